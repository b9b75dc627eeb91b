"""The wheel works for someone who is not in the checkout.

Builds the wheel from the working tree, installs it with `[all]` into a fresh virtual environment
(torch's CPU wheel first, as the README says), and from a directory outside the checkout runs
`tokensynth init --config tiny`, a toy `tokensynth demo` and `tokensynth eval` on the demo's
clips. Packaged configs, package data (the example MIDI, the exported-model loader, the
transcription model) and every extra the commands need are checked this way, not by reading
setup.py. Minutes, most of them installing from pip's cache.
"""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_CPU = "torch==2.13.0"  # the CPU wheel on this machine kind; a bare `torch` pulls CUDA wheels


def _run(argv, cwd, env=None, timeout=1800):
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_wheel_installed_outside_the_checkout(tmp_path):
    if shutil.which("git") is None or not os.path.isdir(os.path.join(REPO, ".git")):
        pytest.skip("needs a git checkout to build the wheel from")
    # Build from a copy of the tracked and new files, so the checkout gets no build/ or egg-info.
    src = tmp_path / "src"
    files = _run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO).split("\n")
    for rel in filter(None, files):
        if os.path.isfile(os.path.join(REPO, rel)):
            os.makedirs(src / os.path.dirname(rel), exist_ok=True)
            shutil.copy2(os.path.join(REPO, rel), src / rel)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)], cwd=tmp_path)
    (wheel,) = glob.glob(str(dist / "tokensynth_jax-*.whl"))

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    # --no-compile: byte-compiling torch, jax and the rest up front is a minute of the test; the
    # modules the commands below import are compiled as they are imported, as for any user.
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile"]
    _run(pip + [TORCH_CPU], cwd=tmp_path)
    _run(pip + [f"{wheel}[all]"], cwd=tmp_path)

    elsewhere = tmp_path / "user"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    tokensynth = str(venv / "bin" / "tokensynth")

    # The installed package, not the checkout, answers.
    where = _run([str(venv / "bin" / "python"), "-c", "import tokensynth_jax, tokensynth_prep; "
                  "print(tokensynth_jax.__file__); print(tokensynth_prep.__file__)"], cwd=elsewhere, env=env)
    assert all(str(venv) in line for line in where.split()), where
    assert not (venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" /
                "data_prep").exists()

    # It knows its version, and its metadata carries the README as its description.
    code = ("import importlib.metadata as m; d = m.metadata('tokensynth-jax'); "
            "print(d['Version']); print(d['Description-Content-Type']); print(d.get_payload()[:40])")
    meta = _run([str(venv / "bin" / "python"), "-c", code],
                cwd=elsewhere, env=env).splitlines()
    assert _run([tokensynth, "--version"], cwd=elsewhere, env=env).strip() == f"tokensynth-jax {meta[0]}"
    assert meta[1] == "text/markdown" and meta[2] == "# tokensynth-jax", meta

    out = _run([tokensynth, "init", "--config", "tiny", "init"], cwd=elsewhere, env=env)
    assert "tiny" in out and os.path.isfile(elsewhere / "init" / "tokensynth.json")

    _run([tokensynth, "demo", "--workdir", "demo", "--steps", "6", "--pairs-per-instrument", "2", "--items", "1"],
         cwd=elsewhere, env=env)
    demo = elsewhere / "demo"
    assert os.path.isfile(demo / "eval" / "eval.md")

    # `tokensynth eval` on what the demo produced: its generated clips against their MIDI.
    items = []
    for midi in sorted(glob.glob(str(demo / "synth" / "midi" / "*.mid"))):
        pair = os.path.splitext(os.path.basename(midi))[0][:8]
        for wav in sorted(glob.glob(str(demo / "synth" / f"cloning-*{pair}*.wav"))):
            clip = os.path.basename(wav)[len("cloning-"):-len(".wav")]
            items.append({"id": f"cloning-{clip}", "task": "cloning", "generated": wav, "midi": midi,
                          "target": str(demo / "synth" / f"target-{clip}.wav"),
                          "reference": str(demo / "synth" / f"reference-{clip}.wav")})
    assert items, sorted(os.listdir(demo / "synth"))
    with open(elsewhere / "items.jsonl", "w") as f:
        f.writelines(json.dumps(item) + "\n" for item in items)
    _run([tokensynth, "eval", "items.jsonl", "--clap", "none", "--out", "scores"], cwd=elsewhere, env=env)
    report = json.load(open(elsewhere / "scores" / "eval.json"))
    assert len(report["items"]) == len(items) and all(0 <= item["f1"] <= 1 for item in report["items"])
