"""Clips the prepared data never holds, for judging a model: held-out instruments on held-out phrases.

The demo (and anyone evaluating a model trained on a prep job's output) needs targets whose notes
the model never saw: procedural phrases of a seed the job never uses, rendered dry by the job's
test-split instruments with the job's own note tables, so they sound like the training data less
its effects.
"""
from __future__ import annotations

from . import instruments, midi_sources, render
from .config import PrepConfig

HELD_OUT_SEED = 7_700_001  # procedural phrases of this seed are never in the prepared data


def held_out_clips(manifest: dict, sample_rate: int, count: int, max_notes: int) -> list[dict]:
    """`count` clips of the test instruments (round robin) on phrases the data never holds.

    Args:
      manifest: the prep job's manifest (its config and instrument splits).
      sample_rate: the codec's rate.
      count: clips to make.
      max_notes: notes per phrase at most.

    Returns:
      Per clip: "instrument" (id), "program" (GM program), "notes" (float [N, 4] start, end,
      pitch, velocity of the target), "target" (the phrase rendered by the instrument, dry) and
      "reference" (another held-out phrase by the same instrument: the timbre's recording).
    """
    cfg = PrepConfig.from_dict(manifest["config"])
    specs = {s.instrument_id: s for s in instruments.list_instruments(cfg)}
    test_ids = manifest["instruments"]["test"]["ids"]
    tables: dict = {}
    clips, index = [], 0
    for j in range(count):
        instrument = test_ids[j % len(test_ids)]
        if instrument not in tables:
            tables[instrument] = instruments.build_note_table(specs[instrument], sample_rate, cfg)
        table, rendered = tables[instrument], []
        while len(rendered) < 2:  # the target's phrase, then the reference's; phrases out of range are skipped
            seg = midi_sources.procedural_segment(HELD_OUT_SEED, index, max_notes)
            index += 1
            shift = table.transpose_to_fit(seg.notes[:, 2])
            if shift is not None:
                notes = seg.notes.copy()
                notes[:, 2] += shift
                audio = render.render(notes, table, fade_seconds=cfg.fade_seconds)
                rendered.append((notes, render.normalise(audio, peak=cfg.peak, silence_peak=cfg.silence_peak,
                                                         what=seg.key)))
        clips.append({"instrument": instrument, "program": specs[instrument].params["program"],
                      "notes": rendered[0][0], "target": rendered[0][1], "reference": rendered[1][1]})
    return clips


def to_midi_file(notes, program: int, path: str) -> None:
    """Writes notes (float [N, 4] start, end, pitch, velocity) as a one-instrument MIDI file."""
    midi_sources.to_pretty_midi(notes, program=program).write(path)
