"""Batched generation of codec tokens: one prefill, then one jitted `lax.while_loop`.

Prompts of different lengths are left-padded (model.py explains the slot layout), so the whole
batch writes one KV-cache slot per step and stops on device when every item has produced its
end row (an all-zero row) or reached its length cap. No per-token host sync, no recomputed
context. The delay pattern is removed at the boundary: the result is codec codes [B, F, K].
Each item may have its own row cap and its own fewest frames (`min_frames`): until an item has
written that many frames, its end row is masked out (`forbid_early_end`), so a synthesis window
cannot fall silent before its last note-off.
`decode_loop` is that loop as a traceable function over a named carry (`DecodeState`); `generate`
jits it and `export` traces it. The model runs through `TokenSynth.for_decoding` (fused QKV
projections, optionally bf16 parameters).

Samplers are small frozen dataclasses applied per channel. `reference_quirks=True` reproduces
the reference's filters exactly (top-k keeps k + 1 codebook candidates; top-p keeps the first
id whose cumulative probability is >= p for MIDI but > p for codebooks; no temperature).

Guidance:
- `CFG`: classifier-free guidance for a model trained with a null timbre; the batch runs twice
  (timbre and null) and logits become u + s * (c - u) on every channel.
- `FirstNoteGuidance`: the reference's scheme with its separate unconditional model. For the
  first `steps` non-silent rows (silent: the first codebook's argmax is the silence id) the first
  max(count, 2) codebooks are blended s * c + (1 - s) * u. The reference feeds its unconditional
  model an all-zero row after the first guided step (it reads `tokens[:, -2:-1]`, the end of its
  buffer); we feed the rows actually generated, so the unconditional model sees the same audio.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tokensynth_jax.config import ModelConfig, on_cpu, on_gpu
from tokensynth_jax.model.transformer import TokenSynth
from tokensynth_jax.tokens import token_layout

PROMPT_BUCKET = 16  # prompt lengths round up to a multiple of this, so compiles are reused


# --- samplers ----------------------------------------------------------------------------------------
# How TopK and TopP find their cut-off. "sort": a sort (TopP) or `lax.top_k` (TopK) of each
# channel. "bisect": a 32-step bisection over the float32 bit patterns of the logits for the
# cut-off logit itself, each step a compare-and-sum over the channel; the same candidates without
# a sort (TopP's probability sums may round differently in the last bit). On XLA:CPU, where sort
# and top_k are comparison sorts, the bisection took 2.2 ms of CPU time a step for top-p at batch
# 16 against 30 ms for the sort (0.12 vs 2.2 ms at batch 1); the whole batch-16 step took 74 ms
# with the sort. "auto": sort on GPU (one kernel there, where a 32-step loop may cost 32 launches;
# not measured yet: benchmarks/accelerator.py times both), bisect elsewhere.
FILTER_METHODS = ("auto", "sort", "bisect")


def filter_method(method: str) -> str:
    """The method "auto" stands for on the default backend (a method other than "auto" as it is)."""
    if method != "auto":
        return method
    return "sort" if on_gpu() else "bisect"


def _ordered_bits(x):
    """uint32 keys in the order of the float32 values x; -0.0 and +0.0 get one key, as they compare equal."""
    x = jnp.where(x == 0, 0.0, x.astype(jnp.float32))
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _largest_key_where(keys, ok):
    """The largest t with ok(t) [..., 1] (0 if none) for a predicate that holds at 0 and, as t
    grows, holds until some key and never after: a bisection over uint32 in 32 steps."""
    def step(_, bounds):
        lo, hi = bounds
        mid = hi - (hi - lo) // 2  # upper middle, so lo always moves when ok(mid)
        good = ok(mid)
        return jnp.where(good, mid, lo), jnp.where(good | (mid == lo), hi, mid - 1)

    lo = jnp.zeros(keys.shape[:-1] + (1,), jnp.uint32)
    hi = keys.max(axis=-1, keepdims=True)
    return jax.lax.fori_loop(0, 32, step, (lo, hi))[0]


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Arg-max on every channel."""

    def filter(self, logits, is_midi: bool):
        return logits

    stochastic = False


@dataclasses.dataclass(frozen=True)
class TopK:
    """Sample among the k most likely ids of each channel."""

    k: int
    temperature: float = 1.0
    reference_quirks: bool = False
    method: str = "auto"  # FILTER_METHODS
    stochastic = True

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"top-k needs k >= 1, got {self.k}")
        if self.method not in FILTER_METHODS:
            raise ValueError(f"unknown filter method {self.method!r}; one of {FILTER_METHODS}")

    def filter(self, logits, is_midi: bool):
        logits = logits if self.reference_quirks else logits / self.temperature
        k = self.k + (1 if self.reference_quirks and not is_midi else 0)
        k = min(k, logits.shape[-1])
        if filter_method(self.method) == "sort":
            kth = jax.lax.top_k(logits, k)[0][..., -1:]
            return jnp.where(logits >= kth, logits, -jnp.inf)
        # The k-th largest logit is the largest t that at least k logits reach.
        keys = _ordered_bits(logits)
        kth = _largest_key_where(keys, lambda t: (keys >= t).sum(-1, keepdims=True) >= k)
        return jnp.where(keys >= kth, logits, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class TopP:
    """Nucleus sampling: the smallest set of most likely ids whose probability reaches p."""

    p: float
    temperature: float = 1.0
    reference_quirks: bool = False
    method: str = "auto"  # FILTER_METHODS
    stochastic = True

    def __post_init__(self):
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"top-p needs 0 < p <= 1, got {self.p}")
        if self.method not in FILTER_METHODS:
            raise ValueError(f"unknown filter method {self.method!r}; one of {FILTER_METHODS}")

    def filter(self, logits, is_midi: bool):
        logits = logits if self.reference_quirks else logits / self.temperature
        strict = self.reference_quirks and not is_midi  # the reference's > for codebooks
        if filter_method(self.method) == "sort":
            # Unstable: only the values are sorted, so ties cannot change them, and a stable sort is
            # an iota operand more for XLA:GPU's sort kernel (the H200 profile of 2026-11-27).
            sorted_desc = -jnp.sort(-logits, axis=-1, stable=False)
            cum = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
            reached = cum > self.p if strict else cum >= self.p
            # Index of the first id that reaches p (the last one kept); all kept if none reaches it.
            last = jnp.where(reached.any(-1), jnp.argmax(reached, axis=-1), logits.shape[-1] - 1)
            threshold = jnp.take_along_axis(sorted_desc, last[..., None], axis=-1)
            return jnp.where(logits >= threshold, logits, -jnp.inf)
        # The cut-off is the largest logit t whose ids at or above it hold probability p (all
        # kept if rounding leaves even the whole channel short of it, as the sort does).
        weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
        target = self.p * weights.sum(axis=-1, keepdims=True)
        keys = _ordered_bits(logits)

        def reaches(t):
            mass = jnp.where(keys >= t, weights, 0.0).sum(axis=-1, keepdims=True)
            return mass > target if strict else mass >= target

        threshold = _largest_key_where(keys, reaches)
        return jnp.where(keys >= threshold, logits, -jnp.inf)


Sampler = Greedy | TopK | TopP


def sample_row(sampler: Sampler, key, logits_bv, cfg: ModelConfig):
    """One row [B, C] of ids from the concatenated logits of all channels."""
    midi = logits_bv[:, : cfg.midi_vocab_size]
    books = logits_bv[:, cfg.midi_vocab_size :].reshape(-1, cfg.num_codebooks, cfg.codebook_vocab_size)
    midi, books = sampler.filter(midi, True), sampler.filter(books, False)
    if not sampler.stochastic:
        return jnp.concatenate([jnp.argmax(midi, -1)[:, None], jnp.argmax(books, -1)], 1).astype(jnp.int32)
    k_midi, k_books = jax.random.split(key)
    ids_midi = jax.random.categorical(k_midi, midi, axis=-1)
    ids_books = jax.random.categorical(k_books, books, axis=-1)
    return jnp.concatenate([ids_midi[:, None], ids_books], 1).astype(jnp.int32)


# --- guidance ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CFG:
    """Classifier-free guidance with the model's learned null timbre."""

    scale: float


@dataclasses.dataclass(frozen=True)
class FirstNoteGuidance:
    """The reference's first-note guidance with a separate unconditional model."""

    scale: float
    steps: int = 9  # guided non-silent rows
    silence_id: int = 569  # first-codebook id of silence (DAC 44.1 kHz code 568)


# --- results -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Generation:
    """Generated tokens. `codes[b, :num_frames[b]]` are item b's codes; the rest is -1."""

    codes: np.ndarray  # [B, F, K] int32
    num_frames: np.ndarray  # [B]
    rows: np.ndarray  # [B, R, C] generated rows (delayed, ids), zeros after the end
    num_rows: np.ndarray  # [B] rows before the end row / cap
    ended: np.ndarray  # [B] bool: stopped on an end row (False: hit the length cap)


def rows_to_codes(rows_brc: np.ndarray, num_rows_b: np.ndarray, num_codebooks: int):
    """Removes the delay pattern per item; returns (codes [B, F, K] padded with -1, frames [B])."""
    frames = np.maximum(num_rows_b - (num_codebooks - 1), 0)
    width = int(frames.max()) if len(frames) else 0
    codes = np.full((len(rows_brc), width, num_codebooks), -1, np.int32)
    for b, n in enumerate(num_rows_b):
        if frames[b]:
            codes[b, : frames[b]] = token_layout.remove_delay(rows_brc[b, :n, 1:])
    return codes, frames


# --- the loop ----------------------------------------------------------------------------------------
def forbid_early_end(logits_bv, step, min_frames_b, cfg: ModelConfig):
    """Masks the empty id of the codebooks that frames below `min_frames_b` fill at row `step`.

    Under the delay pattern, frame t's codebook 0 sits in row t and its last codebook in row
    t + K - 1, so rows below min_frames have a codebook 0 and rows K - 1 .. min_frames + K - 2 a
    last codebook. Masking those empty ids keeps the row from being the (all-zero) end row and
    keeps the delay pattern intact, so an item writes at least `min_frames_b` frames.
    """
    k = cfg.num_codebooks
    first_empty = cfg.midi_vocab_size  # id 0 of codebook 0
    last_empty = cfg.midi_vocab_size + (k - 1) * cfg.codebook_vocab_size  # id 0 of the last codebook
    first = step < min_frames_b
    last = (step >= k - 1) & (step < min_frames_b + k - 1)
    logits_bv = logits_bv.at[:, first_empty].set(jnp.where(first, -jnp.inf, logits_bv[:, first_empty]))
    return logits_bv.at[:, last_empty].set(jnp.where(last, -jnp.inf, logits_bv[:, last_empty]))


@flax.struct.dataclass
class DecodeState:
    """The carry of the decode `while_loop`: one row a step for the whole batch.

    B is the batch; under classifier-free guidance the model's half (`logits`, `cache`) has 2B
    items (timbre, then null). Without first-note guidance the `uncond_*` fields are empty.
    """

    step: jax.Array  # int32 []: rows generated so far; the next is written at slot P + 1 + step
    done: jax.Array  # bool [B]: stopped (end row, length cap)
    rows: jax.Array  # int32 [B, max_rows, C]: generated rows, zeros after each item's end
    num_rows: jax.Array  # int32 [B]: rows before the end row or cap
    ended: jax.Array  # bool [B]: stopped on an end row (not the cap)
    logits: jax.Array  # float32 [B or 2B, V]: logits of the next row
    cache: tuple  # the model's KV cache (`TokenSynth.init_cache`)
    uncond_logits: jax.Array  # float32 [B, V] or [B, 0]: the unconditional model's next logits
    uncond_cache: tuple  # its KV cache, or ()
    guided: jax.Array  # int32 [B]: non-silent rows blended so far (first-note guidance)


def decode_loop(model: TokenSynth, rows_bpc, pad_b, cap_b, timbre_bt, key, *, sampler: Sampler,
                max_rows: int, guidance: CFG | FirstNoteGuidance | None = None,
                unconditional_model: TokenSynth | None = None, min_frames_b=None) -> DecodeState:
    """Prefill and the decode `while_loop`, as a traceable function (`generate` jits it; `export`
    traces it into a `jax.export` artifact). Stops on device when every item is done.

    Args:
      model: a timbre-conditioned TokenSynth (prepared for decoding here if it is not yet).
      rows_bpc, pad_b, cap_b: left-padded prompt rows [B, P, C], paddings [B] and row caps [B]
        (`prepare_prompts`).
      timbre_bt: CLAP embeddings [B, T].
      key: item b samples with fold_in(key, b), its step s with fold_in(that, s).
      sampler: Greedy(), TopK(...) or TopP(...).
      max_rows: rows of the output buffer (static).
      guidance, unconditional_model: as in `generate`.
      min_frames_b: int32 [B] frames each item writes before its end row may come
        (`forbid_early_end`), or None.
    Returns:
      The final DecodeState: `rows`, `num_rows` and `ended` are the results.
    """
    model = model.for_decoding()
    cfg = model.cfg
    batch, num_prompt = rows_bpc.shape[:2]
    slots = num_prompt + 1 + max_rows
    cfg_guided = isinstance(guidance, CFG)
    first_note = isinstance(guidance, FirstNoteGuidance)

    if cfg_guided:  # timbre half and null half in one batch
        use_null = jnp.concatenate([jnp.zeros(batch, bool), jnp.ones(batch, bool)])
        two = lambda x: jnp.concatenate([x, x])
        logits, cache = model.prefill(two(rows_bpc), two(pad_b), two(timbre_bt), cache=model.init_cache(2 * batch, slots),
                                      use_null_b=use_null)
    else:
        logits, cache = model.prefill(rows_bpc, pad_b, timbre_bt, cache=model.init_cache(batch, slots))
    zero_pad = jnp.zeros(batch, jnp.int32)
    if first_note:
        uncond = unconditional_model.for_decoding()
        u_logits, u_cache = uncond.prefill(rows_bpc[:, :0], zero_pad, None, cache=uncond.init_cache(batch, 1 + max_rows),
                                           use_null_b=jnp.zeros(batch, bool))
    else:
        u_logits, u_cache = jnp.zeros((batch, 0)), ()
    item_keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))
    feed_pad = jnp.concatenate([pad_b, pad_b]) if cfg_guided else pad_b

    def guided(s: DecodeState):
        """The logits to sample from, and the updated count of guided rows."""
        if cfg_guided:
            c, u = s.logits[:batch], s.logits[batch:]
            return u + guidance.scale * (c - u), s.guided
        if not first_note:
            return s.logits, s.guided
        lo = cfg.midi_vocab_size
        first_book = s.logits[:, lo : lo + cfg.codebook_size]
        silent = jnp.argmax(first_book, -1) == guidance.silence_id
        guide = ~silent & (s.guided < guidance.steps)
        count = s.guided + guide
        books = jnp.maximum(count, 2)  # codebooks blended: 2, 2, 3, ..., steps
        channel = jnp.arange(s.logits.shape[-1])
        in_books = (channel[None] >= lo) & (channel[None] < lo + books[:, None] * cfg.codebook_vocab_size)
        # The reference skips blending when the first guided row is the very first audio row.
        blend = (guide & ~((count == 1) & (s.step == 0)))[:, None] & in_books
        mixed = guidance.scale * s.logits + (1.0 - guidance.scale) * s.uncond_logits
        return jnp.where(blend, mixed, s.logits), count

    def cond(s: DecodeState):
        return (s.step < max_rows) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        mixed, count = guided(s)
        if min_frames_b is not None:
            mixed = forbid_early_end(mixed, s.step, min_frames_b, cfg)
        keys = jax.vmap(lambda k: jax.random.fold_in(k, s.step))(item_keys)
        row = jax.vmap(lambda k, l: sample_row(sampler, k, l[None], cfg)[0])(keys, mixed)
        is_end = jnp.all(row == 0, axis=-1)
        live = ~s.done & (s.step < cap_b)
        keep = live & ~is_end
        row = jnp.where(keep[:, None], row, 0)
        done = ~keep
        feed = jnp.concatenate([row, row]) if cfg_guided else row
        logits, cache = model.decode(feed, feed_pad, num_prompt + 1 + s.step, cache=s.cache)
        u_logits, u_cache = s.uncond_logits, s.uncond_cache
        if first_note:
            u_logits, u_cache = jax.lax.cond(
                jnp.any(~done & (count < guidance.steps)),
                lambda: uncond.decode(row, zero_pad, 1 + s.step, cache=s.uncond_cache),
                lambda: (s.uncond_logits, s.uncond_cache),
            )
        return DecodeState(
            step=s.step + 1, done=done,
            rows=jax.lax.dynamic_update_slice_in_dim(s.rows, row[:, None], s.step, axis=1),
            num_rows=jnp.where(keep, s.step + 1, s.num_rows), ended=s.ended | (live & is_end),
            logits=logits, cache=cache, uncond_logits=u_logits, uncond_cache=u_cache, guided=count,
        )

    start = DecodeState(
        step=jnp.int32(0), done=cap_b <= 0, rows=jnp.zeros((batch, max_rows, cfg.num_channels), jnp.int32),
        num_rows=jnp.zeros(batch, jnp.int32), ended=jnp.zeros(batch, bool), logits=logits, cache=cache,
        uncond_logits=u_logits, uncond_cache=u_cache, guided=jnp.zeros(batch, jnp.int32),
    )
    return jax.lax.while_loop(cond, body, start)


def _decode_split(graphdef, state, uncond_graphdef, uncond_state, rows_bpc, pad_b, cap_b, timbre_bt, key,
                  min_frames_b=None, *, sampler, guidance, max_rows):
    """`decode_loop` over split modules (graph definitions are static jit arguments); returns the
    results only, so the cache is not an output."""
    uncond = nnx.merge(uncond_graphdef, uncond_state) if uncond_graphdef is not None else None
    final = decode_loop(nnx.merge(graphdef, state), rows_bpc, pad_b, cap_b, timbre_bt, key, sampler=sampler,
                        max_rows=max_rows, guidance=guidance, unconditional_model=uncond, min_frames_b=min_frames_b)
    return final.rows, final.num_rows, final.ended


# XLA options of the decode loop under `ModelConfig.decode_gemm="cublas"` on a GPU: XLA's Triton
# GEMM fusions off, so every product goes to cuBLAS. Why: in the H200 profile the two-row products
# of batch-1 decoding ran as Triton GEMM fusions (8 x 64 output tiles) that read the weights at
# about 1.1 TB/s of the card's 4.8 (docs/benchmarks.md); cuBLAS has kernels for skinny products.
CUBLAS_GEMM_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
# XLA options of the decode loop on a CPU: YNNPACK's fusions off, so the products of a step run as
# XLA:CPU's own dots. Why: on 2 cores of an AMD EPYC (2026-11-27, jax 0.10.2) YNNPACK ran the
# few-row products of decoding below the memory bandwidth (the 12-layer stack at 16 rows: 27.8 ms,
# 21.8 GB/s, against 21.3 ms with XLA's dots); reference size, top-p, 449 rows: batch 16
# 59.9 -> 52.6 ms a step, batch 1 the same within noise (17.0-17.5 against 16.7-17.5 ms).
# The option is experimental: a jaxlib that does not know it compiles the loop without it.
CPU_DECODE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
_decode_jits: dict = {}


@functools.cache
def _cpu_takes(options: tuple) -> bool:
    """Whether this jaxlib's XLA compiles with these options (a tiny function, once a process)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(np.float32(0)).compile()
        return True
    except Exception:  # noqa: BLE001 - XLA's error for an unknown option is a plain runtime error
        return False


def decode_compile_options(cfg: ModelConfig) -> dict:
    """XLA options of the decode loop's compile for `cfg`: CUBLAS_GEMM_OPTIONS under
    `decode_gemm="cublas"` on a GPU, CPU_DECODE_OPTIONS on a CPU that takes them, else none.
    (benchmarks/accelerator.py adds its "xla." variants here.)"""
    if on_gpu():
        return dict(CUBLAS_GEMM_OPTIONS) if cfg.decode_gemm_impl == "cublas" else {}
    if on_cpu() and _cpu_takes(tuple(sorted(CPU_DECODE_OPTIONS.items()))):
        return dict(CPU_DECODE_OPTIONS)
    return {}


def _decode_jit_for(cfg: ModelConfig):
    """The jitted decode loop, compiled with `decode_compile_options(cfg)` (one jit per set of options)."""
    options = decode_compile_options(cfg)
    key = tuple(sorted(options.items()))
    if key not in _decode_jits:
        _decode_jits[key] = jax.jit(
            _decode_split, static_argnames=("graphdef", "uncond_graphdef", "sampler", "guidance", "max_rows"),
            compiler_options=options or None,
        )
    return _decode_jits[key]


def prepare_prompts(midi_tokens: Sequence[np.ndarray], cfg: ModelConfig, max_rows: int,
                    row_caps: Sequence[int] | None = None):
    """Left-padded prompt rows [B, P, C], pads [B] and per-item row caps [B].

    Item b's audio row r sits at position M_b + 2 + r; the cap keeps it inside `max_len`, and
    within `max_rows` and `row_caps[b]` when given.
    Raises ValueError when a prompt leaves no room for audio.
    """
    prompts = [token_layout.prompt_rows(m, cfg.num_codebooks) for m in midi_tokens]
    longest = max(p.shape[0] for p in prompts)
    width = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    rows = np.zeros((len(prompts), width, cfg.num_channels), np.int32)
    pads = np.zeros(len(prompts), np.int32)
    caps = np.zeros(len(prompts), np.int32)
    for b, p in enumerate(prompts):
        rows[b, width - p.shape[0] :] = p
        pads[b] = width - p.shape[0]
        caps[b] = min(max_rows, cfg.max_len - 1 - p.shape[0], max_rows if row_caps is None else row_caps[b])
        if caps[b] < cfg.num_codebooks:
            raise ValueError(
                f"item {b}: {p.shape[0] - 1} MIDI tokens leave {caps[b]} of {cfg.max_len} positions for audio"
            )
    return rows, pads, caps


def _decode_args(model, midi_tokens, timbre, *, sampler, seed, max_rows, guidance, unconditional_model, dtype,
                 row_caps=None, min_frames=None):
    """(positional, keyword) arguments of the jitted decode loop for `generate`'s arguments."""
    cfg = model.cfg
    if isinstance(guidance, CFG) and not cfg.null_timbre:
        raise ValueError("classifier-free guidance needs a model trained with a null timbre")
    if isinstance(guidance, FirstNoteGuidance) and unconditional_model is None:
        raise ValueError("first-note guidance needs the unconditional model")
    rows, pads, caps = prepare_prompts(midi_tokens, cfg, max_rows, row_caps)
    if min_frames is not None:
        min_frames = np.minimum(np.asarray(min_frames, np.int32), caps - (cfg.num_codebooks - 1))
    if cfg.conditioning == "timbre":
        timbre = np.asarray(timbre, np.float32).reshape(len(rows), cfg.timbre_dim)
    if len(rows) == 1 and cfg.decodes_as_gemm:
        # A second item, a copy that is done from the start (cap 0) and whose rows are dropped:
        # every product of the loop then has two rows. Why: XLA:GPU rewrites a one-row product
        # (under 10M weights: all of a layer's) into a multiply-and-reduce fusion that read the
        # weights at a fraction of the bandwidth in the H200 profile (docs/benchmarks.md); two
        # rows are a GEMM. Item 0 samples with the same keys (fold_in(key, 0)) either way.
        rows, pads, caps = (np.concatenate([a, a]) for a in (rows, pads, caps))
        caps[1] = 0
        timbre = np.concatenate([timbre, timbre]) if cfg.conditioning == "timbre" else timbre
        min_frames = None if min_frames is None else np.concatenate([min_frames, min_frames])
    min_frames = None if min_frames is None else jnp.asarray(min_frames)
    timbre = jnp.asarray(timbre) if cfg.conditioning == "timbre" else timbre
    graphdef, state = nnx.split(model.for_decoding(dtype))
    if isinstance(guidance, FirstNoteGuidance):
        u_graphdef, u_state = nnx.split(unconditional_model.for_decoding(dtype))
    else:
        u_graphdef, u_state = None, None
    args = (graphdef, state, u_graphdef, u_state, jnp.asarray(rows), jnp.asarray(pads), jnp.asarray(caps), timbre,
            jax.random.PRNGKey(seed), min_frames)
    return args, {"sampler": sampler, "guidance": guidance, "max_rows": int(max_rows)}


def generate(
    model: TokenSynth,
    midi_tokens: Sequence[np.ndarray],
    timbre=None,
    *,
    sampler: Sampler = Greedy(),
    seed: int = 0,
    max_rows: int = 450,
    guidance: CFG | FirstNoteGuidance | None = None,
    unconditional_model: TokenSynth | None = None,
    row_caps: Sequence[int] | None = None,
    min_frames: Sequence[int] | None = None,
    dtype: str | None = None,
) -> Generation:
    """Generates codec tokens for a batch of MIDI prompts.

    Args:
      model: a timbre-conditioned TokenSynth (or one from its `for_decoding`, to prepare once).
      midi_tokens: one int array of MIDI tokens per item (lengths may differ).
      timbre: CLAP embeddings [B, T].
      sampler: Greedy(), TopK(k, ...) or TopP(p, ...).
      seed: item b samples with fold_in(PRNGKey(seed), b), step s with fold_in(that, s).
      max_rows: audio rows to generate at most (the reference allows 450 per 5 s window).
      guidance: CFG(scale) for a null-timbre model, or FirstNoteGuidance(scale) with
        `unconditional_model`.
      row_caps: per item, audio rows at most (within `max_rows`); default `max_rows` for all.
      min_frames: per item, frames to write before the end row may come (`forbid_early_end`),
        at most what its row cap leaves; default 0 (the model ends when it samples the end row).
      dtype: parameters and compute in this dtype (e.g. "bfloat16" on GPU/TPU); None keeps the model's.
    Returns:
      A Generation with codes [B, F, K] (padded with -1) and per-item frame counts.
    """
    args, kwargs = _decode_args(model, midi_tokens, timbre, sampler=sampler, seed=seed, max_rows=max_rows,
                                guidance=guidance, unconditional_model=unconditional_model, dtype=dtype,
                                row_caps=row_caps, min_frames=min_frames)
    out, num_rows, ended = jax.device_get(_decode_jit_for(model.cfg)(*args, **kwargs))
    out, num_rows, ended = (a[: len(midi_tokens)] for a in (out, num_rows, ended))  # without a batch-1 copy
    codes, frames = rows_to_codes(out, num_rows, model.cfg.num_codebooks)
    return Generation(codes=codes, num_frames=frames, rows=out, num_rows=num_rows, ended=ended)


def lower_generate(model: TokenSynth, midi_tokens: Sequence[np.ndarray], timbre=None, **kwargs) -> jax.stages.Lowered:
    """The decode loop `generate` would run for these arguments, lowered (for `.compile()`,
    `.cost_analysis()`, `.memory_analysis()`); keyword arguments as `generate`'s."""
    defaults = {"sampler": Greedy(), "seed": 0, "max_rows": 450, "guidance": None, "unconditional_model": None,
                "dtype": None}
    args, static = _decode_args(model, midi_tokens, timbre, **{**defaults, **kwargs})
    return _decode_jit_for(model.cfg).lower(*args, **static)
