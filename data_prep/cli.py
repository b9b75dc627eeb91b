"""`tokensynth prep`: the command line of the data-preparation job, a thin face over `pipeline.run`.

`add_prep_parser(sub)` adds the subcommand to tokensynth's parser; `python -m data_prep.cli` runs
it alone. The defaults make a laptop-sized data set (every preset of the packaged General MIDI
SoundFont x 16 procedural phrases); the paper's sizes are in the help and in
`launch/dataflow_prep.sh`. Beam pipeline options (runner, project, workers, ...) go after `--`.
Errors of the user's input exit with status 2 and one line naming the file and the problem.
"""
from __future__ import annotations

import argparse
import json
import sys

from .config import AUG_EFFECTS, CLAP_INPUTS, SPLITS, ConfigError, PrepConfig


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.replace(":", ",").split(",") if t.strip())


def config_from_args(args) -> PrepConfig:
    """The job config of parsed `prep` arguments."""
    return PrepConfig(
        output_dir=args.out, midi_dir=args.midi_dir, procedural_candidates=args.procedural_candidates,
        num_segments=args.num_segments, max_notes=args.max_notes, min_tempo_bpm=args.min_tempo,
        max_tempo_bpm=args.max_tempo, instruments=args.instruments, soundfonts=tuple(args.soundfont),
        programs=_ints(args.programs) if args.programs else None, nsynth_dir=args.nsynth_dir,
        nsynth_splits=tuple(args.nsynth_splits.split(",")), valid_fraction=args.valid_fraction,
        test_fraction=args.test_fraction, table_pitches=_ints(args.table_pitches),
        table_velocities=_ints(args.table_velocities), max_pitch_shift=args.max_pitch_shift,
        pairs_per_instrument=args.pairs_per_instrument, seed=args.seed, dry_fraction=args.dry_fraction,
        max_effects=args.max_effects, effects=tuple(args.effects.split(",")), codec=args.codec, clap=args.clap,
        clap_input=args.clap_input, encode_batch_size=args.encode_batch_size, device=args.device,
        records_per_shard=args.records_per_shard, chunk_size=args.chunk_size, torch_threads=args.torch_threads,
        note_table_cache=args.note_table_cache, offline=args.offline,
    )


def beam_options(args) -> list[str]:
    """Beam options: what follows `--`, or the DirectRunner with `--workers` processes."""
    extra = [a for a in args.beam_args if a != "--"]
    if not any(a.startswith("--runner") for a in extra):
        extra = ["--runner=DirectRunner", f"--direct_num_workers={args.workers}",
                 "--direct_running_mode=" + ("in_memory" if args.workers == 1 else "multi_processing")] + extra
    return extra


def _cmd_prep(args) -> int:
    from tokensynth_jax.audio import encoders

    from . import instrument_spec, midi_sources, pipeline, sink

    try:
        cfg = config_from_args(args)
        if args.nsynth_tfds:
            from . import nsynth

            if not cfg.nsynth_dir or cfg.instruments != "nsynth":
                raise ConfigError("--nsynth-tfds needs --instruments nsynth --nsynth-dir DIR (where it exports to)")
            nsynth.export_tfds(None if args.nsynth_tfds == "default" else args.nsynth_tfds, cfg.nsynth_dir,
                               cfg.nsynth_splits)
        result = pipeline.run(cfg, beam_options(args))
    except (ConfigError, encoders.EncoderError, instrument_spec.InstrumentError, midi_sources.SegmentError,
            sink.SinkError, FileNotFoundError) as e:
        print(f"tokensynth prep: error: {e}", file=sys.stderr)
        return 2
    manifest = result.manifest
    print(json.dumps({"output": cfg.output_dir, "records": manifest["records"], "rejected": manifest["rejected"],
                      "shards": len(manifest["shards"]), "beam_counters": result.counters}, indent=1))
    return 0


def _cmd_prep_verify(args) -> int:
    from . import sink, verify

    try:
        problems, summary = verify.verify_output(args.out)
    except sink.SinkError as e:
        print(f"tokensynth prep verify: error: {e}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"tokensynth prep verify: {args.out}/{problem}", file=sys.stderr)
    state = f"{len(problems)} problems" if problems else "ok"
    print(f"{args.out}: {summary['shards']} shards, {summary['records']} records read: {state}")
    return 2 if problems else 0


def add_prep_verify_parser(sub) -> argparse.ArgumentParser:
    """Adds `prep-verify` (`tokensynth prep verify OUT`) to a subparsers object."""
    p = sub.add_parser("prep-verify", help="check a prep output against its manifest (`prep verify OUT`)",
                       description="Sizes, sha256, record counts and decoding of every shard the manifest lists.")
    p.add_argument("out", help="the prep output directory (holds manifest.json)")
    p.set_defaults(run=_cmd_prep_verify)
    return p


def add_prep_parser(sub) -> argparse.ArgumentParser:
    """Adds `prep` to a subparsers object (tokensynth's `build_parser`).

    Args:
      sub: the object `ArgumentParser.add_subparsers()` returned.

    Returns:
      The `prep` parser (its default `run` is the command).
    """
    p = sub.add_parser("prep", help="render, augment and tokenize training pairs into ArrayRecord shards (Beam)",
                       description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (local or gs://...)")
    g = p.add_argument_group("MIDI")
    g.add_argument("--midi-dir", help="a Lakh-style tree of .mid/.midi files (default: procedural phrases)")
    g.add_argument("--procedural-candidates", type=int, default=64, help="phrases generated without --midi-dir")
    g.add_argument("--num-segments", type=int, default=32, help="segment pool size (the paper: 10000)")
    g.add_argument("--max-notes", type=int, default=128, help="notes per 5 s segment at most")
    g.add_argument("--min-tempo", type=float, default=20.0, help="bpm; files outside are rejected")
    g.add_argument("--max-tempo", type=float, default=400.0)
    g = p.add_argument_group("instruments")
    g.add_argument("--instruments", choices=["soundfont", "nsynth"], default="soundfont")
    g.add_argument("--soundfont", action="append", default=[], metavar="SF2",
                   help="repeatable; default: the General MIDI SoundFont inside pretty_midi")
    g.add_argument("--programs", help="comma-separated GM programs to use (default: every melodic preset)")
    g.add_argument("--nsynth-dir", help="root of the NSynth release (nsynth-train/, nsynth-valid/, nsynth-test/)")
    g.add_argument("--nsynth-splits", default=",".join(SPLITS))
    g.add_argument("--nsynth-tfds", metavar="DATA_DIR", help="first export TFDS's prepared `nsynth` (from DATA_DIR, "
                   "or 'default') to the raw layout in --nsynth-dir; needs tensorflow-datasets")
    g.add_argument("--valid-fraction", type=float, default=0.05, help="SoundFont presets held out as valid")
    g.add_argument("--test-fraction", type=float, default=0.05, help="SoundFont presets held out as test")
    g.add_argument("--table-pitches", default="21:108:1", help="SoundFont note table LO:HI:STEP")
    g.add_argument("--table-velocities", default="25,50,100,127")
    g.add_argument("--max-pitch-shift", type=int, default=6, help="semitones to fill a missing pitch")
    g = p.add_argument_group("pairs")
    g.add_argument("--pairs-per-instrument", type=int, default=16, help="(the paper: 10000)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dry-fraction", type=float, default=0.2, help="share of pairs without effects")
    g.add_argument("--max-effects", type=int, default=3)
    g.add_argument("--effects", default=",".join(AUG_EFFECTS))
    g = p.add_argument_group("encoders")
    g.add_argument("--codec", default="facebook/encodec_32khz",
                   help="HF id or path, or a preset: tiny-encodec, tiny-dac, random-encodec_32khz, random-dac_44khz")
    g.add_argument("--clap", default="laion/larger_clap_music",
                   help="HF id or path, or a preset: tiny-clap, random-larger_clap_music")
    g.add_argument("--clap-input", choices=CLAP_INPUTS, default="codec-rate")
    g.add_argument("--encode-batch-size", type=int, default=1, help="1 is fastest on CPU; ~32 on a GPU")
    g.add_argument("--device", default="cpu", help="torch device for CLAP and the codec")
    g.add_argument("--offline", action="store_true", help="never ask the hub; pretrained models must be cached")
    g = p.add_argument_group("sink and execution")
    g.add_argument("--records-per-shard", type=int, default=20000)
    g.add_argument("--chunk-size", type=int, default=500, help="pairs per work item")
    g.add_argument("--torch-threads", type=int, default=0)
    g.add_argument("--note-table-cache", type=int, default=2)
    g.add_argument("--workers", type=int, default=1, help="DirectRunner processes (when no --runner follows --)")
    p.add_argument("beam_args", nargs=argparse.REMAINDER, help="-- then Beam pipeline options")
    p.set_defaults(run=_cmd_prep)
    return p


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tokensynth")
    add_prep_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["prep", *(sys.argv[1:] if argv is None else argv)])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
