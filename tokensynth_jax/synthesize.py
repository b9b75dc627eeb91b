"""The synthesis job: MIDI files + a timbre -> codec tokens (and, with a codec, audio).

Glue between the MIDI tokenizer, a checkpoint and the sampler, with errors that name the file
at fault. The command line (`tokensynth synthesize`) is a thin face over `synthesize_tokens`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from tokensynth_jax import checkpoint, midi_tokens, sampling, token_layout


class SynthesisError(ValueError):
    """Bad synthesis input; the message names the file or option at fault."""


@dataclasses.dataclass(frozen=True)
class SynthesisResult:
    generation: sampling.Generation
    windows: list  # the MidiWindow of each input
    metadata: dict  # the checkpoint's metadata


def load_timbre_embedding(path: str, batch: int, timbre_dim: int) -> np.ndarray:
    """Reads a [T] or [B, T] float array from a .npy file; a single embedding serves every item."""
    if not os.path.isfile(path):
        raise SynthesisError(f"{path}: no such timbre embedding file")
    try:
        emb = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError / OSError / UnpicklingError
        raise SynthesisError(f"{path}: not a .npy array ({e})") from e
    emb = np.asarray(emb)
    if not np.issubdtype(emb.dtype, np.floating):
        raise SynthesisError(f"{path}: timbre embedding has dtype {emb.dtype}, expected floats")
    if emb.ndim == 1:
        emb = emb[None]
    if emb.ndim != 2 or emb.shape[1] != timbre_dim:
        raise SynthesisError(f"{path}: timbre embedding of shape {emb.shape}, expected [{timbre_dim}] or [N, {timbre_dim}]")
    if emb.shape[0] == 1:
        emb = np.repeat(emb, batch, axis=0)
    if emb.shape[0] != batch:
        raise SynthesisError(f"{path}: {emb.shape[0]} embeddings for {batch} MIDI files")
    if not np.all(np.isfinite(emb)):
        raise SynthesisError(f"{path}: timbre embedding has NaN or Inf values")
    return emb.astype(np.float32)


def make_sampler(kind: str, top_k: int | None, top_p: float | None, temperature: float):
    """The sampler the command line names."""
    if temperature <= 0:
        raise SynthesisError(f"--temperature must be > 0, got {temperature}")
    if kind == "greedy":
        return sampling.Greedy()
    if kind == "top-k":
        if top_k is None:
            raise SynthesisError("--sampler top-k needs --top-k K")
        return sampling.TopK(top_k, temperature)
    if kind == "top-p":
        if top_p is None:
            raise SynthesisError("--sampler top-p needs --top-p P")
        return sampling.TopP(top_p, temperature)
    raise SynthesisError(f"unknown sampler {kind!r}")


def synthesize_tokens(
    checkpoint_dir: str,
    midi_paths: Sequence[str],
    timbre: np.ndarray,
    *,
    sampler=sampling.Greedy(),
    seed: int = 0,
    guidance_scale: float | None = None,
    unconditional_dir: str | None = None,
    max_rows: int | None = None,
    midi_compat: str | None = None,
) -> SynthesisResult:
    """Generates codec tokens for each MIDI file's first window, in one batched call.

    Args:
      checkpoint_dir: a tokensynth-jax model checkpoint (timbre-conditioned).
      midi_paths: MIDI files, one clip each.
      timbre: [len(midi_paths), T] CLAP embeddings.
      guidance_scale: classifier-free guidance for a model with a null timbre, else the
        reference's first-note guidance with `unconditional_dir`.
      max_rows: audio rows at most (default: the window's budget, 450 as the reference).
      midi_compat: "tokensynth-0.0.4" to tokenize MIDI exactly as the reference.
    """
    model, meta = checkpoint.load_model(checkpoint_dir)
    cfg = model.cfg
    if cfg.conditioning != "timbre":
        raise SynthesisError(f"{checkpoint_dir}: an unconditional model cannot synthesize from a timbre")
    max_notes = (cfg.max_len - 2 - cfg.num_codebooks) // token_layout.TOKENS_PER_NOTE
    windows = [midi_tokens.tokenize_midi(p, compat=midi_compat, max_notes=max_notes) for p in midi_paths]
    guidance, uncond = None, None
    if guidance_scale is not None:
        if cfg.null_timbre:
            guidance = sampling.CFG(guidance_scale)
        elif unconditional_dir is not None:
            uncond, _ = checkpoint.load_model(unconditional_dir)
            if uncond.cfg.conditioning != "unconditional":
                raise SynthesisError(f"{unconditional_dir}: not an unconditional model")
            guidance = sampling.FirstNoteGuidance(guidance_scale)
        else:
            raise SynthesisError(
                f"{checkpoint_dir}: --guidance-scale needs a model trained with a null timbre "
                "or --unconditional-checkpoint for first-note guidance"
            )
    generation = sampling.generate(
        model, [w.tokens for w in windows], timbre, sampler=sampler, seed=seed,
        max_rows=max_rows or 450, guidance=guidance, unconditional_model=uncond,
    )
    return SynthesisResult(generation, windows, meta)
