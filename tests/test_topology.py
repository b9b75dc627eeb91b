"""Restore on any topology: model and train checkpoints written from an 8-device (data 2, fsdp 2,
tensor 2) mesh come back on 1 device and on a (fsdp 4, tensor 2) mesh with the same values and
the shardings of the reader's mesh; a params-only inference checkpoint from a train checkpoint."""
import logging
import os

import grain
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tokensynth_jax import checkpoint, sharding
from tokensynth_jax.cli import main as cli
from tokensynth_jax.config import ModelConfig, load_config_file
from tokensynth_jax.model.transformer import TokenSynth
from tokensynth_jax.training import optim

TINY = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny.py")
STEP = 3
pytestmark = [
    pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices: XLA_FLAGS set in conftest"),
    # Orbax leaves unawaited read coroutines behind when a restore fails its checks.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def _create(cfg, oc):
    model = TokenSynth(cfg, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, optim.make_optimizer(oc, nnx.state(model, nnx.Param)), wrt=nnx.Param)


def _abstract(cfg, oc, mesh):
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: _create(cfg, oc)))
    return graphdef, abstract_state, sharding.state_shardings(abstract_state, mesh)


def _iterator():
    return iter(grain.MapDataset.range(50).map(lambda i: np.full(3, i)).to_iter_dataset())


def _leaves(tree):
    pure = nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree
    flat = jax.tree_util.tree_flatten_with_path(pure)[0]
    return {jax.tree_util.keystr(p): v for p, v in flat}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A train state with random values (parameters and AdamW moments), sharded over 8 devices,
    saved as a model checkpoint and as a train checkpoint with a grain iterator 4 items in."""
    config = load_config_file(TINY)
    cfg = ModelConfig.from_dict(config.model.to_dict())
    oc = optim.OptimConfig.from_dict(config.optim.to_dict())
    mesh8 = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, _, shardings8 = _abstract(cfg, oc, mesh8)
    state = jax.jit(lambda: nnx.state(_create(cfg, oc)), out_shardings=shardings8)()
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda x: jax.device_put(rng.normal(size=x.shape).astype(x.dtype), x.sharding)
        if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x, state)
    model, _ = nnx.merge(graphdef, state)
    fc1 = model.blocks[0].mlp.fc1.kernel[...]
    assert len(fc1.sharding.device_set) == 8 and fc1.sharding.spec == P("fsdp", "tensor")
    root = tmp_path_factory.mktemp("topology")
    checkpoint.save_model(root / "model", cfg, nnx.state(model, nnx.Param), {"weights": "random"})
    it = _iterator()
    for _ in range(4):
        next(it)
    ckpt = checkpoint.TrainCheckpointer(root / "run" / "checkpoints", async_save=False)
    ckpt.save(STEP, state, it, force=True)
    ckpt.close()
    values = {k: np.asarray(v) for k, v in _leaves(state).items()}
    return dict(root=root, cfg=cfg, oc=oc, values=values, next_item=next(it), config=config,
                params={k: np.asarray(v) for k, v in _leaves(nnx.state(model, nnx.Param)).items()})


MESHES = {"1-device": lambda: sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]),
          "fsdp4-tensor2": lambda: sharding.make_mesh({"fsdp": 4, "tensor": 2})}


def _assert_lands_on(model, mesh, name):
    fc1 = model.blocks[0].mlp.fc1.kernel[...]  # [64, 256]
    assert fc1.sharding.mesh == mesh
    if name == "1-device":
        assert fc1.sharding.device_set == {jax.devices()[0]}
        assert [s.data.shape for s in fc1.addressable_shards] == [(64, 256)]
    else:
        assert fc1.sharding.spec == P("fsdp", "tensor")
        assert {s.data.shape for s in fc1.addressable_shards} == {(16, 128)}
        assert model.blocks[1].mlp.fc2.kernel[...].sharding.spec == P("tensor", "fsdp")
        assert model.blocks[0].attn.query.kernel[...].sharding.spec == P("fsdp", "tensor", None)


def _assert_same(restored: dict, saved: dict):
    assert restored.keys() == saved.keys()
    for key, value in saved.items():
        np.testing.assert_array_equal(np.asarray(restored[key]), value, err_msg=key)


@pytest.mark.parametrize("name", list(MESHES))
def test_model_checkpoint_restores_on_another_topology(written, name):
    mesh = MESHES[name]()
    model, meta = checkpoint.load_model(written["root"] / "model", mesh)
    _assert_lands_on(model, mesh, name)
    _assert_same(_leaves(nnx.state(model, nnx.Param)), written["params"])


@pytest.mark.parametrize("name", list(MESHES))
def test_train_checkpoint_restores_on_another_topology(written, name):
    mesh = MESHES[name]()
    graphdef, abstract_state, shardings = _abstract(written["cfg"], written["oc"], mesh)
    it = _iterator()
    ckpt = checkpoint.TrainCheckpointer(written["root"] / "run" / "checkpoints", async_save=False)
    state = ckpt.restore(STEP, abstract_state, shardings, it)
    ckpt.close()
    _assert_same(_leaves(state), written["values"])  # parameters, AdamW moments and step count
    model, opt = nnx.merge(graphdef, state)
    _assert_lands_on(model, mesh, name)
    mu = jax.tree.leaves(nnx.to_pure_dict(nnx.state(opt)))  # optimizer state follows the same rules
    assert all(leaf.sharding.mesh == mesh for leaf in mu)
    np.testing.assert_array_equal(next(it), written["next_item"])  # the data position came back too


@pytest.mark.parametrize("name", list(MESHES))
def test_params_of_a_train_checkpoint(written, name, caplog):
    """... quietly: Orbax once logged that the data iterator "could not be restored" (twice), a
    warning about nothing wrong that an inference export from an intact run printed."""
    mesh = MESHES[name]()
    ckpt = checkpoint.TrainCheckpointer(written["root"] / "run" / "checkpoints", async_save=False)
    with caplog.at_level(logging.WARNING):
        model, step = ckpt.restore_params(None, written["cfg"], mesh)
    ckpt.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert step == STEP
    _assert_lands_on(model, mesh, name)
    _assert_same(_leaves(nnx.state(model, nnx.Param)), written["params"])


def test_train_checkpoint_with_another_model_config_lists_every_key(written):
    cfg = written["cfg"].replace(num_layers=1, d_model=32)
    _, abstract_state, shardings = _abstract(cfg, written["oc"], MESHES["1-device"]())
    ckpt = checkpoint.TrainCheckpointer(written["root"] / "run" / "checkpoints", async_save=False)
    with pytest.raises(checkpoint.CheckpointError) as info:
        ckpt.restore(STEP, abstract_state, shardings, _iterator())
    message = str(info.value)
    assert "train state does not match" in message
    assert "unexpected key 0.blocks.1.mlp.fc1.kernel (64, 256)" in message
    assert "unexpected key 1.opt_state.1.0.mu.blocks.1.ln1.scale (64,)" in message  # AdamW's moments too
    assert "shape mismatch 0.head.kernel: saved (64, 1393), expected (32, 1393)" in message
    with pytest.raises(checkpoint.CheckpointError, match=r"(?s)parameters do not match.*unexpected key blocks\.1\."):
        ckpt.restore_params(STEP, written["cfg"].replace(num_layers=1))  # a partial read would skip it
    ckpt.close()


def test_inference_checkpoint_command(written, tmp_path, capsys):
    run, out = str(written["root"] / "run"), str(tmp_path / "inference")
    assert cli.main(["inference-checkpoint", "--config", TINY, run, out]) == 0
    model, meta = checkpoint.load_model(out, MESHES["fsdp4-tensor2"]())
    assert meta["metadata"]["step"] == STEP and meta["metadata"]["weights"] == "trained"
    assert meta["metadata"]["codec"]["name"] == written["config"].codec.name
    _assert_same(_leaves(nnx.state(model, nnx.Param)), written["params"])
    saved = checkpoint._shapes_by_name(
        checkpoint.ocp.StandardCheckpointer().metadata(os.path.join(out, checkpoint.PARAMS_DIR)).item_metadata.tree)
    assert len(saved) == len(written["params"]) and not any("opt_state" in k for k in saved)  # no optimizer state

    capsys.readouterr()
    assert cli.main(["inference-checkpoint", "--config", TINY, "--step", "99", run, str(tmp_path / "x")]) == 2
    assert "no train checkpoint at step 99 (have [3])" in capsys.readouterr().err
    assert cli.main(["inference-checkpoint", "--config", TINY, "--set", "model.num_layers=3", run,
                     str(tmp_path / "y")]) == 2
    assert "missing key blocks.2.attn.key.bias" in capsys.readouterr().err
    assert cli.main(["inference-checkpoint", "--config", TINY, str(tmp_path), str(tmp_path / "z")]) == 2
    assert "not a training workdir" in capsys.readouterr().err


def test_model_checkpoint_with_another_config_lists_every_key(written, tmp_path):
    """load_model checks names and shapes before Orbax reads (Orbax stops at the first problem)."""
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_model(written["root"] / "model", override={"num_layers": 3, "timbre_hidden": 95})
    lines = str(info.value).splitlines()
    assert "parameters do not match the config in tokensynth.json" in lines[0]
    assert "  missing key blocks.2.mlp.fc2.bias (64,)" in lines
    assert "  shape mismatch timbre_fc1.kernel: saved (512, 96), expected (512, 95)" in lines
    assert len(lines) == 1 + 16 + 3  # every key of the third block, and the three timbre MLP shapes
