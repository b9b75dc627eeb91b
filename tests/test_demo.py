"""`tokensynth demo`, the README's main job, end to end at a small size: prep -> train ->
synthesis of held-out instruments -> evaluation, with every artifact it promises on disk."""
import glob
import json
import os

import numpy as np
import soundfile

from tokensynth_jax.cli import demo
from tokensynth_jax.cli import main as cli
from tokensynth_jax.inference import synthesize


def test_demo_runs_the_whole_chain(tmp_path, capsys):
    workdir = str(tmp_path / "demo")
    args = ["demo", "--workdir", workdir, "--steps", "12", "--pairs-per-instrument", "3", "--items", "2"]
    assert cli.main(args) == 0

    report = json.load(open(os.path.join(workdir, "eval", "eval.json")))
    rows = {r["task"]: r for r in report["rows"]}
    assert set(rows) == {"cloning", "text"} and all(r["n"] == 2 for r in rows.values())
    for r in rows.values():
        assert r["mss"] > 0 and -1 <= r["clap_score"] <= 1 and 0 <= r["f1"] <= 1
    test_instruments = json.load(open(os.path.join(workdir, "data", "manifest.json")))["instruments"]["test"]["ids"]
    assert set(rows["cloning"]["instruments"]) <= set(test_instruments)  # only instruments never trained on
    assert "| Instrument cloning |" in open(os.path.join(workdir, "eval", "eval.md")).read()

    synth = os.path.join(workdir, "synth")
    for item in report["items"]:
        audio, rate = soundfile.read(os.path.join(synth, f"{item['id']}.wav"))
        assert rate == 32000 and np.all(np.isfinite(audio))
        assert 0 < len(audio) <= (5 + synthesize.RELEASE_SECONDS) * rate  # a 5 s clip's notes, then the release
        assert os.path.isfile(os.path.join(workdir, "plots", f"{item['id']}.png"))
    assert os.path.isfile(os.path.join(workdir, "plots", "loss.png"))
    meta = json.load(open(os.path.join(workdir, "model", "tokensynth.json")))["metadata"]
    assert meta["clap_model"] == "tiny-clap|codec-rate" and meta["codec"]["name"] == "tiny-encodec"

    # The model records which CLAP made its training timbres: another one is refused.
    midi = sorted(glob.glob(os.path.join(synth, "midi", "*.mid")))[0]
    argv = ["synthesize", "--checkpoint", os.path.join(workdir, "model"), "--midi", midi, "--text", "a violin",
            "--clap", "random-larger_clap_music", "--out", str(tmp_path / "x.wav")]
    assert cli.main(argv) == 2
    assert "trained on timbres from CLAP 'tiny-clap'" in capsys.readouterr().err


def test_instrument_text_names_the_gm_program():
    assert demo.instrument_text("sf2:TimGM6mb:000-040") == "a recording of a violin"
