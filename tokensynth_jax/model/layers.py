"""Flax NNX layers of the TokenSynth decoder: dense, layer norm, attention, MLP and block.

Weights carry logical axis names (`sharding.py` maps them to mesh axes); no mesh axis is named
here. Parameters are stored in `param_dtype` and cast to the compute `dtype` where used, so bf16
compute keeps fp32 master weights. Shapes use the legend of `model.py`.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tokensynth_jax.config import ModelConfig

KERNEL_INIT = nnx.initializers.normal(stddev=0.02)


def param(rngs: nnx.Rngs, init, shape, names, dtype) -> nnx.Param:
    """A parameter initialised by `init` and annotated with logical axis `names`.

    Eager sharding is off: `sharding.create_sharded` places parameters through
    `jit(out_shardings=...)`, which needs no ambient mesh and works for abstract states.
    """
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


class Dense(nnx.Module):
    """y = x . W + b over the last axis of x, with W of shape [*in_shape, *out_shape]."""

    def __init__(self, in_shape, out_shape, names, cfg: ModelConfig, *, rngs: nnx.Rngs):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        pd = jnp.dtype(cfg.param_dtype)
        self.kernel = param(rngs, KERNEL_INIT, in_shape + out_shape, names, pd)
        self.bias = param(rngs, nnx.initializers.zeros, out_shape, names[len(in_shape):], pd)
        self.num_in = len(in_shape)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x):
        kernel = self.kernel[...].astype(self.dtype)
        axes = (tuple(range(x.ndim - self.num_in, x.ndim)), tuple(range(self.num_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (axes, ((), ())))
        return y + self.bias[...].astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm computed in fp32 (as torch does under autocast), returned in the compute dtype."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.scale = param(rngs, nnx.initializers.ones, (cfg.d_model,), ("embed",), pd)
        self.bias = param(rngs, nnx.initializers.zeros, (cfg.d_model,), ("embed",), pd)
        self.eps = cfg.layer_norm_eps
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x):
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


def dropout(x, rate: float, key):
    """Inverted dropout; the identity when `key` is None (inference)."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def attend(q_bqhd, k_bhkd, v_bhkd, valid_bqk):
    """Softmax attention in fp32; a query with no valid key outputs zeros.

    Keys and values are head-major ([B, H, S, h]): on XLA:CPU a slot-major cache made XLA
    transpose the whole cache every step (21 ms vs 1.7 ms a layer at batch 16, 466 slots).
    Queries go head-major too, and masked logits get the most negative float (not -inf) so
    `jax.nn.softmax` and its fused gradient apply; rows with no valid key are zeroed afterwards.
    The earlier -inf / isfinite formulation made the attention backward 2.5x slower on XLA:CPU
    (0.45 s vs 0.18 s a layer at 1024 positions). Zeros for fully masked rows is what torch's
    scaled_dot_product_attention returns, which the reference's inverted mask relies on.
    """
    q_bhqd = jnp.swapaxes(q_bqhd, 1, 2) * jnp.asarray(q_bqhd.shape[-1] ** -0.5, q_bqhd.dtype)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q_bhqd, k_bhkd, preferred_element_type=jnp.float32)
    logits = jnp.where(valid_bqk[:, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    weights = jnp.where(valid_bqk.any(-1)[:, None, :, None], weights, 0.0)
    return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v_bhkd.dtype), v_bhkd), 1, 2)


def attend_causal(q_bqhd, k_bhkd, v_bhkd, valid_bqk, chunk: int = 256):
    """`attend` for masks that never let a query see a later key (causal, with or without left
    padding), in query chunks that each read only the keys up to their own end.

    Skips the upper triangle: at 1024 positions in chunks of 256 it does 10/16 of the score and
    softmax work, which is most of attention's cost on a CPU.
    """
    length = q_bqhd.shape[1]
    if length % chunk or length <= chunk:
        return attend(q_bqhd, k_bhkd, v_bhkd, valid_bqk)
    outs = []
    for start in range(0, length, chunk):
        end = start + chunk
        outs.append(attend(q_bqhd[:, start:end], k_bhkd[:, :, :end], v_bhkd[:, :, :end], valid_bqk[:, start:end, :end]))
    return jnp.concatenate(outs, axis=1)


class KVCache(NamedTuple):
    """One layer's keys and values for every slot, [B, H, S, h]; a pytree passed in and out."""

    k: jax.Array
    v: jax.Array


class Attention(nnx.Module):
    """Multi-head self-attention with biases (as the reference), optionally over a KV cache."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, hd = cfg.d_model, cfg.num_heads, cfg.head_dim
        self.query = Dense((d,), (h, hd), ("embed", "heads", "kv"), cfg, rngs=rngs)
        self.key = Dense((d,), (h, hd), ("embed", "heads", "kv"), cfg, rngs=rngs)
        self.value = Dense((d,), (h, hd), ("embed", "heads", "kv"), cfg, rngs=rngs)
        self.out = Dense((h, hd), (d,), ("heads", "kv", "embed"), cfg, rngs=rngs)
        self.causal = cfg.attention == "causal"

    def __call__(self, x_bld, valid_bqk, cache: KVCache | None = None, slot=None):
        """Attends over this call's keys, or over `cache` after writing them at `slot`."""
        q, k, v = self.project_qkv(x_bld)
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, H, L, h]
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), slot, axis=2)
            v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), slot, axis=2)
            cache = KVCache(k, v)
        # Without a cache this call's queries are its keys, in order; the causal pattern never
        # attends ahead, so the upper triangle can be skipped.
        fn = attend_causal if cache is None and self.causal else attend
        y = fn(q, k.astype(q.dtype), v.astype(q.dtype), valid_bqk)
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
        parts = (attn.query, attn.key, attn.value)
        d, h, hd = cfg.d_model, cfg.num_heads, cfg.head_dim
        names = ("embed", None, "heads", "kv")
        self.qkv = nnx.eval_shape(lambda: Dense((d,), (3, h, hd), names, cfg, rngs=nnx.Rngs(0)))
        self.qkv.kernel.set_value(jnp.stack([p.kernel[...] for p in parts], axis=1))
        self.qkv.bias.set_value(jnp.stack([p.bias[...] for p in parts], axis=0))
        self.out = attn.out
        self.causal = attn.causal

    def project_qkv(self, x_bld):
        qkv = self.qkv(x_bld)  # [B, L, 3, H, h]
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


class Mlp(nnx.Module):
    """Position-wise MLP: d_model -> mlp_dim -> GELU (exact erf, as torch) -> d_model."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.fc1 = Dense((cfg.d_model,), (cfg.mlp_dim,), ("embed", "mlp"), cfg, rngs=rngs)
        self.fc2 = Dense((cfg.mlp_dim,), (cfg.d_model,), ("mlp", "embed"), cfg, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)), residual dropout."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.ln1 = LayerNorm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln2 = LayerNorm(cfg, rngs=rngs)
        self.mlp = Mlp(cfg, rngs=rngs)
        self.rate = cfg.dropout

    def __call__(self, x, valid_bqk, cache=None, slot=None, dropout_key=None):
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        y, cache = self.attn(self.ln1(x), valid_bqk, cache, slot)
        x = x + dropout(y, self.rate, keys[0])
        x = x + dropout(self.mlp(self.ln2(x)), self.rate, keys[1])
        return x, cache
