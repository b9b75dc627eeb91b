"""The written-out backward passes of the exact GELU and LayerNorm (`gelu_grad` / `layer_norm_grad` =
"recompute"): the same values and gradients as JAX's autodiff, fewer tensors kept for the backward."""
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


def _plain_layer_norm(x, scale, bias):
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(jnp.square(x - mean).mean(-1, keepdims=True) + EPS) * scale + bias


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
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_norm_forward_is_the_layer_norm_module(dtype):
    """Bitwise the module's default path, eager and jitted, on inputs with an offset and a spread."""
    cfg = TINY.replace(dtype=dtype)
    plain = randomize(layers.LayerNorm(cfg, rngs=nnx.Rngs(0)), seed=2)
    ours = layers.LayerNorm(cfg.replace(layer_norm_grad="recompute"), rngs=nnx.Rngs(0))
    nnx.update(ours, nnx.state(plain))
    assert not plain.grad_recomputed and ours.grad_recomputed
    x = (3.0 + 5.0 * jax.random.normal(jax.random.PRNGKey(3), (2, 7, cfg.d_model))).astype(dtype)
    want = np.asarray(plain(x).astype(jnp.float32))
    assert ours(x).dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(ours(x).astype(jnp.float32)), want)
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
    plain = layers.LayerNorm(TINY.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    params = nnx.state(plain, nnx.Param)
    graphdef = nnx.graphdef(plain)
    assert _kept(lambda p, v: nnx.merge(graphdef, p)(v), params, x)[1] >= 3 * 2 * x.nbytes  # fp32 copies


# --- the model ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scan_layers,remat", [(False, "none"), (True, "dots")])
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
    kept = {}
    for changes in ({"gelu_grad": "recompute"}, {"layer_norm_grad": "recompute"},
                    {"gelu_grad": "recompute", "layer_norm_grad": "recompute"}):
        (loss, got), kept[tuple(changes)] = grads(**changes)
        np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # the keys' biases: zero up to rounding
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-7 * scale)
        assert kept[tuple(changes)] < want_kept if remat == "none" else kept[tuple(changes)] <= want_kept, changes
    if remat == "none":  # under "dots" the block keeps only its products anyway
        assert kept["gelu_grad", "layer_norm_grad"] < min(kept["gelu_grad",], kept["layer_norm_grad",])


# --- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize("gpu", [False, True])
def test_gradient_knobs_config(monkeypatch, gpu):
    from tokensynth_jax import config as config_module

    monkeypatch.setattr(config_module, "on_gpu", lambda: gpu)
    auto = ModelConfig.from_dict(load_config_file("tiny").model.to_dict())
    assert (auto.gelu_grad, auto.layer_norm_grad) == ("auto", "auto")
    assert (auto.gelu_grad_impl, auto.layer_norm_grad_impl) == ("xla", "xla")  # not yet measured on a GPU
    assert not layers.Mlp(auto, rngs=nnx.Rngs(0)).grad_recomputed
    assert not layers.LayerNorm(auto, rngs=nnx.Rngs(0)).grad_recomputed
    overrides = {"model.gelu_grad": "recompute", "model.layer_norm_grad": "recompute"}  # a command line
    set_ = ModelConfig.from_dict(load_config_file("tiny", overrides).model.to_dict())
    assert (set_.gelu_grad_impl, set_.layer_norm_grad_impl) == ("recompute", "recompute")
    assert layers.Mlp(set_, rngs=nnx.Rngs(0)).grad_recomputed
    assert auto.replace(gelu_grad="xla").gelu_grad_impl == "xla"
    assert {"gelu_grad", "layer_norm_grad"} <= set(RUNTIME_FIELDS)  # a checkpoint loads under either
    for name in ("gelu_grad", "layer_norm_grad"):
        with pytest.raises(ConfigError, match=f"model.{name}='fused': one of 'auto', 'xla', 'recompute'"):
            ModelConfig(**{name: "fused"})
