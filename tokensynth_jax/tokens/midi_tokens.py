"""MIDI files -> TokenSynth MIDI tokens: one 5 s window, or a whole file in windows that lose no note.

The reference (`tokensynth.utils.get_tokens_from_midi`, v0.0.4) chains the notes of every
instrument, drums included, sorts them by onset and stops at the first note that starts or ends at
or after 5 s, so one long early note silently drops every later note, and it can only tokenize the
first 5 s. By default we keep every non-drum note that fits inside the window, report the notes
that overlap it but do not fit (`cut_notes`) and the drum notes left out, tokenize windows at any
start time, and raise `MidiTokenizationError` naming the file for bad input instead of returning
an empty or wrong sequence. `compat="tokensynth-0.0.4"` reproduces the reference's tokens exactly.
Time bins keep the reference's arithmetic `int(seconds * 100)`, truncation included (a note at
0.29 s lands in bin 28, because 0.29 * 100 == 28.999999999999996).

`split_into_windows` covers a whole file for synthesis (see its doc and docs/synthesis.md): windows
of up to 5 s end where no note sounds when they can, a note sounding across a window's end is
clipped there and carried on into the next window, and a window holds no more notes than the model
can take, so dense passages get shorter windows.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Union

import numpy as np

from tokensynth_jax.errors import UserError
from tokensynth_jax.tokens.midi_library import pretty_midi
from tokensynth_jax.tokens.token_layout import (
    NUM_PITCHES,
    OFFSET_BASE,
    ONSET_BASE,
    PITCH_BASE,
    SECONDS_PER_BIN,
    TIME_BINS,
    TOKENS_PER_NOTE,
    VELOCITY_BASE,
    VELOCITY_CLASSES,
    WINDOW_SECONDS,
    velocity_class,
)

COMPAT_MODES = ("tokensynth-0.0.4",)
_BINS_PER_SECOND = 100  # the reference's literal; TIME_BINS / WINDOW_SECONDS
assert TIME_BINS == _BINS_PER_SECOND * WINDOW_SECONDS

MidiInput = Union[str, os.PathLike, pretty_midi.PrettyMIDI]


class MidiTokenizationError(UserError):
    """A MIDI input that cannot be tokenized; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class MidiWindow:
    """The tokens of one window of a MIDI file.

    tokens: int32 [4 * num_notes], per note onset, offset, pitch and velocity ids.
    source: the file path, or '<PrettyMIDI>' for an in-memory object.
    start_seconds: where the window starts in the file; token times are relative to it.
    num_notes: notes tokenized.
    cut_notes: notes overlapping the window but left out because they do not fit in it (they
      start before it and sound into it, or end at or after its end; in compat mode, every note
      starting inside the window that the reference drops).
    dropped_drum_notes: drum notes starting inside the window, left out (0 in compat mode).
    seconds: the window's length; its notes lie in [start_seconds, start_seconds + seconds).
    clipped_notes: notes clipped at the window's end, whose rest is carried into the next window
      (`split_into_windows` only).
    """

    tokens: np.ndarray
    source: str
    start_seconds: float
    num_notes: int
    cut_notes: int
    dropped_drum_notes: int
    seconds: float = WINDOW_SECONDS
    clipped_notes: int = 0


def _load(midi: MidiInput) -> tuple[pretty_midi.PrettyMIDI, str]:
    if isinstance(midi, pretty_midi.PrettyMIDI):
        return midi, "<PrettyMIDI>"
    source = os.fspath(midi)
    if os.path.isdir(source):
        raise MidiTokenizationError(f"{source}: is a directory, not a MIDI file")
    if not os.path.isfile(source):
        raise MidiTokenizationError(f"{source}: no such file")
    try:
        return pretty_midi.PrettyMIDI(source), source
    except Exception as e:  # mido / pretty_midi raise many types for corrupt files
        raise MidiTokenizationError(
            f"{source}: not a readable MIDI file ({type(e).__name__}: {e})"
        ) from e


def _sorted_notes(pm: pretty_midi.PrettyMIDI, source: str, with_drums: bool) -> list:
    """The reference's note order: instrument order chained, then a stable sort by onset."""
    notes = [n for inst in pm.instruments if with_drums or not inst.is_drum for n in inst.notes]
    if not notes:
        if any(inst.notes for inst in pm.instruments):
            raise MidiTokenizationError(f"{source}: only drum notes, nothing to tokenize")
        raise MidiTokenizationError(f"{source}: the file has no notes")
    notes.sort(key=lambda n: n.start)
    return notes


def _note_tokens(note, start_seconds: float, pitch_shift: int, source: str, clamp: bool) -> list:
    pitch = note.pitch + pitch_shift
    if not 0 <= pitch < NUM_PITCHES:
        raise MidiTokenizationError(
            f"{source}: pitch {note.pitch} + shift {pitch_shift} = {pitch} is outside 0..127 "
            f"(note at {note.start:.3f} s)"
        )
    # Subtracting 0.0 is exact, so for start_seconds == 0 this is the reference's int(t * 100).
    onset = int((note.start - start_seconds) * _BINS_PER_SECOND)
    offset = int((note.end - start_seconds) * _BINS_PER_SECOND)
    if clamp:  # a note ending a hair before the window end may round up to bin 500
        onset, offset = min(onset, TIME_BINS - 1), min(offset, TIME_BINS - 1)
    return [ONSET_BASE + onset, OFFSET_BASE + offset, PITCH_BASE + pitch,
            VELOCITY_BASE + velocity_class(note.velocity)]


def _window(source, notes, drum_notes, start_seconds, pitch_shift, compat, max_notes):
    end_seconds = start_seconds + WINDOW_SECONDS
    kept, cut = [], 0
    if compat:
        for i, note in enumerate(notes):
            if note.start >= end_seconds or note.end >= end_seconds:
                cut = sum(n.start < end_seconds for n in notes[i:])
                break
            kept.append(note)
    else:
        for note in notes:
            if start_seconds <= note.start < end_seconds and note.end < end_seconds:
                kept.append(note)
            elif note.start < end_seconds and note.end > start_seconds:
                cut += 1
    if max_notes is not None and len(kept) > max_notes:
        raise MidiTokenizationError(
            f"{source}: {len(kept)} notes in the window at {start_seconds:g} s, "
            f"more than max_notes={max_notes}"
        )
    tokens = [t for n in kept for t in _note_tokens(n, start_seconds, pitch_shift, source, not compat)]
    drums = sum(start_seconds <= n.start < end_seconds for n in drum_notes)
    tokens_m = np.asarray(tokens, dtype=np.int32).reshape(-1)
    assert tokens_m.shape[0] == TOKENS_PER_NOTE * len(kept)
    return MidiWindow(tokens_m, source, float(start_seconds), len(kept), cut, drums)


def _drum_notes(pm: pretty_midi.PrettyMIDI) -> list:
    return [n for inst in pm.instruments if inst.is_drum for n in inst.notes]


def tokenize_midi(midi: MidiInput, *, start_seconds: float = 0.0, pitch_shift: int = 0,
                  compat: str | None = None, max_notes: int | None = None) -> MidiWindow:
    """Tokenizes the notes of one 5 s window of a MIDI file.

    Args:
      midi: a path to a MIDI file, or a loaded `pretty_midi.PrettyMIDI`.
      start_seconds: where the window starts; token times are relative to it.
      pitch_shift: semitones added to every pitch (the result must stay in 0..127).
      compat: None for our behaviour, or "tokensynth-0.0.4" for the reference's exact tokens
        (drums included, stop at the first note reaching 5 s; start_seconds must be 0).
      max_notes: if given, more notes than this in the window is an error.

    Returns:
      The window's `MidiWindow`.

    Raises:
      MidiTokenizationError: bad arguments, an unreadable file, no (non-drum) notes, a pitch out
        of range, no notes in the window, or more than `max_notes` notes.
    """
    source = "<PrettyMIDI>" if isinstance(midi, pretty_midi.PrettyMIDI) else os.fspath(midi)
    if compat is not None and compat not in COMPAT_MODES:
        raise MidiTokenizationError(f"{source}: unknown compat mode {compat!r}, know {COMPAT_MODES}")
    if start_seconds < 0:
        raise MidiTokenizationError(f"{source}: start_seconds={start_seconds} is negative")
    if compat and start_seconds != 0:
        raise MidiTokenizationError(
            f"{source}: compat mode {compat!r} only tokenizes the window at 0 s, not {start_seconds}"
        )
    pm, source = _load(midi)
    notes = _sorted_notes(pm, source, with_drums=bool(compat))
    drum_notes = [] if compat else _drum_notes(pm)
    window = _window(source, notes, drum_notes, start_seconds, pitch_shift, compat, max_notes)
    if window.num_notes == 0:
        duration = max(n.end for n in notes)
        raise MidiTokenizationError(
            f"{source}: no notes fit in the window [{start_seconds:g}, "
            f"{start_seconds + WINDOW_SECONDS:g}) s ({window.cut_notes} cut at its edges); "
            f"the file's notes last {duration:.3f} s"
        )
    return window


MIN_FILL = 0.5  # a cut is taken in the latter half of the longest window that fits, so windows stay long


def split_into_windows(midi: MidiInput, *, window_seconds: float = WINDOW_SECONDS, pitch_shift: int = 0,
                       max_notes: int | Callable[[float], int] | None = None) -> list[MidiWindow]:
    """Tokenizes a whole MIDI file (drums left out) as windows that together hold every note.

    The first window starts at the first onset. Each window ends at the best cut within reach:
    among the onsets and note-offs in the latter half (`MIN_FILL`) of the longest window that
    fits, one where no note sounds if there is one, else the one that clips the fewest notes; the
    latest on ties. A note sounding across the cut is clipped there, and its rest is carried into
    the next window (it starts at 0 there), so a note longer than a window is split into pieces.
    A cut where nothing sounds moves back to the last note-off before it, and the next window
    starts at the next onset (silence is skipped, so no window is empty); else at the cut. A
    window fits when it lasts at most `window_seconds` and holds at most `max_notes(its length)`
    notes (pieces included): dense passages get shorter windows.

    Args:
      midi: a path to a MIDI file, or a loaded `pretty_midi.PrettyMIDI`.
      window_seconds: the longest window, in (0, 5] s (the vocabulary's time bins span 5 s).
      pitch_shift: semitones added to every pitch (the result must stay in 0..127).
      max_notes: the most notes a window may hold: a number, or a function of the window's length
        in seconds (a synthesis model's budget: longer windows leave fewer positions for notes).

    Returns:
      The windows in time order; their `seconds` and `clipped_notes` say where they were cut.

    Raises:
      MidiTokenizationError: as `tokenize_midi`, or more notes sounding at one place than even the
        shortest window there can hold.
    """
    source = "<PrettyMIDI>" if isinstance(midi, pretty_midi.PrettyMIDI) else os.fspath(midi)
    if not 0 < window_seconds <= WINDOW_SECONDS:
        raise MidiTokenizationError(
            f"{source}: window_seconds={window_seconds}; windows last at most {WINDOW_SECONDS:g} s "
            "(the vocabulary's time bins)"
        )
    budget = max_notes if callable(max_notes) else (lambda seconds: max_notes)
    pm, source = _load(midi)
    notes = _sorted_notes(pm, source, with_drums=False)
    starts = np.array([n.start for n in notes])
    ends = np.maximum([n.end for n in notes], starts + SECONDS_PER_BIN)  # a 0 s note still takes a place
    music_end = float(ends.max())
    windows, start = [], float(starts.min())
    while True:
        cut = _best_cut(starts, ends, start, min(start + window_seconds, music_end), budget, source)
        windows.append(_pieces_window(source, notes, start, cut, pitch_shift))
        if cut >= music_end:
            break
        sounding = (starts < cut) & (ends > cut)
        start = cut if sounding.any() else float(starts[starts >= cut].min())
    return _count_drums(windows, _drum_notes(pm))


def _best_cut(starts, ends, start: float, reach: float, budget, source: str) -> float:
    """Where the window starting at `start` ends (see `split_into_windows`)."""
    live = ((ends > start) | (starts >= start)) & (starts < reach)  # notes the window may hold
    ls, le = starts[live], ends[live]
    cuts = np.unique(np.concatenate([ls, le, [reach]]))
    cuts = cuts[(cuts > start) & (cuts <= reach)]
    held = (ls[:, None] < cuts[None]).sum(0)  # notes (and pieces) in the window [start, cut)
    crossing = ((ls[:, None] < cuts[None]) & (le[:, None] > cuts[None])).sum(0)
    limits = np.array([np.inf if budget(c - start) is None else budget(c - start) for c in cuts])
    fits = held <= limits
    if not fits.any():
        raise MidiTokenizationError(
            f"{source}: {held[0]} notes sound in the {cuts[0] - start:.3f} s from {start:.3f} s, more than the "
            f"{limits[0]:g} a window that short can hold"
        )
    longest = cuts[fits].max()
    pool = np.flatnonzero(fits & (cuts >= start + MIN_FILL * (longest - start)))
    best = pool[np.lexsort((-cuts[pool], crossing[pool]))[0]]  # fewest clipped notes, then the latest
    if crossing[best] == 0:  # in silence: end at the last note-off, not after silence to be skipped
        return float(le[ls < cuts[best]].max())
    return float(cuts[best])


def _pieces_window(source, notes, start: float, cut: float, pitch_shift: int) -> MidiWindow:
    """The window [start, cut): every note sounding in it, clipped to it."""
    pieces, clipped = [], 0
    for n in notes:
        if n.start < cut and (n.end > start or n.start >= start):
            clipped += int(n.end > cut)
            pieces.append(pretty_midi.Note(n.velocity, n.pitch, max(n.start, start), min(n.end, cut)))
    pieces.sort(key=lambda n: n.start)  # stable: carried-in pieces first, then the reference's order
    tokens = [t for n in pieces for t in _note_tokens(n, start, pitch_shift, source, True)]
    return MidiWindow(np.asarray(tokens, np.int32).reshape(-1), source, start, len(pieces), 0, 0,
                      seconds=cut - start, clipped_notes=clipped)


def _count_drums(windows: list[MidiWindow], drum_notes: list) -> list[MidiWindow]:
    """Each window reports the drum notes starting from it up to the next window (all, together)."""
    bounds = [w.start_seconds for w in windows[1:]] + [np.inf]
    out, lower = [], -np.inf
    for w, upper in zip(windows, bounds):
        drums = sum(lower <= n.start < upper for n in drum_notes)
        out.append(dataclasses.replace(w, dropped_drum_notes=drums))
        lower = upper
    return out


def tokens_to_notes(tokens_m: np.ndarray, *, program: int = 0) -> pretty_midi.PrettyMIDI:
    """MIDI tokens -> a one-instrument PrettyMIDI: the notes a record or prompt asks for (e.g. the
    reference of a transcription score). Times are bin centres, so `tokenize_midi` of the result
    gives the same tokens back; velocities are the classes' values."""
    tokens = np.asarray(tokens_m).reshape(-1)
    if tokens.size % TOKENS_PER_NOTE:
        raise MidiTokenizationError(f"{tokens.size} MIDI tokens is not a whole number of {TOKENS_PER_NOTE}-token notes")
    pm = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(program=program)
    bins = WINDOW_SECONDS / TIME_BINS
    for onset, offset, pitch, velocity in tokens.reshape(-1, TOKENS_PER_NOTE).tolist():
        fields = (onset - ONSET_BASE, offset - OFFSET_BASE, pitch - PITCH_BASE, velocity - VELOCITY_BASE)
        if not (0 <= fields[0] < TIME_BINS and 0 <= fields[1] < TIME_BINS and 0 <= fields[2] < NUM_PITCHES
                and 0 <= fields[3] < len(VELOCITY_CLASSES)):
            raise MidiTokenizationError(f"tokens {[onset, offset, pitch, velocity]} are not an (onset, offset, pitch, "
                                        "velocity) note")
        end = (max(fields[1], fields[0]) + 0.5) * bins
        inst.notes.append(pretty_midi.Note(VELOCITY_CLASSES[fields[3]], fields[2], (fields[0] + 0.5) * bins, end))
    pm.instruments.append(inst)
    return pm
