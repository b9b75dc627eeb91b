"""Training knobs that change how the backward pass is computed, not what: the written-out backwards
of the exact GELU and of LayerNorm (`gelu_grad` / `layer_norm_grad` = "recompute": the same values
and gradients as JAX's autodiff, fewer tensors kept), the pinned residual layout (`residual_layout="row_major"`: the same numbers) and the
flattened Dense products (`dense_dot="flat"`: the same numbers, no transposed operands)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize
from flax import nnx

from tokensynth_jax.config import RUNTIME_FIELDS, ConfigError, ModelConfig, load_config_file
from tokensynth_jax.model import layers
from tokensynth_jax.model.transformer import TokenSynth

TINY = ModelConfig(num_layers=2, d_model=48, num_heads=3, num_codebooks=3, codebook_size=17, max_len=40,
                   timbre_dim=29, timbre_hidden=53)
EPS = 1e-5


def _kept(fn, *args):
    """The arrays `jax.vjp` keeps for the backward pass of `fn`: (count, bytes), from shapes alone."""
    leaves = jax.tree.leaves(jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], *args))
    return len(leaves), sum(x.size * x.dtype.itemsize for x in leaves)


# --- GELU ---------------------------------------------------------------------------------------
def test_gelu_exact_equals_autodiff_of_the_exact_gelu():
    x = jnp.linspace(-6.0, 6.0, 4801, dtype=jnp.float32)  # every 1/400, zero and the tails included
    g = jax.random.normal(jax.random.PRNGKey(0), x.shape)
    plain = lambda v: jax.nn.gelu(v, approximate=False)
    y, vjp = jax.vjp(layers.gelu_exact, x)
    want_y, want_vjp = jax.vjp(plain, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want_y))
    np.testing.assert_allclose(np.asarray(vjp(g)[0]), np.asarray(want_vjp(g)[0]), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(lambda v: layers.gelu_exact(v).sum()))(x)),
                               np.asarray(jax.grad(lambda v: plain(v).sum())(x)), rtol=2e-6, atol=1e-7)
    # bf16: the forward is the same op; the derivative, computed in fp32 and rounded once, is at
    # least as near the fp32 derivative (at the same bf16 inputs) as bf16 autodiff's
    xb, gb = x.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
    yb, vjp_b = jax.vjp(layers.gelu_exact, xb)
    want_yb, want_vjp_b = jax.vjp(plain, xb)
    assert yb.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(yb, np.float32), np.asarray(want_yb, np.float32))
    exact = np.asarray(jax.vjp(plain, xb.astype(jnp.float32))[1](gb.astype(jnp.float32))[0])
    dx, auto = (np.asarray(v(gb)[0], np.float32) for v in (vjp_b, want_vjp_b))
    assert vjp_b(gb)[0].dtype == jnp.bfloat16
    np.testing.assert_allclose(dx, exact, rtol=2**-8, atol=1e-6)  # one rounding to bf16
    np.testing.assert_allclose(dx, auto, rtol=0.03, atol=0.03)
    assert np.abs(dx - exact).max() <= np.abs(auto - exact).max()


def test_gelu_exact_keeps_only_its_input():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 64), jnp.bfloat16)
    assert _kept(layers.gelu_exact, x) == (1, x.nbytes)
    assert _kept(lambda v: jax.nn.gelu(v, approximate=False), x)[1] >= 3 * x.nbytes  # what the profile saw


# --- LayerNorm ----------------------------------------------------------------------------------
def _plain_layer_norm(x, scale, bias):
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(jnp.square(x - mean).mean(-1, keepdims=True) + EPS) * scale + bias


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_norm_forward_is_the_layer_norm_module(dtype):
    """Bitwise the module's default path, eager and jitted, on inputs with an offset and a spread."""
    cfg = TINY.replace(dtype=dtype, layer_norm_grad="xla")
    plain = randomize(layers.LayerNorm(cfg, rngs=nnx.Rngs(0)), seed=2)
    ours = layers.LayerNorm(cfg.replace(layer_norm_grad="recompute"), rngs=nnx.Rngs(0))
    nnx.update(ours, nnx.state(plain))
    assert not plain.grad_recomputed and ours.grad_recomputed
    x = (3.0 + 5.0 * jax.random.normal(jax.random.PRNGKey(3), (2, 7, cfg.d_model))).astype(dtype)
    assert ours(x).dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(ours(x).astype(jnp.float32)), np.asarray(plain(x).astype(jnp.float32)))
    run = jax.jit(lambda m, v: m(v).astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(run(ours, x)), np.asarray(run(plain, x)))


def test_layer_norm_gradients_equal_autodiff_of_the_formula():
    keys = jax.random.split(jax.random.PRNGKey(4), 4)
    d = 48
    x = 3.0 + 5.0 * jax.random.normal(keys[0], (3, 5, d))  # sums over both leading axes
    scale, bias = 1.0 + jax.random.normal(keys[1], (d,)), jax.random.normal(keys[2], (d,))
    g = jax.random.normal(keys[3], x.shape)
    ours = lambda *a: layers.layer_norm(*a, EPS, jnp.dtype(jnp.float32))
    y, vjp = jax.vjp(ours, x, scale, bias)
    want_y, want_vjp = jax.vjp(_plain_layer_norm, x, scale, bias)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want_y), rtol=1e-5, atol=1e-5)
    for got, want, name in zip(vjp(g), want_vjp(g), ("x", "scale", "bias")):
        assert got.shape == want.shape and got.dtype == jnp.float32, name
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=name)
    # bf16 input and output (the compute dtype), fp32 scale and bias (master weights)
    xb, gb = x.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
    ours_b = lambda *a: layers.layer_norm(*a, EPS, jnp.dtype(jnp.bfloat16))
    got = jax.vjp(ours_b, xb, scale, bias)[1](gb)
    want = jax.vjp(_plain_layer_norm, xb.astype(jnp.float32), scale, bias)[1](gb.astype(jnp.float32))
    assert [v.dtype for v in got] == [jnp.bfloat16, jnp.float32, jnp.float32]
    dx = np.asarray(got[0], np.float32)
    np.testing.assert_allclose(dx, np.asarray(want[0]), rtol=2**-8, atol=1e-3 * np.abs(dx).max())
    for a, b, name in zip(got[1:], want[1:], ("scale", "bias")):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4, err_msg=name)


def test_layer_norm_keeps_its_input_and_the_row_statistics():
    x = jax.random.normal(jax.random.PRNGKey(5), (4, 8, TINY.d_model), jnp.bfloat16)
    scale, bias = jnp.ones(TINY.d_model), jnp.zeros(TINY.d_model)
    rows = 4 * 8
    kept = _kept(lambda *a: layers.layer_norm(*a, EPS, jnp.dtype(jnp.bfloat16)), x, scale, bias)
    assert kept == (4, x.nbytes + scale.nbytes + 2 * rows * 4)  # x, scale, fp32 mean and 1/std
    plain = layers.LayerNorm(TINY.replace(dtype="bfloat16", layer_norm_grad="xla"), rngs=nnx.Rngs(0))
    params = nnx.state(plain, nnx.Param)
    graphdef = nnx.graphdef(plain)
    assert _kept(lambda p, v: nnx.merge(graphdef, p)(v), params, x)[1] >= 3 * 2 * x.nbytes  # fp32 copies


# --- the model ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scan_layers,remat", [(False, "none"), (True, "none"), (True, "dots")])
def test_model_gradients_with_recomputed_gelu_and_layer_norm(scan_layers, remat):
    """The same loss gradients as JAX's autodiff (fp32, dropout on), and without remat less kept for
    the backward."""
    cfg = TINY.replace(scan_layers=scan_layers, remat=remat, dropout=0.1)
    base = randomize(TokenSynth(cfg, rngs=nnx.Rngs(0)), seed=6)
    params = nnx.state(base, nnx.Param)
    rng = np.random.default_rng(7)
    rows = np.zeros((2, 12, cfg.num_channels), np.int32)
    rows[:, :4, 0] = rng.integers(1, cfg.midi_vocab_size, (2, 4))
    rows[:, 5:, 1:] = rng.integers(0, cfg.codebook_vocab_size, (2, 7, cfg.num_codebooks))
    timbre = rng.normal(size=(2, cfg.timbre_dim)).astype(np.float32)
    weights = jax.random.normal(jax.random.PRNGKey(8), (2, 13, cfg.output_size))  # the timbre position, 12 rows

    def grads(**changes):
        graphdef = nnx.graphdef(TokenSynth(cfg.replace(**changes), rngs=nnx.Rngs(0)))

        def loss(p):
            logits = nnx.merge(graphdef, p)(rows, timbre, dropout_rng=jax.random.PRNGKey(9))
            return (logits * weights).sum()

        return jax.jit(jax.value_and_grad(loss))(params), _kept(loss, params)[1]

    (want_loss, want), want_kept = grads(gelu_grad="xla", layer_norm_grad="xla")
    scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(want))
    for changes in ({"gelu_grad": "recompute", "layer_norm_grad": "xla"}, {"layer_norm_grad": "recompute"},
                    {"gelu_grad": "recompute", "layer_norm_grad": "recompute"}):
        (loss, got), kept = grads(**changes)
        np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # the keys' biases: zero up to rounding
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-7 * scale)
        # under "dots" the block keeps only its products anyway
        assert kept < want_kept if remat == "none" else kept <= want_kept, changes


@pytest.mark.parametrize("scan_layers,remat", [(False, "none"), (True, "dots")])
def test_row_major_residual_changes_no_number_and_reaches_the_step(scan_layers, remat):
    """`residual_layout="row_major"`: the same loss and gradients up to fp32 rounding (dropout on;
    XLA fuses differently around a constraint), and the jitted gradient carries XLA layout
    constraints (forward and backward) that the default has none of."""
    cfg = TINY.replace(scan_layers=scan_layers, remat=remat, dropout=0.1)
    base = randomize(TokenSynth(cfg, rngs=nnx.Rngs(0)), seed=3)
    params = nnx.state(base, nnx.Param)
    rng = np.random.default_rng(4)
    rows = rng.integers(0, cfg.codebook_vocab_size, (2, 12, cfg.num_channels)).astype(np.int32)
    timbre = rng.normal(size=(2, cfg.timbre_dim)).astype(np.float32)

    def grad_fn(layout):
        graphdef = nnx.graphdef(TokenSynth(cfg.replace(residual_layout=layout), rngs=nnx.Rngs(0)))
        loss = lambda p: jnp.square(nnx.merge(graphdef, p)(rows, timbre, dropout_rng=jax.random.PRNGKey(5))).mean()
        return jax.jit(jax.value_and_grad(loss))

    pinned, plain = grad_fn("row_major"), grad_fn("xla")
    (loss, got), (want_loss, want) = pinned(params), plain(params)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(want))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * scale)
    constraints = lambda f: f.lower(params).as_text().count("LayoutConstraint")
    assert constraints(plain) == 0
    assert constraints(pinned) >= 2 * 3 * (1 if scan_layers else cfg.num_layers)  # 3 a block, and their gradients


# --- Dense products -----------------------------------------------------------------------------
@pytest.mark.parametrize("scan_layers,dtype", [(False, "float32"), (True, "float32"), (True, "bfloat16")])
def test_flat_dense_dots_change_no_number(scan_layers, dtype):
    """`dense_dot="flat"`: the same logits, loss and gradients as one dot_general over the kernels'
    own axes (dropout on; bf16 with the head's backward in bf16, `layers.widened_dot`)."""
    cfg = TINY.replace(scan_layers=scan_layers, dropout=0.1, dtype=dtype, logits_grad_dtype="compute")
    params = nnx.state(randomize(TokenSynth(cfg, rngs=nnx.Rngs(0)), seed=11), nnx.Param)
    rng = np.random.default_rng(12)
    rows = rng.integers(0, cfg.codebook_vocab_size, (3, 10, cfg.num_channels)).astype(np.int32)
    timbre = rng.normal(size=(3, cfg.timbre_dim)).astype(np.float32)

    def run(dense_dot):
        model = TokenSynth(cfg.replace(dense_dot=dense_dot), rngs=nnx.Rngs(0))
        assert all(d.flat == (dense_dot == "flat") for _, d in nnx.iter_graph(model) if isinstance(d, layers.Dense))
        loss = lambda p: jnp.square(nnx.merge(nnx.graphdef(model), p)(rows, timbre, dropout_rng=jax.random.PRNGKey(13))).mean()
        logits = jax.jit(lambda p: nnx.merge(nnx.graphdef(model), p)(rows, timbre))(params)
        return logits, jax.jit(jax.value_and_grad(loss))(params)

    (logits, (loss, got)), (want_logits, (want_loss, want)) = run("flat"), run("xla")
    tol = {"float32": 1e-5, "bfloat16": 2e-2}[dtype]
    np.testing.assert_allclose(np.asarray(logits, np.float32), np.asarray(want_logits, np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=tol)
    scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(want))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol * scale)


def test_flat_dense_dots_transpose_nothing_on_the_cpu():
    """Why "flat" is the CPU's choice: XLA:CPU transposes the [D, H, h] kernels and their gradients
    into [M, K] x [K, N] form with copies (0.5 s of the reference-size step's thread time); merged to
    two axes first, the products of the forward and backward take every array as it lies."""

    def transposes(dense_dot):
        cfg = ModelConfig(d_model=256, num_heads=4, dense_dot=dense_dot)
        attn = layers.Attention(cfg, rngs=nnx.Rngs(0))
        graphdef = nnx.graphdef(attn)
        x = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 256))

        def loss(state, x):  # the query projection [D] -> [H, h], the output's [H, h] -> [D]
            a = nnx.merge(graphdef, state)
            return jnp.sum(a.out(a.query(x)) ** 2)

        hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(nnx.state(attn), x).compile().as_text()
        return len(re.findall(r" transpose\(", hlo))

    assert transposes("flat") == 0
    assert transposes("xla") > 0


# --- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize("gpu", [False, True])
def test_gradient_knobs_config(monkeypatch, gpu):
    from tokensynth_jax import config as config_module

    monkeypatch.setattr(config_module, "on_gpu", lambda: gpu)
    monkeypatch.setattr(config_module, "on_cpu", lambda: not gpu)
    auto = ModelConfig.from_dict(load_config_file("tiny").model.to_dict())
    assert (auto.gelu_grad, auto.gelu_grad_impl) == ("auto", "xla")  # slower on an H200: a memory knob
    assert not layers.Mlp(auto, rngs=nnx.Rngs(0)).grad_recomputed
    set_ = ModelConfig.from_dict(load_config_file("tiny", {"model.gelu_grad": "recompute"}).model.to_dict())
    assert set_.gelu_grad_impl == "recompute" and layers.Mlp(set_, rngs=nnx.Rngs(0)).grad_recomputed
    assert auto.replace(gelu_grad="xla").gelu_grad_impl == "xla"
    assert "gelu_grad" in RUNTIME_FIELDS  # a checkpoint loads under either
    with pytest.raises(ConfigError, match="model.gelu_grad='fused': one of 'auto', 'xla', 'recompute'"):
        ModelConfig(gelu_grad="fused")
    # faster on a CPU, lighter under a TPU's layer scan, no faster on an H200
    assert (auto.layer_norm_grad, auto.layer_norm_grad_impl) == ("auto", "xla" if gpu else "recompute")
    assert layers.LayerNorm(auto, rngs=nnx.Rngs(0)).grad_recomputed == (not gpu)
    for value in ("xla", "recompute"):
        ln = ModelConfig.from_dict(load_config_file("tiny", {"model.layer_norm_grad": value}).model.to_dict())
        assert ln.layer_norm_grad_impl == value
        assert layers.LayerNorm(ln, rngs=nnx.Rngs(0)).grad_recomputed == (value == "recompute")
    assert "layer_norm_grad" in RUNTIME_FIELDS
    with pytest.raises(ConfigError, match="model.layer_norm_grad='fused': one of 'auto', 'xla', 'recompute'"):
        ModelConfig(layer_norm_grad="fused")
    assert (auto.residual_layout, auto.residual_layout_impl) == ("auto", "xla")  # until a GPU times it
    assert not layers.Block(auto, rngs=nnx.Rngs(0)).row_major
    pinned = ModelConfig.from_dict(load_config_file("tiny", {"model.residual_layout": "row_major"}).model.to_dict())
    assert pinned.residual_layout_impl == "row_major" and layers.Block(pinned, rngs=nnx.Rngs(0)).row_major
    assert "residual_layout" in RUNTIME_FIELDS
    with pytest.raises(ConfigError, match="model.residual_layout='column_major': one of auto, xla, row_major"):
        ModelConfig(residual_layout="column_major")
    assert (auto.dense_dot, auto.dense_dot_impl) == ("auto", "xla" if gpu else "flat")  # timed on the CPU only
    assert layers.Dense((4,), (2, 3), ("embed", "heads", "kv"), auto, rngs=nnx.Rngs(0)).flat == (not gpu)
    assert auto.replace(dense_dot="xla").dense_dot_impl == "xla" and auto.replace(dense_dot="flat").dense_dot_impl == "flat"
    assert "dense_dot" in RUNTIME_FIELDS
    with pytest.raises(ConfigError, match="model.dense_dot='einsum': one of auto, xla, flat"):
        ModelConfig(dense_dot="einsum")
