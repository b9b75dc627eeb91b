"""Flax NNX layers of the TokenSynth decoder: dense, layer norm, attention, MLP and block.

Weights carry logical axis names (`sharding.py` maps them to mesh axes); no mesh axis is named
here. Parameters are stored in `param_dtype` and cast to the compute `dtype` where used, so bf16
compute keeps fp32 master weights. Shapes use the legend of `model.py`.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tokensynth_jax import sharding
from tokensynth_jax.config import PALLAS_DECODE_ATTENTION, ModelConfig
from tokensynth_jax.model import attention, gemv

KERNEL_INIT = nnx.initializers.normal(stddev=0.02)


def param(rngs: nnx.Rngs, init, shape, names, dtype) -> nnx.Param:
    """A parameter initialised by `init` and annotated with logical axis `names`.

    Eager sharding is off: `transformer.create_sharded` places parameters through
    `jit(out_shardings=...)`, which needs no ambient mesh and works for abstract states.
    """
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def widened_dot(x, kernel, dims, out_dtype):
    """`lax.dot_general` accumulated into and returned in `out_dtype` (fp32 logits of bf16
    features), whose backward products run in the operands' dtype: the gradient of the output is
    rounded to it first, as torch autocast's bf16 head does.

    Why: differentiated as it is, a product with an fp32 output takes an fp32 gradient into both
    backward products, so the bf16 operands are widened and the two largest GEMMs of the loss
    (the 10,358-wide head's input and weight gradients) run in fp32 (TF32 on a GPU) on twice the
    bytes. `ModelConfig.logits_grad_dtype="compute"` selects this; with fp32 operands it is the
    plain product.
    """
    return jax.lax.dot_general(x, kernel, dims, preferred_element_type=out_dtype)


def _widened_dot_fwd(x, kernel, dims, out_dtype):
    return widened_dot(x, kernel, dims, out_dtype), (x, kernel)


def _widened_dot_bwd(dims, out_dtype, residuals, g):
    x, kernel = residuals
    _, vjp = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, dims, preferred_element_type=x.dtype), x, kernel)
    return vjp(g.astype(x.dtype))


widened_dot.defvjp(_widened_dot_fwd, _widened_dot_bwd)


class Dense(nnx.Module):
    """y = x . W + b over the last axis of x, with W of shape [*in_shape, *out_shape]."""

    def __init__(self, in_shape, out_shape, names, cfg: ModelConfig, *, rngs: nnx.Rngs):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        pd = jnp.dtype(cfg.param_dtype)
        self.kernel = param(rngs, KERNEL_INIT, in_shape + out_shape, names, pd)
        self.bias = param(rngs, nnx.initializers.zeros, out_shape, names[len(in_shape):], pd)
        self.num_in = len(in_shape)
        self.dtype = jnp.dtype(cfg.dtype)
        self.grad_in_compute_dtype = cfg.logits_grad_impl == "compute"
        self.flat = cfg.dense_dot_impl == "flat"

    def __call__(self, x, out_dtype=None):
        """`out_dtype` (e.g. fp32 for logits) is what the product accumulates into and returns;
        default the compute dtype."""
        out_dtype = out_dtype or self.dtype
        kernel = self.kernel[...].astype(self.dtype)
        x = x.astype(self.dtype)
        lead, out_shape, num_in = x.shape[:x.ndim - self.num_in], kernel.shape[self.num_in:], self.num_in
        if self.flat:  # [M, K] x [K, N] (ModelConfig.dense_dot)
            x = x.reshape(math.prod(lead), math.prod(x.shape[len(lead):]))
            kernel = kernel.reshape(x.shape[1], math.prod(out_shape))
            num_in = 1
        dims = ((tuple(range(x.ndim - num_in, x.ndim)), tuple(range(num_in))), ((), ()))
        if self.grad_in_compute_dtype and jnp.dtype(out_dtype) != self.dtype:
            y = widened_dot(x, kernel, dims, jnp.dtype(out_dtype))
        else:
            y = jax.lax.dot_general(x, kernel, dims, preferred_element_type=out_dtype)
        return y.reshape(lead + out_shape).astype(out_dtype) + self.bias[...].astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x, scale, bias, eps, dtype):
    """LayerNorm over the last axis in fp32, returned in `dtype`, whose backward is written out: it
    keeps x (in its own dtype) and the fp32 mean and 1/std of each row, and computes the gradients
    in fp32 with the closed form. Its forward is `_layer_norm_fwd`, which `LayerNorm` also runs
    under JAX's autodiff (`layer_norm_grad="xla"`), so the numbers are the same.

    Why: differentiated as it is, the backward keeps three fp32 [B, L, D] arrays a LayerNorm. Under
    the layer scan (a TPU's default) they are the scan's residuals, written for every layer: 2.1 GB
    of a v5e chip's 8.8 GB of temporaries at batch 8 x 1024 (docs/benchmarks.md, "TPU"); on a CPU the
    step is 14% faster with this. On an H200, unrolled, XLA fused them into the backward and this
    gave no speed. `ModelConfig.layer_norm_grad` selects it ("auto": off a GPU).
    """
    return _layer_norm_fwd(x, scale, bias, eps, dtype)[0]


def _layer_norm_fwd(x, scale, bias, eps, dtype):
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(var + eps)
    y = (xf - mean) * rstd
    return (y * scale + bias).astype(dtype), (x, scale, mean, rstd)


def _layer_norm_bwd(eps, dtype, residuals, g):
    x, scale, mean, rstd = residuals
    xhat = (x.astype(jnp.float32) - mean) * rstd
    g = g.astype(jnp.float32)
    gs = g * scale.astype(jnp.float32)
    dx = rstd * (gs - gs.mean(-1, keepdims=True) - xhat * (gs * xhat).mean(-1, keepdims=True))
    leading = tuple(range(x.ndim - 1))
    return dx.astype(x.dtype), (g * xhat).sum(leading).astype(scale.dtype), g.sum(leading).astype(scale.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.Module):
    """LayerNorm computed in fp32 (as torch does under autocast), returned in the compute dtype."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.scale = param(rngs, nnx.initializers.ones, (cfg.d_model,), ("embed",), pd)
        self.bias = param(rngs, nnx.initializers.zeros, (cfg.d_model,), ("embed",), pd)
        self.eps = cfg.layer_norm_eps
        self.dtype = jnp.dtype(cfg.dtype)
        self.grad_recomputed = cfg.layer_norm_grad_impl == "recompute"

    def __call__(self, x):
        args = (x, self.scale[...], self.bias[...], self.eps, self.dtype)
        # the same forward either way; without the written-out backward, JAX differentiates its ops
        return layer_norm(*args) if self.grad_recomputed else _layer_norm_fwd(*args)[0]


def dropout(x, rate: float, key, rng: str = "threefry"):
    """Inverted dropout; the identity when `key` is None (inference).

    `rng` ("threefry" or "rbg", `ModelConfig.dropout_rng_impl`) draws the mask with JAX's threefry, or
    with XLA's RngBitGenerator keyed from `key`: on a GPU the threefry rounds are fused into the
    mask and made dropout 8.6% of a train step (docs/benchmarks.md); RngBitGenerator is one kernel
    that writes the bits. Both are fixed by `key`, so runs and resumes repeat exactly on one mesh.
    """
    if key is None or rate == 0.0:
        return x
    if rng == "rbg":
        key = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def row_major(x):
    """x with its layout pinned to row-major (and its gradient's): `ModelConfig.residual_layout`."""
    from jax.experimental.layout import Layout, with_layout_constraint

    return with_layout_constraint(x, Layout(tuple(range(x.ndim))))


class KVCache(NamedTuple):
    """One layer's keys and values for every slot, [B, H, S, h], or [B * H, S, h] ("flat", under the
    XLA decode attention: `TokenSynth.init_cache`); a pytree passed in and out."""

    k: jax.Array
    v: jax.Array


def attend_with_cache(q, k, v, valid_bqk, cache: KVCache | None, slot, pad_b, impl: str, decode_impl: str,
                      q_scaled: bool = False):
    """Attention of this call's queries, keys and values ([B, L, H, h]), writing the keys and values into
    `cache` at `slot`; the arguments as `Attention.__call__`, `impl` and `decode_impl` as ModelConfig's
    `attention_impl` and `decode_attention_impl`. `q_scaled`: q comes already multiplied by h^-0.5, a
    power of two (`GemvBlock`), which the Pallas decode kernel takes as it is and the other paths undo
    exactly. Returns ([B, L, H, h], the updated cache or None)."""
    pallas_step = _pallas_step(q, valid_bqk, cache, pad_b, decode_impl)
    if q_scaled and not pallas_step:
        q = q * jnp.asarray(q.shape[-1] ** 0.5, q.dtype)
    if cache is not None:
        cache = KVCache(_write_cache(cache.k, k, slot), _write_cache(cache.v, v, slot))
    if valid_bqk is None:
        if cache is not None:  # attend to exactly what later steps will read back
            k, v = k.astype(cache.k.dtype).astype(q.dtype), v.astype(cache.v.dtype).astype(q.dtype)
        impl = attention.resolve(impl, q.dtype)
        y = attention.causal_self_attention(q, k, v, pad_b, impl=impl)
    elif pallas_step:
        # The causal mask `valid_bqk` holds, as slots pad_b .. slot (ModelConfig allows the
        # kernel with causal attention only).
        y = attention.pallas_decode_attention(q, cache.k, cache.v, pad_b, slot, q_scaled=q_scaled)
    else:
        if cache is not None:
            k_bhsd, v_bhsd = cache.k, cache.v
        else:
            k_bhsd, v_bhsd = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        y = attention.attend(q, k_bhsd.astype(q.dtype), v_bhsd.astype(q.dtype), valid_bqk)
    # Named so the "dots" remat policy keeps it: a fused kernel's output is no matmul.
    y = checkpoint_name(y, "attention")
    return y, cache


def _write_cache(cache, x_blhd, slot):
    """`cache` ([B, H, S, h] or flat [B * H, S, h]) with this call's keys or values [B, L, H, h]
    written from `slot` on."""
    x = jnp.swapaxes(x_blhd, 1, 2).astype(cache.dtype)
    if cache.ndim == 3:
        x = x.reshape(-1, *x.shape[2:])
    return jax.lax.dynamic_update_slice_in_dim(cache, x, slot, axis=cache.ndim - 2)


def _pallas_step(q, valid_bqk, cache, pad_b, decode_impl: str) -> bool:
    """Whether a call is one decoded row per item over a cache, under a Pallas decode attention
    (`ModelConfig.decode_attention`; the causal mask `valid_bqk` holds as slots pad_b .. slot)."""
    return (cache is not None and valid_bqk is not None and decode_impl in PALLAS_DECODE_ATTENTION
            and q.shape[1] == 1 and pad_b is not None)


def attend_qkv_with_cache(qkv_bl3hd, valid_bqk, cache: KVCache | None, slot, pad_b, impl: str, decode_impl: str,
                          q_scaled: bool = False):
    """`attend_with_cache` over a fused QKV product [B, L, 3, H, h]. A decoded row under
    `decode_attention="pallas_fused"` is one kernel that also writes the cache
    (`attention.pallas_decode_step`); anything else splits the product and calls `attend_with_cache`."""
    if decode_impl == "pallas_fused" and _pallas_step(qkv_bl3hd, valid_bqk, cache, pad_b, decode_impl):
        y, k, v = attention.pallas_decode_step(qkv_bl3hd[:, 0], cache.k, cache.v, pad_b, slot, q_scaled=q_scaled)
        return y, KVCache(k, v)
    return attend_with_cache(qkv_bl3hd[:, :, 0], qkv_bl3hd[:, :, 1], qkv_bl3hd[:, :, 2], valid_bqk, cache, slot,
                             pad_b, impl, decode_impl, q_scaled=q_scaled)


class Attention(nnx.Module):
    """Multi-head self-attention with biases (as the reference), optionally over a KV cache."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, hd = cfg.d_model, cfg.num_heads, cfg.head_dim
        self.query = Dense((d,), (h, hd), ("embed", "heads", "kv"), cfg, rngs=rngs)
        self.key = Dense((d,), (h, hd), ("embed", "heads", "kv"), cfg, rngs=rngs)
        self.value = Dense((d,), (h, hd), ("embed", "heads", "kv"), cfg, rngs=rngs)
        self.out = Dense((h, hd), (d,), ("heads", "kv", "embed"), cfg, rngs=rngs)
        self.impl, self.decode_impl = cfg.attention_impl, cfg.decode_attention_impl

    def __call__(self, x_bld, valid_bqk=None, cache: KVCache | None = None, slot=None, pad_b=None):
        """Self-attention of this call's rows, writing their keys and values into `cache` at `slot`.

        Args:
          x_bld: [B, L, D] input rows.
          valid_bqk: a dense [B, L, S] mask over the keys attended to: the cache's slots when
            there is a cache, else this call's. None: causal attention over this call's own keys
            only (full forwards; a prefill into a fresh cache from slot 0), computed by the
            fused kernel of `ModelConfig.attention_impl`.
          cache: one layer's KVCache, or None.
          slot: where this call's keys go in the cache.
          pad_b: int [B] left padding of each item (the causal path, and one decoded row per item
            under a Pallas `decode_attention`; None: none).
        Returns:
          ([B, L, D] output, the updated cache or None).
        """
        q, k, v = self.project_qkv(x_bld)  # [B, L, H, h]
        y, cache = attend_with_cache(q, k, v, valid_bqk, cache, slot, pad_b, self.impl, self.decode_impl)
        return self.out(y), cache

    def project_qkv(self, x_bld):
        """Queries, keys and values, each [B, L, H, h]."""
        return self.query(x_bld), self.key(x_bld), self.value(x_bld)


class FusedQKVAttention(Attention):
    """`Attention` with the query, key and value projections in one [D, 3, H, h] matmul.

    For decoding: one kernel a layer and step instead of three. Built from a trained `Attention`
    (`TokenSynth.for_decoding`), so checkpoints keep the three projections apart.
    """

    def __init__(self, attn: Attention, cfg: ModelConfig):
        d, h, hd = cfg.d_model, cfg.num_heads, cfg.head_dim
        names = ("embed", None, "heads", "kv")
        self.qkv = nnx.eval_shape(lambda: Dense((d,), (3, h, hd), names, cfg, rngs=nnx.Rngs(0)))
        kernel, bias = self.stacked(attn)
        self.qkv.kernel.set_value(kernel)
        self.qkv.bias.set_value(bias)
        self.out = attn.out
        self.impl, self.decode_impl = attn.impl, attn.decode_impl

    @staticmethod
    def stacked(attn: Attention):
        """The query, key and value kernels of `attn` as one [D, 3, H, h], and their biases [3, H, h]."""
        parts = (attn.query, attn.key, attn.value)
        return jnp.stack([p.kernel[...] for p in parts], axis=1), jnp.stack([p.bias[...] for p in parts], axis=0)

    def __call__(self, x_bld, valid_bqk=None, cache: KVCache | None = None, slot=None, pad_b=None):
        """`Attention.__call__`, over the fused product [B, L, 3, H, h]."""
        y, cache = attend_qkv_with_cache(self.qkv(x_bld), valid_bqk, cache, slot, pad_b, self.impl, self.decode_impl)
        return self.out(y), cache


@jax.custom_vjp
def gelu_exact(x):
    """`jax.nn.gelu(x, approximate=False)`, whose backward keeps only x and computes
    g * (Phi(x) + x phi(x)) in fp32 (Phi, phi: the standard normal's CDF and density).

    Why: differentiated as it is, the exact GELU's forward wrote three [32, 1024, 4096] bf16 tensors
    for its backward, 0.44 ms a layer of an H200 train step at batch 32 (docs/benchmarks.md, "Where
    the time goes now"); x is the one tensor the derivative needs. `ModelConfig.gelu_grad="recompute"`
    selects this: at batch 32 x 1024 it kept a quarter less memory (19.1 vs 25.5 GB) and was 3.4%
    slower (the backward's erf costs more than the writes it saves), so it is a memory knob.
    """
    return jax.nn.gelu(x, approximate=False)


def _gelu_exact_fwd(x):
    return jax.nn.gelu(x, approximate=False), x


def _gelu_exact_bwd(x, g):
    xf = x.astype(jnp.float32)
    cdf = 0.5 * jax.lax.erfc(-xf * np.sqrt(0.5).astype(np.float32))  # = 0.5 (1 + erf(x / sqrt 2)), exact in the tail
    pdf = jnp.exp(-0.5 * xf * xf) * np.float32(1 / np.sqrt(2 * np.pi))
    return ((g.astype(jnp.float32) * (cdf + xf * pdf)).astype(x.dtype),)


gelu_exact.defvjp(_gelu_exact_fwd, _gelu_exact_bwd)


class Mlp(nnx.Module):
    """Position-wise MLP: d_model -> mlp_dim -> GELU (exact erf, as torch) -> d_model."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.fc1 = Dense((cfg.d_model,), (cfg.mlp_dim,), ("embed", "mlp"), cfg, rngs=rngs)
        self.fc2 = Dense((cfg.mlp_dim,), (cfg.d_model,), ("mlp", "embed"), cfg, rngs=rngs)
        self.grad_recomputed = cfg.gelu_grad_impl == "recompute"

    def __call__(self, x):
        h = self.fc1(x)
        return self.fc2(gelu_exact(h) if self.grad_recomputed else jax.nn.gelu(h, approximate=False))


class Block(nnx.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)), residual dropout."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.ln1 = LayerNorm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln2 = LayerNorm(cfg, rngs=rngs)
        self.mlp = Mlp(cfg, rngs=rngs)
        self.rate, self.dropout_rng = cfg.dropout, cfg.dropout_rng_impl
        self.row_major = cfg.residual_layout_impl == "row_major"

    def __call__(self, x, valid_bqk=None, cache=None, slot=None, dropout_key=None, pad_b=None):
        """One block; `valid_bqk`, `cache`, `slot` and `pad_b` as `Attention.__call__`."""
        def pin(a):  # the residual stream: batch-major on a mesh, and row-major if asked
            a = sharding.constrain(a, sharding.RESIDUAL)
            return row_major(a) if self.row_major else a

        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        x = pin(x)
        y, cache = self.attn(self.ln1(x), valid_bqk, cache, slot, pad_b)
        x = pin(x + dropout(y, self.rate, keys[0], self.dropout_rng))
        x = pin(x + dropout(self.mlp(self.ln2(x)), self.rate, keys[1], self.dropout_rng))
        return x, cache


class GemvDense(nnx.Module):
    """A `Dense` for decoding whose kernel is stored transposed, [N, K] (`gemv`'s layout), with the
    stage around the product (LayerNorm before; GELU and a residual after) fused into one kernel
    when there are few rows (`gemv.supported`); otherwise the same computation in XLA."""

    def __init__(self, kernel, bias, num_in: int, dtype, pad_to: int = 1):
        """`kernel` [*in_shape, *out_shape] and `bias` [*out_shape] as a `Dense` holds them; `pad_to`:
        zero output rows are added up to a multiple of it (the kernel tiles N; the 10,358-wide
        head), and dropped from the result."""
        self.out_shape = tuple(kernel.shape[num_in:])
        k, n = math.prod(kernel.shape[:num_in]), math.prod(self.out_shape)
        extra = -n % pad_to
        self.kernel_t = nnx.Param(jnp.pad(kernel.reshape(k, n).T, ((0, extra), (0, 0))))
        self.bias = nnx.Param(jnp.pad(bias.reshape(n), (0, extra)))
        self.num_in, self.n = num_in, n
        self.dtype = jnp.dtype(dtype)

    @classmethod
    def of(cls, dense: Dense, pad_to: int = 1) -> GemvDense:
        return cls(dense.kernel[...], dense.bias[...], dense.num_in, dense.dtype, pad_to)

    def __call__(self, x, ln: LayerNorm | None = None, gelu: bool = False, residual=None, out_dtype=None):
        """y = [residual +] [gelu](ln(x) . W + b) over the last `num_in` axes of x, in `out_dtype`
        (default the compute dtype; the product accumulates in fp32 either way)."""
        lead = x.shape[: x.ndim - self.num_in]
        rows = math.prod(lead)
        w = self.kernel_t[...].astype(self.dtype)
        n, k = w.shape
        ln_args = None if ln is None else (ln.scale[...], ln.bias[...], ln.eps)
        res = None if residual is None else residual.reshape(rows, n)
        product = gemv.gemv if gemv.supported(rows, n, k) else gemv.gemv_reference
        y = product(x.reshape(rows, k), w, self.bias[...].astype(self.dtype), ln=ln_args, gelu=gelu, residual_mn=res,
                    out_dtype=out_dtype)
        return y[:, : self.n].reshape(lead + self.out_shape)


class GemvBlock(nnx.Module):
    """A `Block` prepared for decoding with `ModelConfig.decode_gemm="pallas"`: each weight stage one
    `gemv` kernel (LayerNorm + fused QKV; attention-output product + residual; LayerNorm + MLP
    input + GELU; MLP output + residual), about 9 kernels a layer and step where XLA made 16.
    Built from a trained `Block` (`TokenSynth.for_decoding`); checkpoints keep the `Block` layout."""

    def __init__(self, block: Block, cfg: ModelConfig):
        attn = block.attn
        self.ln1, self.ln2 = block.ln1, block.ln2
        kernel, bias = FusedQKVAttention.stacked(attn)  # [D, 3, H, h], [3, H, h]
        # The queries' h^-0.5 folded into their weights when it is a power of two (h = 16, 64, 256):
        # exact in any float format, and one elementwise kernel a layer and step fewer.
        scale = cfg.head_dim ** -0.5
        self.q_prescaled = math.log2(scale).is_integer()
        if self.q_prescaled:
            kernel, bias = kernel.at[:, 0].multiply(scale), bias.at[0].multiply(scale)
        self.qkv = GemvDense(kernel, bias, 1, cfg.dtype)  # [D] -> [3, H, h]
        self.out = GemvDense.of(attn.out)
        self.fc1, self.fc2 = GemvDense.of(block.mlp.fc1), GemvDense.of(block.mlp.fc2)
        self.impl, self.decode_impl = attn.impl, attn.decode_impl

    def __call__(self, x, valid_bqk=None, cache=None, slot=None, dropout_key=None, pad_b=None):
        """`Block.__call__` for inference (no dropout)."""
        if dropout_key is not None:
            raise ValueError("a block prepared for decoding has no dropout")
        qkv = self.qkv(x, ln=self.ln1)  # [B, L, 3, H, h]
        y, cache = attend_qkv_with_cache(qkv, valid_bqk, cache, slot, pad_b, self.impl, self.decode_impl,
                                         q_scaled=self.q_prescaled)
        x = self.out(y, residual=x)
        return self.fc2(self.fc1(x, ln=self.ln2, gelu=True), residual=x), cache
