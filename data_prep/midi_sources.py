"""MIDI sources: 5 s single-instrument segments from a Lakh-style tree, or procedural phrases.

A segment is one non-drum track of one file over one 5 s window, holding the notes that fit in
the window by the tokenizer's own rule (start in [0, 5), end < 5 relative to the window), so the
notes rendered are exactly the notes tokenized. `file_segments` never raises on bad input: a file
that cannot be read, has no notes, only drums or an extreme tempo, and a window with more than
`max_notes` notes come back as (reason, item) rejections for the pipeline to count. Paths in segment sources are
relative to the MIDI root, so records stay traceable when the tree moves.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import warnings

import numpy as np

from tokensynth_jax.errors import UserError
from tokensynth_jax.tokens import midi_tokens
from tokensynth_jax.tokens.midi_library import pretty_midi
from tokensynth_jax.tokens.token_layout import WINDOW_SECONDS

from . import paths, procedural
from .paths import is_remote, join, read_bytes

MIDI_EXTENSIONS = (".mid", ".midi")
UNREADABLE, EMPTY, DRUM_ONLY, EXTREME_TEMPO, TOO_MANY_NOTES = (
    "unreadable_midi", "empty_midi", "drum_only", "extreme_tempo", "too_many_notes")


class SegmentError(UserError):
    """A segment that cannot be rebuilt or tokenized; the message names the source."""


@dataclasses.dataclass(frozen=True)
class Segment:
    """One 5 s single-instrument MIDI segment."""

    key: str  # stable, unique id of the segment
    source: dict  # the record's source dict: {"midi", "track", "start", ...}
    notes: np.ndarray  # float64 [N, 4]: start s, end s (relative to the window), pitch, velocity


def list_midi_files(root: str) -> list[str]:
    """Every .mid/.midi file under `root`, at any depth, as sorted paths relative to it.

    Raises:
      SegmentError: the root does not exist or holds no MIDI file.
    """
    if is_remote(root):
        base = root.rstrip("/") + "/"
        matches = paths.filesystems().match([base + "**"])[0].metadata_list
        rel = [m.path[len(base):] for m in matches]
    else:
        if not os.path.isdir(root):
            raise SegmentError(f"{root}: the MIDI directory does not exist")
        rel = [os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files]
    rel = sorted(p for p in rel if p.lower().endswith(MIDI_EXTENSIONS))
    if not rel:
        raise SegmentError(f"{root}: no .mid or .midi files under it")
    return rel


def _load(data: bytes) -> pretty_midi.PrettyMIDI:
    with warnings.catch_warnings():  # pretty_midi warns about meta events on odd tracks; not our concern
        warnings.simplefilter("ignore")
        return pretty_midi.PrettyMIDI(io.BytesIO(data))


def _track_windows(notes: np.ndarray, max_notes: int):
    """Yields (window start, notes of the window relative to it, cut notes) for windows with notes."""
    starts, ends = notes[:, 0], notes[:, 1]
    last = float(ends.max())
    for k in range(max(1, int(np.ceil(last / WINDOW_SECONDS)))):
        w0 = k * WINDOW_SECONDS
        rel_s, rel_e = starts - w0, ends - w0
        inside = (rel_s >= 0) & (rel_s < WINDOW_SECONDS) & (rel_e < WINDOW_SECONDS)
        overlapping = (rel_s < WINDOW_SECONDS) & (rel_e > 0)
        if inside.any():
            win = notes[inside].copy()
            win[:, 0], win[:, 1] = rel_s[inside], rel_e[inside]
            yield w0, win[np.lexsort((win[:, 2], win[:, 0]))], int((overlapping & ~inside).sum())


def file_segments(root: str, rel_path: str, *, max_notes: int, min_tempo_bpm: float,
                  max_tempo_bpm: float) -> tuple[list[Segment], list[tuple[str, str]]]:
    """Cuts one MIDI file into segments.

    Args:
      root: the MIDI root directory (local path or Beam filesystem URL).
      rel_path: the file, relative to `root`.
      max_notes: windows with more notes are rejected (`too_many_notes`).
      min_tempo_bpm, max_tempo_bpm: a file with any tempo outside this range is rejected.

    Returns:
      (segments, rejections): rejections are (reason, item) pairs, item naming the file or window.
    """
    try:
        pm = _load(read_bytes(join(root, rel_path)))
        _, tempi = pm.get_tempo_changes()
    except Exception as e:  # mido/pretty_midi raise many types for corrupt or non-MIDI files
        return [], [(UNREADABLE, f"{rel_path}: {type(e).__name__}: {str(e)[:200]}")]
    if len(tempi) and (tempi.min() < min_tempo_bpm or tempi.max() > max_tempo_bpm):
        return [], [(EXTREME_TEMPO, f"{rel_path}: tempo {tempi.min():.4g}..{tempi.max():.4g} bpm")]
    melodic = [(i, inst) for i, inst in enumerate(pm.instruments) if not inst.is_drum and inst.notes]
    if not melodic:
        drums = any(inst.notes for inst in pm.instruments)
        return [], [(DRUM_ONLY, rel_path) if drums else (EMPTY, rel_path)]
    segments, rejected = [], []
    for track, inst in melodic:
        notes = np.asarray([(n.start, n.end, n.pitch, n.velocity) for n in inst.notes], np.float64)
        for w0, win, cut in _track_windows(notes, max_notes):
            key = f"{rel_path}#{track}@{w0:g}"
            if win.shape[0] > max_notes:
                rejected.append((TOO_MANY_NOTES, f"{key}: {win.shape[0]} notes > {max_notes}"))
                continue
            source = {"midi": rel_path, "track": track, "start": w0, "program": int(inst.program),
                      "cut_notes": cut}
            segments.append(Segment(key, source, win))
    return segments, rejected


def procedural_segment(seed: int, index: int, max_notes: int) -> Segment:
    """Phrase `index` of the procedural generator as a segment."""
    notes = procedural.generate(seed, index, max_notes)
    return Segment(f"{procedural.GENERATOR}:{seed}:{index}", procedural.source(seed, index), notes)


def segment_from_source(source: dict, *, midi_dir: str | None, max_notes: int) -> Segment:
    """Rebuilds a segment from a record's source dict (traceability and re-rendering).

    Raises:
      SegmentError: the source names a file, track or window that no longer holds that segment.
    """
    if source.get("midi") == procedural.GENERATOR:
        return procedural_segment(source["seed"], source["index"], max_notes)
    if midi_dir is None:
        raise SegmentError(f"{source}: a file source needs the MIDI directory")
    pm = _load(read_bytes(join(midi_dir, source["midi"])))
    inst = pm.instruments[source["track"]]
    notes = np.asarray([(n.start, n.end, n.pitch, n.velocity) for n in inst.notes], np.float64)
    for w0, win, _ in _track_windows(notes, max_notes):
        if w0 == source["start"]:
            return Segment(f"{source['midi']}#{source['track']}@{w0:g}", dict(source), win)
    raise SegmentError(f"{source}: no notes in that window of {source['midi']}")


def pool_rank(seed: int, key: str) -> int:
    """The segment's place in the seeded pool order (the pool is the `num_segments` lowest)."""
    return int.from_bytes(hashlib.sha256(f"pool|{seed}|{key}".encode()).digest()[:8], "big")


def to_pretty_midi(notes: np.ndarray, program: int = 0) -> pretty_midi.PrettyMIDI:
    """A one-instrument PrettyMIDI holding the segment's notes (times relative to the window)."""
    pm = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(program=program)
    inst.notes = [pretty_midi.Note(velocity=int(v), pitch=int(p), start=float(s), end=float(e))
                  for s, e, p, v in notes]
    pm.instruments.append(inst)
    return pm


def tokenize(segment: Segment, transpose: int, max_notes: int) -> np.ndarray:
    """The segment's MIDI tokens (transposed), checked to hold every note that is rendered.

    Raises:
      SegmentError: the tokenizer kept a different number of notes than the segment holds.
    """
    try:
        window = midi_tokens.tokenize_midi(to_pretty_midi(segment.notes), start_seconds=0.0,
                                           pitch_shift=transpose, max_notes=max_notes)
    except midi_tokens.MidiTokenizationError as e:
        raise SegmentError(f"{segment.key}: {e}") from e
    if window.num_notes != segment.notes.shape[0] or window.cut_notes:
        raise SegmentError(f"{segment.key}: tokenized {window.num_notes} of {segment.notes.shape[0]} notes")
    return window.tokens
