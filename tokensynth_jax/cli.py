"""`tokensynth`: the command line, a thin face over the package's jobs.

Subcommands: prep (the Beam data job), train, init (a randomly initialised checkpoint of a
config), convert (official PyTorch <-> ours), synthesize (MIDI + timbre -> codec tokens), demo
(the embedded default end to end).
Errors of the user's input exit with status 2 and one line naming the file and the problem.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
EXAMPLE_MIDI = os.path.join(ASSETS, "example.mid")
TINY_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny.py")


def _cmd_init(args) -> int:
    from flax import nnx

    from tokensynth_jax import checkpoint, sharding
    from tokensynth_jax.config import ModelConfig, load_config_file

    overrides = dict(kv.split("=", 1) for kv in args.set)
    overrides.update(getattr(args, "config_overrides", {}))
    config = load_config_file(args.config, overrides)
    cfg = ModelConfig.from_dict(config.model.to_dict())
    model = sharding.create_sharded(cfg, sharding.make_mesh({"data": -1}), seed=args.seed)
    meta = {"weights": "random-init", "seed": args.seed, "config_file": args.config,
            "codec": config.codec.to_dict()}
    checkpoint.save_model(args.out_dir, cfg, nnx.state(model, nnx.Param), meta)
    print(f"wrote randomly initialised {args.config} ({cfg.num_layers}x{cfg.d_model}) to {args.out_dir}")
    return 0


def _cmd_train(args) -> int:
    import logging

    from tokensynth_jax import train
    from tokensynth_jax.config import load_config_file

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    overrides = dict(kv.split("=", 1) for kv in args.set)
    overrides.update(args.config_overrides)
    config = load_config_file(args.config, overrides)
    train.train(config, args.workdir, init_from=args.init_from)
    return 0


def _cmd_convert(args) -> int:
    from tokensynth_jax import checkpoint, convert

    if args.from_format == "official":
        state = convert.load_official_file(args.src)
        cfg, params, report = convert.from_official(state, num_heads=args.num_heads, attention=args.attention)
        checkpoint.save_model(args.dst, cfg, params, {"weights": "converted", "source": os.path.abspath(args.src),
                                                      "conversion": report, "codec": {"name": "descript/dac_44khz"}})
        print(json.dumps({"wrote": args.dst, "config": cfg.to_dict(), **report}, indent=2))
    else:
        import torch

        model, _ = checkpoint.load_model(args.src)
        state = convert.to_official(model.cfg, checkpoint.params_to_numpy(model))
        torch.save(state, args.dst)
        print(f"wrote {len(state)} tensors to {args.dst} (attention mask buffers: {model.cfg.attention})")
    return 0


def _cmd_synthesize(args) -> int:
    from tokensynth_jax import checkpoint, synthesize
    from tokensynth_jax.config import ModelConfig

    for flag, value in (("--timbre-audio", args.timbre_audio), ("--text", args.text)):
        if value is not None:
            raise synthesize.SynthesisError(
                f"{flag} needs the CLAP front end, which this version does not have yet; "
                "pass a CLAP embedding with --timbre-embedding E.npy"
            )
    if args.mix is not None:
        raise synthesize.SynthesisError("--mix blends --timbre-audio and --text, which need the CLAP front end")
    if args.out is not None:
        raise synthesize.SynthesisError(
            "--out OUT.wav needs codec decoding, which this version does not have yet; use --tokens-out OUT.npy"
        )
    if args.timbre_embedding is None:
        raise synthesize.SynthesisError("give the timbre: --timbre-embedding E.npy")
    if args.tokens_out is None:
        raise synthesize.SynthesisError("give an output: --tokens-out OUT.npy")
    cfg = ModelConfig.from_dict(checkpoint.read_metadata(args.checkpoint)["model"])
    timbre = synthesize.load_timbre_embedding(args.timbre_embedding, len(args.midi), cfg.timbre_dim)
    sampler = synthesize.make_sampler(args.sampler, args.top_k, args.top_p, args.temperature)
    result = synthesize.synthesize_tokens(
        args.checkpoint, args.midi, timbre, sampler=sampler, seed=args.seed,
        guidance_scale=args.guidance_scale, unconditional_dir=args.unconditional_checkpoint,
        max_rows=args.max_rows, midi_compat=args.midi_compat,
    )
    gen = result.generation
    np.save(args.tokens_out, gen.codes)
    for path, window, frames, ended in zip(args.midi, result.windows, gen.num_frames, gen.ended):
        note = f", {window.cut_notes} notes cut at the window edges" if window.cut_notes else ""
        print(f"{path}: {window.num_notes} notes{note} -> {frames} frames ({'end row' if ended else 'length cap'})")
    print(f"wrote codes {gen.codes.shape} (items x frames x codebooks, -1 after each item's end) to {args.tokens_out}")
    return 0


def _cmd_demo(args) -> int:
    """Until the data and training jobs land: the synthesis chain on a random tiny model."""
    out = os.path.abspath(args.workdir)
    os.makedirs(out, exist_ok=True)
    model_dir = os.path.join(out, "model-random")
    _cmd_init(argparse.Namespace(config=TINY_CONFIG, set=[], seed=0, out_dir=model_dir))
    emb = np.random.default_rng(0).normal(size=512).astype(np.float32)
    emb_path = os.path.join(out, "timbre.npy")
    np.save(emb_path, emb / np.linalg.norm(emb))
    tokens = os.path.join(out, "tokens.npy")
    parser = build_parser()
    return _cmd_synthesize(parser.parse_args(
        ["synthesize", "--checkpoint", model_dir, "--midi", EXAMPLE_MIDI, "--timbre-embedding", emb_path,
         "--sampler", "top-p", "--top-p", "0.9", "--tokens-out", tokens]
    ))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokensynth", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="a randomly initialised checkpoint of a config (benchmarks, smoke tests)")
    p.add_argument("--config", required=True, help="configs/X.py[:arg]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. model.num_layers=2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("out_dir")
    p.set_defaults(run=_cmd_init)

    p = sub.add_parser("train", help="train a model on `tokensynth prep` shards (resumes from --workdir)")
    p.add_argument("--config", required=True, help="configs/X.py[:arg]; override fields with --config.a.b=value")
    p.add_argument("--workdir", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--init-from", help="a model checkpoint (e.g. a converted official one) to fine-tune")
    p.set_defaults(run=_cmd_train)

    p = sub.add_parser("convert", help="official PyTorch state dict <-> our checkpoint")
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="from_format", choices=["official"], help="IN.pt OUT_DIR")
    direction.add_argument("--to", dest="to_format", choices=["official"], help="CKPT_DIR OUT.pt")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--num-heads", type=int, default=16, help="attention heads (not stored in the official file)")
    p.add_argument("--attention", choices=["causal", "tokensynth-0.0.4"], default=None,
                   help="override the attention pattern (default causal; see convert.py)")
    p.set_defaults(run=_cmd_convert)

    p = sub.add_parser("synthesize", help="MIDI + timbre -> codec tokens")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--midi", nargs="+", required=True, metavar="FILE")
    p.add_argument("--timbre-embedding", metavar="E.npy", help="CLAP embedding [512] or [N, 512]")
    p.add_argument("--timbre-audio", metavar="WAV")
    p.add_argument("--text")
    p.add_argument("--mix", type=float, metavar="A", help="a * audio + (1 - a) * text")
    p.add_argument("--sampler", choices=["greedy", "top-k", "top-p"], default="top-p")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--unconditional-checkpoint", help="unconditional model for first-note guidance")
    p.add_argument("--max-rows", type=int, help="audio rows at most (default 450, as the reference)")
    p.add_argument("--midi-compat", choices=["tokensynth-0.0.4"], help="tokenize MIDI exactly as the reference")
    p.add_argument("--tokens-out", metavar="OUT.npy")
    p.add_argument("--out", metavar="OUT.wav")
    p.set_defaults(run=_cmd_synthesize)

    from data_prep.cli import add_prep_parser  # cheap: Beam is imported only when prep runs

    add_prep_parser(sub)

    p = sub.add_parser("demo", help="the embedded default end to end")
    p.add_argument("--workdir", default="runs/demo")
    p.set_defaults(run=_cmd_demo)
    return parser


def _split_config_overrides(argv):
    """`--config.a.b=value` arguments (the config_flags style) -> ({"a.b": value}, other args)."""
    overrides, rest = {}, []
    for arg in argv:
        if arg.startswith("--config.") and "=" in arg:
            key, value = arg[len("--config."):].split("=", 1)
            overrides[key] = value
        else:
            rest.append(arg)
    return overrides, rest


def main(argv=None) -> int:
    overrides, argv = _split_config_overrides(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(argv)
    args.config_overrides = overrides
    from tokensynth_jax.checkpoint import CheckpointError
    from tokensynth_jax.convert import ConversionError
    from tokensynth_jax.input_pipeline import DataError
    from tokensynth_jax.midi_tokens import MidiTokenizationError
    from tokensynth_jax.synthesize import SynthesisError

    try:
        return args.run(args)
    except (CheckpointError, ConversionError, MidiTokenizationError, SynthesisError, FileNotFoundError, KeyError,
            DataError) as e:
        print(f"tokensynth {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
