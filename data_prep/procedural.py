"""A seeded generator of 5 s musical phrases: the embedded MIDI source that needs no download.

Each phrase is a pure function of (seed, index): a tempo, a key and scale, a register, a rhythm
grid with rests and ties, a velocity contour and one of four textures (block chords, arpeggios, a
melody, or a melody over chords). Notes are returned as an array of rows (start s, end s, pitch,
velocity) that all fit inside the 5 s window under the tokenizer's rule (start in [0, 5), end < 5),
so a phrase is tokenized and rendered exactly as generated.
"""
from __future__ import annotations

import numpy as np

from tokensynth_jax.tokens.token_layout import WINDOW_SECONDS

GENERATOR = "procedural-v1"  # bump when the output for a (seed, index) changes
TEXTURES = ("chords", "arpeggio", "melody", "melody+chords")
_SCALES = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
    "pentatonic": (0, 2, 4, 7, 9),
    "blues": (0, 3, 5, 6, 7, 10),
}
_SUBDIVISIONS = (1.0, 0.5, 1 / 3, 0.25)  # beats per grid step
_LAST_END = WINDOW_SECONDS - 0.011  # int(end * 100) stays <= 499
_LOWEST, _HIGHEST = 21, 108  # the piano range, where every library has notes


def _scale_pitches(rng: np.random.Generator) -> np.ndarray:
    name = list(_SCALES)[rng.integers(len(_SCALES))]
    root = int(rng.integers(12))
    steps = np.asarray(_SCALES[name])
    octaves = np.arange(0, 11)[:, None] * 12
    pitches = (octaves + root + steps[None, :]).reshape(-1)
    return pitches[(pitches >= _LOWEST) & (pitches <= _HIGHEST)]


def _grid(rng: np.random.Generator, beat: float) -> np.ndarray:
    """Onset times of one rhythmic line: a grid with rests and occasional ties."""
    step = beat * _SUBDIVISIONS[rng.integers(len(_SUBDIVISIONS))]
    onsets = np.arange(0.0, WINDOW_SECONDS, step)
    keep = rng.random(onsets.shape[0]) > rng.uniform(0.0, 0.4)  # rests
    keep[0] = keep[0] or rng.random() < 0.7  # most phrases start on the downbeat
    return onsets[keep]


def _durations(rng: np.random.Generator, onsets: np.ndarray, long_notes: bool) -> np.ndarray:
    gaps = np.diff(np.append(onsets, WINDOW_SECONDS))
    legato = rng.uniform(0.3, 1.0, size=onsets.shape[0]) if not long_notes else np.ones(onsets.shape[0])
    ties = rng.random(onsets.shape[0]) < (0.4 if long_notes else 0.1)
    return np.where(ties, gaps * rng.uniform(1.0, 2.5, size=onsets.shape[0]), gaps * legato)


def _velocities(rng: np.random.Generator, n: int) -> np.ndarray:
    base = rng.uniform(30, 120)
    contour = np.linspace(0, rng.uniform(-40, 40), n) if n else np.zeros(0)  # crescendo / diminuendo
    accents = np.where(np.arange(n) % int(rng.integers(2, 5)) == 0, rng.uniform(0, 15), 0.0)
    return np.clip(np.round(base + contour + accents + rng.normal(0, 6, n)), 1, 127)


def _melody(rng, scale, center, beat) -> list:
    onsets = _grid(rng, beat)
    idx = int(np.searchsorted(scale, center))
    walk = np.cumsum(rng.choice([-2, -1, -1, 0, 1, 1, 2, 3, -3], size=onsets.shape[0]))
    degrees = np.clip(idx + walk, 0, scale.shape[0] - 1)
    durs = _durations(rng, onsets, long_notes=False)
    vels = _velocities(rng, onsets.shape[0])
    return [(t, t + d, int(scale[k]), int(v)) for t, d, k, v in zip(onsets, durs, degrees, vels)]


def _chord_tones(rng, scale, center) -> np.ndarray:
    idx = int(np.clip(np.searchsorted(scale, center) + rng.integers(-3, 4), 0, scale.shape[0] - 1))
    size = int(rng.choice([3, 3, 4]))  # triads, some sevenths
    degrees = np.clip(idx + 2 * np.arange(size), 0, scale.shape[0] - 1)
    return np.unique(scale[degrees])


def _chords(rng, scale, center, beat, broken: bool) -> list:
    notes = []
    bar = beat * int(rng.choice([2, 4]))
    for t0 in np.arange(0.0, WINDOW_SECONDS, bar):
        tones = _chord_tones(rng, scale, center)
        vel = _velocities(rng, 1)[0]
        if broken:  # arpeggio: the chord's tones one after another, up or up-down
            step = bar / int(rng.choice([4, 6, 8]))
            order = np.concatenate([tones, tones[-2:0:-1]]) if rng.random() < 0.5 else tones
            times = t0 + step * np.arange(int(round(bar / step)))
            for i, t in enumerate(times):
                notes.append((t, t + step * rng.uniform(0.6, 1.5), int(order[i % order.shape[0]]),
                              int(np.clip(vel + rng.normal(0, 5), 1, 127))))
        else:
            length = bar * rng.uniform(0.5, 1.0)
            for p in tones:
                notes.append((t0, t0 + length, int(p), int(np.clip(vel + rng.normal(0, 4), 1, 127))))
    return notes


def generate(seed: int, index: int, max_notes: int) -> np.ndarray:
    """One phrase.

    Args:
      seed: the job's seed.
      index: which phrase; any non-negative integer.
      max_notes: the phrase keeps at most this many notes (the earliest ones).

    Returns:
      float64 [N, 4] rows (start s, end s, pitch, velocity), sorted by start then pitch, N >= 1,
      every note inside the 5 s window.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 0x5EED]))
    beat = 60.0 / rng.uniform(60, 180)
    scale = _scale_pitches(rng)
    center = rng.uniform(40, 84)
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    if texture == "melody":
        notes = _melody(rng, scale, center, beat)
    elif texture == "chords":
        notes = _chords(rng, scale, center, beat, broken=False)
    elif texture == "arpeggio":
        notes = _chords(rng, scale, center, beat, broken=True)
    else:
        notes = _melody(rng, scale, center + 12, beat) + _chords(rng, scale, center - 7, beat, broken=False)
    arr = np.asarray(notes, dtype=np.float64).reshape(-1, 4)
    arr[:, 1] = np.minimum(arr[:, 1], _LAST_END)
    arr = arr[(arr[:, 0] >= 0) & (arr[:, 1] - arr[:, 0] >= 0.02)]  # notes the window can hold
    if arr.shape[0] == 0:  # a phrase of rests only: one note, so every phrase is usable
        arr = np.asarray([[0.0, min(4 * beat, _LAST_END), float(scale[scale.shape[0] // 2]), 80.0]])
    arr = arr[np.lexsort((arr[:, 2], arr[:, 0]))][:max_notes]
    return arr


def source(seed: int, index: int) -> dict:
    """The record's source dict of a phrase (re-generated from it by `midi_sources`)."""
    return {"midi": GENERATOR, "seed": int(seed), "index": int(index), "track": 0, "start": 0.0}
