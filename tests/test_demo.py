"""`tokensynth demo`, the README's main job, end to end at a small size: prep -> train -> synthesis of
held-out instruments on held-out MIDI -> evaluation, with every artifact it promises on disk and the
offline encoders (`demo-melrvq`, `demo-spectral`) named wherever numbers are shown."""
import glob
import json
import os
import pathlib

import jax
import numpy as np
import pytest
import soundfile

from tokensynth_jax import checkpoint
from tokensynth_jax.cli import demo
from tokensynth_jax.cli import main as cli
from tokensynth_jax.inference import synthesize


@pytest.mark.slow
def test_demo_runs_the_whole_chain(tmp_path, capsys):
    workdir = str(tmp_path / "demo")
    args = ["demo", "--workdir", workdir, "--steps", "12", "--pairs-per-instrument", "3", "--items", "2",
            "--programs", "0,11,24,32,40,56,71,73"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "skipping text-to-instrument: demo-spectral embeds reference audio only" in out

    manifest = json.load(open(os.path.join(workdir, "data", "manifest.json")))
    assert manifest["codec"]["name"] == "demo-melrvq" and os.path.isfile(os.path.join(workdir, "data", manifest["codec"]["state"]))
    report = json.load(open(os.path.join(workdir, "eval", "eval.json")))
    rows = {(r["task"], r["model"]): r for r in report["rows"]}
    assert set(rows) == {("cloning", "tokensynth"), ("cloning", "rendered target"), ("cloning", "codec round trip")}
    assert all(r["n"] == 2 for r in rows.values())
    for r in rows.values():
        assert r["mss"] >= 0 and -1 <= r["clap_score"] <= 1 and 0 <= r["f1"] <= 1
    assert rows["cloning", "rendered target"]["f1"] > 0.5  # the ceiling: the targets play their notes
    test_instruments = manifest["instruments"]["test"]["ids"]
    assert set(rows["cloning", "tokensynth"]["instruments"]) <= set(test_instruments)  # never trained on
    md = open(os.path.join(workdir, "eval", "eval.md")).read()
    assert "Codec: `demo-melrvq`" in md and "Timbre embedder: `demo-spectral`" in md and "| Instrument cloning |" in md
    assert "Text-to-instrument: skipped" in md

    synth = os.path.join(workdir, "synth")
    clips = sorted(os.path.basename(p)[len("target-"):-4] for p in glob.glob(os.path.join(synth, "target-*.wav")))
    assert len(clips) == 2
    generated = []
    for clip in clips:
        for kind in ("target", "reference", "cloning", "codec-round-trip"):
            audio, rate = soundfile.read(os.path.join(synth, f"{kind}-{clip}.wav"))
            longest = 5 + (synthesize.RELEASE_SECONDS if kind == "cloning" else 0.1)  # the MIDI's length, plus the release
            assert rate == 16000 and 0 < len(audio) <= longest * rate and np.all(np.isfinite(audio)), (kind, clip)
            # No WAV clips in a player; the ones that would have are named, at the ceiling.
            peak = synthesize.peak_dbfs(audio)
            assert peak <= demo.LISTENING_PEAK_DBFS + 1e-4, (kind, clip)
            if f"{kind}-{clip}.wav" in report["settings"]["wavs_scaled_db"]:
                assert peak == pytest.approx(demo.LISTENING_PEAK_DBFS, abs=1e-4)
            if kind == "cloning":
                generated.append(audio)
        assert os.path.isfile(os.path.join(workdir, "plots", f"{clip}.png"))  # target | generated
    assert not np.array_equal(*(g[: min(map(len, generated))] for g in generated))  # clips differ
    # The silent ones (the model wrote the quietest loudness code throughout) are named in the report.
    assert report["settings"]["silent_generated"] == {"cloning": demo.silent_clips(clips, generated)}
    assert os.path.isfile(os.path.join(workdir, "plots", "loss.png"))
    meta = json.load(open(os.path.join(workdir, "model", "tokensynth.json")))["metadata"]
    assert meta["clap_model"] == "demo-spectral|codec-rate"
    # The fitted codec travels with the checkpoint: its state is copied in and named relative to it.
    assert meta["codec"]["name"] == "codec/demo-melrvq.npz" and meta["codec"]["fit"] == manifest["codec"]["fit"]
    assert open(os.path.join(workdir, "model", "codec", "demo-melrvq.npz"), "rb").read() == \
        open(os.path.join(workdir, "data", "codec", "demo-melrvq.npz"), "rb").read()

    # The model records which embedder made its training timbres: another one is refused, and this
    # one has no text side.
    midi = sorted(glob.glob(os.path.join(synth, "midi", "*.mid")))[0]
    argv = ["synthesize", "--checkpoint", os.path.join(workdir, "model"), "--midi", midi, "--text", "a violin",
            "--out", str(tmp_path / "x.wav")]
    assert cli.main(argv + ["--clap", "tiny-clap"]) == 2
    assert "trained on timbres from CLAP 'demo-spectral'" in capsys.readouterr().err
    assert cli.main(argv) == 2
    assert "text-to-instrument needs a CLAP checkpoint" in capsys.readouterr().err
    # From a reference recording it synthesizes, decoding with the codec the checkpoint names.
    argv = ["synthesize", "--checkpoint", os.path.join(workdir, "model"), "--midi", midi,
            "--timbre-audio", os.path.join(synth, f"reference-{clips[0]}.wav"), "--out", str(tmp_path / "y.wav")]
    assert cli.main(argv) == 0 and soundfile.info(str(tmp_path / "y.wav")).samplerate == 16000
    # Naming the prep output's copy of the same fit is the same codec; any other codec is refused.
    data_state = os.path.join(workdir, "data", "codec", "demo-melrvq.npz")
    assert cli.main(argv + ["--overwrite", "--codec", data_state]) == 0
    assert cli.main(argv + ["--overwrite", "--codec", "tiny-encodec"]) == 2
    assert "the model writes" in capsys.readouterr().err
    # Without --config, inference-checkpoint takes the model and codec the run recorded (run.json):
    # the demo's sizes are set at run time, so configs/demo.py alone does not fit its checkpoints.
    again = str(tmp_path / "again")
    assert cli.main(["inference-checkpoint", os.path.join(workdir, "train"), again]) == 0
    ours, theirs = (checkpoint.load_model(d) for d in (again, os.path.join(workdir, "model")))
    assert ours[1]["model"] == theirs[1]["model"] and ours[1]["metadata"]["codec"] == theirs[1]["metadata"]["codec"]
    for x, y in zip(*(jax.tree.leaves(checkpoint.params_to_numpy(m)) for m, _ in (ours, theirs))):
        assert x.tobytes() == y.tobytes()
    state = pathlib.Path(workdir, "model", "codec", "demo-melrvq.npz").read_bytes()
    assert pathlib.Path(again, "codec", "demo-melrvq.npz").read_bytes() == state
    capsys.readouterr()
    assert cli.main(["inference-checkpoint", "--config", "demo", os.path.join(workdir, "train"), str(tmp_path / "no")]) == 2
    assert "--config demo: model.max_len is 640, the run trained" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "no")
    # The fitted codec goes along through safetensors and back, and into an export: what comes back
    # synthesizes the same WAV. The tensors file is as readable as its config (safetensors 0.8 left it 0600).
    st, back, exported = (str(tmp_path / name) for name in ("st", "back", "exported"))
    assert cli.main(["convert", "--to", "safetensors", os.path.join(workdir, "model"), st]) == 0
    assert cli.main(["convert", "--from", "safetensors", st, back]) == 0
    assert cli.main(["export", "--checkpoint", back, exported, "--max-rows", "16", "--platforms", "cpu"]) == 0
    for folder in (st, back, exported):
        assert pathlib.Path(folder, "codec", "demo-melrvq.npz").read_bytes() == state, folder
    assert json.loads(pathlib.Path(exported, "export.json").read_text())["codec"]["name"] == "codec/demo-melrvq.npz"
    mode = lambda name: os.stat(os.path.join(st, name)).st_mode & 0o777
    assert mode("model.safetensors") == mode("config.json")
    argv[argv.index("--checkpoint") + 1] = back
    argv[-1] = str(tmp_path / "z.wav")
    assert cli.main(argv) == 0
    assert soundfile.read(str(tmp_path / "z.wav"))[0].tobytes() == soundfile.read(str(tmp_path / "y.wav"))[0].tobytes()


def test_silent_generated_clips_are_named_in_the_report_preamble():
    rate = 16000
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)
    quiet = np.full(rate, 0.5 * demo.SILENT_PEAK)
    names = demo.silent_clips(["a", "b", "c", "d"], [tone, np.zeros(rate), quiet, np.zeros(0)])
    assert names == ["b", "c", "d"]
    codec = {"name": "demo-melrvq", "num_codebooks": 4, "codebook_size": 256, "frame_rate": 25.0, "sample_rate": rate}
    clips = [{"instrument": "sf2:x:000-000"}] * 4
    md = demo._preamble(codec, "demo-spectral", False, clips, True, {"cloning": names}, {})
    assert "Silent (cloning): 3 of 4 generated clips peak below -60 dBFS (b, c, d)" in md and "Scaled" not in md
    md = demo._preamble(codec, "demo-spectral", False, clips, True, {"cloning": []}, {"cloning-a.wav": -13.52})
    assert "Silent" not in md
    assert "Scaled for listening: cloning-a.wav by -13.5 dB. These WAVs in synth/ peaked above full scale" in md


def test_instrument_text_names_the_gm_program():
    assert demo.instrument_text("sf2:TimGM6mb:000-040") == "a recording of a violin"


@pytest.mark.slow  # ~35 s: a small demo end to end
def test_a_demo_of_few_programs_holds_one_out_as_test_and_trains_without_a_valid_split(tmp_path, capsys):
    """`--programs` with fewer than 6 programs held none out as test (a traceback after training), and
    fewer than 8 none as valid (train stopped on the missing valid/ folder); one program is an error."""
    workdir = str(tmp_path / "demo")
    assert cli.main(["demo", "--workdir", workdir, "--programs", "0,40", "--steps", "1", "--pairs-per-instrument", "2",
                     "--items", "1"]) == 0
    with open(os.path.join(workdir, "data", "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["records"] == {"test": 2, "train": 2}
    with open(os.path.join(workdir, "eval", "eval.json")) as f:
        rows = {(r["task"], r["model"]): r for r in json.load(f)["rows"]}
    assert rows["cloning", "tokensynth"]["instruments"] == manifest["instruments"]["test"]["ids"]
    capsys.readouterr()
    assert cli.main(["demo", "--workdir", str(tmp_path / "one"), "--programs", "40"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--programs 40: the demo holds at least one program out" in err[0]
    assert not os.path.exists(tmp_path / "one")
