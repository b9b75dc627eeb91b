"""`demo-spectral`: an offline timbre embedding from spectral statistics, for the demo without a pretrained CLAP.

TokenSynth conditions on a 512-d, unit-norm CLAP embedding of a reference recording. Offline
there is no pretrained CLAP, and a random one maps every clip to nearly the same vector. This
embedder is a fixed function of the recording that tells instruments apart without any weights,
from statistics over the sounding frames of a 16 kHz spectrogram chosen to describe the
instrument more than the notes it plays:
- the harmonic profile: the level of harmonics 1..12 of each frame's lowest strong partial,
  relative to the frame's strongest partial (odd-harmonic clarinets, bright brass, pure flutes),
  mean and spread over frames;
- brightness relative to pitch: the spectral centroid in units of that lowest partial (log);
- the envelope in time: the median loudness step between frames, and the shares of frames that
  decay and that hold steady (plucked and struck notes decay, bowed and blown ones hold);
- noisiness: spectral flatness (log), mean and spread.
Each statistic is centred and scaled by fixed constants (its mean and spread over General MIDI
renders of procedural phrases, measured once and rounded), the vector is multiplied by a fixed
seeded Gaussian projection to 512-d, and L2-normalised, so it has CLAP's shape and the cosine of two
embeddings compares the standardised statistics. Clips are peak-normalised first: loudness is not
timbre. A silent clip (a generation can be one) has no timbre to describe: its statistics are the
centre, all zero, and one constant component before the projection keeps its embedding defined
(cosine about 0.2 with real clips). It embeds audio only: text-to-instrument needs a real CLAP, and asking this one for text
is an error. Only numpy, scipy and librosa; deterministic.
"""
from __future__ import annotations

import numpy as np

from tokensynth_jax.errors import UserError

NAME = "demo-spectral"
DIM = 512  # CLAP's embedding size, so models and records need no change
SAMPLE_RATE = 16000  # analysis rate (content above 8 kHz says little about the instrument)
_N_FFT, _HOP = 2048, 256  # 128 ms windows: partials of low notes resolved
_HARMONICS = 12
_ACTIVE_DB = 40.0  # frames within this many dB of the loudest frame are "sounding"
_PARTIAL_DB = 30.0  # partials within this many dB of a frame's strongest one count
_FLOOR_DB = 60.0  # harmonic levels are clipped at this many dB below the strongest partial
_STEADY_DB = 0.1  # a loudness step smaller than this (dB per frame) holds steady
_SEED = 0x5EC7  # the projection's seed
# Centre and spread of each statistic over GM renders at 16 kHz: programs 0 4 11 19 24 27 32 40 42
# 48 56 61 65 71 73 80 x 12 procedural phrases each.
_CENTRE = np.array([
    -0.85, -1.78, -1.86, -2.13, -2.53, -3.05, -3.37, -3.74, -3.76, -4.22, -4.36, -4.44,  # harmonic levels / 10 dB
    0.81, 0.95, 0.95, 0.95, 1.02, 1.05, 1.08, 1.05, 1.1, 1.1, 1.09, 1.08,  # their spread / 10 dB
    1.66, 0.42,  # log relative centroid: mean, spread
    -0.09, 0.47, 0.22,  # median step dB, share decaying, share steady
    -9.33, 1.79,  # log flatness: mean, spread
])
_SPREAD = np.array([
    0.49, 1.23, 0.98, 1.12, 1.23, 1.33, 1.2, 1.34, 1.29, 1.15, 1.09, 1.12,
    0.25, 0.4, 0.34, 0.32, 0.39, 0.35, 0.37, 0.38, 0.39, 0.42, 0.42, 0.47,
    0.61, 0.24,
    0.16, 0.18, 0.19,
    2.57, 0.93,
])


class SpectralEmbedderError(UserError):
    """Input the embedder cannot use; the message says which."""


def _resample(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    from math import gcd

    from scipy.signal import resample_poly

    if sample_rate == SAMPLE_RATE:
        return audio
    g = gcd(int(sample_rate), SAMPLE_RATE)
    return resample_poly(audio, SAMPLE_RATE // g, int(sample_rate) // g)


def _harmonics(level_db: np.ndarray, freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: levels of harmonics 1..12 of the lowest partial within _PARTIAL_DB of the
    strongest, relative to the strongest ([T, 12] dB), and log(centroid / that partial's frequency)
    ([T]); frames without such a partial above 30 Hz are left out.

    Args:
      level_db: [T, bins] magnitudes in dB of the sounding frames.
      freqs: [bins] bin frequencies.
    """
    top = level_db.max(axis=1, keepdims=True)
    inner = level_db[:, 1:-1]
    partial = (inner > level_db[:, :-2]) & (inner >= level_db[:, 2:]) & (inner > top - _PARTIAL_DB) \
        & (freqs[None, 1:-1] > 30.0)
    has = partial.any(axis=1)
    level_db, top, partial = level_db[has], top[has], partial[has]
    f0 = freqs[1 + partial.argmax(axis=1)]  # argmax of a boolean row: its first True
    bins = np.round(np.arange(1, _HARMONICS + 1)[None, :] * f0[:, None] / freqs[1]).astype(int)
    inside = bins < level_db.shape[1] - 1
    b = np.where(inside, bins, 1)
    rows = np.arange(len(level_db))[:, None]
    near = np.maximum.reduce([level_db[rows, b - 1], level_db[rows, b], level_db[rows, b + 1]])  # partials sit off-bin
    levels = np.maximum(np.where(inside, near, top - _FLOOR_DB) - top, -_FLOOR_DB)
    magnitude = 10.0 ** (level_db / 20.0)
    centroid = (magnitude * freqs[None, :]).sum(axis=1) / magnitude.sum(axis=1)
    return levels, np.log(centroid / f0)


def statistics(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """The standardised statistics of one clip (see the module doc), before the projection.

    Args:
      audio: float mono samples [N].
      sample_rate: their rate.

    Returns:
      float64 [31] statistics, each about zero-mean and unit-spread over GM renders; zeros for a
      silent clip or one without partials above 30 Hz.

    Raises:
      SpectralEmbedderError: not finite mono audio.
    """
    import librosa

    audio = np.asarray(audio, np.float64)
    if audio.ndim != 1 or audio.size == 0 or not np.isfinite(audio).all():
        raise SpectralEmbedderError(f"{NAME}: takes finite mono audio [N > 0], got shape {audio.shape}")
    x = _resample(audio, sample_rate)
    peak = np.abs(x).max()
    if peak <= 0:
        return np.zeros(len(_CENTRE))
    magnitude = np.abs(librosa.stft(x / peak, n_fft=_N_FFT, hop_length=_HOP))  # [bins, T]
    frame_db = 10.0 * np.log10((magnitude ** 2).sum(axis=0) + 1e-10)
    active = frame_db >= frame_db.max() - _ACTIVE_DB
    level_db = 20.0 * np.log10(magnitude + 1e-6)
    freqs = librosa.fft_frequencies(sr=SAMPLE_RATE, n_fft=_N_FFT)
    levels, relative_centroid = _harmonics(level_db[:, active].T, freqs)
    if len(levels) == 0:  # every sounding frame is below 30 Hz: nothing harmonic to describe
        return np.zeros(len(_CENTRE))
    profile = levels / 10.0
    steps = np.diff(frame_db)[active[1:] & active[:-1]]
    if steps.size == 0:
        steps = np.zeros(1)
    flatness = np.log(librosa.feature.spectral_flatness(S=magnitude[:, active])[0] + 1e-10)
    stats = np.concatenate([
        profile.mean(axis=0), profile.std(axis=0),
        [relative_centroid.mean(), relative_centroid.std(),
         np.median(steps), np.mean(steps < -_STEADY_DB), np.mean(np.abs(steps) < _STEADY_DB),
         flatness.mean(), flatness.std()],
    ])
    return (stats - _CENTRE) / _SPREAD


class SpectralEmbedder:
    """Clips -> unit-norm 512-d spectral-statistics embeddings (CLAP's shape, not CLAP's space)."""

    name = NAME
    dim = DIM

    def __init__(self):
        # One row per statistic, and one for the constant component (see the module doc).
        self._projection = np.random.default_rng(_SEED).standard_normal((len(_CENTRE) + 1, DIM)) / np.sqrt(DIM)

    def embed(self, audio_bn: np.ndarray, sample_rate: int) -> np.ndarray:
        """Embeddings of each clip.

        Args:
          audio_bn: float [B, N] mono clips at `sample_rate`.
          sample_rate: their rate.

        Returns:
          float32 [B, 512] unit-norm embeddings.
        """
        audio_bn = np.asarray(audio_bn)
        if audio_bn.ndim != 2:
            raise SpectralEmbedderError(f"{NAME}: embed takes audio [B, N], got shape {audio_bn.shape}")
        stats = np.stack([np.append(statistics(a, sample_rate), 1.0) for a in audio_bn])
        emb = stats @ self._projection
        return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)

    def embed_text(self, texts) -> np.ndarray:
        """Always an error: spectral statistics have no text side."""
        raise SpectralEmbedderError(
            f"{NAME} embeds reference audio only; text-to-instrument needs a CLAP checkpoint "
            "(e.g. --clap laion/larger_clap_music, downloaded to the Hugging Face cache first)")
