"""Instrument libraries behind one interface: a list of `InstrumentSpec`s and a note table for each.

A spec is small and picklable (it travels through the pipeline); `build_note_table` turns it into
a `render.NoteTable` on the worker. SoundFont presets (bank 0, programs 0-127; drum kits are never
used) are rendered note by note with FluidSynth, offline, without an audio driver; the default is
the General MIDI SoundFont that ships inside pretty_midi. NSynth lives in `nsynth.py`. Libraries
without their own splits (SoundFonts) get held-out instruments by a seeded rank, so the valid and
test instruments are never seen in training.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import tempfile
import threading

import numpy as np

from tokensynth_jax.tokens.midi_library import import_fluidsynth, pretty_midi

from .config import PrepConfig
from .instrument_spec import InstrumentError, InstrumentSpec
from .paths import is_remote, read_bytes
from .render import NoteTable

DEFAULT_SOUNDFONT = "pretty_midi:TimGM6mb.sf2"  # resolved on each machine, where pretty_midi is installed
_TRIM_DB = -80.0  # a note's tail below this (relative to the instrument's loudest note) is cut
_SILENT_NOTE_DB = -60.0  # a note this far below the loudest is a missing note, not a quiet one


def assign_splits(ids: list[str], valid_fraction: float, test_fraction: float, seed: int) -> dict:
    """Held-out instruments by a seeded rank: floor(n * fraction) test, then valid, the rest train."""
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"split|{seed}|{i}".encode()).hexdigest())
    n_test, n_valid = int(len(ids) * test_fraction), int(len(ids) * valid_fraction)
    return {i: "test" if r < n_test else "valid" if r < n_test + n_valid else "train"
            for r, i in enumerate(ranked)}


# --- FluidSynth ------------------------------------------------------------------------------------
def _fluidsynth():
    try:
        fluidsynth = import_fluidsynth()
    except (ImportError, OSError) as e:
        raise InstrumentError(
            f"FluidSynth is not available ({e}): install the Debian package libfluidsynth3 "
            "(apt-get install libfluidsynth3) and the Python package pyfluidsynth"
        ) from e
    # pyfluidsynth only wraps the int16 writer; the float writer keeps quiet notes' resolution.
    fl = fluidsynth._fl
    fl.fluid_synth_write_float.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                           ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    return fluidsynth


_local_copies: dict = {}
_local_lock = threading.Lock()


def resolve_soundfont(path: str) -> str:
    """A local path for a SoundFont: the packaged default, a local file, or a cached remote copy."""
    if path == DEFAULT_SOUNDFONT:
        return os.path.join(os.path.dirname(pretty_midi.__file__), "TimGM6mb.sf2")
    if not is_remote(path):
        if not os.path.isfile(path):
            raise InstrumentError(f"{path}: no such SoundFont file")
        return path
    with _local_lock:
        if path not in _local_copies:
            fd, local = tempfile.mkstemp(suffix=".sf2")
            with os.fdopen(fd, "wb") as f:
                f.write(read_bytes(path))
            _local_copies[path] = local
        return _local_copies[path]


class _Synth:
    """One FluidSynth instance rendering single notes to float32, reverb and chorus off (the
    effects are the augmentation's job)."""

    def __init__(self, soundfont: str, sample_rate: int):
        fs = _fluidsynth()
        self._fl = fs._fl
        self.synth = fs.Synth(gain=1.0, samplerate=float(sample_rate),
                              **{"synth.reverb.active": 0, "synth.chorus.active": 0})
        self.sfid = self.synth.sfload(resolve_soundfont(soundfont))
        if self.sfid < 0:
            self.synth.delete()
            raise InstrumentError(f"{soundfont}: FluidSynth cannot load this SoundFont")
        self.sample_rate = sample_rate

    def preset_name(self, bank: int, program: int) -> str | None:
        return self.synth.sfpreset_name(self.sfid, bank, program)

    def note(self, bank: int, program: int, pitch: int, velocity: int, hold: float, release: float) -> np.ndarray:
        # A reset before every note: each note starts from the same state, whatever came before.
        self.synth.system_reset()
        self.synth.program_select(0, self.sfid, bank, program)
        n_hold, n_rel = int(round(hold * self.sample_rate)), int(round(release * self.sample_rate))
        left = np.zeros(n_hold + n_rel, np.float32)
        right = np.zeros(n_hold + n_rel, np.float32)
        self.synth.noteon(0, pitch, velocity)
        self._fl.fluid_synth_write_float(self.synth.synth, n_hold, left.ctypes.data, 0, 1, right.ctypes.data, 0, 1)
        self.synth.noteoff(0, pitch)
        if n_rel:
            self._fl.fluid_synth_write_float(self.synth.synth, n_rel, left[n_hold:].ctypes.data, 0, 1,
                                             right[n_hold:].ctypes.data, 0, 1)
        return 0.5 * (left + right)

    def close(self):
        self.synth.delete()


def soundfont_instruments(paths: tuple[str, ...], programs: tuple[int, ...] | None, *,
                          valid_fraction: float, test_fraction: float, seed: int) -> list[InstrumentSpec]:
    """The melodic presets (bank 0) of SoundFonts as instruments, with seeded held-out splits.

    Raises:
      InstrumentError: a SoundFont cannot be loaded, or a requested program is not in it.
    """
    specs = []
    for path in paths or (DEFAULT_SOUNDFONT,):
        synth = _Synth(path, 22050)
        try:
            stem = os.path.splitext(os.path.basename(path.split(":", 1)[-1]))[0]
            wanted = range(128) if programs is None else programs
            for program in wanted:
                name = synth.preset_name(0, program)
                if name is None:
                    if programs is not None:
                        raise InstrumentError(f"{path}: no preset at bank 0 program {program}")
                    continue
                specs.append(InstrumentSpec(f"sf2:{stem}:000-{program:03d}", "", "soundfont",
                                            {"path": path, "bank": 0, "program": int(program), "name": name}))
        finally:
            synth.close()
    ids = [s.instrument_id for s in specs]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise InstrumentError(f"two SoundFonts share a file name, so their ids collide: {twice[:3]}")
    splits = assign_splits(ids, valid_fraction, test_fraction, seed)
    return [dataclasses.replace(s, split=splits[s.instrument_id]) for s in specs]


def _finish_table(spec: InstrumentSpec, sample_rate: int, raw: dict, max_pitch_shift: int) -> NoteTable:
    """Drops missing (near-silent) notes, trims silent tails, builds the table."""
    peaks = {k: float(np.abs(v).max()) if v.size else 0.0 for k, v in raw.items()}
    top = max(peaks.values(), default=0.0)
    if not np.isfinite(top) or top <= 0:
        return NoteTable(spec.instrument_id, sample_rate, {}, max_pitch_shift)  # raises: no notes
    floor, trim = top * 10 ** (_SILENT_NOTE_DB / 20), top * 10 ** (_TRIM_DB / 20)
    clips = {}
    for k, v in raw.items():
        if peaks[k] >= floor and np.isfinite(v).all():
            loud = np.flatnonzero(np.abs(v) > trim)
            clips[k] = v[: loud[-1] + 1]
    return NoteTable(spec.instrument_id, sample_rate, clips, max_pitch_shift)


def soundfont_note_table(spec: InstrumentSpec, sample_rate: int, cfg: PrepConfig) -> NoteTable:
    """Renders a preset's note table with FluidSynth (`cfg.table_pitches` x `cfg.table_velocities`)."""
    synth = _Synth(spec.params["path"], sample_rate)
    try:
        bank, program = spec.params["bank"], spec.params["program"]
        synth.note(bank, program, 60, 100, 0.05, 0.0)  # a fresh synth's first note differs; warm it up
        lo, hi, step = cfg.table_pitches
        raw = {(p, v): synth.note(bank, program, p, v, cfg.note_hold_seconds, cfg.note_release_seconds)
               for p in range(lo, hi + 1, step) for v in cfg.table_velocities}
    finally:
        synth.close()
    return _finish_table(spec, sample_rate, raw, cfg.max_pitch_shift)


def list_instruments(cfg: PrepConfig) -> list[InstrumentSpec]:
    """The configured library's instruments, sorted by id.

    Raises:
      InstrumentError: the library cannot be read.
    """
    if cfg.instruments == "soundfont":
        specs = soundfont_instruments(cfg.soundfonts, cfg.programs, valid_fraction=cfg.valid_fraction,
                                      test_fraction=cfg.test_fraction, seed=cfg.seed)
    else:
        from . import nsynth

        specs = nsynth.raw_instruments(cfg.nsynth_dir, cfg.nsynth_splits)
    if not specs:
        raise InstrumentError(f"the {cfg.instruments} library has no instruments")
    return sorted(specs, key=lambda s: s.instrument_id)


def build_note_table(spec: InstrumentSpec, sample_rate: int, cfg: PrepConfig) -> NoteTable:
    """The note table of any library's instrument, at `sample_rate`."""
    if spec.library == "soundfont":
        return soundfont_note_table(spec, sample_rate, cfg)
    if spec.library == "nsynth":
        from . import nsynth

        return _finish_table(spec, sample_rate, nsynth.raw_notes(spec, sample_rate), cfg.max_pitch_shift)
    raise InstrumentError(f"{spec.instrument_id}: unknown library {spec.library!r}")
