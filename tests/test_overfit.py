"""The whole training path on real prep output: `tokensynth prep` (SoundFont renders, tiny random
EnCodec and CLAP) -> ArrayRecord shards -> grain -> the sharded train loop -> samples.

A tiny model must overfit four pairs to near-zero loss, and its greedy samples from the same
prompts must reproduce the records' codes: this fails if any stage (record layout, delay pattern,
loss masks, shardings, cached generation) disagrees with another.
"""
import json
import os

import numpy as np
import pytest

from tokensynth_jax.cli import main as cli
from tokensynth_jax.config import load_config_file
from tokensynth_jax.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 150


@pytest.fixture(scope="module")
def prep_out(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prep"))
    assert cli.main([
        "prep", "--out", out, "--codec", "tiny-encodec", "--clap", "tiny-clap", "--programs", "0,40",
        "--valid-fraction", "0.5", "--test-fraction", "0", "--pairs-per-instrument", "4", "--num-segments", "8",
        "--procedural-candidates", "50", "--max-notes", "8", "--table-pitches", "36:96:4",
        "--table-velocities", "50,110", "--chunk-size", "4",
    ]) == 0
    return out


@pytest.mark.slow
def test_tiny_model_overfits_prep_pairs_and_reproduces_them(prep_out, tmp_path):
    manifest = json.load(open(os.path.join(prep_out, "manifest.json")))
    assert manifest["records"]["train"] == 4
    workdir = str(tmp_path / "run")
    config = load_config_file(os.path.join(ROOT, "configs", "tiny.py"), {
        "data.paths": os.path.join(prep_out, "train"), "data.seq_len": 320, "data.global_batch": 8,
        "model.dropout": 0.0, "optim.peak_lr": 4e-3, "optim.end_lr_ratio": 1.0, "optim.warmup_steps": 20, "optim.weight_decay": 0.0,
        "optim.total_steps": STEPS, "train.steps": STEPS, "train.log_every": 25, "train.eval_every": 0,
        "train.checkpoint_every": 10_000, "train.sample_every": STEPS, "train.sample_count": 4,
        "mesh.data": 4, "mesh.fsdp": 2,
    })
    train.train(config, workdir)
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = [x["loss"] for x in lines if x["split"] == "train"]
    assert losses[0] > 1.0 and losses[-1] < 0.02, losses
    samples = [x for x in lines if x["split"] == "samples"][-1]
    assert samples["sample_ended"] == 1.0 and samples["sample_match"] > 0.99, samples
    sample = np.load(os.path.join(workdir, "samples", f"step_{STEPS}", "sample_0.npz"))
    assert sample["codes"].shape == sample["target_codes"].shape
