"""Batched generation of codec tokens: one prefill, then one jitted `lax.while_loop`.

Prompts of different lengths are left-padded (model.py explains the slot layout), so the whole
batch writes one KV-cache slot per step and stops on device when every item has produced its
end row (an all-zero row) or reached its length cap. No per-token host sync, no recomputed
context. The delay pattern is removed at the boundary: the result is codec codes [B, F, K].
Each item may have its own row cap and its own fewest frames (`min_frames`): until an item has
written that many frames, its end row is masked out (`forbid_early_end`), so a synthesis window
cannot fall silent before its last note-off.

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
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tokensynth_jax.config import ModelConfig
from tokensynth_jax.model.transformer import TokenSynth
from tokensynth_jax.tokens import token_layout

PROMPT_BUCKET = 16  # prompt lengths round up to a multiple of this, so compiles are reused


# --- samplers ----------------------------------------------------------------------------------------
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
    stochastic = True

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"top-k needs k >= 1, got {self.k}")

    def filter(self, logits, is_midi: bool):
        logits = logits if self.reference_quirks else logits / self.temperature
        k = self.k + (1 if self.reference_quirks and not is_midi else 0)
        k = min(k, logits.shape[-1])
        kth = jax.lax.top_k(logits, k)[0][..., -1:]
        return jnp.where(logits >= kth, logits, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class TopP:
    """Nucleus sampling: the smallest set of most likely ids whose probability reaches p."""

    p: float
    temperature: float = 1.0
    reference_quirks: bool = False
    stochastic = True

    def __post_init__(self):
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"top-p needs 0 < p <= 1, got {self.p}")

    def filter(self, logits, is_midi: bool):
        logits = logits if self.reference_quirks else logits / self.temperature
        sorted_desc = -jnp.sort(-logits, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
        reached = cum > self.p if (self.reference_quirks and not is_midi) else cum >= self.p
        # Index of the first id that reaches p (the last one kept); all kept if none reaches it.
        last = jnp.where(reached.any(-1), jnp.argmax(reached, axis=-1), logits.shape[-1] - 1)
        threshold = jnp.take_along_axis(sorted_desc, last[..., None], axis=-1)
        return jnp.where(logits >= threshold, logits, -jnp.inf)


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


# --- the loop ----------------------------------------------------------------------------------------
def _decode_loop(graphdef, state, uncond_graphdef, uncond_state, rows_bpc, pad_b, cap_b, timbre_bt, key,
                 min_frames_b=None, *, sampler, guidance, max_rows: int):
    model: TokenSynth = nnx.merge(graphdef, state)
    cfg = model.cfg
    batch, num_prompt = rows_bpc.shape[:2]
    slots = num_prompt + 1 + max_rows
    cfg_guided = isinstance(guidance, CFG)

    if cfg_guided:  # timbre half and null half in one batch
        cache = model.init_cache(2 * batch, slots)
        use_null = jnp.concatenate([jnp.zeros(batch, bool), jnp.ones(batch, bool)])
        two = lambda x: jnp.concatenate([x, x])
        logits, cache = model.prefill(two(rows_bpc), two(pad_b), two(timbre_bt), cache=cache, use_null_b=use_null)
    else:
        cache = model.init_cache(batch, slots)
        logits, cache = model.prefill(rows_bpc, pad_b, timbre_bt, cache=cache)

    first_note = isinstance(guidance, FirstNoteGuidance)
    if first_note:
        uncond: TokenSynth = nnx.merge(uncond_graphdef, uncond_state)
        zero_pad = jnp.zeros(batch, jnp.int32)
        u_cache = uncond.init_cache(batch, 1 + max_rows)
        u_logits, u_cache = uncond.prefill(rows_bpc[:, :0], zero_pad, None, cache=u_cache, use_null_b=jnp.zeros(batch, bool))
    else:
        u_logits, u_cache, zero_pad = jnp.zeros((batch, 0)), (), None
    item_keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))

    def guided(step, logits, u_logits, count):
        if cfg_guided:
            c, u = logits[:batch], logits[batch:]
            return u + guidance.scale * (c - u), count
        if not first_note:
            return logits, count
        lo = cfg.midi_vocab_size
        first_book = logits[:, lo : lo + cfg.codebook_size]
        silent = jnp.argmax(first_book, -1) == guidance.silence_id
        guide = ~silent & (count < guidance.steps)
        count = count + guide
        books = jnp.maximum(count, 2)  # codebooks blended: 2, 2, 3, ..., steps
        channel = jnp.arange(logits.shape[-1])
        in_books = (channel[None] >= lo) & (channel[None] < lo + books[:, None] * cfg.codebook_vocab_size)
        # The reference skips blending when the first guided row is the very first audio row.
        blend = (guide & ~((count == 1) & (step == 0)))[:, None] & in_books
        mixed = guidance.scale * logits + (1.0 - guidance.scale) * u_logits
        return jnp.where(blend, mixed, logits), count

    def cond(carry):
        step, done = carry[0], carry[1]
        return (step < max_rows) & ~jnp.all(done)

    def body(carry):
        step, done, out, num_rows, ended, logits, cache, u_logits, u_cache, count = carry
        mixed, count = guided(step, logits, u_logits, count)
        if min_frames_b is not None:
            mixed = forbid_early_end(mixed, step, min_frames_b, cfg)
        keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(item_keys)
        row = jax.vmap(lambda k, l: sample_row(sampler, k, l[None], cfg)[0])(keys, mixed)
        is_end = jnp.all(row == 0, axis=-1)
        live = ~done & (step < cap_b)
        keep = live & ~is_end
        row = jnp.where(keep[:, None], row, 0)
        out = jax.lax.dynamic_update_slice_in_dim(out, row[:, None], step, axis=1)
        num_rows = jnp.where(keep, step + 1, num_rows)
        ended = ended | (live & is_end)
        done = ~keep
        slot = num_prompt + 1 + step
        feed = jnp.concatenate([row, row]) if cfg_guided else row
        feed_pad = jnp.concatenate([pad_b, pad_b]) if cfg_guided else pad_b
        logits, cache = model.decode(feed, feed_pad, slot, cache=cache)
        if first_note:
            u_logits, u_cache = jax.lax.cond(
                jnp.any(~done & (count < guidance.steps)),
                lambda: uncond.decode(row, zero_pad, 1 + step, cache=u_cache),
                lambda: (u_logits, u_cache),
            )
        return step + 1, done, out, num_rows, ended, logits, cache, u_logits, u_cache, count

    carry = (
        jnp.int32(0), cap_b <= 0, jnp.zeros((batch, max_rows, cfg.num_channels), jnp.int32),
        jnp.zeros(batch, jnp.int32), jnp.zeros(batch, bool), logits, cache, u_logits, u_cache,
        jnp.zeros(batch, jnp.int32),
    )
    carry = jax.lax.while_loop(cond, body, carry)
    return carry[2], carry[3], carry[4]


_decode_loop_jit = jax.jit(
    _decode_loop, static_argnames=("graphdef", "uncond_graphdef", "sampler", "guidance", "max_rows")
)


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
) -> Generation:
    """Generates codec tokens for a batch of MIDI prompts.

    Args:
      model: a timbre-conditioned TokenSynth.
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
    Returns:
      A Generation with codes [B, F, K] (padded with -1) and per-item frame counts.
    """
    cfg = model.cfg
    if isinstance(guidance, CFG) and not cfg.null_timbre:
        raise ValueError("classifier-free guidance needs a model trained with a null timbre")
    if isinstance(guidance, FirstNoteGuidance) and unconditional_model is None:
        raise ValueError("first-note guidance needs the unconditional model")
    rows, pads, caps = prepare_prompts(midi_tokens, cfg, max_rows, row_caps)
    if min_frames is not None:
        min_frames = jnp.asarray(np.minimum(np.asarray(min_frames, np.int32), caps - (cfg.num_codebooks - 1)))
    if cfg.conditioning == "timbre":
        timbre = jnp.asarray(timbre, jnp.float32).reshape(len(rows), cfg.timbre_dim)
    graphdef, state = nnx.split(model)
    u_graphdef, u_state = nnx.split(unconditional_model) if unconditional_model is not None and isinstance(guidance, FirstNoteGuidance) else (None, None)
    out, num_rows, ended = _decode_loop_jit(
        graphdef, state, u_graphdef, u_state, jnp.asarray(rows), jnp.asarray(pads), jnp.asarray(caps), timbre,
        jax.random.PRNGKey(seed), min_frames, sampler=sampler, guidance=guidance, max_rows=int(max_rows),
    )
    out, num_rows, ended = jax.device_get((out, num_rows, ended))
    codes, frames = rows_to_codes(out, num_rows, cfg.num_codebooks)
    return Generation(codes=codes, num_frames=frames, rows=out, num_rows=num_rows, ended=ended)
