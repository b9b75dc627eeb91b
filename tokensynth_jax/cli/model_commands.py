"""Commands that make or change a model's files: init, convert, convert-clap, inference-checkpoint, export.

Each checks its flags and paths, then claims its output (atomic.py: a temporary sibling renamed
into place at the end, `--overwrite` to replace a previous result), then loads and writes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from tokensynth_jax.checkpoint_meta import META_FILE
from tokensynth_jax.cli import checks
from tokensynth_jax.cli.atomic import Outputs
from tokensynth_jax.cli.checks import UsageError
from tokensynth_jax.config import ConfigError

# What marks a folder as a previous result that --overwrite may replace (each writer's own file
# name: safetensors_format.CONFIG_FILE and transformers' save_pretrained, export.META_FILE).
SAFETENSORS_MARKER = "config.json"
CLAP_MARKER = "config.json"
EXPORT_MARKER = "export.json"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for
DEFAULT_PLATFORMS = "cpu,cuda,tpu"


def _overwrite_flag(p) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace a previous result at the output path")


# --- init ----------------------------------------------------------------------------------------------
def add_init_parser(sub) -> None:
    p = checks.subcommand(sub, "init", _init, takes_config=True,
                          help="a randomly initialised checkpoint of a config (benchmarks, smoke tests)")
    p.add_argument("--config", required=True, help="a packaged config (tiny, reference, ...) or configs/X.py[:arg]; "
                   "override fields with --config.a.b=value")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. model.num_layers=2")
    p.add_argument("--seed", type=checks.seed, default=0)
    _overwrite_flag(p)
    p.add_argument("out_dir", metavar="OUT")


def _init(args) -> int:
    config = checks.load_config(args)
    outputs = Outputs(args.overwrite)
    temp = outputs.dir(args.out_dir, "OUT", marker=META_FILE)

    from flax import nnx

    from tokensynth_jax import checkpoint, sharding
    from tokensynth_jax.config import ModelConfig
    from tokensynth_jax.model import transformer
    from tokensynth_jax.training import plan

    cfg = ModelConfig.from_dict(config.model.to_dict())
    plan.check_fits_memory(cfg, 1, "to initialise")
    model = transformer.create_sharded(cfg, sharding.make_mesh({"data": -1}), seed=args.seed)
    meta = {"weights": "random-init", "seed": args.seed, "config_file": args.config, "codec": config.codec.to_dict()}
    with outputs:
        checkpoint.save_model(temp, cfg, nnx.state(model, nnx.Param), meta)
    print(f"wrote randomly initialised {args.config} ({cfg.num_layers}x{cfg.d_model}) to {args.out_dir}")
    return 0


# --- convert -------------------------------------------------------------------------------------------
def add_convert_parser(sub) -> None:
    p = checks.subcommand(sub, "convert", _convert, help="official PyTorch state dict or safetensors <-> our checkpoint")
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="from_format", choices=["official", "safetensors"],
                           help="IN.pt OUT_DIR, or SAFETENSORS_DIR OUT_DIR")
    direction.add_argument("--to", dest="to_format", choices=["official", "safetensors"],
                           help="CKPT_DIR OUT.pt, or CKPT_DIR SAFETENSORS_DIR")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--num-heads", type=checks.positive_int,
                   help="attention heads (not stored in the official file; default 16)")
    p.add_argument("--attention", choices=["causal", "tokensynth-0.0.4"], default=None,
                   help="override the attention pattern (default causal; see interop/convert.py)")
    p.add_argument("--force", action="store_true",
                   help="--to official: write a model of another shape than the official package hard-codes")
    _overwrite_flag(p)


def _convert(args) -> int:
    official = "official" in (args.from_format, args.to_format)
    if not official and (args.num_heads is not None or args.attention is not None):
        raise UsageError("--num-heads and --attention are for official .pt files; safetensors checkpoints carry their config")
    if args.to_format == "official" and (args.num_heads is not None or args.attention is not None):
        raise UsageError("--num-heads and --attention are for --from official; a checkpoint carries its config")
    if args.force and args.to_format != "official":
        raise UsageError("--force goes with --to official")
    outputs = Outputs(args.overwrite)
    if args.from_format == "official":
        checks.input_file(args.src, "IN.pt")
        temp = outputs.dir(args.dst, "OUT_DIR", marker=META_FILE)
    elif args.from_format == "safetensors":
        checks.input_dir(args.src, "SAFETENSORS_DIR")
        temp = outputs.dir(args.dst, "OUT_DIR", marker=META_FILE)
    else:
        _, cfg = checks.model_checkpoint(args.src, "CKPT_DIR")
        if args.to_format == "official":
            temp = outputs.file(args.dst, "OUT.pt")
            _check_official_shape(args, cfg)
        else:
            temp = outputs.dir(args.dst, "SAFETENSORS_DIR", marker=SAFETENSORS_MARKER)

    from tokensynth_jax import checkpoint
    from tokensynth_jax.inference.inference_checkpoint import copy_fitted_codec
    from tokensynth_jax.interop import convert, safetensors_format

    if args.from_format == "safetensors":
        cfg, params, metadata = safetensors_format.load(args.src)
        with outputs:
            checkpoint.save_model(temp, cfg, params, metadata)
            copy_fitted_codec(metadata, args.src, temp)
    elif args.to_format == "safetensors":
        model, meta = checkpoint.load_model(args.src)
        with outputs:
            safetensors_format.save(temp, model.cfg, checkpoint.params_to_numpy(model), meta["metadata"])
            copy_fitted_codec(meta["metadata"], args.src, temp)
    elif args.from_format == "official":
        state = convert.load_official_file(args.src)
        try:
            cfg, params, report = convert.from_official(
                state, num_heads=args.num_heads or convert.OFFICIAL_NUM_HEADS, attention=args.attention)
        except convert.ConversionError as e:  # what is wrong with the file's tensors: name the file
            raise UsageError(f"IN.pt {args.src}: {e}") from e
        except ConfigError as e:  # the model the flags ask for cannot be built (heads that do not divide the width)
            raise UsageError(f"--num-heads {args.num_heads}: {e}" if args.num_heads else f"IN.pt {args.src}: {e}") from e
        metadata = {"weights": "converted", "source": os.path.abspath(args.src), "conversion": report,
                    "codec": {"name": "descript/dac_44khz"}}
        with outputs:
            checkpoint.save_model(temp, cfg, params, metadata)
        print(json.dumps({"wrote": args.dst, "config": cfg.to_dict(), **report}, indent=2))
        return 0
    else:
        model, _ = checkpoint.load_model(args.src)
        state = convert.to_official(model.cfg, checkpoint.params_to_numpy(model))
        with outputs:
            convert.save_official_file(temp, state)
        print(f"wrote {len(state)} tensors to {args.dst} (attention mask buffers: {model.cfg.attention})")
        return 0
    print(f"wrote {args.dst} ({args.from_format or 'ours'} -> {args.to_format or 'ours'})")
    return 0


def _check_official_shape(args, cfg) -> None:
    """The official package hard-codes the reference sizes: another shape needs --force, and a warning."""
    from tokensynth_jax.interop import convert

    if cfg.null_timbre:
        raise UsageError(f"CKPT_DIR {args.src}: the model has a learned null timbre (trained for CFG); "
                         "the official format has none")
    problems = convert.official_shape_problems(cfg)
    if not problems:
        return
    what = (f"the official package (tokensynth 0.0.4) hard-codes the reference model and will reject this file "
            f"or misread it: {'; '.join(problems)}")
    if not args.force:
        raise UsageError(f"CKPT_DIR {args.src}: {what}; pass --force to write it anyway")
    print(f"tokensynth convert: warning: {what}", file=sys.stderr)


# --- convert-clap --------------------------------------------------------------------------------------
def add_convert_clap_parser(sub) -> None:
    p = checks.subcommand(sub, "convert-clap", _convert_clap,
                          help="LAION's original CLAP .pt (HTSAT, unfused) -> a --clap directory")
    p.add_argument("original", metavar="ORIGINAL", help="e.g. music_audioset_epoch_15_esc_90.14.pt")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--tokenizer", help="RoBERTa tokenizer directory to include (for text timbres)")
    p.add_argument("--text-heads", type=checks.positive_int, default=12, help="RoBERTa attention heads (default 12)")
    _overwrite_flag(p)


def _convert_clap(args) -> int:
    checks.input_file(args.original, "ORIGINAL")
    if args.tokenizer is not None:
        checks.input_dir(args.tokenizer, "--tokenizer")
    outputs = Outputs(args.overwrite)
    temp = outputs.dir(args.out_dir, "OUT_DIR", marker=CLAP_MARKER)

    from tokensynth_jax.interop import clap_convert

    tokenizer = clap_convert.load_tokenizer(args.tokenizer) if args.tokenizer is not None else None
    state = clap_convert.load_original_file(args.original)
    width = clap_convert.text_width(state)
    if width % args.text_heads:
        raise UsageError(f"--text-heads {args.text_heads}: does not divide the text encoder's width {width} "
                         f"(roberta-base: {clap_convert.ROBERTA_BASE_HEADS} heads)")
    with outputs:
        summary = clap_convert.convert_state(state, temp, tokenizer=tokenizer, text_heads=args.text_heads)
    summary.update(wrote=args.out_dir, source=os.path.abspath(args.original), tokenizer=args.tokenizer)
    print(json.dumps(summary, indent=2))
    return 0


# --- inference-checkpoint ------------------------------------------------------------------------------
def add_inference_checkpoint_parser(sub) -> None:
    p = checks.subcommand(sub, "inference-checkpoint", _inference_checkpoint, takes_config=True,
                          help="params-only model checkpoint from a training workdir (drops optimizer state)")
    p.add_argument("--config", help="the run's config (default: the model and codec `tokensynth train` recorded "
                   "in WORKDIR/run.json, which a config given here must agree with)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--step", type=checks.non_negative_int, help="saved step to export (default: the newest)")
    _overwrite_flag(p)
    p.add_argument("workdir", metavar="WORKDIR", help="the --workdir of tokensynth train")
    p.add_argument("out_dir", metavar="OUT")


def _inference_checkpoint(args) -> int:
    checks.input_dir(args.workdir, "WORKDIR")
    config = _run_config(args)
    saved = os.path.join(args.workdir, "checkpoints")
    if not os.path.isdir(saved):
        raise UsageError(f"WORKDIR {args.workdir}: not a training workdir (no checkpoints/)")
    from tokensynth_jax import checkpoint

    steps = sorted(checkpoint.train_steps(saved))
    if not steps:
        raise UsageError(f"WORKDIR {args.workdir}: no train checkpoint saved yet")
    if args.step is not None and args.step not in steps:
        raise UsageError(f"--step {args.step}: no train checkpoint at step {args.step} (have {steps})")
    outputs = Outputs(args.overwrite)
    temp = outputs.dir(args.out_dir, "OUT", marker=META_FILE)

    from tokensynth_jax.inference.inference_checkpoint import write_inference_checkpoint

    with outputs:
        step = write_inference_checkpoint(config, args.workdir, temp, args.step)
    print(f"wrote the parameters of {args.workdir} step {step} (no optimizer state) to {args.out_dir}")
    return 0


def _run_config(args):
    """The config of the run in WORKDIR: --config (with its overrides), checked against the model that
    `tokensynth train` recorded in WORKDIR/run.json; or, without --config, that record itself."""
    import ml_collections

    run = checks.run_record(args.workdir)
    if args.config is None:
        if args.set or args.config_overrides:
            raise UsageError("--set and --config.KEY=VALUE change a --config; give the run's --config with them")
        if run is None:
            raise UsageError(f"WORKDIR {args.workdir}: no run.json (a run of an older tokensynth train); "
                             "pass --config, the run's config")
        return ml_collections.ConfigDict({"model": run["model"], "codec": run.get("codec") or {}})
    config = checks.load_config(args)
    differ = checks.model_differences(config.model.to_dict(), run["model"]) if run else []
    if differ:
        raise UsageError(f"--config {args.config}: {'; '.join(differ)} ({os.path.join(args.workdir, 'run.json')}; "
                         "leave --config out to use it)")
    return config


# --- export --------------------------------------------------------------------------------------------
def add_export_parser(sub) -> None:
    p = checks.subcommand(sub, "export", _export,
                          help="jax.export of the generation function (cpu, cuda, tpu) + params + loader")
    p.add_argument("--checkpoint", required=True, help="a tokensynth-jax model checkpoint (timbre-conditioned)")
    p.add_argument("out_dir", metavar="OUT")
    checks.add_sampler_flags(p)
    p.add_argument("--max-rows", type=checks.positive_int, default=450,
                   help="audio rows at most (450: a 5 s window, as the reference)")
    p.add_argument("--platforms", default=DEFAULT_PLATFORMS, help=f"comma-separated lowering platforms of {PLATFORMS}")
    p.add_argument("--example-midi", nargs="+", default=[], metavar="FILE",
                   help="tokenize these MIDI files into OUT/example_prompt.npz for the loader")
    p.add_argument("--example-timbre", metavar="E.npy", help="CLAP embedding [T] or [N, T] stored in the example prompt")
    p.add_argument("--midi-compat", choices=["tokensynth-0.0.4"], help="tokenize the example MIDI as the reference")
    _overwrite_flag(p)


def _export(args) -> int:
    checks.check_sampler_flags(args)
    platforms = [p for p in args.platforms.split(",") if p]
    unknown = sorted(set(platforms) - set(PLATFORMS))
    if unknown or not platforms:
        raise UsageError(f"--platforms {args.platforms}: unknown platforms {unknown}; jax lowers for {', '.join(PLATFORMS)}")
    if args.example_timbre and not args.example_midi:
        raise UsageError("--example-timbre goes with --example-midi FILE...")
    for path in args.example_midi:
        checks.input_file(path, "--example-midi")
    if args.example_timbre:
        checks.input_file(args.example_timbre, "--example-timbre")
    outputs = Outputs(args.overwrite)
    temp = outputs.dir(args.out_dir, "OUT", marker=EXPORT_MARKER)
    meta, cfg = checks.model_checkpoint(args.checkpoint, "--checkpoint")
    if cfg.conditioning != "timbre":
        raise UsageError(f"--checkpoint {args.checkpoint}: only timbre-conditioned models are exported "
                         "(this one is unconditional)")
    checks.check_top_k(args, cfg)
    if args.max_rows < cfg.num_codebooks:
        raise UsageError(f"--max-rows {args.max_rows} is fewer than the {cfg.num_codebooks} rows one frame needs")
    if args.max_rows > cfg.max_len - 3:
        raise UsageError(f"--max-rows {args.max_rows} is more than the {cfg.max_len - 3} audio rows the model's "
                         f"{cfg.max_len} positions hold after the start, one MIDI token and the separator")

    from tokensynth_jax.inference import timbre  # light: read the examples before JAX is imported
    from tokensynth_jax.tokens import midi_tokens

    tokens = [midi_tokens.tokenize_midi(p, compat=args.midi_compat, max_notes=cfg.max_notes).tokens
              for p in args.example_midi]
    example_timbre = (timbre.load_embedding(args.example_timbre, len(args.example_midi), cfg.timbre_dim)
                      if args.example_timbre else None)

    from tokensynth_jax import checkpoint
    from tokensynth_jax.inference import export
    from tokensynth_jax.inference.inference_checkpoint import copy_fitted_codec

    example = None
    if tokens:  # padded as in-process generation pads them (export.pad_tokens)
        midi, lengths = export.pad_tokens(tokens)
        example = {"midi": midi, "lengths": lengths}
        if example_timbre is not None:
            example["timbre"] = example_timbre
    sampler = checks.make_sampler(args)
    model, _ = checkpoint.load_model(args.checkpoint)
    with outputs:
        info = export.export_model(model, temp, metadata=meta["metadata"], source=os.path.abspath(args.checkpoint),
                                   sampler=sampler, max_rows=args.max_rows, platforms=platforms,
                                   example_prompt=example,
                                   example_source={"midi_files": [os.path.abspath(p) for p in args.example_midi],
                                                   "tokenizer": args.midi_compat or "tokensynth-jax",
                                                   "timbre": os.path.abspath(args.example_timbre)
                                                   if args.example_timbre else None})
        copy_fitted_codec(meta["metadata"], args.checkpoint, temp)  # export.json names it relative to OUT
    print(f"exported {args.checkpoint} for {', '.join(info['platforms'])} (jax {info['jax_version']}, "
          f"sampler {info['sampler']['kind']}, max_rows {info['max_rows']}) to {args.out_dir}")
    prompt = f" --prompt {os.path.join(args.out_dir, export.EXAMPLE_PROMPT_FILE)}" if example else " --prompt P.npz"
    print(f"run it without this package: python {os.path.join(args.out_dir, export.LOADER_FILE)} {args.out_dir}{prompt}"
          + ("" if example and "timbre" in example else " --timbre E.npy"))
    return 0


def _checkpoint_verify(args) -> int:
    from tokensynth_jax import checkpoint

    results = checkpoint.verify(args.dir, checksums=not args.sizes_only)
    for what, problems in results:
        print(f"{args.dir} {what}: " + ("ok" if not problems else "DAMAGED: " + "; ".join(problems)))
    damaged = [what for what, problems in results if problems]
    if damaged:
        raise UsageError(f"{args.dir}: {', '.join(damaged)} damaged")
    return 0


def add_checkpoint_parser(sub) -> None:
    p = checks.subcommand(sub, "checkpoint", _checkpoint_verify, help="check checkpoints offline",
                          prog="tokensynth checkpoint verify",
                          usage="tokensynth checkpoint verify [-h] [--sizes-only] dir")
    p.add_argument("action", choices=["verify"], help=argparse.SUPPRESS)
    p.add_argument("dir", help="a training workdir (its checkpoints/), a checkpoints/ folder or a model checkpoint")
    p.add_argument("--sizes-only", action="store_true", help="check file sizes, not sha256 (no reading)")
