"""`tokensynth eval`: the paper's metrics of generated clips (evaluation/evaluate.py), as eval.json and eval.md.

The manifest is read and every file it names is checked before the first item is scored; the
report is written atomically (atomic.py).
"""
from __future__ import annotations

import argparse
import os

from tokensynth_jax.cli import checks
from tokensynth_jax.cli.atomic import Outputs
from tokensynth_jax.evaluation import evaluate, metrics

_HELP = f"""Scores generated clips as the paper does and writes OUT/eval.json and OUT/eval.md.

ITEMS is a JSON-lines manifest, or a folder holding {evaluate.MANIFEST_NAME}; one object a line, paths
relative to the manifest's folder:
  {{"id": "piano-3", "task": "cloning", "generated": "gen/piano-3.wav", "midi": "midi/3.mid",
   "target": "target/piano-3.wav", "reference": "ref/piano.wav", "model": "tokensynth", "instrument": "piano"}}
  {{"id": "pad-3", "task": "text", "generated": "gen/pad-3.wav", "midi": "midi/3.mid", "text": "a warm synth pad"}}
task: "cloning" (needs "reference") or "text" (needs "text"). "target", the ground-truth
rendering of the same MIDI by the same instrument, is optional: without it MSS is left out.
"model" names the table row (default tokensynth); "instrument" is reported per row. The items are
the held-out split: pass the instruments you held out of training.

Metrics: MSS (DDSP's multi-scale spectral loss: FFT 2048..64, hop size/4, L1 of linear plus log
magnitudes) between generated and target, at the generated clip's rate, the shorter clip
zero-padded; CLAP score: cosine of CLAP embeddings, generated vs reference audio (cloning) or vs
text (text-to-instrument); F1: note onsets within --onset-tolerance and pitch within 50 cents,
basic-pitch's transcription of the generated clip against the MIDI's melodic notes (drums left
out; a silent clip scores 0). Stereo files are averaged to mono."""


def add_eval_parser(sub) -> None:
    p = checks.subcommand(sub, "eval", _eval, help="the paper's metrics (MSS, CLAP score, F1) of generated clips",
                          description=_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", metavar="ITEMS", help=f"manifest (JSON lines) or a folder holding {evaluate.MANIFEST_NAME}")
    p.add_argument("--out", help="folder for eval.json and eval.md (default: the manifest's folder)")
    p.add_argument("--clap", default="laion/larger_clap_music",
                   help="CLAP checkpoint or preset (tiny-clap for tests; 'none' leaves CLAP scores out)")
    p.add_argument("--offline", action=argparse.BooleanOptionalAction, default=True,
                   help="load CLAP from the local cache only (default)")
    p.add_argument("--onset-tolerance", type=checks.positive_float, default=metrics.ONSET_TOLERANCE, metavar="S",
                   help="seconds within which onsets match (default 0.05, mir_eval's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing eval.json and eval.md")


def _eval(args) -> int:
    items = evaluate.read_manifest(args.items)
    manifest = os.path.join(args.items, evaluate.MANIFEST_NAME) if os.path.isdir(args.items) else args.items
    for item in items:  # every file, before the first item is scored
        for field, path in evaluate.item_files(item):
            checks.input_file(path, f"{manifest}: item {item.id!r} {field}")
    out_dir = checks.output_dir(args.out or os.path.dirname(os.path.abspath(manifest)), "--out")
    board = os.path.join(out_dir, "tensorboard")  # clips and scores beside the report, once it is written
    checks.output_dir(board, "--out")
    outputs = Outputs(args.overwrite)
    json_temp, md_temp = (outputs.file(os.path.join(out_dir, name), "--out") for name in evaluate.REPORT_FILES)
    if args.clap != "none":
        from tokensynth_jax.audio import encoders

        encoders.check_clap(args.clap, offline=args.offline)
        clap = evaluate.load_clap(args.clap, offline=args.offline)
    else:
        clap = None
    failed = []

    def skip(i, item, error):
        failed.append({"id": item.id, "error": str(error)})
        print(f"[{i + 1}/{len(items)}] {item.id}: skipped: {error}")

    results = evaluate.evaluate_items(items, clap=clap, onset_tolerance=args.onset_tolerance, on_error=skip,
                                      progress=lambda i, r: print(f"[{i + 1}/{len(items)}] {r['id']}: F1 {r['f1']:.3f}"))
    if not results:
        raise checks.UsageError(f"{manifest}: none of its {len(items)} items could be scored (first: {failed[0]['error']})")
    settings = {"clap": args.clap, "onset_tolerance": args.onset_tolerance, "manifest": os.path.abspath(manifest)}
    with outputs:
        evaluate.write_report(results, json_temp, md_temp, settings, failed=failed)
    print(evaluate.markdown_table(evaluate.aggregate(results)), end="")
    if failed:
        print(f"{len(failed)} of {len(items)} items could not be scored; eval.json and eval.md list them")
    print(f"wrote {' and '.join(os.path.join(out_dir, n) for n in evaluate.REPORT_FILES)}")
    scored = {r["id"] for r in results}
    if evaluate.write_tensorboard([x for x in items if x.id in scored], results, board):
        print(f"wrote the clips and scores to {board} (tensorboard --logdir {board})")
    else:
        print("tensorboardX is not installed: no TensorBoard clips (pip install 'tokensynth-jax[eval]')")
    return 0
