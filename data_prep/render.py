"""The sample-based polyphonic renderer (the paper's method) over per-instrument note tables.

A `NoteTable` maps (pitch, velocity) to a recorded note. Rendering places each note's recording at
its onset, lets it sound until its offset, then fades it out over `fade_seconds` (a raised cosine,
so no click), using the nearest velocity layer of the nearest recorded pitch. A pitch with no
recording is filled from the nearest recorded pitch within `max_pitch_shift` semitones by
resampling (`np.interp` at a rate of 2^(semitones/12)): a sampler's classic pitch shift, which also
shortens or stretches the note, and costs one interpolation per (pitch, velocity), cached. The mix
is mono at the table's (the codec's) sample rate and peak-normalised, so it never clips. Overlap-add
is a loop over notes with vectorised slices: at <= 128 notes a segment, a fully vectorised scatter
(np.add.at) is slower than this.
"""
from __future__ import annotations

import numpy as np

from tokensynth_jax.errors import UserError
from tokensynth_jax.tokens.token_layout import WINDOW_SECONDS

SILENT, NONFINITE, MISSING_PITCHES = "silent_render", "nonfinite_render", "instrument_missing_pitches"


class RenderError(UserError):
    """A render that must not become a training pair; `reason` is the counter name."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class NoteTable:
    """Recorded notes of one instrument: (pitch, velocity) -> mono float32 audio at `sample_rate`."""

    def __init__(self, name: str, sample_rate: int, clips: dict, max_pitch_shift: int):
        """
        Args:
          name: the instrument id (for error messages).
          sample_rate: the clips' sample rate.
          clips: {(pitch, velocity): float32 [n]}; silent or empty clips must be left out.
          max_pitch_shift: semitones a recording may be shifted to fill a missing pitch.
        """
        if not clips:
            raise RenderError(MISSING_PITCHES, f"{name}: the instrument has no recorded notes")
        self.name, self.sample_rate, self.max_pitch_shift = name, int(sample_rate), int(max_pitch_shift)
        self._clips = {k: np.asarray(v, np.float32) for k, v in clips.items()}
        self.pitches = np.asarray(sorted({p for p, _ in self._clips}))
        self._velocities = {int(p): np.asarray(sorted(v for q, v in self._clips if q == p)) for p in self.pitches}
        dist = np.abs(np.arange(128)[:, None] - self.pitches[None, :])
        self._nearest = self.pitches[np.argmin(dist, axis=1)]  # ties go to the lower pitch
        self.playable = dist.min(axis=1) <= self.max_pitch_shift
        self._cache: dict = {}

    @property
    def num_samples(self) -> int:
        """Samples held in memory (all recordings)."""
        return sum(c.shape[0] for c in self._clips.values())

    def transpose_to_fit(self, pitches: np.ndarray) -> int | None:
        """The octave transposition (0, +-12, +-24, ...; smallest first) that makes every pitch
        playable, or None if none does."""
        pitches = np.asarray(pitches, np.int64)
        for shift in (0, 12, -12, 24, -24, 36, -36, 48, -48):
            moved = pitches + shift
            if moved.min() >= 0 and moved.max() <= 127 and self.playable[moved].all():
                return shift
        return None

    def clip(self, pitch: int, velocity: int) -> np.ndarray:
        """The recording for a note: nearest velocity layer of the nearest pitch, shifted if needed."""
        pitch = int(pitch)
        if not self.playable[pitch]:
            raise RenderError(MISSING_PITCHES, f"{self.name}: pitch {pitch} is more than "
                              f"{self.max_pitch_shift} semitones from any recorded pitch")
        source = int(self._nearest[pitch])
        layers = self._velocities[source]
        layer = int(layers[np.argmin(np.abs(layers - int(velocity)))])
        key = (pitch, layer)
        if key not in self._cache:
            x = self._clips[(source, layer)]
            if source == pitch:
                self._cache[key] = x
            else:
                rate = 2.0 ** ((pitch - source) / 12.0)
                n = int((x.shape[0] - 1) / rate) + 1
                self._cache[key] = np.interp(np.arange(n) * rate, np.arange(x.shape[0]), x).astype(np.float32)
        return self._cache[key]


def render(notes: np.ndarray, table: NoteTable, *, transpose: int = 0, fade_seconds: float = 0.05,
           seconds: float = WINDOW_SECONDS) -> np.ndarray:
    """Mixes a segment's notes (unnormalised).

    Args:
      notes: float [N, 4] rows (start s, end s, pitch, velocity), times relative to the clip.
      table: the instrument.
      transpose: semitones added to every pitch.
      fade_seconds: the release fade after each note's offset.
      seconds: the clip length.

    Returns:
      float32 [round(seconds * sample_rate)] mono audio.

    Raises:
      RenderError: a pitch the instrument cannot play (`instrument_missing_pitches`).
    """
    sr = table.sample_rate
    total = int(round(seconds * sr))
    out = np.zeros(total, np.float32)
    fade = int(round(fade_seconds * sr))
    ramp = (0.5 + 0.5 * np.cos(np.linspace(0.0, np.pi, fade + 2)[1:-1])).astype(np.float32)
    for start, end, pitch, velocity in np.asarray(notes, np.float64):
        i0 = int(round(start * sr))
        if i0 >= total:
            continue
        x = table.clip(int(pitch) + transpose, int(velocity))
        held = max(0, int(round((end - start) * sr)))
        length = min(held + fade, x.shape[0], total - i0)
        seg = x[:length].copy()
        if held < length:  # the release fade, where the note is still sounding at its offset
            seg[held:length] *= ramp[: length - held]
        out[i0 : i0 + length] += seg
    return out


def normalise(audio: np.ndarray, *, peak: float, silence_peak: float, what: str) -> np.ndarray:
    """Peak-normalises a clip, rejecting silent and non-finite ones.

    Args:
      audio: float mono audio.
      peak: the target peak (<= 1, so nothing clips).
      silence_peak: a clip whose peak is below this is silent.
      what: names the clip in errors.

    Returns:
      float32 audio with max |x| == peak.

    Raises:
      RenderError: `nonfinite_render` or `silent_render`.
    """
    if not np.isfinite(audio).all():
        raise RenderError(NONFINITE, f"{what}: the render has non-finite samples")
    top = float(np.abs(audio).max()) if audio.size else 0.0
    if top < silence_peak:
        raise RenderError(SILENT, f"{what}: the render is silent (peak {top:.3g} < {silence_peak:g})")
    return (audio * np.float32(peak / top)).astype(np.float32)
