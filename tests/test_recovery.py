"""Faults a long run must survive: damaged checkpoints and shards, a kill -9, each found and named.

A damaged newest checkpoint (a truncated array file, a deleted metadata file, a deleted data-
iterator file) makes the run resume from the previous one with the losses of an uninterrupted run;
`checkpoint verify` finds the same damage offline; a truncated shard is named in one line; after
a SIGKILL and a resume every step is in metrics.jsonl (and TensorBoard) exactly once, and the
trainer's own log lines reach the console.
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from tokensynth_jax import checkpoint
from tokensynth_jax.cli import main as cli
from tokensynth_jax.config import ModelConfig, load_config_file
from tokensynth_jax.training import input_pipeline, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_input_pipeline import _write_shards  # noqa: E402

# Orbax leaves unawaited read coroutines behind when a read of a damaged file fails.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("shards"))
    _write_shards(d, num_shards=2, per_shard=10, frames=(20, 60), codebook_size=64, codebooks=4)
    return d


def _config(shards, **train_fields):
    overrides = {"data.paths": shards, "train.log_every": 1, "train.eval_every": 0, "train.checkpoint_every": 2}
    overrides.update({f"train.{k}": v for k, v in train_fields.items()})
    return load_config_file(TINY, overrides)


def _metric_steps(workdir):
    return [json.loads(x)["step"] for x in open(os.path.join(workdir, "metrics.jsonl"))]


def _losses(workdir):
    return {x["step"]: x["loss"] for x in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    """(losses of 4 uninterrupted steps, their workdir, with checkpoints 2 and 4)."""
    workdir = str(tmp_path_factory.mktemp("runs") / "straight")
    train.train(_config(shards, steps=4), workdir)
    return _losses(workdir), workdir


def _largest_array_file(step_dir):
    with open(os.path.join(step_dir, checkpoint.STEP_FILE_LIST)) as f:
        files = json.load(f)["files"]
    return max((k for k in files if k.startswith("state/ocdbt")), key=lambda k: files[k]["bytes"])


def _damage(step_dir, how):
    """Damages a saved step; returns the file it names (relative to the step)."""
    if how == "truncated array file":
        rel = _largest_array_file(step_dir)
        path = os.path.join(step_dir, rel)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "deleted metadata file":
        rel = "state/_METADATA"
        os.remove(os.path.join(step_dir, rel))
    else:
        rel = "data/process_0-of-1.json"
        os.remove(os.path.join(step_dir, rel))
    return rel


def _copy(stopped, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(stopped, workdir)
    return workdir, os.path.join(workdir, "checkpoints")


@pytest.mark.parametrize("how", ["truncated array file", "deleted metadata file", "deleted iterator file"])
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(runs, shards, tmp_path, how):
    straight, stopped = runs
    workdir, ckpts = _copy(stopped, tmp_path)
    rel = _damage(os.path.join(ckpts, "4"), how)
    (step4, problems4), (step2, problems2) = checkpoint.verify(workdir)
    assert (step4, step2, problems2) == ("step 4", "step 2", []) and problems4[0].startswith(rel)
    train.train(_config(shards, steps=4), workdir)  # steps 3 and 4 again, from checkpoint 2
    assert _losses(workdir) == straight  # resumed from step 2 with its data position
    assert _metric_steps(workdir) == [1, 2, 3, 4]  # the first run's lines of steps 3 and 4 were dropped
    assert sorted(os.listdir(ckpts)) == ["2", "4", "4.damaged"]  # moved aside, never deleted
    assert checkpoint.verify(ckpts) == [("step 4", []), ("step 2", [])]


def test_require_latest_checkpoint_refuses_to_fall_back(runs, shards, tmp_path):
    _, stopped = runs
    workdir, ckpts = _copy(stopped, tmp_path)
    _damage(os.path.join(ckpts, "4"), "deleted metadata file")
    with pytest.raises(checkpoint.CheckpointError, match=r"step 4, is damaged: state/_METADATA is missing;"
                                                         r" train.require_latest_checkpoint") as info:
        train.train(_config(shards, steps=4, require_latest_checkpoint=True), workdir)
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(ckpts)) == ["2", "4"]  # nothing moved


def test_no_intact_checkpoint_stops_with_one_line_and_exit_2(runs, shards, tmp_path, capsys):
    _, stopped = runs
    workdir, ckpts = _copy(stopped, tmp_path)
    _damage(os.path.join(ckpts, "4"), "deleted iterator file")
    _damage(os.path.join(ckpts, "2"), "truncated array file")
    argv = ["train", "--config", TINY, "--workdir", workdir, f"--config.data.paths={shards}",
            "--config.train.steps=4", "--config.train.eval_every=0"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("\n")
    assert err.splitlines()[-1].startswith(f"tokensynth train: error: {ckpts}: no intact checkpoint (step 4: "
                                           "data/process_0-of-1.json is missing; step 2: state/ocdbt.process_0/d/")
    assert sorted(os.listdir(ckpts)) == ["2", "4"]


def test_inference_checkpoint_of_a_damaged_step_is_one_line(runs, tmp_path, capsys):
    _, stopped = runs
    workdir, ckpts = _copy(stopped, tmp_path)
    rel = _damage(os.path.join(ckpts, "4"), "truncated array file")
    assert cli.main(["inference-checkpoint", "--config", TINY, workdir, str(tmp_path / "m")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"tokensynth inference-checkpoint: error: {ckpts}: step 4 is damaged: {rel} has ")
    assert last.endswith("(truncated); `tokensynth checkpoint verify` lists the intact steps")
    assert cli.main(["inference-checkpoint", "--config", TINY, "--step", "2", workdir, str(tmp_path / "m")]) == 0


def test_checkpoint_verify_command(runs, tmp_path, capsys):
    _, stopped = runs
    workdir, ckpts = _copy(stopped, tmp_path)
    assert cli.main(["checkpoint", "verify", workdir]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{workdir} step 4: ok", f"{workdir} step 2: ok"]
    # A flipped byte keeps the size: only the sha256 finds it.
    path = os.path.join(ckpts, "2", _largest_array_file(os.path.join(ckpts, "2")))
    with open(path, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert cli.main(["checkpoint", "verify", "--sizes-only", ckpts]) == 0
    capsys.readouterr()
    assert cli.main(["checkpoint", "verify", ckpts]) == 2
    out, err = capsys.readouterr()
    rel = os.path.relpath(path, os.path.join(ckpts, "2"))
    assert f"step 2: DAMAGED: {rel} has changed since it was written (sha256 differs)" in out
    assert err.strip() == f"tokensynth checkpoint verify: error: {ckpts}: step 2 damaged"
    assert cli.main(["checkpoint", "verify", str(tmp_path / "nothing")]) == 2
    assert "neither a model checkpoint" in capsys.readouterr().err


def test_checkpoints_without_file_lists_are_checked_by_reading_them(runs, tmp_path):
    """Steps saved before file lists existed: a truncated array file fails the read."""
    _, stopped = runs
    workdir, ckpts = _copy(stopped, tmp_path)
    array_file = os.path.join(ckpts, "4", _largest_array_file(os.path.join(ckpts, "4")))
    for step in ("2", "4"):
        os.remove(os.path.join(ckpts, step, checkpoint.STEP_FILE_LIST))
    assert checkpoint.verify(workdir) == [("step 4", []), ("step 2", [])]
    with open(array_file, "r+b") as f:
        f.truncate(os.path.getsize(array_file) // 2)
    (problem,) = checkpoint.verify(workdir)[0][1]
    assert problem.startswith("state: arrays unreadable (ValueError: OUT_OF_RANGE")


def test_model_checkpoint_verify(tmp_path, capsys):
    model_dir = str(tmp_path / "m")
    assert cli.main(["init", "--config", TINY, model_dir]) == 0
    assert cli.main(["checkpoint", "verify", model_dir]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{model_dir} model: ok"
    meta = checkpoint.read_metadata(model_dir)
    rel = max(meta["files"], key=lambda k: meta["files"][k]["bytes"])
    with open(os.path.join(model_dir, rel), "r+b") as f:
        f.truncate(10)
    assert cli.main(["checkpoint", "verify", model_dir]) == 2
    assert f"model: DAMAGED: {rel} has 10 bytes" in capsys.readouterr().out
    with pytest.raises(checkpoint.CheckpointError, match=f"^{model_dir}: damaged checkpoint: {rel} has 10 bytes"):
        checkpoint.load_model(model_dir)


def test_truncated_shard_is_named(tmp_path):
    d = str(tmp_path / "shards")
    os.makedirs(d)
    _write_shards(d, num_shards=3, per_shard=4)
    bad = os.path.join(d, "shard-00001.array_record")
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    cfg = load_config_file(TINY, {"data.paths": d})
    with pytest.raises(input_pipeline.DataError, match=f"^{bad}: not a readable ArrayRecord shard") as info:
        input_pipeline.make_dataset(input_pipeline.PipelineConfig((d,), global_batch=2, seq_len=64),
                                    ModelConfig.from_dict(cfg.model.to_dict()))
    assert "\n" not in str(info.value)


def test_shard_sidecar_size_count_and_sha256(tmp_path):
    """A shard with prep's sidecar is checked against it: count and size always, sha256 on request."""
    from tokensynth_prep import sink

    d = str(tmp_path)
    raw = [r.to_bytes() for r in _write_shards(d, num_shards=1, per_shard=5).values()]
    summary = sink.write_shard(d, "train", 0, 1, list(zip("abcde", raw)), [], "fp")
    path = os.path.join(d, summary["shard"])
    input_pipeline.verify_shards([path], sha256=True)
    with open(path, "r+b") as f:  # flip a byte in the middle of a record: the footer still parses
        f.seek(summary["bytes"] // 3)
        byte = f.read(1)
        f.seek(summary["bytes"] // 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    input_pipeline.verify_shards([path])  # sizes and counts cannot see it
    with pytest.raises(input_pipeline.DataError, match=f"^{path}: sha256 differs from the one prep wrote"):
        input_pipeline.verify_shards([path], sha256=True)
    with open(path, "ab") as f:  # appended bytes: the footer is no longer at the end
        f.write(b"x")
    with pytest.raises(input_pipeline.DataError, match=f"^{path}: not a readable ArrayRecord shard"):
        input_pipeline.verify_shards([path])
    writer = ArrayRecordWriter(path, "group_size:1")  # a readable shard, but not the one prep wrote
    for data in raw[:4]:
        writer.write(data)
    writer.close()
    with pytest.raises(input_pipeline.DataError, match=f"^{path}: 4 records in .* bytes, prep wrote 5 records"):
        input_pipeline.verify_shards([path])


def test_truncate_metrics_keeps_steps_up_to_the_resume_and_drops_a_half_written_line(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    lines = [json.dumps({"step": s, "split": split, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4) for split in ("train", "eval")]
    with open(path, "w") as f:
        f.writelines(lines)
        f.write('{"step": 5, "split": "tr')  # killed mid-write
    assert train.truncate_metrics(path, 2) == 5
    with open(path) as f:
        assert f.read() == "".join(lines[:4])
    assert train.truncate_metrics(path, 2) == 0 and train.truncate_metrics(str(tmp_path / "none.jsonl"), 0) == 0


@pytest.mark.slow
def test_kill_9_then_resume_writes_every_step_once(shards, tmp_path):
    """A real `tokensynth train` killed with SIGKILL after step 7 (checkpoints every 3 steps), then
    resumed: metrics.jsonl and the TensorBoard scalars hold each step once, and the resume's
    "resumed from step K" line reaches the console."""
    from tensorboard.backend.event_processing import event_accumulator

    workdir = str(tmp_path / "k")
    cmd = [sys.executable, "-m", "tokensynth_jax.cli", "train", "--config", TINY, "--workdir", workdir,
           f"--config.data.paths={shards}", "--config.train.log_every=1", "--config.train.checkpoint_every=3",
           "--config.train.eval_every=0"]
    proc = subprocess.Popen([*cmd, "--config.train.steps=100000"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    deadline, seen = time.time() + 120, []
    for line in proc.stdout:
        seen.append(line)
        if "[train] step 7:" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = max(_metric_steps(workdir))
    assert killed_at >= 7, "".join(seen)
    out = subprocess.run([*cmd, "--config.train.steps=10"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr
    resumed = int(out.stderr.split("resumed from step ")[1].split()[0])
    assert resumed in (3, 6) and resumed < killed_at
    assert "tokensynth.train INFO devices: " in out.stderr and "train step memory (MB)" in out.stderr
    assert _metric_steps(workdir) == list(range(1, 11))
    acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 11))
    np.testing.assert_allclose([e.value for e in acc.Scalars("train/loss")],
                               [_losses(workdir)[s] for s in range(1, 11)], rtol=1e-6)


def test_resuming_with_another_model_is_one_line_and_keeps_the_runs_record(runs, shards, tmp_path):
    """In a process of its own, so that log lines on stderr count: the run's INFO line came before the
    error, and run.json (which inference-checkpoint reads) was rewritten with the refused model."""
    _, stopped = runs
    workdir, _ = _copy(stopped, tmp_path)
    record = os.path.join(workdir, "run.json")
    before = pathlib.Path(record).read_text()
    out = subprocess.run([sys.executable, "-m", "tokensynth_jax.cli", "train", "--config", TINY, "--workdir", workdir,
                          f"--config.data.paths={shards}", "--config.model.num_layers=3", "--config.train.steps=6",
                          "--config.train.eval_every=0"], capture_output=True, text=True, timeout=300, check=False)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("tokensynth train: error: "), out.stderr
    assert lines[0].endswith("model.num_layers is 3, the run trained 2 (its run.json); resume with the run's model, "
                             "or train in another --workdir"), lines[0]
    assert pathlib.Path(record).read_text() == before
    # Without run.json (a run of an older version) the restore itself names what does not match.
    os.remove(record)
    assert cli.main(["train", "--config", TINY, "--workdir", workdir, f"--config.data.paths={shards}",
                     "--config.model.num_layers=3", "--config.train.steps=6", "--config.train.eval_every=0"]) == 2
    assert not os.path.exists(record)
