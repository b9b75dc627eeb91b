"""The `tokensynth` command line: init, convert both ways, synthesize, and its errors."""
import os

import numpy as np
import pretty_midi
import pytest
import torch

from tokensynth_jax import checkpoint
from tokensynth_jax.cli import main as cli
from tokensynth_jax.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt") / "model")
    assert cli.main(["init", "--config", TINY, "--seed", "3", out]) == 0
    return out


@pytest.fixture(scope="module")
def embedding(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("emb") / "e.npy")
    np.save(path, np.random.default_rng(0).normal(size=512).astype(np.float32))
    return path


def _midi(path, notes):
    pm = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(program=0)
    inst.notes = [pretty_midi.Note(100, p, s, e) for p, s, e in notes]
    pm.instruments.append(inst)
    pm.write(str(path))
    return str(path)


def test_init_writes_the_config_and_random_weights_label(tiny_ckpt):
    meta = checkpoint.read_metadata(tiny_ckpt)
    assert meta["metadata"]["weights"] == "random-init"
    cfg = ModelConfig.from_dict(meta["model"])
    assert (cfg.num_layers, cfg.d_model, cfg.num_codebooks) == (2, 64, 4)


def test_init_applies_overrides_and_rejects_unknown_fields(tmp_path):
    out = str(tmp_path / "m")
    assert cli.main(["init", "--config", TINY, "--set", "model.num_layers=3", out]) == 0
    assert ModelConfig.from_dict(checkpoint.read_metadata(out)["model"]).num_layers == 3
    assert cli.main(["init", "--config", TINY, "--set", "model.no_such_field=1", str(tmp_path / "x")]) == 2


def test_convert_round_trip_through_official_pt(tiny_ckpt, tmp_path):
    pt = str(tmp_path / "official.pt")
    back = str(tmp_path / "back")
    assert cli.main(["convert", "--to", "official", "--force", tiny_ckpt, pt]) == 0  # tiny: not the official shape
    state = torch.load(pt, weights_only=True)
    assert "blocks.0.attn.mask" in state and bool(state["blocks.0.attn.mask"][0, 0, 5, 3])  # causal: row 5 sees 3
    assert cli.main(["convert", "--from", "official", "--num-heads", "4", pt, back]) == 0
    a, _ = checkpoint.load_model(tiny_ckpt)
    b, meta = checkpoint.load_model(back)
    assert b.cfg == a.cfg
    for x, y in zip(*(jax_leaves(checkpoint.params_to_numpy(m)) for m in (a, b))):
        np.testing.assert_array_equal(x, y)
    assert meta["metadata"]["conversion"]["mask_buffer"] == "causal"


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_convert_rejects_a_state_dict_with_wrong_keys(tmp_path, capsys):
    pt = str(tmp_path / "bad.pt")
    torch.save({"midi_tok_embed.weight": torch.zeros(3, 4)}, pt)
    assert cli.main(["convert", "--from", "official", pt, str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
    assert cli.main(["convert", "--from", "official", str(tmp_path / "none.pt"), str(tmp_path / "o")]) == 2


def test_synthesize_writes_codes_for_several_midi_files(tiny_ckpt, embedding, tmp_path, capsys):
    a = _midi(tmp_path / "a.mid", [(60, 0.1, 0.9), (64, 1.0, 2.0)])
    b = _midi(tmp_path / "b.mid", [(67, 0.2, 0.5)])
    out = str(tmp_path / "codes.npy")
    argv = ["synthesize", "--checkpoint", tiny_ckpt, "--midi", a, b, "--timbre-embedding", embedding,
            "--sampler", "top-k", "--top-k", "5", "--seed", "7", "--max-rows", "40", "--tokens-out", out]
    assert cli.main(argv) == 0
    codes = np.load(out)
    assert codes.shape[0] == 2 and codes.shape[2] == 4
    assert codes.max() < 64 and codes.min() >= -1
    assert cli.main(argv[:-1] + [str(tmp_path / "again.npy")]) == 0
    np.testing.assert_array_equal(codes, np.load(str(tmp_path / "again.npy")))  # seeded
    assert "a.mid: 2 notes" in capsys.readouterr().out
    # runtime fields of the checkpoint's model, set from the command line: the same codes
    knobs = ["--set", "model.decode_attention=pallas_fused", "--set", "model.matvec_as_gemm=true"]
    assert cli.main(argv[:-1] + [str(tmp_path / "fused.npy"), *knobs]) == 0
    np.testing.assert_array_equal(codes, np.load(str(tmp_path / "fused.npy")))


def test_runtime_overrides_read_the_text_as_a_config_override_does():
    """Typed by the field's default, not the checkpoint's value: a checkpoint written with
    loss_chunk=256 and scan_layers=True still takes "auto" and "false"."""
    from tokensynth_jax.cli import checks
    from tokensynth_jax.config import ModelConfig

    cfg = ModelConfig(loss_chunk=256, scan_layers=True)
    got = checks.runtime_overrides(["model.loss_chunk=auto", "model.scan_layers=false", "model.dropout=0.2"], cfg)
    assert got == {"loss_chunk": "auto", "scan_layers": "false", "dropout": 0.2}
    assert cfg.replace(**got).loss_chunk == "auto" and cfg.replace(**got).scan_layers is False


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--text", "a warm cello"], "one way"),  # two timbre sources
        (["--timbre-audio", "x.wav"], "one way"),
        (["--mix", "0.5"], "one way"),
        (["--out", "x.mp3"], "writes WAV files"),
        (["--codec", "tiny-encodec"], "nothing is decoded"),  # codes only: no codec to pick
        (["--spectrogram"], "give --out"),
        (["--guidance-scale", "2"], "null timbre"),
        (["--sampler", "top-k"], "--top-k"),
    ],
)
def test_synthesize_says_clearly_what_is_missing(tiny_ckpt, embedding, tmp_path, capsys, extra, message):
    midi = _midi(tmp_path / "a.mid", [(60, 0.1, 0.9)])
    argv = ["synthesize", "--checkpoint", tiny_ckpt, "--midi", midi, "--timbre-embedding", embedding,
            "--tokens-out", str(tmp_path / "o.npy")] + extra
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_synthesize_reads_an_npz_of_one_embedding_and_refuses_one_of_several(tiny_ckpt, embedding, tmp_path, capsys):
    midi = _midi(tmp_path / "a.mid", [(60, 0.1, 0.9)])
    run = lambda emb, out: cli.main(["synthesize", "--checkpoint", tiny_ckpt, "--midi", midi, "--timbre-embedding",
                                     emb, "--tokens-out", str(tmp_path / out)])
    np.savez(tmp_path / "one.npz", timbre=np.load(embedding))
    assert run(str(tmp_path / "one.npz"), "npz.npy") == 0 and run(embedding, "npy.npy") == 0
    np.testing.assert_array_equal(np.load(tmp_path / "npz.npy"), np.load(tmp_path / "npy.npy"))
    np.savez(tmp_path / "two.npz", a=np.load(embedding), b=np.zeros(3))
    capsys.readouterr()
    assert run(str(tmp_path / "two.npz"), "two.npy") == 2
    assert "two.npz: an .npz archive of 2 arrays (a, b)" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "two.npy")


def test_synthesize_names_the_bad_file(tiny_ckpt, embedding, tmp_path, capsys):
    bad = tmp_path / "notes.mid"
    bad.write_text("not midi")
    argv = ["synthesize", "--checkpoint", tiny_ckpt, "--midi", str(bad), "--timbre-embedding", embedding,
            "--tokens-out", str(tmp_path / "o.npy")]
    assert cli.main(argv) == 2
    assert "notes.mid" in capsys.readouterr().err
    wrong = str(tmp_path / "wrong.npy")
    np.save(wrong, np.zeros(3, np.float32))
    midi = _midi(tmp_path / "a.mid", [(60, 0.1, 0.9)])
    argv = ["synthesize", "--checkpoint", tiny_ckpt, "--midi", midi, "--timbre-embedding", wrong,
            "--tokens-out", str(tmp_path / "o.npy")]
    assert cli.main(argv) == 2
    assert "wrong.npy" in capsys.readouterr().err
    assert cli.main(argv[:2] + [str(tmp_path)] + argv[3:]) == 2  # a directory that is no checkpoint
