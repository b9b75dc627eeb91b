"""Model checkpoints: exact round trips, restoring sharded onto a mesh, and clear errors."""
import gc
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import randomize
from flax import nnx
from jax.sharding import PartitionSpec as P

from tokensynth_jax import checkpoint, sharding
from tokensynth_jax.config import ModelConfig
from tokensynth_jax.model.transformer import TokenSynth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ModelConfig(num_layers=2, d_model=48, num_heads=3, num_codebooks=4, codebook_size=37, max_len=97,
                   timbre_dim=29, timbre_hidden=53)
# Orbax leaves unawaited read coroutines behind when a restore fails its shape checks; they are
# reported whenever the garbage collector finds them, so the tests that fail restores collect.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
needs_8_devices = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices: XLA_FLAGS set in conftest")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(directory, model) of a randomised TINY model saved once for the module."""
    model = randomize(TokenSynth(TINY, rngs=nnx.Rngs(0)), seed=3)
    directory = str(tmp_path_factory.mktemp("ckpt") / "model")
    checkpoint.save_model(directory, TINY, nnx.state(model, nnx.Param), {"weights": "random", "step": 7})
    return directory, model


def _copy_with_meta(saved, tmp_path, **changes):
    directory = str(tmp_path / "copy")
    shutil.copytree(saved[0], directory)
    path = os.path.join(directory, checkpoint.META_FILE)
    with open(path) as f:
        meta = json.load(f)
    for key, value in changes.items():
        if key == "model":
            meta["model"].update(value)
        else:
            meta[key] = value
    with open(path, "w") as f:
        json.dump(meta, f)
    return directory


def _flat(model):
    return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_round_trip_is_exact(saved):
    directory, model = saved
    restored, meta = checkpoint.load_model(directory)
    assert restored.cfg == TINY
    assert meta["metadata"] == {"weights": "random", "step": 7}
    assert meta["format"] == checkpoint.FORMAT and meta["version"] == checkpoint.FORMAT_VERSION
    before, after = _flat(model), _flat(restored)
    assert before.keys() == after.keys()
    for key in before:
        assert after[key].dtype == before[key].dtype, key
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    rows = np.zeros((1, 6, TINY.num_channels), np.int32)
    rows[0, :3, 0] = [3, 700, 1130]
    timbre = np.ones((1, TINY.timbre_dim), np.float32)
    np.testing.assert_array_equal(np.asarray(restored(rows, timbre)), np.asarray(model(rows, timbre)))


def test_saving_a_nested_dict_equals_saving_the_state(saved, tmp_path):
    directory, model = saved
    checkpoint.save_model(tmp_path / "dict", TINY, checkpoint.params_to_numpy(model))
    restored, meta = checkpoint.load_model(tmp_path / "dict")
    assert meta["metadata"] == {}
    for key, value in _flat(model).items():
        np.testing.assert_array_equal(_flat(restored)[key], value, err_msg=key)


def test_an_interrupted_save_leaves_no_writer_behind_the_cleanup(saved, tmp_path, monkeypatch):
    """Ctrl-C right after Orbax dispatched its writes: save_model must wait for its threads before
    the interrupt reaches the command's cleanup, or they write into the folder it just deleted."""
    import time

    import orbax.checkpoint as ocp

    from tokensynth_jax.cli import atomic

    dispatch = ocp.StandardCheckpointer.save

    def save_then_interrupt(self, *args, **kwargs):
        dispatch(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", save_then_interrupt)
    _, model = saved
    outputs = atomic.Outputs(overwrite=False)
    temp = outputs.dir(str(tmp_path / "out" / "model"), "OUT", marker=checkpoint.META_FILE)
    with pytest.raises(KeyboardInterrupt), outputs:
        checkpoint.save_model(temp, TINY, nnx.state(model, nnx.Param))
    time.sleep(1.0)  # what a leftover writer thread would write, it has written by now
    assert not os.path.exists(tmp_path / "out"), os.listdir(tmp_path / "out")


@needs_8_devices
def test_restores_sharded_onto_a_mesh(saved):
    directory, model = saved
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    restored, _ = checkpoint.load_model(directory, mesh)
    fc1 = restored.blocks[0].mlp.fc1.kernel[...]  # [48, 192]
    assert fc1.sharding.mesh == mesh and fc1.sharding.spec == P("fsdp", "tensor")
    assert {s.data.shape for s in fc1.addressable_shards} == {(12, 96)}  # no device holds it whole
    assert restored.blocks[1].mlp.fc2.kernel[...].sharding.spec == P("tensor", "fsdp")
    assert restored.final_ln.scale[...].sharding.spec == P("fsdp")
    assert restored.pos_embed[...].sharding.spec == P(None, "fsdp")
    # 3 heads do not divide over tensor=2, and 1133 MIDI ids do not either: those axes replicate
    assert restored.blocks[0].attn.query.kernel[...].sharding.spec == P("fsdp", None, None)
    assert restored.midi_embed[...].sharding.spec == P(None, "fsdp")
    before, after = _flat(model), _flat(restored)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


@needs_8_devices
def test_default_mesh_and_single_device_code(saved):
    directory, model = saved
    # Without a mesh, load_model spreads over every local device on the data axis (replicated).
    restored, _ = checkpoint.load_model(directory)
    kernel = restored.head.kernel[...]
    assert len(kernel.sharding.device_set) == jax.device_count() and kernel.sharding.is_fully_replicated
    # A model created without any mesh lives on device 0 alone and runs there.
    fresh = TokenSynth(TINY, rngs=nnx.Rngs(0))
    for leaf in jax.tree.leaves(nnx.state(fresh, nnx.Param)):
        assert leaf.sharding.device_set == {jax.devices()[0]}
    out = fresh(np.zeros((1, 3, TINY.num_channels), np.int32), np.zeros((1, TINY.timbre_dim), np.float32))
    assert out.devices() == {jax.devices()[0]}


def test_override_of_compute_dtype(saved):
    restored, _ = checkpoint.load_model(saved[0], override={"dtype": "bfloat16"})
    assert restored.cfg.dtype == "bfloat16"
    assert restored.head.kernel[...].dtype == np.float32  # master weights as saved


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="not a tokensynth-jax checkpoint"):
        checkpoint.load_model(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="not a tokensynth-jax checkpoint"):
        checkpoint.load_model(tmp_path / "missing")


@pytest.mark.parametrize("changes,problem", [
    ({"format": "something-else"}, "format 'something-else'"),
    ({"version": checkpoint.FORMAT_VERSION + 1}, "newer than this code"),
    ({"metadata": [1]}, "metadata is \\[1\\], not an object"),
    ({"metadata": {"codec": "dac"}}, "metadata.codec is 'dac', not an object"),
    ({"metadata": {"codec": {"name": "nope", "frame_rate": -1, "sample_rate": 16000}}},
     "metadata.codec.frame_rate is -1, not a positive number"),
    ({"metadata": {"codec": {"name": "nope", "frame_rate": 50, "sample_rate": 0}}},
     "metadata.codec.sample_rate is 0, not a positive number"),
    ({"metadata": {"codec": {"name": 7}}}, "metadata.codec.name is 7, not a codec name"),
])
def test_foreign_metadata(saved, tmp_path, changes, problem):
    with pytest.raises(checkpoint.CheckpointError, match=problem):
        checkpoint.load_model(_copy_with_meta(saved, tmp_path, **changes))


@pytest.mark.parametrize("model_changes", [
    {"num_layers": 3}, {"num_layers": 1}, {"d_model": 51}, {"codebook_size": 36}, {"null_timbre": True},
    {"conditioning": "unconditional"},
])
def test_config_that_does_not_match_the_parameters(saved, tmp_path, model_changes):
    directory = _copy_with_meta(saved, tmp_path, model=model_changes)
    with pytest.raises(checkpoint.CheckpointError, match="parameters do not match the config"):
        checkpoint.load_model(directory)
    gc.collect()


def test_override_that_changes_shapes_is_an_error(saved):
    with pytest.raises(checkpoint.CheckpointError, match="parameters do not match the config"):
        checkpoint.load_model(saved[0], override={"num_layers": 3})
    gc.collect()


def test_missing_parameters(saved, tmp_path):
    directory = _copy_with_meta(saved, tmp_path)
    shutil.rmtree(os.path.join(directory, checkpoint.PARAMS_DIR))
    with pytest.raises(checkpoint.CheckpointError, match="copy"):
        checkpoint.load_model(directory)


def test_changed_bytes_and_a_mangled_file_list_are_named_before_orbax_reads(saved, tmp_path):
    """Same sizes, other bytes: the sha256 of the file list finds it (Orbax would fail inside
    tensorstore's threads); a file list or model config of the wrong JSON type is one line too."""
    directory = _copy_with_meta(saved, tmp_path)
    data = sorted(glob.glob(os.path.join(directory, "params", "ocdbt.process_0", "d", "*")))
    assert data
    size = os.path.getsize(data[0])
    with open(data[0], "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    with pytest.raises(checkpoint.CheckpointError, match="has changed since it was written"):
        checkpoint.load_model(directory)
    meta_path = os.path.join(directory, checkpoint.META_FILE)
    meta = json.load(open(meta_path))
    for field, value, problem in [("files", "x", "the file list is a str"),
                                  ("files", None, "the file list is a NoneType"),
                                  ("files", {"params/x": {"bytes": "a"}}, "has no byte count"),
                                  ("model", None, "no model config")]:
        with open(meta_path, "w") as f:
            json.dump({**meta, field: value}, f)
        with pytest.raises(checkpoint.CheckpointError, match=problem):
            checkpoint.load_model(directory)


def test_verify_model_checks_the_file_list_and_reads_older_checkpoints_whole(saved, tmp_path):
    """`tokensynth checkpoint verify` on a model checkpoint: intact is no problem; a null file list
    is a damaged one (not an older checkpoint); a checkpoint from before file lists (no "files")
    is checked by reading every array, which finds a cut file too."""
    assert checkpoint.verify(saved[0]) == [("model", [])]
    directory = _copy_with_meta(saved, tmp_path, files=None)
    assert checkpoint.verify_model(directory) == ["the file list is a NoneType, not an object of path -> size"]
    path = os.path.join(directory, checkpoint.META_FILE)
    with open(path) as f:
        meta = json.load(f)
    del meta["files"]
    with open(path, "w") as f:
        json.dump(meta, f)
    assert checkpoint.verify_model(directory) == []
    data = max(glob.glob(os.path.join(directory, "params", "ocdbt.process_0", "d", "*")), key=os.path.getsize)
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    problems = checkpoint.verify_model(directory)
    assert problems, "a cut data file of an older checkpoint goes unnoticed"
    # The command line says so in one line: tensorstore's late callbacks into Orbax's closed event
    # loop used to print tracebacks after it.
    run = subprocess.run([sys.executable, "-m", "tokensynth_jax.cli", "checkpoint", "verify", directory],
                         capture_output=True, text=True, cwd=ROOT, check=False)
    assert run.returncode == 2 and "DAMAGED" in run.stdout, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1, run.stderr
