"""`tokensynth export`: the exported generation function, reloaded in a process that never imports
tokensynth_jax, gives the tokens of in-process `sampling.generate`; it is lowered for cpu, cuda and
tpu with a symbolic batch; the loader script runs the example prompt the command writes."""
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import write_midi

from tokensynth_jax import checkpoint
from tokensynth_jax.cli import main as cli
from tokensynth_jax.inference import export, sampling
from tokensynth_jax.tokens import token_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
MAX_ROWS = 24
SEED = 5
MAX_LEN = 128  # positions of the exported tiny model
# MIDI token counts per item: different lengths exercise the left padding; 110 tokens leave
# MAX_LEN - 2 - 110 = 16 < MAX_ROWS rows, so that item stops at its own length cap.
LENGTHS = (110, 8, 33)


def _run_without_package(script: str, cwd) -> str:
    """Runs `script` in a fresh interpreter that must not import tokensynth_jax (nor flax)."""
    guard = "\nimport sys\nassert 'tokensynth_jax' not in sys.modules and 'flax' not in sys.modules, sorted(sys.modules)\n"
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script) + guard], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint dir, export dir, MIDI files) of a tiny random model exported with top-p."""
    root = tmp_path_factory.mktemp("export")
    ckpt, out = str(root / "model"), str(root / "exported")
    assert cli.main(["init", "--config", TINY, "--set", f"model.max_len={MAX_LEN}", "--seed", "4", ckpt]) == 0
    midi = [str(root / "a.mid"), str(root / "b.mid")]
    write_midi(midi[0], [(0, False, [(0.1, 0.6, 60, 90), (0.5, 1.2, 64, 40)])])
    write_midi(midi[1], [(33, False, [(0.0, 2.0, 40, 127)] + [(0.2 * i, 0.2 * i + 0.1, 70 + i, 60) for i in range(9)])])
    emb = str(root / "timbre.npy")
    np.save(emb, np.random.default_rng(1).normal(size=(2, 512)).astype(np.float32))
    assert cli.main(["export", "--checkpoint", ckpt, out, "--sampler", "top-p", "--top-p", "0.8",
                     "--max-rows", str(MAX_ROWS), "--example-midi", *midi, "--example-timbre", emb]) == 0
    return ckpt, out, midi


def test_reloaded_without_the_package_gives_the_in_process_tokens(exported, tmp_path):
    ckpt, out, _ = exported
    rng = np.random.default_rng(0)
    tokens = [rng.integers(1, token_layout.MIDI_VOCAB_SIZE, n).astype(np.int32) for n in LENGTHS]
    timbre = rng.normal(size=(len(LENGTHS), 512)).astype(np.float32)
    midi, lengths = export.pad_tokens(tokens)
    np.savez(tmp_path / "inputs.npz", midi=midi, lengths=lengths, timbre=timbre)
    _run_without_package(f"""
        import sys
        import numpy as np
        sys.path.insert(0, {out!r})
        from load_exported import ExportedGenerator
        gen = ExportedGenerator({out!r})
        inputs = np.load("inputs.npz")
        for n in (1, 3):
            result = gen(inputs["midi"][:n], inputs["lengths"][:n], inputs["timbre"][:n], seed={SEED})
            np.savez(f"out{{n}}.npz", **result)
        try:  # bad input is a clear error before anything reaches XLA
            gen(inputs["midi"][:1], [inputs["midi"].shape[1] + 1], inputs["timbre"][:1])
            raise AssertionError("a length past the prompt width was accepted")
        except ValueError as e:
            assert "lengths must lie in" in str(e), e
    """, cwd=tmp_path)

    model, _ = checkpoint.load_model(ckpt)
    for n in (1, 3):
        ours = sampling.generate(model, tokens[:n], timbre[:n], sampler=sampling.TopP(0.8), seed=SEED, max_rows=MAX_ROWS)
        theirs = np.load(tmp_path / f"out{n}.npz")
        for field in ("codes", "num_frames", "ended", "rows", "num_rows"):
            np.testing.assert_array_equal(theirs[field], getattr(ours, field), err_msg=f"batch {n}: {field}")
    assert list(ours.num_rows) == [16, MAX_ROWS, MAX_ROWS]  # item 0 stopped at its own cap
    assert len(np.unique(ours.codes[:, :10].reshape(3, -1), axis=0)) == 3  # items differ: per-item keys


def test_artifact_is_lowered_for_cpu_cuda_tpu_with_a_symbolic_batch(exported):
    _, out, _ = exported
    with open(os.path.join(out, export.EXPORTED_FILE), "rb") as f:
        exp = jax.export.deserialize(bytearray(f.read()))
    assert exp.platforms == ("cpu", "cuda", "tpu")
    args, _ = jax.tree_util.tree_unflatten(exp.in_tree, exp.in_avals)
    params, midi, lengths, timbre, key_data = args
    assert all(jax.export.is_symbolic_dim(d) for d in midi.shape)  # batch b and MIDI width m
    assert midi.shape[0] == lengths.shape[0] == timbre.shape[0]
    assert (key_data.shape, key_data.dtype) == ((2,), np.uint32)
    with np.load(os.path.join(out, export.PARAMS_FILE)) as npz:
        assert set(npz.files) == set(params)
        assert all(npz[n].shape == params[n].shape for n in npz.files)
    assert os.path.getsize(os.path.join(out, export.EXPORTED_FILE)) < 1_000_000  # weights are not baked in
    meta = json.load(open(os.path.join(out, export.META_FILE)))
    assert meta["platforms"] == ["cpu", "cuda", "tpu"] and meta["jax_version"] == jax.__version__
    assert meta["tokensynth_jax_version"] == importlib.metadata.version("tokensynth-jax")
    assert meta["sampler"] == {"kind": "TopP", "p": 0.8, "temperature": 1.0, "reference_quirks": False,
                               "method": sampling.filter_method("auto")}
    assert meta["outputs"][0]["shape"] == ["b", MAX_ROWS - 4 + 1, 4]
    assert meta["codec"]["name"] == "tiny-encodec"
    assert meta["example_prompt"] == {"file": export.EXAMPLE_PROMPT_FILE, "midi_files": exported[2],
                                      "tokenizer": "tokensynth-jax", "timbre": os.path.join(os.path.dirname(out),
                                                                                            "timbre.npy")}


def test_loader_script_runs_the_example_prompt_from_midi_files(exported, tmp_path):
    ckpt, out, midi_files = exported
    script = os.path.join(out, export.LOADER_FILE)
    codes = str(tmp_path / "codes.npz")
    _run_without_package(f"""
        import runpy, sys
        sys.argv = [{script!r}, {out!r}, "--prompt", {os.path.join(out, export.EXAMPLE_PROMPT_FILE)!r},
                    "--seed", "2", "--out", {codes!r}]
        try:
            runpy.run_path({script!r}, run_name="__main__")
        except SystemExit as e:
            assert e.code == 0, e.code
    """, cwd=tmp_path)
    model, _ = checkpoint.load_model(ckpt)
    emb = np.load(os.path.join(out, export.EXAMPLE_PROMPT_FILE))["timbre"]
    from tokensynth_jax.tokens import midi_tokens

    tokens = [midi_tokens.tokenize_midi(p).tokens for p in midi_files]
    ours = sampling.generate(model, tokens, emb, sampler=sampling.TopP(0.8), seed=2, max_rows=MAX_ROWS)
    np.testing.assert_array_equal(np.load(codes)["codes"], ours.codes)


def test_the_loader_scripts_mistakes_are_one_line_and_exit_2(exported, tmp_path):
    """A missing prompt file, a folder that is no export, and a Python without flatbuffers (which
    jax needs to read an export but does not install) end in one line, not a traceback."""
    _, out, _ = exported
    script = os.path.join(out, export.LOADER_FILE)
    prompt = os.path.join(out, export.EXAMPLE_PROMPT_FILE)
    blocked = "sys.modules['flatbuffers'] = None\n"
    cases = [([out, "--prompt", str(tmp_path / "none.npz")], "", "No such file or directory"),
             ([str(tmp_path), "--prompt", prompt], "", "not a tokensynth export (no export.json)"),
             ([out, "--prompt", prompt], blocked, "needs the flatbuffers package")]
    for argv, setup, message in cases:
        code = f"import runpy, sys\n{setup}sys.argv = {[script, *argv]!r}\nrunpy.run_path({script!r}, run_name='__main__')"
        run = subprocess.run([sys.executable, "-c", code],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1 and message in lines[0], (argv, run.stderr)
        assert lines[0].startswith("load_exported.py: error: ")


def test_bad_export_requests_are_clear_errors(exported, tmp_path, capsys):
    ckpt, _, midi_files = exported
    assert cli.main(["export", "--checkpoint", ckpt, str(tmp_path / "x"), "--max-rows", "3"]) == 2
    assert "--max-rows 3 is fewer than the 4 rows" in capsys.readouterr().err
    assert cli.main(["export", "--checkpoint", ckpt, str(tmp_path / "x"), "--platforms", "cpu,gpu"]) == 2
    assert "unknown platforms ['gpu']" in capsys.readouterr().err
    assert cli.main(["export", "--checkpoint", str(tmp_path / "none"), str(tmp_path / "x")]) == 2
    assert "not a tokensynth-jax checkpoint" in capsys.readouterr().err


def test_the_exported_loop_uses_the_portable_attention_whatever_the_config_says():
    """A model configured for the fused kernels (cuDNN, Pallas decode) exports XLA's attention:
    the artifact must lower for every platform and serialize without per-platform custom calls."""
    from tokensynth_jax.config import ModelConfig

    cfg = ModelConfig(num_layers=1, d_model=32, num_heads=2, num_codebooks=4, codebook_size=17, max_len=64,
                      timbre_dim=8, timbre_hidden=16, dtype="bfloat16", attention_impl="cudnn",
                      decode_attention="pallas_gpu")
    _, _, specs = export.safetensors_format.param_structure(cfg)
    args = ({n: jax.ShapeDtypeStruct(shape, dtype) for n, (shape, dtype) in specs.items()},
            jax.ShapeDtypeStruct((2, 7), np.int32), jax.ShapeDtypeStruct((2,), np.int32),
            jax.ShapeDtypeStruct((2, 8), np.float32), jax.ShapeDtypeStruct((2,), np.uint32))
    jaxpr = str(jax.make_jaxpr(export.make_generate_fn(cfg, sampling.TopP(0.9), 8))(*args))
    assert "pallas_call" not in jaxpr and "cudnn" not in jaxpr and "dot_product_attention" not in jaxpr


def test_a_model_with_bfloat16_weights_runs_from_its_export(tmp_path):
    """numpy has no bfloat16, so params.npz holds such weights as raw 2-byte records; the loader
    passed them on as they were and the exported call failed with a TypeError traceback."""
    ckpt, out = str(tmp_path / "model"), str(tmp_path / "exported")
    assert cli.main(["init", "--config", TINY, "--set", f"model.max_len={MAX_LEN}", "--set", "model.param_dtype=bfloat16",
                     "--seed", "3", ckpt]) == 0
    assert cli.main(["export", "--checkpoint", ckpt, out, "--sampler", "top-k", "--top-k", "5", "--temperature", "0.7",
                     "--max-rows", "8", "--platforms", "cpu"]) == 0
    rng = np.random.default_rng(2)
    tokens = [rng.integers(1, token_layout.MIDI_VOCAB_SIZE, n).astype(np.int32) for n in (12, 4)]
    timbre = rng.normal(size=(2, 512)).astype(np.float32)
    midi, lengths = export.pad_tokens(tokens)
    np.savez(tmp_path / "inputs.npz", midi=midi, lengths=lengths, timbre=timbre)
    _run_without_package(f"""
        import sys
        import numpy as np
        sys.path.insert(0, {out!r})
        from load_exported import ExportedGenerator
        inputs = np.load("inputs.npz")
        np.savez("out.npz", **ExportedGenerator({out!r})(inputs["midi"], inputs["lengths"], inputs["timbre"], seed=1))
    """, cwd=tmp_path)
    model, _ = checkpoint.load_model(ckpt)
    ours = sampling.generate(model, tokens, timbre, sampler=sampling.TopK(5, 0.7), seed=1, max_rows=8)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npz")["codes"], ours.codes)
