"""Prep's first pass for a codec fitted on the job's own renders (`--codec demo-melrvq`).

Before the Beam graph runs, `prepare` renders a deterministic sample of training pairs (procedural
phrases on the *train* instruments only, so held-out instruments never shape the codec), with the
job's augmentation, fits the codec on their target and reference clips and saves the state as
`OUT/codec/demo-melrvq.npz`, then a sidecar `demo-melrvq.json` (the job's config fingerprint and
the fit's). Both are written atomically, sidecar last, as shards are: a state with its sidecar is
finished, and a rerun (a resume after kill -9) reuses it instead of fitting again, so the codes in
every shard come from one fit and resumed shards stay byte-identical. The fit is a pure function
of the config and the instrument library, so even a refit gives the same state. The encoders then
load the state by its path, which is the codec's name for the rest of the job and for training
and synthesis. Other codecs pass through untouched.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from tokensynth_jax.audio import melrvq

from . import instrument_spec, instruments, midi_sources, pairs, paths, plan, render, sink
from .config import PrepConfig

CLIPS_PER_INSTRUMENT = 12  # fit pairs rendered per train instrument at most (target and reference: 2 clips each)
MAX_INSTRUMENTS = 32  # the fit sees at most this many train instruments (the first by id)
STATE_DIR = "codec"
_FIT_SEED_KEY = "codec-fit"  # separates the fit sample's phrases from the job's own pool


def state_paths(output_dir: str) -> tuple[str, str]:
    """(state .npz, sidecar .json) of a job's fitted codec."""
    stem = sink.join(output_dir, STATE_DIR, melrvq.NAME)
    return stem + ".npz", stem + ".json"


def _fit_clips(cfg: PrepConfig, specs: list, sample_rate: int) -> list[np.ndarray]:
    """Target and reference clips of the fit sample (pairs that fail to render are left out)."""
    train = [s for s in specs if s.split == "train"] or list(specs)
    index = plan.rng_for(cfg.seed, _FIT_SEED_KEY).integers(1 << 30)
    pool = [midi_sources.procedural_segment(cfg.seed, int(index) + i, cfg.max_notes) for i in range(2 * CLIPS_PER_INSTRUMENT)]
    per_instrument = min(CLIPS_PER_INSTRUMENT, cfg.pairs_per_instrument)  # a small job fits on a small sample
    fit_cfg = dataclasses.replace(cfg, pairs_per_instrument=per_instrument, chunk_size=per_instrument)
    clips = []
    for spec in train[:MAX_INSTRUMENTS]:
        try:
            table = instruments.build_note_table(spec, sample_rate, cfg)
        except (instrument_spec.InstrumentError, render.RenderError, OSError, ValueError):
            continue  # the job itself reports unusable instruments
        for chunk in plan.plan_instrument(spec, pool, fit_cfg, 1):
            for p in chunk:
                try:
                    rendered = pairs.render_pair(p, table, fit_cfg)
                except (render.RenderError, midi_sources.SegmentError):
                    continue
                clips += [rendered.target, rendered.reference]
    return clips


def prepare(cfg: PrepConfig, specs: list) -> tuple[str, dict]:
    """The codec name the job's encoders load, and what the manifest adds to the codec's entry.

    Args:
      cfg: the job config; only `cfg.codec == "demo-melrvq"` fits anything.
      specs: the job's instruments (with their splits).

    Returns:
      (codec name, manifest entries): for a fitted codec its state's path and the entries saying
      where the state is (relative to `cfg.output_dir`) and how it was fitted; other codecs pass
      through with no entries.

    Raises:
      sink.SinkError: the output holds a fit of another configuration, or a broken one.
      melrvq.MelRVQError: the sample has too few frames to fit the codebooks.
    """
    if cfg.codec != melrvq.NAME:
        return cfg.codec, {}
    state_path, sidecar_path = state_paths(cfg.output_dir)
    relative = f"{STATE_DIR}/{melrvq.NAME}.npz"
    fingerprint = cfg.fingerprint()
    try:
        sidecar = sink.read_json(sidecar_path)
    except (OSError, IOError, ValueError):
        sidecar = None  # never finished: fit (again)
    if sidecar is not None:
        if sidecar.get("config_fingerprint") != fingerprint:
            raise sink.SinkError(f"{cfg.output_dir}: {relative} was fitted by a different configuration; "
                                 "use a new output directory or delete the old one")
        try:
            fitted = melrvq.MelRVQ.from_bytes(paths.read_bytes(state_path), what=state_path)
        except (OSError, IOError, melrvq.MelRVQError) as e:
            raise sink.SinkError(f"{cfg.output_dir}: {relative} is unreadable ({e}); delete {STATE_DIR}/ to refit") from e
        if fitted.fingerprint != sidecar.get("fit"):
            raise sink.SinkError(f"{cfg.output_dir}: {relative} does not match its sidecar's fit; "
                                 f"delete {STATE_DIR}/ to refit")
    else:
        clips = _fit_clips(cfg, specs, melrvq.MelRVQConfig().sample_rate)
        fitted = melrvq.fit(clips)
        sidecar = {"codec": melrvq.NAME, "config_fingerprint": fingerprint, "fit": fitted.fingerprint,
                   "clips": len(clips), "seconds": float(sum(len(c) for c in clips)) / fitted.config.sample_rate}
        sink.write_bytes_atomic(state_path, fitted.to_bytes())
        sink.write_json_atomic(sidecar_path, sidecar)
    return state_path, {"state": relative, "fit_sha256": sidecar["fit"], "fit_clips": sidecar["clips"],
                        "fit_seconds": sidecar["seconds"]}

