"""Products of a few rows with a weight matrix, as one Pallas (Triton) kernel each, for decoding.

A decoding step multiplies one row per item (two for a batch of one, `sampling._decode_args`)
by every weight matrix of the model. That is a matrix-vector product, bounded by reading the
weights: 25 MB a layer in bf16, about 5 us at an H200's 4.8 TB/s. In the H200 profile of
2026-11-27 XLA ran them as Triton GEMM fusions with 8 x 64 output tiles that read the weights at
about 1.1 TB/s, 21.7 us a layer, and each LayerNorm, bias, GELU and residual add around them was
a kernel of its own (about 16 kernels a layer, 199 a step; docs/benchmarks.md). XLA cannot fuse
into a GEMM's prologue, so here one kernel does a whole stage: optional LayerNorm of the rows,
the product, the bias, optional exact GELU, optional residual add. Measured on an H200: batch 1
228 ms a 5 s clip against 240-250 with XLA's GEMMs; the kernels still read at about 1 TB/s, so
there is more to take (docs/benchmarks.md, runs 3 and 4 of 2026-11-27).

Layout: the weight is stored transposed, w [N, K] (`layers.GemvDense`), so every program of the
grid reads `block_n` whole rows of K contiguous values, and the grid is N / block_n programs
(hundreds: every SM has several in flight). The product is an elementwise multiply and a sum
over K in fp32, not a tensor-core dot (that needs 16 rows; a few rows are bandwidth-bound
anyway). Inputs are rounded to the weights' dtype before the product, as XLA's bf16 GEMM does;
the bias, GELU and residual are fp32 and rounded once at the end. Off a GPU the kernel runs in
Pallas interpret mode (how the CPU tests check its numbers against `gemv_reference`).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from tokensynth_jax import config

# Tiling of the kernel (benchmarks/accelerator.py's "gemv.NAME=VALUE" variants override these to
# tune on a GPU): weight rows per program, K values per loop step, warps per program, and the
# software-pipelining depth of the K loop. Measured on an H200 (2026-11-27, batch-1 decoding, ms a
# 5 s clip): the K step is what counts (256: 402, 512: 276-289, 1024: 228; each step ends in a
# cross-thread sum); 2 or 4 rows a program 227-228, 8 rows 242, 16 rows 355; 2 or 4 warps 228-229,
# 8 warps 336; 3 stages 285 against 289; unrolling the K loop 228 against 230. XLA's GEMMs: 240-250.
BLOCK_N = 4
BLOCK_K = 1024
NUM_WARPS = 4
NUM_STAGES = 2
# Keep the products of every K step elementwise ([rows, block_n, block_k] fp32) and sum across
# threads once at the end, instead of once a step: 346 against 226 ms on an H100 (2026-11-27).
SUM_ONCE = False
# Not yet measured (the H100 profile of 2026-11-27 has the kernels reading weights at about
# 1 TB/s of 3.35, with or without a LayerNorm, whatever the rows a program; docs/benchmarks.md):
# ROWS_LOOP: one row of x at a time, so a program holds [block_n, block_k] products, not
# [rows, block_n, block_k] (fewer registers, more programs resident on an SM);
# W_FIRST: a program loads its weight rows before the LayerNorm's reductions, so the load is in
# flight while they run (K in one step only).
ROWS_LOOP = False
W_FIRST = False
MAX_ROWS = 8  # more rows than this go to XLA's GEMM, where tensor cores pay


def supported(rows: int, n: int, k: int) -> bool:
    """Whether `gemv` takes these sizes: at most MAX_ROWS rows, and Triton's tensor dimensions are
    powers of two."""
    block_k = min(BLOCK_K, k)
    power_of_two = lambda v: v & (v - 1) == 0
    return (rows <= MAX_ROWS and power_of_two(rows) and n % BLOCK_N == 0 and k % block_k == 0
            and power_of_two(block_k))


def gelu_in_kernel(x):
    """0.5 x (1 + erf(x / sqrt 2)) in fp32, with erf by Abramowitz & Stegun 7.1.26 (absolute
    error below 1.5e-7). Why: Pallas's Triton lowering has no erf (only erf_inv)."""
    z = jnp.abs(x) * (1.0 / math.sqrt(2.0))
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf_abs = 1.0 - poly * jnp.exp(-z * z)
    return 0.5 * x * (1.0 + jnp.where(x < 0, -erf_abs, erf_abs))


def _kernel(*refs, has_ln: bool, gelu: bool, has_residual: bool, eps: float, block_k: int, sum_once: bool,
            rows_loop: bool, w_first: bool):
    from jax.experimental import pallas as pl

    refs = list(refs)
    x_ref, w_ref, b_ref = refs[:3]
    ln_scale_ref, ln_bias_ref = refs[3:5] if has_ln else (None, None)
    residual_ref = refs[5 if has_ln else 3] if has_residual else None
    o_ref = refs[-1]
    rows, k = x_ref.shape
    block_n = o_ref.shape[1]
    steps = k // block_k
    f32 = jnp.float32
    w_all = w_ref[...].astype(f32) if w_first and steps == 1 else None

    def w_chunk(i):  # [block_n, block_k]
        return w_all if w_all is not None else w_ref[:, pl.ds(i * block_k, block_k)].astype(f32)

    def x_chunk(i, row=None):  # [rows, block_k], or [block_k] of one row
        ks = pl.ds(i * block_k, block_k)
        return (x_ref[:, ks] if row is None else x_ref[row, ks]).astype(f32)

    def statistics(row=None):  # two passes over the rows (a few KB, from cache): mean, variance of x - mean
        shape = () if row is not None else (rows,)
        mean = jax.lax.fori_loop(0, steps, lambda i, acc: acc + x_chunk(i, row).sum(-1), jnp.zeros(shape, f32)) / k
        centred = lambda i: x_chunk(i, row) - (mean if row is not None else mean[:, None])
        var = jax.lax.fori_loop(0, steps, lambda i, acc: acc + jnp.square(centred(i)).sum(-1), jnp.zeros(shape, f32)) / k
        return mean, jax.lax.rsqrt(var + eps)

    def normalized(i, stats, row=None):  # the product's inputs, rounded to the compute dtype
        xk = x_chunk(i, row)
        if has_ln:
            ks = pl.ds(i * block_k, block_k)
            mean, rstd = stats if row is not None else (stats[0][:, None], stats[1][:, None])
            xk = (xk - mean) * rstd * ln_scale_ref[ks].astype(f32) + ln_bias_ref[ks].astype(f32)
        return xk.astype(w_ref.dtype).astype(f32)

    def epilogue(acc, row=None):
        y = acc + b_ref[...].astype(f32)
        if gelu:
            y = gelu_in_kernel(y)
        if has_residual:
            y = y + (residual_ref[...] if row is None else residual_ref[row, :]).astype(f32)
        return y.astype(o_ref.dtype)

    if rows_loop:
        for row in range(rows):
            stats = statistics(row) if has_ln else None
            def step(i, a, stats=stats, row=row):
                return a + (normalized(i, stats, row)[None, :] * w_chunk(i)).sum(-1)

            acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((block_n,), f32))
            o_ref[row, :] = epilogue(acc, row)
        return
    stats = statistics() if has_ln else None

    def products(i):  # [rows, block_n, block_k]
        return normalized(i, stats)[:, None, :] * w_chunk(i)[None, :, :]

    if sum_once:
        acc = jax.lax.fori_loop(0, steps, lambda i, a: a + products(i), jnp.zeros((rows, block_n, block_k), f32))
        acc = acc.sum(-1)
    else:
        acc = jax.lax.fori_loop(0, steps, lambda i, a: a + products(i).sum(-1), jnp.zeros((rows, block_n), f32))
    o_ref[...] = epilogue(acc)


def gemv(x_mk, w_nk, b_n, *, ln=None, gelu: bool = False, residual_mn=None, out_dtype=None,
         interpret: bool | None = None):
    """[M, N] = stage(x) . w^T + b, one Pallas kernel (sizes: `supported`).

    Args:
      x_mk: [M, K] rows (M in 1, 2, 4, 8).
      w_nk: [N, K] the weight, transposed; its dtype is the compute dtype.
      b_n: [N] bias.
      ln: (scale [K], bias [K], eps): LayerNorm each row first (fp32 statistics), or None.
      gelu: exact GELU after the bias.
      residual_mn: [M, N] added last, or None.
      out_dtype: of the result (default w's dtype; fp32 for logits).
    Returns:
      [M, N] in `out_dtype`.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    if interpret is None:
        interpret = not config.on_gpu()
    (rows, k), n = x_mk.shape, w_nk.shape[0]
    if not supported(rows, n, k):
        raise ValueError(f"gemv: unsupported sizes M={rows}, N={n}, K={k} (see gemv.supported)")
    block_n, block_k = BLOCK_N, min(BLOCK_K, k)
    args = [x_mk, w_nk, b_n]
    specs = [pl.BlockSpec((rows, k), lambda i: (0, 0)), pl.BlockSpec((block_n, k), lambda i: (i, 0)),
             pl.BlockSpec((block_n,), lambda i: (i,))]
    if ln is not None:
        args += [ln[0], ln[1]]
        specs += [pl.BlockSpec((k,), lambda i: (0,))] * 2
    if residual_mn is not None:
        args.append(residual_mn)
        specs.append(pl.BlockSpec((rows, block_n), lambda i: (0, i)))
    kernel = functools.partial(_kernel, has_ln=ln is not None, gelu=gelu, has_residual=residual_mn is not None,
                               eps=float(ln[2]) if ln is not None else 0.0, block_k=block_k, sum_once=bool(SUM_ONCE),
                               rows_loop=bool(ROWS_LOOP), w_first=bool(W_FIRST))
    return pl.pallas_call(
        kernel, grid=(n // block_n,), in_specs=specs, out_specs=pl.BlockSpec((rows, block_n), lambda i: (0, i)),
        out_shape=jax.ShapeDtypeStruct((rows, n), out_dtype or w_nk.dtype), interpret=interpret, name="gemv",
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
    )(*args)


def gemv_reference(x_mk, w_nk, b_n, *, ln=None, gelu: bool = False, residual_mn=None, out_dtype=None):
    """What `gemv` computes, in XLA (any sizes): the fallback, and what the tests compare with."""
    f32 = jnp.float32
    x = x_mk.astype(f32)
    if ln is not None:
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(var + ln[2]) * ln[0].astype(f32) + ln[1].astype(f32)
    y = jax.lax.dot_general(x.astype(w_nk.dtype), w_nk, (((1,), (1,)), ((), ())), preferred_element_type=f32)
    y = y + b_n.astype(f32)
    if gelu:
        y = jax.nn.gelu(y, approximate=False)
    if residual_mn is not None:
        y = y + residual_mn.astype(f32)
    return y.astype(out_dtype or w_nk.dtype)
