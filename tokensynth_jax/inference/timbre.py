"""Timbre embeddings for synthesis: CLAP of a reference recording, of a text, or a mix of both.

The audio front end (torch, transformers) is data_prep's `encoders.ClapEmbedder`, so synthesis
embeds references exactly as prep embedded the training references. This module adds what a
user's input needs: reading a WAV file of any rate and channel count, with a `TimbreError` naming
the file for one that is unreadable, empty, too short, silent or not finite, reading an embedding
file, and the audio/text mix.

All embeddings are float32 [D] (D = 512 for LAION CLAP) of unit L2 norm, as CLAP's are and as the
model saw in training. The mix `a * audio + (1 - a) * text` is renormalised to unit norm: the
blend of two unit vectors is shorter than either (down to |cos| when a = 0.5), and the model never
saw a shorter embedding; renormalising keeps the direction the blend gives, which is what CLAP
similarity measures (spherical and linear interpolation then differ only in the pace along the arc).
"""
from __future__ import annotations

import os

import numpy as np

from tokensynth_jax.audio import io as audio_io
from tokensynth_jax.errors import UserError

DEFAULT_CLAP = "laion/larger_clap_music"  # the LAION music checkpoint (HTSAT-base), as the paper
MIN_SECONDS = 0.5  # shorter references carry too little of the instrument to embed
SILENCE_PEAK = 1e-4  # -80 dBFS: below this peak a reference is silent (CLAP would embed noise)


class TimbreError(UserError):
    """A reference recording, text or mix weight that cannot give a timbre; the message names it."""


def load_embedding(path: str, batch: int, timbre_dim: int) -> np.ndarray:
    """Reads a [T] or [B, T] float array from a .npy file; a single embedding serves every item."""
    if not os.path.isfile(path):
        raise TimbreError(f"{path}: no such timbre embedding file")
    try:
        emb = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError / OSError / UnpicklingError
        raise TimbreError(f"{path}: not a .npy array ({e})") from e
    if isinstance(emb, np.lib.npyio.NpzFile):  # an .npz archive: its one array, if it holds just one
        with emb:
            if len(emb.files) != 1:
                raise TimbreError(f"{path}: an .npz archive of {len(emb.files)} arrays ({', '.join(emb.files[:5])}); "
                                  "give one array, as np.save writes it (.npy)")
            emb = emb[emb.files[0]]
    emb = np.asarray(emb)
    if not np.issubdtype(emb.dtype, np.floating):
        raise TimbreError(f"{path}: timbre embedding has dtype {emb.dtype}, expected floats")
    if emb.ndim == 1:
        emb = emb[None]
    if emb.ndim != 2 or emb.shape[1] != timbre_dim:
        raise TimbreError(f"{path}: timbre embedding of shape {emb.shape}, expected [{timbre_dim}] or [N, {timbre_dim}]")
    if emb.shape[0] == 1:
        emb = np.repeat(emb, batch, axis=0)
    if emb.shape[0] != batch:
        raise TimbreError(f"{path}: {emb.shape[0]} embeddings for {batch} MIDI files")
    if not np.all(np.isfinite(emb)):
        raise TimbreError(f"{path}: timbre embedding has NaN or Inf values")
    return emb.astype(np.float32)


def load_clap(name: str = DEFAULT_CLAP, *, device: str = "cpu", offline: bool = False,
              input_mode: str = "codec-rate"):
    """Loads a CLAP checkpoint (Hugging Face id or local path) or a data_prep preset (`tiny-clap`).

    Args:
      name: the checkpoint; pretrained weights come from the Hugging Face cache (or the hub when
        reachable); a missing one is an error, never random weights.
      device: torch device.
      offline: only look in the local cache.
      input_mode: "codec-rate" resamples straight to CLAP's 48 kHz; "tokensynth-0.0.4" band-limits
        to 16 kHz first, as the reference implementation (and its official checkpoints) did.

    Returns:
      A `tokensynth_jax.audio.encoders.ClapEmbedder`.

    Raises:
      TimbreError: the checkpoint cannot be loaded (the message says what to do).
    """
    from tokensynth_jax.audio import encoders

    try:
        return encoders.ClapEmbedder(name, batch_size=1, device=device, offline=offline, input_mode=input_mode)
    except encoders.EncoderError as e:
        raise TimbreError(str(e)) from e


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """A reference recording as mono float32 audio and its sample rate (any format, any rate).

    Raises:
      TimbreError naming the file: missing, unreadable or not audio, no samples.
    """
    return audio_io.read_mono(path, TimbreError)


def check_audio(audio: np.ndarray, sample_rate: int, source: str = "<array>") -> np.ndarray:
    """The reference as float32 [N], after the checks that make a CLAP embedding meaningful.

    Raises:
      TimbreError naming `source`: not 1-D, a bad rate, NaN/Inf, shorter than MIN_SECONDS, silent.
    """
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 1:
        raise TimbreError(f"{source}: reference audio of shape {audio.shape}; expected mono [samples]")
    if not sample_rate or sample_rate <= 0:
        raise TimbreError(f"{source}: sample rate {sample_rate} is not a positive number of Hz")
    if not np.all(np.isfinite(audio)):
        raise TimbreError(f"{source}: the audio has NaN or Inf samples")
    seconds = len(audio) / sample_rate
    if seconds < MIN_SECONDS:
        raise TimbreError(f"{source}: {seconds:.3f} s of audio; a timbre reference needs at least {MIN_SECONDS} s")
    peak = float(np.abs(audio).max())
    if peak < SILENCE_PEAK:
        raise TimbreError(f"{source}: the audio is silent (peak {peak:.2e}, below {SILENCE_PEAK:g}); "
                          "a timbre reference must play the instrument")
    return audio


def audio_embedding(clap, audio: str | os.PathLike | np.ndarray, sample_rate: int | None = None) -> np.ndarray:
    """The CLAP embedding of a reference recording.

    Args:
      clap: from `load_clap`.
      audio: a path to an audio file, or mono float samples [N].
      sample_rate: the samples' rate (only with an array; a file says its own). Resampled to
        CLAP's 48 kHz.

    Returns:
      float32 [D], unit norm.

    Raises:
      TimbreError naming the file: see `read_wav` and `check_audio`.
    """
    if isinstance(audio, (str, os.PathLike)):
        if sample_rate is not None:
            raise TimbreError(f"{os.fspath(audio)}: a file carries its own sample rate; pass sample_rate only with an array")
        source = os.fspath(audio)
        audio, sample_rate = read_wav(source)
    else:
        source = "<array>"
        if sample_rate is None:
            raise TimbreError("an audio array needs its sample_rate")
    audio = check_audio(audio, sample_rate, source)
    emb = clap.embed(audio[None], sample_rate)[0]
    if not np.all(np.isfinite(emb)):
        raise TimbreError(f"{source}: CLAP ({clap.name}) gave a NaN embedding")
    return emb.astype(np.float32)


def text_embedding(clap, text: str) -> np.ndarray:
    """The CLAP embedding of a text description (e.g. "a warm cello"): float32 [D], unit norm.

    Raises:
      TimbreError: empty or blank text, or a tokenizer that cannot be loaded.
    """
    from tokensynth_jax.audio import encoders

    if not isinstance(text, str) or not text.strip():
        raise TimbreError(f"--text: a timbre description must be a non-empty text, got {text!r}")
    try:
        return clap.embed_text([text])[0].astype(np.float32)
    except encoders.EncoderError as e:
        raise TimbreError(str(e)) from e


def mix_embedding(a: float, audio_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """`a * audio + (1 - a) * text`, renormalised to unit norm (see the module doc).

    Args:
      a: weight of the audio in [0, 1]: 1 is the recording's timbre, 0 the text's.
      audio_emb, text_emb: unit-norm [D] embeddings from the same CLAP.

    Raises:
      TimbreError: `a` outside [0, 1], shapes that differ, or a blend of opposite embeddings
      that has no direction.
    """
    if not 0.0 <= a <= 1.0:
        raise TimbreError(f"--mix {a}: the audio weight must be in [0, 1] (1 = the recording, 0 = the text)")
    audio_emb, text_emb = np.asarray(audio_emb, np.float32), np.asarray(text_emb, np.float32)
    if audio_emb.shape != text_emb.shape:
        raise TimbreError(f"--mix: audio embedding {audio_emb.shape} and text embedding {text_emb.shape} differ")
    mixed = a * audio_emb + (1.0 - a) * text_emb
    norm = float(np.linalg.norm(mixed))
    if norm < 1e-6:
        raise TimbreError(f"--mix {a}: the audio and text embeddings cancel out; pick another weight")
    return (mixed / norm).astype(np.float32)
