"""`tokensynth prep`: the command line of the data-preparation job (`tokensynth_prep.pipeline.run`).

The one place in tokensynth_jax that imports `tokensynth_prep` (the installed name of the
repository's data_prep/): the job depends on this package, never the reverse. The defaults make
a laptop-sized data set (every preset of the packaged General MIDI SoundFont x 16 procedural
phrases); the paper's sizes are in the help and in `launch/dataflow_prep.sh`. Beam pipeline
options (runner, project, workers, ...) go after `--`. The job resumes into --out, so its output
is not atomic: finished shards are kept and a rerun does the rest.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys

from tokensynth_jax.cli import checks
from tokensynth_jax.cli.checks import UsageError
from tokensynth_jax.errors import UserError
from tokensynth_prep import held_out  # noqa: F401  (the demo's held-out clips, through this gate)
from tokensynth_prep.config import AUG_EFFECTS, CLAP_INPUTS, SPLITS  # light: no Beam, no encoders


def _ints(text: str) -> tuple[int, ...]:
    """"0,40" or "36:96:4" -> integers."""
    try:
        values = tuple(int(t) for t in text.replace(":", ",").split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers like 0,40 or LO:HI:STEP") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} lists nothing")
    return values


def _pitch_range(text: str) -> tuple[int, int, int]:
    """"36:96:4" -> (36, 96, 4)."""
    values = _ints(text)
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO:HI:STEP, three integers")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


# PrepConfig fields whose flag is not `--` + the field with dashes.
_FLAGS = {"output_dir": "--out", "min_tempo_bpm": "--min-tempo", "max_tempo_bpm": "--max-tempo",
          "soundfonts": "--soundfont"}


def config_from_args(args):
    """The job's PrepConfig of parsed `prep` arguments (it checks every field; its errors name the
    flag here, not the field)."""
    from tokensynth_prep.config import ConfigError

    try:
        return _config(args)
    except ConfigError as e:
        field, sep, rest = str(e).partition(": ")
        if sep and field.isidentifier():
            raise UsageError(f"{_FLAGS.get(field, '--' + field.replace('_', '-'))}: {rest}") from e
        raise


def _config(args):
    from tokensynth_prep.config import PrepConfig

    return PrepConfig(
        output_dir=args.out, midi_dir=args.midi_dir, procedural_candidates=args.procedural_candidates,
        num_segments=args.num_segments, max_notes=args.max_notes, min_tempo_bpm=args.min_tempo,
        max_tempo_bpm=args.max_tempo, instruments=args.instruments, soundfonts=tuple(args.soundfont),
        programs=args.programs, nsynth_dir=args.nsynth_dir, nsynth_splits=args.nsynth_splits,
        valid_fraction=args.valid_fraction, test_fraction=args.test_fraction, table_pitches=args.table_pitches,
        table_velocities=args.table_velocities, max_pitch_shift=args.max_pitch_shift,
        pairs_per_instrument=args.pairs_per_instrument, seed=args.seed, dry_fraction=args.dry_fraction,
        max_effects=args.max_effects, effects=args.effects, codec=args.codec, clap=args.clap,
        clap_input=args.clap_input, encode_batch_size=args.encode_batch_size, device=args.device,
        records_per_shard=args.records_per_shard, chunk_size=args.chunk_size, torch_threads=args.torch_threads,
        note_table_cache=args.note_table_cache, offline=args.offline,
    )


def beam_options(args) -> list[str]:
    """Beam options: what follows `--`, or this machine's runner with `--workers` processes."""
    from tokensynth_prep import pipeline

    return pipeline.with_local_runner([a for a in args.beam_args if a != "--"], args.workers)


def check_beam_options(options: list[str]) -> None:
    """Refuses, before any work, Beam options it would drop or fail on late: a flag Beam does not
    know (it logs "Discarding unparseable args" and runs without it, so a misspelt Dataflow flag
    would run the job here) and a runner it cannot make."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from apache_beam.runners import runner as beam_runner

    dropped = []
    handler = logging.Handler()
    handler.emit = lambda record: dropped.append(record.getMessage())
    beam_log = logging.getLogger("apache_beam.options.pipeline_options")
    beam_log.addHandler(handler)
    beam_log.propagate = False  # said once, below
    try:
        parsed = PipelineOptions(options)
        parsed.get_all_options()
    finally:
        beam_log.removeHandler(handler)
        beam_log.propagate = True
    unknown = [m for m in dropped if m.startswith("Discarding unparseable args")]
    if unknown:
        raise UsageError(f"Beam options (after --): unknown {unknown[0].partition(': ')[2]}")
    name = parsed.view_as(StandardOptions).runner
    try:
        beam_runner.create_runner(name)
    except (ValueError, ImportError) as e:
        raise UsageError(f"Beam options (after --): --runner={name}: {str(e).splitlines()[0]:.300}") from e


def _check_paths(args) -> None:
    checks.output_dir(args.out, "--out")
    if args.midi_dir is not None and checks.is_local(args.midi_dir):
        checks.input_dir(args.midi_dir, "--midi-dir")
    for path in args.soundfont:
        if checks.is_local(path):
            checks.input_file(path, "--soundfont")
            with open(path, "rb") as f:  # FluidSynth prints C-library noise about anything else, then fails
                head = f.read(12)
            if head[:4] != b"RIFF" or head[8:12] != b"sfbk":
                raise UsageError(f"--soundfont {path}: not a SoundFont (an .sf2 or .sf3 file starts RIFF....sfbk)")
    if args.nsynth_dir is not None and checks.is_local(args.nsynth_dir) and not args.nsynth_tfds:
        checks.input_dir(args.nsynth_dir, "--nsynth-dir")  # with --nsynth-tfds it is written first
    if args.nsynth_dir is not None and args.instruments != "nsynth":
        raise UsageError(f"--nsynth-dir {args.nsynth_dir}: goes with --instruments nsynth "
                         f"(--instruments {args.instruments} renders SoundFont presets)")
    if args.nsynth_tfds and (not args.nsynth_dir or args.instruments != "nsynth"):
        raise UsageError("--nsynth-tfds needs --instruments nsynth --nsynth-dir DIR (where it exports to)")
    from tokensynth_jax.audio import encoders

    try:
        encoders.check_device(args.device)
    except encoders.EncoderError as e:
        raise UsageError(f"--device: {e}") from e


@contextlib.contextmanager
def _log_level(logger: str | None, level: int):
    """The named logger (None: the root) at `level` for the duration."""
    log = logging.getLogger(logger)
    before = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(before)


def _prep(args) -> int:
    _check_paths(args)
    cfg = config_from_args(args)
    # Importing Beam warns through the root logger that BigQuery's client library is missing,
    # which this job never uses.
    with _log_level(None, logging.ERROR):
        from tokensynth_prep import pipeline
    check_beam_options(beam_options(args))

    if args.nsynth_tfds:
        from tokensynth_prep import nsynth

        nsynth.export_tfds(None if args.nsynth_tfds == "default" else args.nsynth_tfds, cfg.nsynth_dir, cfg.nsynth_splits)
    # A new local --out that the job fails in is removed again; one that existed is a resume, kept.
    fresh = checks.is_local(args.out) and not os.path.exists(args.out)
    # A user error inside a step (every MIDI file rejected, say) reaches us and is printed in one
    # line; Beam would log it with its traceback first. A bug still ends in a traceback: ours.
    try:
        with _log_level("apache_beam.runners.common", logging.CRITICAL):
            result = pipeline.run(cfg, beam_options(args))
    except UserError:
        if fresh:
            shutil.rmtree(args.out, ignore_errors=True)
        raise
    manifest = result.manifest
    print(json.dumps({"output": cfg.output_dir, "records": manifest["records"], "rejected": manifest["rejected"],
                      "shards": len(manifest["shards"]), "beam_counters": result.counters}, indent=1))
    return 0


def add_prep_parser(sub) -> argparse.ArgumentParser:
    """Adds `prep` to a subparsers object (tokensynth's `build_parser`); returns its parser."""
    p = checks.subcommand(sub, "prep", _prep,
                          help="render, augment and tokenize training pairs into ArrayRecord shards (Beam)",
                          description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (local or gs://...); a rerun resumes into it")
    g = p.add_argument_group("MIDI")
    g.add_argument("--midi-dir", help="a Lakh-style tree of .mid/.midi files (default: procedural phrases)")
    g.add_argument("--procedural-candidates", type=checks.positive_int, default=64,
                   help="phrases generated without --midi-dir")
    g.add_argument("--num-segments", type=checks.positive_int, default=32, help="segment pool size (the paper: 10000)")
    g.add_argument("--max-notes", type=checks.positive_int, default=128, help="notes per 5 s segment at most")
    g.add_argument("--min-tempo", type=checks.positive_float, default=20.0, help="bpm; files outside are rejected")
    g.add_argument("--max-tempo", type=checks.positive_float, default=400.0)
    g = p.add_argument_group("instruments")
    g.add_argument("--instruments", choices=["soundfont", "nsynth"], default="soundfont")
    g.add_argument("--soundfont", action="append", default=[], metavar="SF2",
                   help="repeatable; default: the General MIDI SoundFont inside pretty_midi")
    g.add_argument("--programs", type=checks.gm_programs, help="comma-separated GM programs to use (default: every melodic preset)")
    g.add_argument("--nsynth-dir", help="root of the NSynth release (nsynth-train/, nsynth-valid/, nsynth-test/)")
    g.add_argument("--nsynth-splits", type=_names, default=SPLITS, help=f"comma-separated, of {','.join(SPLITS)}")
    g.add_argument("--nsynth-tfds", metavar="DATA_DIR", help="first export TFDS's prepared `nsynth` (from DATA_DIR, "
                   "or 'default') to the raw layout in --nsynth-dir; needs tensorflow-datasets")
    g.add_argument("--valid-fraction", type=float, default=0.05, help="SoundFont presets held out as valid")
    g.add_argument("--test-fraction", type=float, default=0.05, help="SoundFont presets held out as test")
    g.add_argument("--table-pitches", type=_pitch_range, default=(21, 108, 1), help="SoundFont note table LO:HI:STEP")
    g.add_argument("--table-velocities", type=_ints, default=(25, 50, 100, 127))
    g.add_argument("--max-pitch-shift", type=checks.non_negative_int, default=6, help="semitones to fill a missing pitch")
    g = p.add_argument_group("pairs")
    g.add_argument("--pairs-per-instrument", type=checks.positive_int, default=16, help="(the paper: 10000)")
    g.add_argument("--seed", type=checks.seed, default=0)
    g.add_argument("--dry-fraction", type=float, default=0.2, help="share of pairs without effects")
    g.add_argument("--max-effects", type=checks.positive_int, default=3)
    g.add_argument("--effects", type=_names, default=AUG_EFFECTS, help=f"comma-separated, of {','.join(AUG_EFFECTS)}")
    g = p.add_argument_group("encoders")
    g.add_argument("--codec", default="facebook/encodec_32khz",
                   help="HF id or path, or a preset: tiny-encodec, tiny-dac, random-encodec_32khz, random-dac_44khz; "
                        "or demo-melrvq, an offline codec fitted on this job's renders (saved as OUT/codec/)")
    g.add_argument("--clap", default="laion/larger_clap_music",
                   help="HF id or path, or a preset: tiny-clap, random-larger_clap_music; or demo-spectral, "
                        "an offline timbre embedding of spectral statistics (audio only, no text)")
    g.add_argument("--clap-input", choices=CLAP_INPUTS, default="codec-rate")
    g.add_argument("--encode-batch-size", type=checks.positive_int, default=1, help="1 is fastest on CPU; ~32 on a GPU")
    g.add_argument("--device", default="cpu", help="torch device for CLAP and the codec")
    g.add_argument("--offline", action="store_true", help="never ask the hub; pretrained models must be cached")
    g = p.add_argument_group("sink and execution")
    g.add_argument("--records-per-shard", type=checks.positive_int, default=20000)
    g.add_argument("--chunk-size", type=checks.positive_int, default=500, help="pairs per work item")
    g.add_argument("--torch-threads", type=checks.non_negative_int, default=0)
    g.add_argument("--note-table-cache", type=checks.positive_int, default=2)
    g.add_argument("--workers", type=checks.positive_int, default=1,
                   help="local processes (Beam's FnApiRunner; when no --runner follows --)")
    p.add_argument("beam_args", nargs=argparse.REMAINDER, help="-- then Beam pipeline options")
    return p


def _prep_verify(args) -> int:
    from tokensynth_prep import verify

    checks.input_dir(args.out, "OUT")
    problems, summary = verify.verify_output(args.out)
    for problem in problems:
        print(f"tokensynth prep verify: {args.out}/{problem}", file=sys.stderr)
    if problems:
        raise UsageError(f"{args.out}: {len(problems)} problems in {summary['shards']} shards")
    print(f"{args.out}: {summary['shards']} shards, {summary['records']} records read: ok")
    return 0


def add_prep_verify_parser(sub) -> argparse.ArgumentParser:
    """`tokensynth prep verify OUT` (registered as prep-verify: `prep` takes Beam's options after it)."""
    p = checks.subcommand(sub, "prep-verify", _prep_verify, help="check a prep output against its manifest "
                          "(`prep verify OUT`)",
                          description="Sizes, sha256, record counts and decoding of every shard the manifest lists.",
                          prog="tokensynth prep verify")
    p.add_argument("out", help="the prep output directory (holds manifest.json)")
    return p
