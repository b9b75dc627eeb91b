"""One pair's work: plan -> rendered, augmented clips and MIDI tokens -> a `PairRecord`.

Plain functions that the Beam DoFns call and that the traceability check calls again: a record's
sources (segment, octave transposition, instrument, effect chain) are enough to re-render its
target exactly. Segments that fall outside an instrument's recorded range are moved by whole
octaves into it (the smallest move that fits; the record says which), since many NSynth
instruments cover only a few octaves; a segment that fits no octave is rejected.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from tokensynth_jax.tokens import records

from . import augment, instrument_spec, instruments, midi_sources, render
from .config import PrepConfig
from .plan import PairPlan, rng_for

TOKENIZE_ERROR, UNUSABLE_INSTRUMENT = "tokenize_error", "instrument_unusable"


@dataclasses.dataclass
class RenderedPair:
    """A pair's audio and tokens, before the encoders."""

    plan: PairPlan
    target: np.ndarray  # float32 [N] at the codec's rate, peak-normalised
    reference: np.ndarray  # float32 [N]
    augmentation: dict
    midi_tokens: np.ndarray  # int32 [M], the target's
    target_source: dict
    reference_source: dict


def _clip(segment: midi_sources.Segment, table: render.NoteTable, transpose: int, fx, cfg: PrepConfig,
          what: str) -> np.ndarray:
    audio = render.render(segment.notes, table, transpose=transpose, fade_seconds=cfg.fade_seconds)
    audio = render.normalise(audio, peak=cfg.peak, silence_peak=cfg.silence_peak, what=what)
    audio = augment.apply(audio, table.sample_rate, fx)
    # Effects may boost, cut or (with broken parameters) break the signal: check and normalise again.
    return render.normalise(audio, peak=cfg.peak, silence_peak=cfg.silence_peak, what=what + " after effects")


def _transpose(segment: midi_sources.Segment, table: render.NoteTable, what: str) -> int:
    shift = table.transpose_to_fit(segment.notes[:, 2])
    if shift is None:
        lo, hi = int(segment.notes[:, 2].min()), int(segment.notes[:, 2].max())
        raise render.RenderError(render.MISSING_PITCHES, f"{what}: pitches {lo}..{hi} fit no octave of "
                                 f"{table.name} (recorded {table.pitches.min()}..{table.pitches.max()})")
    return shift


def _source(segment: midi_sources.Segment, transpose: int) -> dict:
    return {**segment.source, "key": segment.key, "transpose": int(transpose)}


def render_pair(plan: PairPlan, table: render.NoteTable, cfg: PrepConfig) -> RenderedPair:
    """Renders, augments and tokenizes one pair.

    Args:
      plan: the pair.
      table: the note table of `plan.instrument`, at the codec's sample rate.
      cfg: the job config.

    Returns:
      The rendered pair.

    Raises:
      render.RenderError: missing pitches, a silent or non-finite clip (`.reason` says which).
      midi_sources.SegmentError: the target's notes do not tokenize as rendered.
    """
    what = f"pair {plan.pair_id} ({plan.instrument.instrument_id})"
    t_shift = _transpose(plan.target, table, what + " target")
    r_shift = _transpose(plan.reference, table, what + " reference")
    tokens = midi_sources.tokenize(plan.target, t_shift, cfg.max_notes)
    chain = augment.sample_chain(rng_for(cfg.seed, "augment", plan.pair_id), effects=cfg.effects,
                                 max_effects=cfg.max_effects, dry_fraction=cfg.dry_fraction)
    fx = augment.board(chain)
    target = _clip(plan.target, table, t_shift, fx, cfg, what + " target")
    reference = _clip(plan.reference, table, r_shift, fx, cfg, what + " reference")
    return RenderedPair(plan, target, reference, chain, tokens, _source(plan.target, t_shift),
                        _source(plan.reference, r_shift))


def to_record(pair: RenderedPair, codes_tk: np.ndarray, timbre: np.ndarray, codec: dict,
              clap_model: str) -> records.PairRecord:
    """The record of an encoded pair (the schema of `tokensynth_jax.tokens.records`)."""
    return records.PairRecord(
        pair_id=pair.plan.pair_id, split=pair.plan.split, instrument_id=pair.plan.instrument.instrument_id,
        midi_tokens=pair.midi_tokens, codes=codes_tk, timbre=timbre, codec=codec, clap_model=clap_model,
        augmentation=pair.augmentation, target_source=pair.target_source,
        reference_source=pair.reference_source,
    )


def rerender(record: records.PairRecord, cfg: PrepConfig, which: str = "target",
             table: render.NoteTable | None = None) -> np.ndarray:
    """Re-renders a record's target (or reference) clip from its sources alone.

    Args:
      record: a decoded record.
      cfg: the config of the job that wrote it (MIDI root, library, render settings).
      which: "target" or "reference".
      table: the instrument's note table, if already built.

    Returns:
      float32 audio, equal to what the job encoded.
    """
    source = record.target_source if which == "target" else record.reference_source
    segment = midi_sources.segment_from_source(source, midi_dir=cfg.midi_dir, max_notes=cfg.max_notes)
    if table is None:
        spec = next((s for s in instruments.list_instruments(cfg) if s.instrument_id == record.instrument_id), None)
        if spec is None:
            raise instrument_spec.InstrumentError(f"{record.instrument_id}: not in the configured library")
        table = instruments.build_note_table(spec, int(record.codec["sample_rate"]), cfg)
    return _clip(segment, table, int(source["transpose"]), augment.board(record.augmentation), cfg, which)
