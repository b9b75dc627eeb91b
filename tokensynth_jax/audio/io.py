"""Reading audio files and changing sample rates: one place for every job that touches audio.

Two resamplers on purpose: polyphase (scipy) is what the codec and CLAP encoders of prep have
always used, so shards stay byte-identical; soxr (librosa) is what basic-pitch and the reference's
CLAP front end use for their inputs, so scores match theirs.
"""
from __future__ import annotations

import math
import os

import numpy as np

from tokensynth_jax.errors import UserError


def read_mono(path: str | os.PathLike, error: type[UserError] = UserError) -> tuple[np.ndarray, int]:
    """An audio file as mono float32 and its sample rate.

    Any format libsndfile reads (WAV, FLAC, OGG, AIFF) at any rate; several channels are averaged
    (CLAP, the codecs and the metrics are mono models, and the model writes mono).

    Args:
      path: the file.
      error: the error class raised, so each job reports in its own terms.

    Raises:
      `error` naming the file: missing, unreadable or not audio, no samples.
    """
    import soundfile

    path = os.fspath(path)
    if os.path.isdir(path):
        raise error(f"{path}: is a directory, not an audio file")
    if not os.path.isfile(path):
        raise error(f"{path}: no such audio file")
    try:
        audio, sr = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise error(f"{path}: not an audio file that libsndfile reads ({e})") from e
    if audio.shape[0] == 0:
        raise error(f"{path}: the file holds no samples")
    return audio.mean(axis=1), int(sr)


def resample_polyphase(audio: np.ndarray, src: int, dst: int) -> np.ndarray:
    """`audio` (last axis) from `src` to `dst` Hz by scipy's polyphase filter, as float32."""
    from scipy.signal import resample_poly

    if src == dst:
        return np.asarray(audio, np.float32)
    g = math.gcd(src, dst)
    return resample_poly(audio, dst // g, src // g, axis=-1).astype(np.float32)


def resample_soxr(audio: np.ndarray, src: int, dst: int) -> np.ndarray:
    """`audio` from `src` to `dst` Hz with soxr_hq (what `librosa.load` and `librosa.resample` use)."""
    audio = np.asarray(audio, np.float32)
    if src == dst:
        return audio
    import librosa

    return librosa.resample(audio, orig_sr=src, target_sr=dst, res_type="soxr_hq").astype(np.float32)
