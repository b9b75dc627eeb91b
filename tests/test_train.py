"""The training loop: exact resume, preemption, metrics files, fine-tuning from a checkpoint."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import soundfile

from tokensynth_jax.cli import main as cli
from tokensynth_jax.config import load_config_file
from tokensynth_jax.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import read_tensorboard  # noqa: E402
from test_input_pipeline import _without_targets, _write_shards  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("shards"))
    _write_shards(d, num_shards=2, per_shard=10, frames=(20, 60), codebook_size=64, codebooks=4)
    return d


def _config(shards, **train):
    overrides = {"data.paths": shards, "data.eval_paths": shards, "train.log_every": 2, "train.eval_every": 0,
                 "train.checkpoint_every": 100}
    overrides.update({f"train.{k}": v for k, v in train.items()})
    return load_config_file(TINY, overrides)


def _saved(workdir, step):
    return jax.tree.leaves(ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state")))


def _losses(workdir):
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return {x["step"]: x["loss"] for x in lines if x["split"] == "train"}


@pytest.mark.slow
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(shards, tmp_path):
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    train.train(_config(shards, steps=8), straight)
    train.train(_config(shards, steps=4), resumed)
    train.train(_config(shards, steps=8), resumed)  # picks up step 4 and the data iterator
    for x, y in zip(_saved(straight, 8), _saved(resumed, 8)):
        np.testing.assert_array_equal(x, y)
    assert _losses(straight) == _losses(resumed)
    assert sorted(_losses(straight)) == [2, 4, 6, 8]


@pytest.mark.slow
def test_grain_worker_processes_train_the_same_run_and_resume_bitwise(shards, tmp_path):
    # data.worker_count > 0 once ended every run in a traceback (grain's workers read an unparsed absl flag)
    in_process, workers = str(tmp_path / "a"), str(tmp_path / "b")
    train.train(_config(shards, steps=4), in_process)
    with_workers = lambda steps: _config(shards, steps=steps).copy_and_resolve_references()
    for steps in (2, 4):  # killed-and-resumed with workers: the iterator's state comes back from the checkpoint
        config = with_workers(steps)
        config.data.worker_count = 2
        train.train(config, workers)
    for x, y in zip(_saved(in_process, 4), _saved(workers, 4)):
        np.testing.assert_array_equal(x, y)
    assert _losses(in_process) == _losses(workers) and sorted(_losses(workers)) == [2, 4]


def test_grain_workers_leave_no_shared_memory_behind(shards, tmp_path):
    """JAX on CPU took the workers' shared-memory batches without copying; the last ones were still
    held at exit and Python's resource tracker warned of leaked shared_memory objects."""
    done = subprocess.run([sys.executable, "-m", "tokensynth_jax.cli", "train", "--config", TINY, "--workdir",
                           str(tmp_path / "run"), f"--config.data.paths={shards}", "--config.train.steps=3",
                           "--config.train.eval_every=0", "--config.data.worker_count=2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "leaked" not in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["preempted", "ctrl-c"])
def test_sigterm_or_ctrl_c_saves_and_stops_then_resumes(shards, tmp_path, signum):
    workdir = str(tmp_path / "p")
    cmd = [sys.executable, "-m", "tokensynth_jax.cli", "train", "--config", TINY, "--workdir", workdir,
           f"--config.data.paths={shards}", "--config.train.steps=100000", "--config.train.log_every=1",
           "--config.train.checkpoint_every=100000", "--config.train.eval_every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    deadline = time.time() + 120
    for line in proc.stdout:  # wait until it is training
        if "[train] step 3:" in line or time.time() > deadline:
            break
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in out, out
    assert f"{signal.Signals(signum).name}: saved step" in out
    saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert len(saved) == 1 and saved[0] >= 3
    train.train(_config(shards, steps=saved[0] + 2), workdir)
    assert max(_losses(workdir)) == saved[0] + 2


def test_loss_falls_and_eval_metrics_are_written(shards, tmp_path):
    workdir = str(tmp_path / "e")
    last = train.train(_config(shards, steps=60, log_every=10, eval_every=60), workdir)
    losses = _losses(workdir)
    assert losses[60] < losses[10] - 0.5  # random codes: it can learn the empty slots and frequencies only
    evals = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl")) if '"eval"' in x]
    assert evals and 0.0 <= evals[-1]["accuracy"] <= 1.0 and "ce_cb3" in evals[-1]
    assert last["tokens_per_s"] > 0 and os.listdir(os.path.join(workdir, "tensorboard"))


def test_samples_go_to_tensorboard_as_audio_and_spectrograms(shards, tmp_path):
    workdir = str(tmp_path / "s")
    train.train(_config(shards, steps=4, sample_every=2, sample_count=2), workdir)
    events = read_tensorboard(os.path.join(workdir, "tensorboard"))
    tags = events.Tags()
    clips = ["samples/sample_0/generated", "samples/sample_1/generated", "samples/sample_0/target",
             "samples/sample_1/target"]
    assert sorted(tags["audio"]) == sorted(f"{c}/audio" for c in clips)
    assert sorted(tags["images"]) == sorted(f"{c}/spectrogram" for c in clips)
    assert {"train/loss", "samples/sample_match"} <= set(tags["scalars"])  # beside the scalars
    generated = events.Audio("samples/sample_0/generated/audio")
    assert [e.step for e in generated] == [2, 4]
    assert [e.step for e in events.Audio("samples/sample_0/target/audio")] == [2]  # the record's clip, once
    written, rate = soundfile.read(os.path.join(workdir, "samples", "step_4", "sample_0.wav"), dtype="float32")
    heard, tb_rate = soundfile.read(io.BytesIO(generated[-1].encoded_audio_string), dtype="float32")
    assert rate == tb_rate == 32000 and len(written) == generated[-1].length_frames > 0
    np.testing.assert_allclose(heard, written / max(1.0, np.abs(written).max()), atol=1e-4)
    image = events.Images("samples/sample_0/generated/spectrogram")[-1]
    assert image.step == 4 and image.height == 256 and image.width > 1


@pytest.mark.slow
def test_init_from_checkpoint_and_config_mismatch(shards, tmp_path):
    model_dir = str(tmp_path / "m")
    assert cli.main(["init", "--config", TINY, "--seed", "5", model_dir]) == 0
    from tokensynth_jax import checkpoint

    loaded, _ = checkpoint.load_model(model_dir)
    workdir = str(tmp_path / "ft")
    train.train(_config(shards, steps=1), workdir, init_from=model_dir)
    # One step at warmup lr 0 leaves the initial parameters: they must be the init checkpoint's.
    emb = [x for x in _saved(workdir, 1) if x.shape == loaded.midi_embed[...].shape][0]
    np.testing.assert_array_equal(emb, np.asarray(loaded.midi_embed[...]))
    other = str(tmp_path / "other")
    assert cli.main(["init", "--config", TINY, "--config.model.num_layers=3", other]) == 0
    with pytest.raises(checkpoint.CheckpointError, match="differs"):
        train.train(_config(shards, steps=1), str(tmp_path / "ft2"), init_from=other)


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_the_same_devices(shards, tmp_path):
    """jax.distributed over localhost: 2 processes x 4 CPU devices == 1 process x 8 devices."""
    args = ["train", "--config", TINY, f"--config.data.paths={shards}", "--config.train.steps=4",
            "--config.train.log_every=1", "--config.train.eval_every=0"]
    one = str(tmp_path / "one")
    subprocess.run([sys.executable, "-m", "tokensynth_jax.cli", *args, "--workdir", one], cwd=ROOT, check=True,
                   capture_output=True, env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    two = str(tmp_path / "two")
    _run_two_processes([*args, "--workdir", two])
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(a)], rtol=2e-5)


def _run_two_processes(args, devices_each=4, timeout=300):
    """`python -m tokensynth_jax.cli ARGS` as 2 processes joined by jax.distributed over localhost."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "tokensynth_jax.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}",
                                       TOKENSYNTH_COORDINATOR=f"127.0.0.1:{port}", TOKENSYNTH_NUM_PROCESSES="2",
                                       TOKENSYNTH_PROCESS_ID=str(i)))
             for i in range(2)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs


@pytest.mark.slow
def test_two_processes_count_the_records_each_of_them_skipped(tmp_path):
    """skipped_examples is counted over the global batch (it was process 0's share of it)."""
    data = _shard_with_two_bad_records(tmp_path / "data")
    workdir = str(tmp_path / "run")
    _run_two_processes(["train", "--config", TINY, "--workdir", workdir, f"--config.data.paths={data}",
                        "--config.train.steps=3", "--config.train.log_every=1", "--config.train.eval_every=0"])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(x) for x in f]
    assert [x.get("skipped_examples") for x in lines if x["split"] == "train"] == [2, 2, 2]


def test_records_longer_than_seq_len_are_refused_before_the_run_makes_anything(tmp_path, capsys):
    from tokensynth_jax.tokens import records
    from tokensynth_jax.training import input_pipeline
    from tokensynth_prep import sink

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    # The longest records: 53 and 63 positions in the two train shards, 103 in valid.
    for split, index, count, frames in (("train", 0, 2, (30, 40)), ("train", 1, 2, (30, 50)), ("valid", 0, 1, (30, 90))):
        pairs = [records.PairRecord(f"{split}{index}{i}", split, "inst", rng.integers(1, 1133, 8),
                                    rng.integers(0, 64, (n, 4)), rng.normal(size=512), {}, "clap", {"chain": []},
                                    {"midi": "gen", "start": 0.0}, {"midi": "gen", "start": 5.0})
                 for i, n in enumerate(frames)]
        sink.write_shard(str(data), split, index, count, [(p.pair_id, p.to_bytes()) for p in pairs], [], "fp")
    train_shards = [str(data / "train" / f"shard-0000{i}-of-00002.array_record") for i in (0, 1)]
    valid_shard = str(data / "valid" / "shard-00000-of-00001.array_record")
    input_pipeline.verify_shards(train_shards, seq_len=63)  # a seq_len that holds them passes
    workdir = tmp_path / "run"
    # Where several shards, train or held out, hold longer records, the message names the longest:
    # one retry is enough.
    for seq_len, eval_paths, longest, shard, more in ((52, "", 63, train_shards[1], " (and 1 more of the 2 shards)"),
                                                      (52, str(data / "valid"), 103, valid_shard,
                                                       " (and 2 more of the 3 shards)"),
                                                      (62, "", 63, train_shards[1], ";"),
                                                      (100, str(data / "valid"), 103, valid_shard, ";")):
        argv = ["train", "--config", "tiny", "--workdir", str(workdir), f"--config.data.paths={data / 'train'}",
                f"--config.data.eval_paths={eval_paths}", f"--config.data.seq_len={seq_len}"]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert f"--config.data.seq_len={seq_len}: {shard} holds records of up to {longest} positions{more}" in err[0]
        assert not workdir.exists()


def _pair_bytes(rng, i: int, frames: int, split: str = "train") -> bytes:
    """A pair record for the tiny config (4 codebooks of 64 codes): 8 MIDI tokens, `frames` frames."""
    from tokensynth_jax.tokens import records

    return records.PairRecord(
        f"p{i}", split, "inst", rng.integers(1, 1133, 8), rng.integers(0, 64, (frames, 4)), rng.normal(size=512), {},
        "clap", {"chain": []}, {"midi": "gen", "start": 0.0}, {"midi": "gen", "start": 5.0}).to_bytes()


def _write_records(directory, data) -> str:
    """`data` (record bytes, damaged ones too) as DIRECTORY/shard.array_record; returns DIRECTORY."""
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(directory)
    writer = ArrayRecordWriter(os.path.join(directory, "shard.array_record"), "group_size:1")
    for d in data:
        writer.write(d)
    writer.close()
    return str(directory)


def _shard_with_two_bad_records(directory) -> str:
    """Eight records, one damaged and one too long for the tiny config (200 frames: 213 positions)."""
    rng = np.random.default_rng(1)
    return _write_records(directory, [_pair_bytes(rng, 0, 40), b"\x00damaged", _pair_bytes(rng, 2, 200),
                                      *(_pair_bytes(rng, i, 40) for i in range(3, 8))])


def test_bad_records_mid_data_are_skipped_counted_and_the_run_goes_on(tmp_path):
    _shard_with_two_bad_records(tmp_path / "data")
    workdir = str(tmp_path / "run")
    config = load_config_file(TINY, {"data.paths": str(tmp_path / "data"), "train.steps": 2, "train.log_every": 1,
                                     "train.eval_every": 0})
    last = train.train(config, workdir)  # global batch 8: every step sees all eight records
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(x) for x in f]
    assert [x.get("skipped_examples") for x in lines if x["split"] == "train"] == [2, 2]
    assert np.isfinite(last["loss"]) and os.path.isdir(os.path.join(workdir, "checkpoints", "2"))


def test_a_diverging_run_is_one_line_and_never_checkpoints_a_diverged_state(shards, tmp_path, capsys):
    workdir = tmp_path / "run"
    argv = ["train", "--config", "tiny", "--workdir", str(workdir), f"--config.data.paths={shards}",
            "--config.train.steps=6", "--config.train.log_every=100", "--config.train.checkpoint_every=1",
            "--config.optim.peak_lr=1e30", "--config.optim.warmup_steps=0", "--config.optim.clip_norm=0"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "RuntimeError" not in err  # nor Orbax's, from saves left running
    last = err.strip().splitlines()[-1]  # after the run's INFO lines
    assert "step 3: loss nan, grad norm nan: training diverged (newest checkpoint: 2)" in last
    assert "--config.optim.peak_lr" in last
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]  # kept: steps before the divergence
    assert all(np.isfinite(x).all() for x in _saved(str(workdir), 2))


def test_a_held_out_set_is_scored_whole_even_when_smaller_than_a_batch(tmp_path):
    """Evaluation is one pass over the held-out shards: its last short batch is scored too (it was
    dropped, so a held-out set of fewer records than data.global_batch logged an empty `[eval]`)."""
    from tokensynth_jax.config import ModelConfig
    from tokensynth_jax.training import input_pipeline as ip

    written = _write_shards(str(tmp_path), num_shards=1, per_shard=5, frames=(20, 30), codebook_size=64, codebooks=4)
    cfg = ModelConfig(num_layers=1, d_model=32, num_heads=2, num_codebooks=4, codebook_size=64, max_len=64)
    pc = ip.PipelineConfig((str(tmp_path),), global_batch=8, seq_len=64, shuffle=False, num_epochs=1,
                           drop_remainder=False)
    for proc in range(2):  # each process's block of the one short batch, filled with examples with no targets
        batches = list(ip.make_dataset(pc, cfg, process_index=proc, process_count=2))
        assert len(batches) == 1 and batches[0]["mask"].shape == (4, 64)
        assert _without_targets(batches[0]) == (0 if proc == 0 else 3)
    workdir = str(tmp_path / "run")
    config = load_config_file(TINY, {"data.paths": str(tmp_path), "data.eval_paths": str(tmp_path), "train.steps": 1,
                                     "train.log_every": 1, "train.eval_every": 1, "data.seq_len": 64})
    train.train(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = [json.loads(x) for x in f if '"eval"' in x]
    assert len(written) == 5 and len(evals) == 1 and np.isfinite(evals[0]["ce"]) and "acc_cb3" in evals[0]


def test_held_out_data_is_checked_before_the_run_and_a_damaged_held_out_record_is_passed_over(tmp_path, capsys):
    rng = np.random.default_rng(2)
    pair = lambda i, frames: _pair_bytes(rng, i, frames, "valid")
    for name, data in (("damaged_first", [b"\x00damaged", pair(1, 40), pair(2, 40)]), ("too_long", [pair(0, 200)])):
        _write_records(tmp_path / name, data)
    base = ["train", "--config", "tiny", "--config.data.paths=" + str(tmp_path / "damaged_first"),
            "--config.train.steps=1", "--config.train.eval_every=1", "--config.train.sample_every=1",
            "--config.train.sample_count=2", "--config.train.sample_audio=false"]
    # Held-out records that do not fit: one line before the run makes anything (was: at the first evaluation).
    assert cli.main([*base, "--workdir", str(tmp_path / "a"), f"--config.data.eval_paths={tmp_path / 'too_long'}"]) == 2
    assert "record p0: 213 positions exceed seq_len 128" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "a").exists()
    # A damaged first record: evaluation and the sample prompts pass over it, as training does.
    workdir = tmp_path / "b"
    assert cli.main([*base, "--workdir", str(workdir), f"--config.data.eval_paths={tmp_path / 'damaged_first'}"]) == 0
    with open(workdir / "metrics.jsonl") as f:
        evals = [json.loads(x) for x in f if '"eval"' in x]
    assert len(evals) == 1 and np.isfinite(evals[0]["ce"])
    assert sorted(os.listdir(workdir / "samples" / "step_1")) == ["sample_0.npz", "sample_1.npz"]
