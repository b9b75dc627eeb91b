"""What every instrument library yields: an `InstrumentSpec` per instrument, and its error type.

Its own module so the libraries (SoundFont in instruments.py, NSynth in nsynth.py) and the
dispatcher that picks between them share the types without importing each other.
"""
from __future__ import annotations

import dataclasses

from tokensynth_jax.errors import UserError


class InstrumentError(UserError):
    """A library or instrument that cannot be used; the message names it."""


@dataclasses.dataclass(frozen=True)
class InstrumentSpec:
    """One instrument of a library, enough for any worker to build its note table."""

    instrument_id: str  # e.g. "sf2:TimGM6mb:000-040" or "nsynth:guitar_acoustic_010"
    split: str  # "train" / "valid" / "test"
    library: str  # "soundfont" or "nsynth"
    params: dict  # library specifics (soundfont: path, bank, program, name; nsynth: dir, notes)
