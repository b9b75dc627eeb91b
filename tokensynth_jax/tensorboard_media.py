"""Audio clips as TensorBoard summaries: the sound, and its spectrogram as an image.

A loss curve does not say whether the model plays the notes; a listen and a look do, so training
samples (`train_samples.py`) and evaluation clips (`evaluate.write_tensorboard`) go to TensorBoard
beside the scalars. Writers are tensorboardX `SummaryWriter`s. Numpy only (no scipy, no
matplotlib), so a trainer that writes samples needs nothing the `train` extra does not install.
"""
from __future__ import annotations

import math

import numpy as np

SPECTROGRAM_ROWS = 256  # log-spaced frequency rows, so notes an octave apart sit equally far apart
LOWEST_HZ = 30.0
DYNAMIC_RANGE_DB = 80.0  # colours span the clip's loudest bin down to this far below it
# Anchors of a dark-to-light colour ramp (matplotlib's magma at 0, 1/4, 1/2, 3/4, 1).
_RAMP = np.array([[0, 0, 4], [81, 18, 124], [183, 55, 121], [252, 137, 97], [252, 253, 191]], np.float64)


def spectrogram_image(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """A log-magnitude, log-frequency spectrogram of mono audio as an RGB image.

    ~46 ms Hann windows with 75% overlap; rows from LOWEST_HZ (bottom) to Nyquist (top).

    Returns:
      uint8 [SPECTROGRAM_ROWS, frames, 3].
    """
    nfft = 1 << max(8, math.ceil(math.log2(sample_rate * 0.046)))
    hop = nfft // 4
    x = np.asarray(audio, np.float64).reshape(-1)
    length = nfft + math.ceil(max(len(x) - nfft, 0) / hop) * hop  # whole frames, the last one padded
    x = np.pad(x, (0, length - len(x)))
    frames = np.lib.stride_tricks.sliding_window_view(x, nfft)[::hop] * np.hanning(nfft)
    power_ft = np.abs(np.fft.rfft(frames, axis=-1)).T ** 2
    db = 10 * np.log10(power_ft + 1e-12)
    freqs = np.fft.rfftfreq(nfft, 1.0 / sample_rate)
    rows = np.geomspace(LOWEST_HZ, sample_rate / 2, SPECTROGRAM_ROWS)
    db = np.stack([np.interp(rows, freqs, column) for column in db.T], axis=1)[::-1]  # high frequencies on top
    # The loudest bin is the top colour, but never below 0 dB (about -54 dBFS), so silence stays dark.
    level = np.clip((db - max(db.max(), 0.0)) / DYNAMIC_RANGE_DB + 1.0, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.minimum(level.astype(int), len(_RAMP) - 2)
    rgb = _RAMP[low] + (level - low)[..., None] * (_RAMP[low + 1] - _RAMP[low])
    return rgb.round().astype(np.uint8)


def add_clip(writer, tag: str, audio: np.ndarray, sample_rate: int, step: int) -> None:
    """Writes `tag/audio` (a WAV) and `tag/spectrogram` (an image) at `step`.

    A clip that overshoots +-1 (codec output can) is scaled to a peak of 1, since TensorBoard's
    audio would clip it; an empty clip writes nothing.
    """
    audio = np.asarray(audio, np.float32).reshape(-1)
    if audio.size == 0:
        return
    peak = float(np.abs(audio).max())
    if peak > 1.0:
        audio = audio / peak
    writer.add_audio(f"{tag}/audio", audio, step, sample_rate=int(sample_rate))
    writer.add_image(f"{tag}/spectrogram", spectrogram_image(audio, sample_rate), step, dataformats="HWC")
