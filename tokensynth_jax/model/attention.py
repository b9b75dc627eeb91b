"""Softmax attention: the XLA path, and the fused kernels that `ModelConfig.attention_impl` picks.

Three kinds of call, as the model makes them:
- `attend(q, k, v, valid)`: any pattern given as a dense [B, Lq, Lk] mask (cached decoding, the
  reference's inverted pattern), over every key it is given.
- `pallas_decode_attention(q, k, v, pad_b, slot)`: one query row per item over a KV cache, through
  the Pallas (Triton) decode-attention kernel of JAX's ops library (`ModelConfig.decode_attention`
  "pallas_gpu"): one kernel instead of XLA's products, mask and softmax, and it reads only the
  slots written so far, where `attend` reads the whole cache every step (at batch 256 the cache is
  7 GB, most of a step's bytes).
- `pallas_decode_step(qkv, k, v, pad_b, slot)`: the same over a step's fused QKV product, as one
  kernel of this package's that also writes the step's keys and values into the cache
  (`ModelConfig.decode_attention` "pallas_fused"): no cache-update, slice or split-combine kernels.
- `causal_self_attention(q, k, v, pad_b, impl=...)`: a sequence attending to itself causally,
  item b's first `pad_b[b]` positions being left padding (batched prefill; None in training,
  whose right padding causal attention never sees). This is where the [B, H, L, L] scores are
  big, so it goes to the fused kernel of the platform:
    "xla"         `attend_causal`: scores in fp32, query chunks that skip the upper triangle
                  (fastest on XLA:CPU);
    "cudnn"       cuDNN flash attention through `jax.nn.dot_product_attention` (GPU; bf16/fp16),
                  left padding turned into sequence lengths by rotating each item to the front;
    "pallas_tpu"  the Pallas TPU splash-attention kernel, left padding as segment ids. Off a TPU
                  it runs in Pallas interpret mode (slow; what the CPU tests check numerics with).
  All three give the same numbers: queries are scaled in the compute dtype before the product,
  scores and softmax statistics are fp32, and the outputs of padding queries are zeros.
Shapes: q, k, v are [B, L, H, h] (`jax.nn.dot_product_attention`'s layout) unless named `_bhkd`.
"""
from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from tokensynth_jax import config, sharding
from tokensynth_jax.config import PALLAS_DECODE_ATTENTION

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas_tpu")
SPLASH_BLOCKS = (512, 256, 128)  # splash tiles: the largest that divides the padded length


def resolve(impl: str, dtype) -> str:
    """The implementation "auto" stands for on the model's platform (`config.platform`): cuDNN on a
    CUDA GPU with a 16-bit compute dtype (its flash kernel has no fp32 path), splash on a TPU, else
    XLA."""
    if impl != "auto":
        return impl
    backend = config.platform()
    if backend == "tpu":
        return "pallas_tpu"
    # JAX's GPU backend is "gpu" and says its vendor; a target that `compiling_for` names ("cuda",
    # from a host without a GPU: benchmarks/gpu_aot.py) has no backend here to ask.
    cuda = backend == "cuda" or (backend == "gpu" and "cuda" in jax.extend.backend.get_backend().platform_version.lower())
    if cuda and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


# --- XLA --------------------------------------------------------------------------------------
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
    b, lq, h, d = q_bqhd.shape
    q_bhqd = jnp.swapaxes(q_bqhd, 1, 2) * jnp.asarray(d ** -0.5, q_bqhd.dtype)
    if k_bhkd.ndim == 3:  # a flat cache [B * H, S, h] (`TokenSynth.init_cache`): one batch axis
        logits = jnp.einsum("nqd,nkd->nqk", q_bhqd.reshape(b * h, lq, d), k_bhkd, preferred_element_type=jnp.float32)
        logits = logits.reshape(b, h, lq, -1)
    else:
        logits = jnp.einsum("bhqd,bhkd->bhqk", q_bhqd, k_bhkd, preferred_element_type=jnp.float32)
    logits = jnp.where(valid_bqk[:, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    weights = jnp.where(valid_bqk.any(-1)[:, None, :, None], weights, 0.0).astype(v_bhkd.dtype)
    if v_bhkd.ndim == 3:
        out = jnp.einsum("nqk,nkd->nqd", weights.reshape(b * h, lq, -1), v_bhkd).reshape(b, h, lq, d)
    else:
        out = jnp.einsum("bhqk,bhkd->bhqd", weights, v_bhkd)
    return jnp.swapaxes(out, 1, 2)


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


DECODE_BLOCK = 64  # KV slots per block (and per split) of the Pallas decode kernel
PARALLEL_ITEMS = 1024  # items x heads from which the decode kernel runs unsplit (8 programs per SM of an H100)
DECODE_WARPS = 4  # warps per program of the decode kernel (the ops library's default)
DECODE_STAGES = 2  # software-pipelining depth of its loop over KV blocks (the library's default)


def cache_slots(num_slots: int, decode_impl: str) -> int:
    """Slots a KV cache needs for `num_slots` positions: the Pallas decode kernel reads whole
    blocks, so its caches round up to a multiple of DECODE_BLOCK (the extra slots are never valid)."""
    if decode_impl in PALLAS_DECODE_ATTENTION:
        return -(-num_slots // DECODE_BLOCK) * DECODE_BLOCK
    return num_slots


def pallas_decode_attention(q_bqhd, k_bhsd, v_bhsd, pad_b, slot, *, q_scaled: bool = False,
                            interpret: bool | None = None):
    """Causal attention of one query row per item over a KV cache: item b attends to the slots
    pad_b[b] .. slot (its left padding excluded), as `attend` with `attention_valid`'s mask.

    JAX's Pallas GPU `decode_attention.gqa` with one query head per KV head. Small batches split
    the cache into DECODE_BLOCK-slot splits, so even batch 1 has heads x splits programs in flight
    (splits past `slot` are skipped, and XLA combines the splits' softmax statistics); from
    PARALLEL_ITEMS items x heads on there are enough programs without splits, and each loops over
    its written blocks with nothing to combine. Queries are scaled in the compute dtype before the
    product, as in `attend`; scores and softmax statistics are fp32. Off a GPU it runs in Pallas
    interpret mode.

    Args:
      q_bqhd: [B, 1, H, h] queries of this step (not yet scaled, unless `q_scaled`).
      k_bhsd, v_bhsd: the cache, [B, H, S, h] with S a multiple of DECODE_BLOCK (`cache_slots`).
      pad_b: int [B] left padding; slot: int [] the slot this step wrote.
      q_scaled: the queries come already multiplied by h^-0.5 (`layers.GemvBlock`).
    Returns:
      [B, 1, H, h] in the dtype of q.
    """
    from jax.experimental.pallas.ops.gpu import decode_attention as pallas_decode

    if interpret is None:
        interpret = not config.on_gpu()
    num_slots = k_bhsd.shape[2]
    splits = 1 if q_bqhd.shape[0] * q_bqhd.shape[2] >= PARALLEL_ITEMS else num_slots // DECODE_BLOCK
    q = (q_bqhd if q_scaled else _scaled(q_bqhd))[:, 0]
    y = pallas_decode.gqa(
        q, jnp.swapaxes(k_bhsd, 1, 2).astype(q.dtype), jnp.swapaxes(v_bhsd, 1, 2).astype(q.dtype),
        start_idx=pad_b.astype(jnp.int32), kv_seq_len=jnp.broadcast_to(slot + 1, pad_b.shape).astype(jnp.int32),
        sm_scale=1.0, block_k=DECODE_BLOCK, k_splits=splits, num_warps=DECODE_WARPS, num_stages=DECODE_STAGES,
        interpret=interpret,
    )
    return y[:, None].astype(q_bqhd.dtype)


def cache_block_attention(q, k_ref, v_ref, start, stop, block: int):
    """Online-softmax attention of one fp32 query [h] over cache slots start .. stop - 1 of refs
    [S, h], a block of slots a step: (running max, sum of weights, unnormalised output [h]), as
    `pallas_decode_attention` accumulates them (weights rounded to the values' dtype before the
    product, sums in fp32). Inside a Pallas kernel."""
    from jax.experimental import pallas as pl

    f32 = jnp.float32
    lowest = jnp.finfo(f32).min

    def body(j, carry):
        m, l, acc = carry
        slots = pl.ds(j * block, block)
        s = (k_ref[slots, :].astype(f32) * q[None, :]).sum(-1)  # [block]
        index = j * block + jnp.arange(block)
        s = jnp.where((index >= start) & (index < stop), s, lowest)
        m_next = jnp.maximum(m, s.max())
        alpha, p = jnp.exp(m - m_next), jnp.exp(s - m_next)
        v = v_ref[slots, :]
        pv = (p.astype(v.dtype).astype(f32)[:, None] * v.astype(f32)).sum(0)
        return m_next, l * alpha + p.sum(), acc * alpha + pv

    zero = jnp.zeros((), f32)
    return jax.lax.fori_loop(start // block, pl.cdiv(stop, block), body,
                             (zero + lowest, zero, jnp.zeros(q.shape, f32)))


def _decode_step_kernel(q_ref, k_new_ref, v_new_ref, k_ref, v_ref, pad_ref, slot_ref, y_ref, k_out_ref, v_out_ref, *,
                        block: int, q_scale):
    from jax.experimental import pallas as pl

    f32 = jnp.float32
    slot = slot_ref[()]
    q = q_ref[...]
    if q_scale is not None:  # in the compute dtype, as `_scaled`
        q = q * jnp.asarray(q_scale, q.dtype)
    q = q.astype(f32)
    k_new, v_new = k_new_ref[...].astype(k_ref.dtype), v_new_ref[...].astype(v_ref.dtype)
    m, l, acc = cache_block_attention(q, k_ref, v_ref, pad_ref[()], slot, block)
    s = (k_new.astype(f32) * q).sum()  # this step's own key, from registers
    m_next = jnp.maximum(m, s)
    alpha, p = jnp.exp(m - m_next), jnp.exp(s - m_next)
    acc = acc * alpha + p.astype(v_new.dtype).astype(f32) * v_new.astype(f32)
    y_ref[...] = (acc / (l * alpha + p)).astype(y_ref.dtype)
    k_out_ref[pl.ds(slot, 1), :] = k_new[None, :]  # the cache's slot `slot`; the kernel read only those before it
    v_out_ref[pl.ds(slot, 1), :] = v_new[None, :]


def pallas_decode_step(qkv_b3hd, k_bhsd, v_bhsd, pad_b, slot, *, q_scaled: bool = False,
                       interpret: bool | None = None):
    """A decoding step's attention as one Pallas (Triton) kernel (`decode_attention="pallas_fused"`):
    writes this step's keys and values into the cache at `slot` and attends item b's query to
    slots pad_b[b] .. slot, the same numbers as `pallas_decode_attention` after XLA's cache update.

    Why: at batch 1 on an H100 (docs/benchmarks.md, 2026-11-27) a layer ran, besides the library
    kernel (4.0 us), the query's slice out of the fused QKV product, two cache updates and the
    split combine, five kernels of 1.1-1.75 us each. Here a program is one (item, head): it loops
    over the written blocks of DECODE_BLOCK slots with nothing to combine, takes the new key and
    value from the QKV product (in registers, not read back) and stores them into the cache, whose
    buffer the output aliases. Off a GPU it runs in Pallas interpret mode.

    Args:
      qkv_b3hd: [B, 3, H, h] this step's fused QKV product (queries not yet scaled, unless `q_scaled`).
      k_bhsd, v_bhsd: the cache, [B, H, S, h], S a multiple of DECODE_BLOCK (`cache_slots`).
      pad_b: int [B] left padding; slot: int [] the slot this step writes.
    Returns:
      ([B, 1, H, h] in the QKV product's dtype, the updated k and v caches).
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    if interpret is None:
        interpret = not config.on_gpu()
    batch, _, heads, head_dim = qkv_b3hd.shape
    num_slots = k_bhsd.shape[2]
    part = lambda i: pl.BlockSpec((None, None, None, head_dim), lambda b, h: (b, i, h, 0))
    cache = pl.BlockSpec((None, None, num_slots, head_dim), lambda b, h: (b, h, 0, 0))
    kernel = functools.partial(_decode_step_kernel, block=DECODE_BLOCK,
                               q_scale=None if q_scaled else head_dim ** -0.5)
    y, k_bhsd, v_bhsd = pl.pallas_call(
        kernel, grid=(batch, heads),
        in_specs=[part(0), part(1), part(2), cache, cache, pl.BlockSpec((None,), lambda b, h: (b,)),
                  pl.BlockSpec((), lambda b, h: ())],
        out_specs=[pl.BlockSpec((None, None, head_dim), lambda b, h: (b, h, 0)), cache, cache],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, head_dim), qkv_b3hd.dtype),
                   jax.ShapeDtypeStruct(k_bhsd.shape, k_bhsd.dtype), jax.ShapeDtypeStruct(v_bhsd.shape, v_bhsd.dtype)],
        input_output_aliases={3: 1, 4: 2}, interpret=interpret, name="decode_step_attention",
        compiler_params=plgpu.CompilerParams(num_warps=DECODE_WARPS, num_stages=DECODE_STAGES),
    )(qkv_b3hd, qkv_b3hd, qkv_b3hd, k_bhsd, v_bhsd, pad_b.astype(jnp.int32), jnp.asarray(slot, jnp.int32))
    return y[:, None], k_bhsd, v_bhsd


def causal_valid(length: int, pad_b=None):
    """[B, L, L] bool (B = 1 without padding): key k <= query q, and k not left padding."""
    pos = jnp.arange(length)
    valid = (pos[None, :] <= pos[:, None])[None]
    return valid if pad_b is None else valid & (pos[None, None, :] >= pad_b[:, None, None])


# --- the dispatch -----------------------------------------------------------------------------
def causal_self_attention(q_blhd, k_blhd, v_blhd, pad_b=None, *, impl: str = "xla"):
    """Causal attention of a sequence over itself, with optional left padding.

    Args:
      q_blhd, k_blhd, v_blhd: [B, L, H, h] in the compute dtype (not yet scaled).
      pad_b: int [B], positions before item b's first real one (None: no padding). Padding keys
        are never attended to; padding queries output zeros.
      impl: "xla", "cudnn" or "pallas_tpu" (see the module docstring; `resolve` turns "auto"
        into one of these).
    Returns:
      [B, L, H, h] in the compute dtype.
    """
    if impl == "xla":
        valid = causal_valid(q_blhd.shape[1], pad_b)
        valid = jnp.broadcast_to(valid, (q_blhd.shape[0],) + valid.shape[1:])
        return attend_causal(q_blhd, jnp.swapaxes(k_blhd, 1, 2), jnp.swapaxes(v_blhd, 1, 2), valid)
    if impl == "cudnn":
        return padded_dot_product_attention(q_blhd, k_blhd, v_blhd, pad_b, implementation="cudnn")
    if impl == "pallas_tpu":
        splash = functools.partial(splash_attention, interpret=config.platform() != "tpu")
        return _per_shard(splash, q_blhd, k_blhd, v_blhd, pad_b)
    raise ValueError(f"unknown attention implementation {impl!r}; one of {IMPLEMENTATIONS[1:]}")


def _per_shard(fn, q_blhd, k_blhd, v_blhd, pad_b):
    """`fn` under `shard_map` over the mesh in context (`jax.set_mesh`, as train.py sets it):
    batch over the mesh axes of the logical `batch` axis, heads over those of `heads`.

    XLA cannot partition a Pallas TPU kernel; each device runs it on its own items and heads.
    An axis that the mesh does not divide stays whole. Without a mesh in context (one device),
    `fn` runs as it is.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q_blhd, k_blhd, v_blhd, pad_b)

    def axes(logical: str, size: int):
        names = sharding.logical_to_spec((logical,))[0]
        names = tuple(a for a in ((names,) if isinstance(names, str) else names or ()) if a in mesh.axis_names)
        return names if names and size % int(np.prod([mesh.shape[a] for a in names])) == 0 else None

    P = jax.sharding.PartitionSpec
    batch, heads = axes("batch", q_blhd.shape[0]), axes("heads", q_blhd.shape[2])
    spec = P(batch, None, heads, None)
    if pad_b is None:
        return jax.shard_map(lambda q, k, v: fn(q, k, v, None), mesh=mesh, in_specs=(spec, spec, spec),
                             out_specs=spec, check_vma=False)(q_blhd, k_blhd, v_blhd)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec, P(batch)), out_specs=spec,
                         check_vma=False)(q_blhd, k_blhd, v_blhd, pad_b)


def _scaled(q_blhd):
    return q_blhd * jnp.asarray(q_blhd.shape[-1] ** -0.5, q_blhd.dtype)


def _zero_padding_queries(y_blhd, pad_b):
    if pad_b is None:
        return y_blhd
    real = jnp.arange(y_blhd.shape[1])[None, :] >= pad_b[:, None]
    return jnp.where(real[:, :, None, None], y_blhd, jnp.zeros((), y_blhd.dtype))


# --- cuDNN ------------------------------------------------------------------------------------
def padded_dot_product_attention(q_blhd, k_blhd, v_blhd, pad_b=None, *, implementation: str = "cudnn"):
    """`jax.nn.dot_product_attention` with `is_causal` and left padding.

    cuDNN masks padding through sequence lengths, which count from the front (right padding), so
    each item is rotated left by its padding, attended with lengths L - pad_b, and rotated back.
    Rotation keeps the real positions in order, so the causal pattern among them is unchanged.
    `implementation="xla"` runs the same call through XLA: how the tests check this wrapper on a
    machine without cuDNN.
    """
    scaled = _scaled(q_blhd)
    if pad_b is None:
        return jax.nn.dot_product_attention(scaled, k_blhd, v_blhd, scale=1.0, is_causal=True,
                                            implementation=implementation)
    length = q_blhd.shape[1]
    pos = jnp.arange(length)[None, :]
    to_front = ((pos + pad_b[:, None]) % length)[:, :, None, None]
    back = ((pos - pad_b[:, None]) % length)[:, :, None, None]
    q, k, v = (jnp.take_along_axis(x, to_front, axis=1) for x in (scaled, k_blhd, v_blhd))
    lengths = (length - pad_b).astype(jnp.int32)
    y = jax.nn.dot_product_attention(q, k, v, scale=1.0, is_causal=True, query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths, implementation=implementation)
    return _zero_padding_queries(jnp.take_along_axis(y, back, axis=1), pad_b)


# --- Pallas TPU splash attention --------------------------------------------------------------
def _splash_kernel(length: int, heads: int, block: int, interpret: bool):
    """A causal splash kernel for one item [H, L, h], made anew in each trace.

    Why not cached: its block-sparsity tables become constants of the trace that calls it. A kernel
    kept across traces would need them as arrays on a device, and the mesh in context puts them on
    the mesh's devices, which an ahead-of-time compile for a TPU topology from a host without TPUs
    does not have (`tokensynth compile-step`, training/plan.py). Splash caches the mask processing itself (numpy, by
    the mask's content), so a kernel costs about a millisecond after the first.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    mask = sa.MultiHeadMask([sa.CausalMask((length, length)) for _ in range(heads)])
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q_blhd, k_blhd, v_blhd, pad_b=None, *, interpret: bool = False):
    """Causal splash attention (Pallas TPU), left padding as segment ids.

    Padding positions get segment 0 and real ones segment 1, so a real query sees only real keys
    and a padding query sees only padding keys (never an empty row, which the kernel cannot
    express); padding queries are zeroed afterwards. The sequence is padded at the end to a
    multiple of 128 (the kernel's lane width); causality keeps those positions out of sight.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    batch, length, heads, _ = q_blhd.shape
    padded = -(-length // 128) * 128
    block = next(b for b in SPLASH_BLOCKS if padded % b == 0)
    kernel = _splash_kernel(padded, heads, block, interpret)

    def head_major(x):
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, padded - length), (0, 0)))

    q, k, v = head_major(_scaled(q_blhd)), head_major(k_blhd), head_major(v_blhd)
    if pad_b is None:
        y = jax.vmap(kernel)(q, k, v)
    else:
        segments = (jnp.arange(padded)[None, :] >= pad_b[:, None]).astype(jnp.int32)
        y = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(s, s)))(q, k, v, segments)
    return _zero_padding_queries(jnp.swapaxes(y[:, :, :length], 1, 2), pad_b)
