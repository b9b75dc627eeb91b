"""MIDI files -> TokenSynth MIDI tokens, one 5 s window at a time.

The reference (`tokensynth.utils.get_tokens_from_midi`, v0.0.4) chains the notes of every
instrument, drums included, sorts them by onset and stops at the first note that starts or ends at
or after 5 s, so one long early note silently drops every later note, and it can only tokenize the
first 5 s. By default we keep every non-drum note that fits inside the window, report the notes
that overlap it but do not fit (`cut_notes`) and the drum notes left out, tokenize windows at any
start time, and raise `MidiTokenizationError` naming the file for bad input instead of returning
an empty or wrong sequence. `compat="tokensynth-0.0.4"` reproduces the reference's tokens exactly.
Time bins keep the reference's arithmetic `int(seconds * 100)`, truncation included (a note at
0.29 s lands in bin 28, because 0.29 * 100 == 28.999999999999996).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence, Union

import numpy as np
import pretty_midi

from tokensynth_jax.errors import UserError
from tokensynth_jax.tokens.token_layout import (
    NUM_PITCHES,
    OFFSET_BASE,
    ONSET_BASE,
    PITCH_BASE,
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
    """

    tokens: np.ndarray
    source: str
    start_seconds: float
    num_notes: int
    cut_notes: int
    dropped_drum_notes: int


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


def split_into_windows(midi: MidiInput, *, window_seconds: float = WINDOW_SECONDS,
                       pitch_shift: int = 0, max_notes: int | None = None) -> list[MidiWindow]:
    """Tokenizes a whole MIDI file as consecutive windows at 0, 5, 10, ... s.

    The windows cover the file up to the end of its last non-drum note. Windows without notes are
    kept, so the list stays contiguous in time for window-by-window synthesis.

    Args:
      midi: a path to a MIDI file, or a loaded `pretty_midi.PrettyMIDI`.
      window_seconds: the window length; must be `token_layout.WINDOW_SECONDS`.
      pitch_shift: semitones added to every pitch (the result must stay in 0..127).
      max_notes: if given, more notes than this in any window is an error.

    Returns:
      One `MidiWindow` per window, in time order.

    Raises:
      MidiTokenizationError: as `tokenize_midi`, except that empty windows are not an error.
    """
    source = "<PrettyMIDI>" if isinstance(midi, pretty_midi.PrettyMIDI) else os.fspath(midi)
    if window_seconds != WINDOW_SECONDS:
        raise MidiTokenizationError(
            f"{source}: window_seconds={window_seconds}, but the vocabulary has {WINDOW_SECONDS} s windows"
        )
    pm, source = _load(midi)
    notes = _sorted_notes(pm, source, with_drums=False)
    drum_notes = _drum_notes(pm)
    end_seconds = max(n.end for n in notes)
    num_windows = max(1, math.ceil(end_seconds / WINDOW_SECONDS))
    return [
        _window(source, notes, drum_notes, k * WINDOW_SECONDS, pitch_shift, None, max_notes)
        for k in range(num_windows)
    ]


def file_windows(paths: Sequence[MidiInput], *, max_notes: int | None = None,
                 compat: str | None = None) -> list[list[MidiWindow]]:
    """Each file's windows for synthesis: all its 5 s windows (`split_into_windows`), or with `compat`
    the reference's single window at 0 s (`tokenize_midi`).

    Raises:
      MidiTokenizationError naming the first file that cannot be tokenized.
    """
    if compat:
        return [[tokenize_midi(p, compat=compat, max_notes=max_notes)] for p in paths]
    return [split_into_windows(p, max_notes=max_notes) for p in paths]


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
