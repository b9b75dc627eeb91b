"""The decode step's Pallas kernels timed alone, on the reference model's shapes (the `kernels`
section of benchmarks/accelerator.py).

Why: a variant of the gemv tiling timed through the whole decode loop costs a compile of the loop
(about 10 s on an H100) for one number a clip; here each weight stage of a step (docs/benchmarks.md,
"Where the time goes on the H100") is one small jit over distinct weight matrices (together more
bytes than the card's L2, as in a step), each product feeding the next as a step's layers do, and
its time per kernel gives the bytes per second the weights are read at. Same for a decode step's
attention: the library kernel with XLA's cache update around it, against
`attention.pallas_decode_step`.

Time per kernel is a difference: the same sweep compiled to run REPEATS[0] and REPEATS[1] times in
one executable, (t1 - t0) / (kernels between them). One call's host dispatch (about 0.1-0.2 ms for
a jit of dozens of arguments) cancels; on 2026-11-28 an H200 timed one sweep a call, and its 19 us
for the QKV product against the 6 us a kernel of a profiled decode step (H100) was mostly that.

Run here (CPU, Pallas interpret mode, shapes divided by 8: a smoke test, numbers meaningless):
  python benchmarks/accelerator.py --quick --sections kernels --out /tmp/accel
"""
from __future__ import annotations

import time

import numpy as np

LAYERS = 12
# A decode step's weight stages at d_model 1024 (batch 1 decodes as 2 rows): name -> (N, K, LayerNorm
# first, GELU, residual added, fp32 out).
STAGES = {
    "qkv": (3072, 1024, True, False, False, False),
    "attention out": (1024, 1024, False, False, True, False),
    "mlp in": (4096, 1024, True, True, False, False),
    "mlp out": (1024, 4096, False, False, True, False),
    "head": (10368, 1024, False, False, False, True),
}
# gemv tilings: name -> module constants of tokensynth_jax/model/gemv.py (the defaults first).
GEMV_VARIANTS = {
    "defaults": {},
    "XLA's product (gemv_reference)": {"xla": 1},
    "a row at a time": {"gemv.ROWS_LOOP": 1},
    "weights loaded first": {"gemv.W_FIRST": 1},
    "a row at a time, weights first": {"gemv.ROWS_LOOP": 1, "gemv.W_FIRST": 1},
    "2 rows x 2048": {"gemv.BLOCK_N": 2, "gemv.BLOCK_K": 2048},
    "2 rows x 4096, a row at a time": {"gemv.BLOCK_N": 2, "gemv.BLOCK_K": 4096, "gemv.ROWS_LOOP": 1},
    "1 row a program, a row at a time": {"gemv.BLOCK_N": 1, "gemv.ROWS_LOOP": 1},
    "8 rows a program, a row at a time": {"gemv.BLOCK_N": 8, "gemv.ROWS_LOOP": 1},
    "2 warps, a row at a time": {"gemv.NUM_WARPS": 2, "gemv.ROWS_LOOP": 1},
    "3 stages": {"gemv.NUM_STAGES": 3},
}
# gemv tilings timed first (the ones closest to a default decision), the rest after the attention.
GEMV_FIRST = ("defaults", "weights loaded first", "XLA's product (gemv_reference)")
# A decode step's attention: (batch, cache slots, the slot written): batch 1 as 2 and batch 256,
# a 5 s clip's prompt and rows halfway (about 330 slots written of 576; the cache rounds up to
# whole blocks, `attention.cache_slots`).
ATTENTION_CASES = ((2, 576, 330), (256, 576, 330))
# Tilings of the decode attention kernels: name -> module constants of tokensynth_jax/model/attention.py
# (the defaults: blocks of 64 slots, 4 warps, 2 stages; no GPU has timed another).
ATTENTION_VARIANTS = {
    "blocks of 128 slots": {"attention.DECODE_BLOCK": 128},
    "blocks of 32 slots": {"attention.DECODE_BLOCK": 32},
    "8 warps": {"attention.DECODE_WARPS": 8},
    "2 warps": {"attention.DECODE_WARPS": 2},
    "3 stages": {"attention.DECODE_STAGES": 3},
    "1 stage": {"attention.DECODE_STAGES": 1},
}


# Sweeps per executable (the difference of the two times is what is reported), and the bytes a
# stage's distinct weights add up to at least (an H100's or H200's L2 is 50 MB). Kept small: the
# executables unroll every product (up to 90 Pallas calls for the attention output's 2 MB weights),
# and each costs compile time out of the section's share of the lease.
REPEATS = (1, 2)
L2_BYTES = 60e6


def _best(fn, args, reps: int) -> float:
    """Seconds a call of `fn`, the best of `reps` after a warm-up (which compiles)."""
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def _per_sweep(make, args, reps: int, repeats: tuple[int, int]) -> float:
    """Device seconds of one sweep: `make(repeats)` is a function running the sweep `repeats` times
    in one executable; the two repeat counts' times differ by (repeats[1] - repeats[0]) sweeps."""
    low, high = (_best(make(r), args, reps) for r in repeats)
    if high <= low:  # no number rather than an absurd one
        raise RuntimeError(f"timing noise: {repeats[1]} sweeps took {high:.2e} s, {repeats[0]} took {low:.2e} s")
    return (high - low) / (repeats[1] - repeats[0])


def _chained(x, out):
    """x, made to depend on `out` (times zero, which XLA keeps for floats: 0 * nan is nan), so the
    next product waits for this one, as a step's next layer does."""
    return x + (out.reshape(-1)[0] * 0).astype(x.dtype)


def time_gemv_stage(stage: str, *, xla: bool = False, rows: int = 2, shrink: int = 1, reps: int = 20,
                    repeats: tuple[int, int] = REPEATS, min_bytes: float = L2_BYTES) -> dict:
    """One weight stage, a kernel for each of at least LAYERS distinct weights (L2_BYTES of them
    together, `min_bytes`): microseconds a kernel and GB/s of weights."""
    import jax
    import jax.numpy as jnp

    from tokensynth_jax.model import gemv

    n, k, has_ln, gelu, residual, fp32 = STAGES[stage]
    n, k = n // shrink, k // shrink
    copies = max(LAYERS, -(-int(min_bytes) // (n * k * 2)))
    rng = np.random.default_rng(0)
    bf16 = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02, jnp.bfloat16)
    x, ws, bs = bf16(rows, k), [bf16(n, k) for _ in range(copies)], [bf16(n) for _ in range(copies)]
    ln = (jnp.ones(k, jnp.float32), jnp.zeros(k, jnp.float32), 1e-5) if has_ln else None
    res = bf16(rows, n) if residual else None
    product = gemv.gemv_reference if xla else gemv.gemv

    def make(repeats):
        def sweeps(x, ws, bs, res):
            out = None
            for _ in range(repeats):
                for w, b in zip(ws, bs):
                    out = product(x, w, b, ln=ln, gelu=gelu, residual_mn=res, out_dtype=jnp.float32 if fp32 else None)
                    x = _chained(x, out)
            return out
        return jax.jit(sweeps)

    s = _per_sweep(make, (x, ws, bs, res), reps, repeats) / copies
    return {"stage": stage, "n": n, "k": k, "rows": rows, "copies": copies, "us": 1e6 * s, "gb_s": n * k * 2 / s / 1e9}


def time_attention(batch: int, slots: int, slot: int, *, fused: bool, heads: int = 16, head_dim: int = 64,
                   reps: int = 20, repeats: tuple[int, int] = REPEATS) -> dict:
    """A decode step's attention over LAYERS distinct caches, as the model runs it
    (`layers.attend_qkv_with_cache`): the library kernel after XLA's cache update and the query's
    slice, or the fused kernel; microseconds a layer and GB/s of cache read."""
    import jax
    import jax.numpy as jnp

    from tokensynth_jax.model import attention, layers

    decode_impl = "pallas_fused" if fused else "pallas_gpu"
    slots = attention.cache_slots(slots, decode_impl)  # whole blocks of the kernel's DECODE_BLOCK
    rng = np.random.default_rng(1)
    bf16 = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16)
    qkv = bf16(batch, 1, 3, heads, head_dim)  # one decoded row per item, the queries prescaled (GemvBlock)
    caches = [layers.KVCache(bf16(batch, heads, slots, head_dim), bf16(batch, heads, slots, head_dim))
              for _ in range(LAYERS)]
    pad, valid = jnp.zeros(batch, jnp.int32), jnp.ones((batch, 1, slots), bool)  # the Pallas step reads no mask

    def make(repeats):
        def step(qkv, caches, s):  # what a GemvBlock's attention runs, layer after layer
            for _ in range(repeats):
                for i, cache in enumerate(caches):
                    y, caches[i] = layers.attend_qkv_with_cache(qkv, valid, cache, s, pad, "xla", decode_impl,
                                                                q_scaled=True)
                    qkv = _chained(qkv, y)
            return y, caches
        fn = jax.jit(step, donate_argnums=1)

        def call(qkv, s):  # the caches are donated and come back updated, as in the decode loop
            y, state["caches"] = fn(qkv, state["caches"], s)
            return y
        return call

    state = {"caches": caches}
    t = _per_sweep(make, (qkv, jnp.int32(slot)), reps, repeats) / LAYERS
    read = 2 * batch * heads * (slot + 1) * head_dim * 2
    return {"batch": batch, "slots": slots, "slot": slot, "fused": fused, "us": 1e6 * t, "gb_s": read / t / 1e9}
