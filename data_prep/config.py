"""The data-preparation job's configuration: one frozen dataclass, validated once, fingerprinted.

Every field that changes the bytes of the output is part of the fingerprint stored in each shard's
sidecar and in the manifest, so a resumed run refuses to mix shards of two configurations. The
performance knobs at the end (`chunk_size`, `torch_threads`, `note_table_cache`, `offline`) change
how the work is spread, never what it writes, and are left out of the fingerprint. Runner options
(DirectRunner, Dataflow, ...) are not config: they go to Beam as standard pipeline options.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

from tokensynth_jax.errors import UserError
from tokensynth_jax.tokens import records

AUG_EFFECTS = ("distortion", "overdrive", "chorus", "phaser", "flanger", "delay", "reverb",
               "compressor", "eq", "filter", "bitcrush")
CLAP_INPUTS = ("codec-rate", "tokensynth-0.0.4")
INSTRUMENT_LIBRARIES = ("soundfont", "nsynth")
SPLITS = ("train", "valid", "test")


class ConfigError(UserError):
    """A job configuration that cannot run; the message names the field."""


@dataclasses.dataclass(frozen=True)
class PrepConfig:
    """What `tokensynth prep` makes. Defaults are the paper's job where it has one."""

    output_dir: str  # local path or any Beam filesystem URL (gs://, s3://, ...)
    # --- MIDI segments ---------------------------------------------------------------------------
    midi_dir: str | None = None  # a Lakh-style tree of .mid/.midi files; None: the procedural generator
    procedural_candidates: int = 20000  # phrases generated when midi_dir is None (the pool is drawn from them)
    num_segments: int = 10000  # size of the segment pool every instrument draws its pairs from
    max_notes: int = 128  # notes per 5 s segment at most (4 tokens each; fits 1024 positions with DAC)
    min_tempo_bpm: float = 20.0  # MIDI files with any tempo outside [min, max] are rejected
    max_tempo_bpm: float = 400.0
    # --- instruments -----------------------------------------------------------------------------
    instruments: str = "soundfont"  # "soundfont" (FluidSynth) or "nsynth" (the raw release layout)
    soundfonts: tuple[str, ...] = ()  # .sf2 paths; empty: the General MIDI SoundFont inside pretty_midi
    programs: tuple[int, ...] | None = None  # GM programs (bank 0) to use; None: every melodic preset
    nsynth_dir: str | None = None  # root holding nsynth-train/, nsynth-valid/, nsynth-test/
    nsynth_splits: tuple[str, ...] = SPLITS  # which NSynth splits to read (each keeps its name)
    valid_fraction: float = 0.05  # share of SoundFont presets held out as "valid" instruments
    test_fraction: float = 0.05  # share held out as "test" instruments (cloning evaluation)
    table_pitches: tuple[int, int, int] = (21, 108, 1)  # SoundFont note table: lowest, highest, step
    table_velocities: tuple[int, ...] = (25, 50, 100, 127)  # SoundFont velocity layers (the token classes)
    note_hold_seconds: float = 3.0  # SoundFont notes are held this long (as NSynth: 3 s held + 1 s release)
    note_release_seconds: float = 1.0
    max_pitch_shift: int = 6  # semitones a recorded note may be resampled to fill a missing pitch
    # --- rendering -------------------------------------------------------------------------------
    fade_seconds: float = 0.05  # release fade at each note's offset
    peak: float = 0.9  # every clip is peak-normalised to this (no clipping)
    silence_peak: float = 1e-4  # a render quieter than this (before normalising) is rejected as silent
    # --- pairs and augmentation ------------------------------------------------------------------
    pairs_per_instrument: int = 10000
    seed: int = 0
    dry_fraction: float = 0.2  # share of pairs left without effects
    max_effects: int = 3  # effects per chain: 1..max_effects
    effects: tuple[str, ...] = AUG_EFFECTS
    # --- encoders --------------------------------------------------------------------------------
    codec: str = "facebook/encodec_32khz"  # preset name, HF id or local path (encoders.py)
    clap: str = "laion/larger_clap_music"
    clap_input: str = "codec-rate"  # "tokensynth-0.0.4": band-limit to 16 kHz first, as the reference does
    encode_batch_size: int = 1  # fixed, padded batches (results never depend on batch mates); ~32 on GPU
    device: str = "cpu"  # torch device for CLAP and the codec
    # --- sink ------------------------------------------------------------------------------------
    records_per_shard: int = 20000  # ~200 MB shards at ~10 KB a pair
    # --- performance knobs (not in the fingerprint) ----------------------------------------------
    chunk_size: int = 500  # pairs of one instrument rendered per work item (one note-table build)
    torch_threads: int = 0  # 0: torch's default
    note_table_cache: int = 2  # note tables kept per worker process
    offline: bool = False  # load pretrained encoders from the local cache only, never the hub

    def __post_init__(self):
        def need(ok, field, why):
            if not ok:
                raise ConfigError(f"{field}: {why} (got {getattr(self, field)!r})")

        need(bool(self.output_dir), "output_dir", "give an output directory")
        need(self.num_segments >= 2, "num_segments", "pairs need at least 2 segments")
        need(self.procedural_candidates >= 2, "procedural_candidates", "must be at least 2")
        need(0 < self.max_notes, "max_notes", "must be positive")
        need(0 < self.min_tempo_bpm < self.max_tempo_bpm, "max_tempo_bpm", "need 0 < min < max")
        need(self.instruments in INSTRUMENT_LIBRARIES, "instruments", f"one of {INSTRUMENT_LIBRARIES}")
        need(self.instruments != "nsynth" or bool(self.nsynth_dir), "nsynth_dir", "needed for nsynth")
        need(set(self.nsynth_splits) <= set(SPLITS), "nsynth_splits", f"subset of {SPLITS}")
        need(self.valid_fraction >= 0, "valid_fraction", "must be >= 0")
        need(self.test_fraction >= 0, "test_fraction", "must be >= 0")
        if self.valid_fraction + self.test_fraction >= 1:
            raise ConfigError(f"valid_fraction: valid_fraction + test_fraction must be < 1, or no preset is left to train on "
                              f"(got {self.valid_fraction!r} + {self.test_fraction!r})")
        lo, hi, step = self.table_pitches
        need(0 <= lo <= hi <= 127 and step >= 1, "table_pitches", "need 0 <= lo <= hi <= 127, step >= 1")
        need(all(1 <= v <= 127 for v in self.table_velocities) and self.table_velocities,
             "table_velocities", "velocities in 1..127")
        need(self.note_hold_seconds > 0 and self.note_release_seconds >= 0, "note_hold_seconds", "positive")
        need(0 <= self.max_pitch_shift <= 24, "max_pitch_shift", "0..24 semitones")
        need(0 <= self.fade_seconds < 1, "fade_seconds", "0 <= fade < 1 s")
        need(0 < self.peak <= 1, "peak", "0 < peak <= 1")
        need(self.pairs_per_instrument >= 1, "pairs_per_instrument", "at least 1")
        need(0 <= self.dry_fraction <= 1, "dry_fraction", "in [0, 1]")
        need(self.max_effects >= 1, "max_effects", "at least 1")
        unknown = sorted(set(self.effects) - set(AUG_EFFECTS))
        need(not unknown and self.effects, "effects", f"known effects are {AUG_EFFECTS}")
        need(self.clap_input in CLAP_INPUTS, "clap_input", f"one of {CLAP_INPUTS}")
        need(self.encode_batch_size >= 1, "encode_batch_size", "at least 1")
        need(self.records_per_shard >= 1, "records_per_shard", "at least 1")
        need(self.chunk_size >= 1, "chunk_size", "at least 1")
        need(self.note_table_cache >= 1, "note_table_cache", "at least 1")

    def to_dict(self) -> dict:
        """The config as plain JSON-able values."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def fingerprint(self) -> str:
        """sha256 of the fields that decide the output's bytes (not output_dir, not the knobs)."""
        d = self.to_dict()
        for k in ("output_dir", "chunk_size", "torch_threads", "note_table_cache", "offline"):
            d.pop(k)
        d["record_version"] = records.SCHEMA_VERSION  # a new schema never resumes an old output
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: dict) -> "PrepConfig":
        """Inverse of `to_dict` (lists back to tuples)."""
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                v = d[f.name]
                kw[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**kw)
