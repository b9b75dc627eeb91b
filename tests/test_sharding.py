"""The device mesh, logical-axis rules and sharded model creation on 8 fake CPU devices."""
import functools
import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tokensynth_jax import sharding
from tokensynth_jax.config import ModelConfig
from tokensynth_jax.model import transformer
from tokensynth_jax.model.transformer import TokenSynth
from tokensynth_jax.training import optim
from tokensynth_jax.training import train_step as ts

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices: XLA_FLAGS set in conftest")

# Every sharded axis divides the (2, 2, 2) mesh: 4 heads, output head 1133 + 3 * 37 = 1244 wide.
EVEN = ModelConfig(num_layers=2, d_model=48, num_heads=4, num_codebooks=3, codebook_size=36, max_len=64,
                   timbre_dim=29, timbre_hidden=54, dropout=0.0)


# --- mesh ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,expected", [
    ({"data": -1}, (8, 1, 1)),
    ({"fsdp": -1}, (1, 8, 1)),
    ({"data": 2, "fsdp": -1, "tensor": 2}, (2, 2, 2)),
    ({"fsdp": 4, "tensor": -1}, (1, 4, 2)),
    ({"data": 2, "fsdp": 4}, (2, 4, 1)),
])
def test_make_mesh_fills_the_free_axis(shape, expected):
    mesh = sharding.make_mesh(shape)
    assert mesh.axis_names == sharding.MESH_AXES
    assert tuple(mesh.shape[a] for a in sharding.MESH_AXES) == expected
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_make_mesh_on_given_devices():
    mesh = sharding.make_mesh({"tensor": -1}, devices=jax.devices()[:2])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 2}


@pytest.mark.parametrize("shape,problem", [
    ({"data": -1, "fsdp": -1}, "at most one mesh axis may be -1"),
    ({"data": -1, "fsdp": 3}, "8 devices do not divide"),
    ({"data": 2}, "needs 2 devices, have 8"),
    ({"data": 4, "tensor": 4}, "needs 16 devices, have 8"),
    ({"data": 0, "fsdp": -1}, "must be positive"),
    ({"tensor": -2}, "must be positive"),
])
def test_make_mesh_rejects_bad_shapes(shape, problem):
    with pytest.raises(sharding.MeshError, match=f"--config.mesh: .*{problem}"):
        sharding.make_mesh(shape)


# --- rules --------------------------------------------------------------------------------------
def test_logical_to_spec():
    assert sharding.logical_to_spec(("batch", "length", "act_embed")) == P(("data", "fsdp"), None, None)
    assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert sharding.logical_to_spec((None, "vocab", "embed")) == P(None, "tensor", "fsdp")
    assert sharding.logical_to_spec(("embed", "embed")) == P("fsdp", None)  # a mesh axis shards one axis at most
    assert sharding.logical_to_spec(("batch", "embed")) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(None) == P()
    custom = (("embed", ("fsdp", "tensor")),)
    assert sharding.logical_to_spec(("embed",), custom) == P(("fsdp", "tensor"))


# --- sharded creation ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="module")
def sharded(mesh):
    return transformer.create_sharded(EVEN, mesh, seed=4)


def test_parameters_are_born_sharded_by_the_rules(sharded, mesh):
    expected = {  # logical names of model.py / layers.py through DEFAULT_RULES
        "midi_embed": P(None, "fsdp"),  # 1133 ids do not divide over tensor: replicated
        "codebook_embed": P(None, None, "fsdp"),  # 37 ids per codebook: replicated over tensor
        "pos_embed": P(None, "fsdp"),
        "timbre_fc1/kernel": P(None, "tensor"),
        "timbre_fc2/kernel": P("tensor", "fsdp"),
        "blocks/0/attn/query/kernel": P("fsdp", "tensor", None),
        "blocks/0/attn/query/bias": P("tensor", None),
        "blocks/1/attn/out/kernel": P("tensor", None, "fsdp"),
        "blocks/1/attn/out/bias": P("fsdp"),
        "blocks/0/mlp/fc1/kernel": P("fsdp", "tensor"),
        "blocks/0/mlp/fc2/kernel": P("tensor", "fsdp"),
        "blocks/1/ln2/scale": P("fsdp"),
        "head/kernel": P("fsdp", "tensor"),
        "head/bias": P("tensor"),
    }
    flat = {"/".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(nnx.state(sharded, nnx.Param))}
    for name, spec in expected.items():
        assert flat[name].sharding.mesh == mesh, name
        assert flat[name].sharding.spec == spec, (name, flat[name].sharding.spec)
    # Sharded for real: each device holds a quarter of a fsdp x tensor kernel.
    fc1 = flat["blocks/0/mlp/fc1/kernel"]
    assert {s.data.shape for s in fc1.addressable_shards} == {(24, 96)}
    assert len(fc1.addressable_shards) == 8


def test_axes_that_do_not_divide_are_replicated(mesh):
    odd = EVEN.replace(num_heads=3)  # 3 heads over tensor=2
    model = transformer.create_sharded(odd, mesh, seed=0)
    assert model.blocks[0].attn.query.kernel[...].sharding.spec == P("fsdp", None, None)
    assert model.blocks[0].mlp.fc1.kernel[...].sharding.spec == P("fsdp", "tensor")


def test_sharded_forward_equals_one_device(sharded, mesh):
    single = TokenSynth(EVEN, rngs=nnx.Rngs(4))  # same seed, no mesh: device 0
    # the same draws; jitted and eager sampling may round the last bit differently
    for a, b in zip(jax.tree.leaves(nnx.state(single, nnx.Param)), jax.tree.leaves(nnx.state(sharded, nnx.Param))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
    rng = np.random.default_rng(0)
    rows = np.zeros((4, 13, EVEN.num_channels), np.int32)
    rows[:, :5, 0] = rng.integers(1, EVEN.midi_vocab_size, (4, 5))
    rows[:, 6:, 1:] = rng.integers(0, EVEN.codebook_vocab_size, (4, 7, EVEN.num_codebooks))
    timbre = rng.normal(size=(4, EVEN.timbre_dim)).astype(np.float32)
    expected = np.asarray(single(rows, timbre))

    @nnx.jit
    def forward(model, rows, timbre):
        logits = model(rows, timbre)
        spec = sharding.logical_to_spec(("batch", "length", "vocab"))
        return jax.lax.with_sharding_constraint(logits, jax.sharding.NamedSharding(mesh, spec))

    rows_s = jax.device_put(rows, sharding.batch_sharding(mesh, rows.ndim))
    timbre_s = jax.device_put(timbre, sharding.batch_sharding(mesh, timbre.ndim))
    assert rows_s.sharding.spec == P(("data", "fsdp"), None, None)
    got = forward(sharded, rows_s, timbre_s)
    assert got.sharding.spec == P(("data", "fsdp"), None, "tensor")
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


# --- the train step's collectives ---------------------------------------------------------------
def _train_step_hlo(cfg, mesh, batch=8, length=12, grad_accum=1):
    """The optimized HLO of one sharded train step, traced with the mesh in context (as train.py)."""
    model = transformer.create_sharded(cfg, mesh, seed=0)
    opt = nnx.Optimizer(model, optim.make_optimizer(optim.OptimConfig(), nnx.state(model, nnx.Param)), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    rng = np.random.default_rng(0)
    targets = rng.integers(0, cfg.codebook_vocab_size, (batch, length + 1, cfg.num_channels)).astype(np.int32)
    data = {"timbre": rng.normal(size=(batch, cfg.timbre_dim)).astype(np.float32), "rows": targets[:, :-1],
            "targets": targets, "mask": np.ones((batch, length + 1), bool)}
    data = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in data.items()}
    with jax.set_mesh(mesh):
        step = functools.partial(ts.train_step, graphdef, grad_accum=grad_accum)
        return jax.jit(step).lower(state, data, jax.random.PRNGKey(0)).compile().as_text()


@pytest.mark.parametrize("scan_layers", [False, True])
def test_train_step_never_gathers_the_batch_activations(mesh, scan_layers, monkeypatch):
    """On a data x fsdp x tensor mesh no collective of the step returns the whole batch's [B, L, D]
    activations (or their gradient): each device keeps its own items. With the lookup tables left
    sharded over `embed`, SPMD replicated the embeddings' [B, L, D] gradient on every device
    (`sharding.whole_embed`)."""
    cfg = EVEN.replace(scan_layers=scan_layers, dropout=0.1)
    whole_batch = re.compile(rf"= f32\[8,1[23],{cfg.d_model}\]\S* (all-gather|all-reduce|all-to-all)")
    assert not whole_batch.search(_train_step_hlo(cfg, mesh))
    if not scan_layers:  # the unrolled step (a GPU's default) is where SPMD gave up
        monkeypatch.setattr(sharding, "whole_embed", lambda table, rules=None: table[...])  # tables left sharded
        assert whole_batch.search(_train_step_hlo(cfg, mesh))


@pytest.mark.parametrize("shape", [{"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 8}], ids=["2x2x2", "fsdp8"])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_train_step_keeps_the_residual_stream_batch_major(shape, scan_layers, monkeypatch):
    """The step moves no activations between shardings: no all-to-all. Without `sharding.constrain`
    SPMD sharded the residual stream over `embed` (as the LayerNorm scales and FSDP weights are) and
    all-to-all'd it back and forth."""
    mesh = sharding.make_mesh(shape)
    cfg = EVEN.replace(scan_layers=scan_layers, dropout=0.1)
    assert " all-to-all(" not in _train_step_hlo(cfg, mesh)
    monkeypatch.setattr(sharding, "constrain", lambda x, names, rules=None: x)
    assert " all-to-all(" in _train_step_hlo(cfg, mesh)


def test_gradient_accumulation_keeps_each_micro_batch_on_every_device():
    """Micro-batch i is rows i, i + 2, ...: each device's rows split where they lie, so nothing is
    moved into place (consecutive rows put each micro-batch on half the devices: an all-to-all
    and collective-permutes of the batch)."""
    hlo = _train_step_hlo(EVEN, sharding.make_mesh({"fsdp": 8}), batch=16, grad_accum=2)
    assert " all-to-all(" not in hlo and " collective-permute(" not in hlo and " collective-permute-start(" not in hlo


def test_constrain_without_a_mesh_is_the_array():
    x = np.ones((4, 3, 2), np.float32)
    assert sharding.constrain(x, sharding.RESIDUAL) is x


def test_whole_embed_without_a_mesh_is_the_table(sharded):
    table = sharded.codebook_embed
    assert sharding.whole_embed(table) is table[...]
