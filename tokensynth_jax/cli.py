"""`tokensynth`: the command line, a thin face over the package's jobs.

Subcommands: prep (the Beam data job), train, init (a randomly initialised checkpoint of a
config), convert (official PyTorch <-> ours), synthesize (MIDI + timbre -> codec tokens), demo
(the embedded default end to end).
Errors of the user's input exit with status 2 and one line naming the file and the problem.
Every command keeps compiled XLA executables in a persistent cache (compile_cache.py).
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
    from tokensynth_jax import checkpoint, convert, safetensors_format

    if "safetensors" in (args.from_format, args.to_format):
        if args.num_heads is not None or args.attention is not None:
            raise convert.ConversionError("--num-heads and --attention are for official .pt files; "
                                          "safetensors checkpoints carry their config")
        if args.from_format == "safetensors":
            cfg, params, metadata = safetensors_format.load(args.src)
            checkpoint.save_model(args.dst, cfg, params, metadata)
        else:
            model, meta = checkpoint.load_model(args.src)
            safetensors_format.save(args.dst, model.cfg, checkpoint.params_to_numpy(model), meta["metadata"])
        print(f"wrote {args.dst} ({args.from_format or 'ours'} -> {args.to_format or 'ours'})")
        return 0
    if args.from_format == "official":
        state = convert.load_official_file(args.src)
        cfg, params, report = convert.from_official(
            state, num_heads=args.num_heads or convert.OFFICIAL_NUM_HEADS, attention=args.attention)
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

    if args.out is None and args.tokens_out is None:
        raise synthesize.SynthesisError("give an output: --out OUT.wav (or a folder), and/or --tokens-out OUT.npy")
    if args.spectrogram and args.out is None:
        raise synthesize.SynthesisError("--spectrogram draws the WAV of --out; give --out")
    wavs = _wav_paths(args.out, args.midi) if args.out is not None else []
    meta = checkpoint.read_metadata(args.checkpoint)
    cfg = ModelConfig.from_dict(meta["model"])
    if wavs:  # fail fast, before CLAP and the model load
        synthesize.resolve_codec(args.checkpoint, meta, args.codec, cfg, offline=args.offline)
    sampler = synthesize.make_sampler(args.sampler, args.top_k, args.top_p, args.temperature)
    timbre = synthesize.timbre_from_inputs(
        batch=len(args.midi), timbre_dim=cfg.timbre_dim, embedding=args.timbre_embedding,
        audio=args.timbre_audio, text=args.text, mix=args.mix, clap=args.clap, offline=args.offline,
        trained_clap=(meta.get("metadata") or {}).get("clap_model"),
    )
    result = synthesize.synthesize_audio(
        args.checkpoint, args.midi, timbre, codec=args.codec, sampler=sampler, seed=args.seed,
        guidance_scale=args.guidance_scale, unconditional_dir=args.unconditional_checkpoint,
        max_rows=args.max_rows, midi_compat=args.midi_compat, decode=args.out is not None, offline=args.offline,
        progress=True, dtype=args.dtype,
    )
    for b, path in enumerate(args.midi):
        windows, frames = result.windows[b], [len(c) for c in result.codes[b]]
        cut = sum(w.cut_notes for w in windows)
        note = f", {cut} notes cut at the window edges" if cut else ""
        ends = ", ".join(f"{f} ({'end row' if e else 'cap' if f else 'no notes'})"
                         for f, e in zip(frames, result.ended[b]))
        print(f"{path}: {sum(w.num_notes for w in windows)} notes{note} in {len(windows)} window(s) -> "
              f"frames {ends}")
        if wavs:
            audio = result.audio[b]
            synthesize.write_wav(wavs[b], audio, result.sample_rate)
            print(f"wrote {wavs[b]} ({len(audio) / result.sample_rate:.2f} s at {result.sample_rate} Hz, "
                  f"codec {result.codec})")
            if args.spectrogram:
                png = os.path.splitext(wavs[b])[0] + ".png"
                synthesize.write_spectrogram(png, audio, result.sample_rate, title=os.path.basename(path))
                print(f"wrote {png}")
    if args.tokens_out is not None:
        # Each file's windows one after another (the WAV overlaps them at 5 s steps instead).
        per_file = [np.concatenate(c) for c in result.codes]
        codes = np.full((len(per_file), max(len(c) for c in per_file), cfg.num_codebooks), -1, np.int32)
        for b, c in enumerate(per_file):
            codes[b, : len(c)] = c
        np.save(args.tokens_out, codes)
        print(f"wrote codes {codes.shape} (items x frames x codebooks, windows one after another, "
              f"-1 after each item's end) to {args.tokens_out}")
    return 0


def _wav_paths(out: str, midi: list) -> list:
    """OUT.wav for one MIDI file; for several, OUT is a folder and each gets its own <stem>.wav."""
    from tokensynth_jax.synthesize import SynthesisError

    ext = os.path.splitext(out)[1].lower()
    if ext == ".wav" and not os.path.isdir(out):
        if len(midi) > 1:
            raise SynthesisError(f"--out {out}: {len(midi)} MIDI files need a folder, not one WAV file")
        return [out]
    if os.path.isfile(out) or (ext and not os.path.isdir(out)):
        raise SynthesisError(f"--out {out}: synthesis writes WAV files; give OUT.wav or a folder")
    paths = [os.path.join(out, os.path.splitext(os.path.basename(m))[0] + ".wav") for m in midi]
    if len(set(paths)) < len(paths):
        raise SynthesisError(f"--out {out}: several MIDI files share a name, so their WAVs would collide")
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokensynth", description=__doc__.splitlines()[0])
    parser.add_argument("--compile-cache", metavar="DIR|off",
                        help="persistent XLA compilation cache folder, or 'off' (default: $TOKENSYNTH_COMPILE_CACHE, "
                             "else ~/.cache/tokensynth-jax/xla; see docs/compile_cache.md)")
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

    p = sub.add_parser("convert", help="official PyTorch state dict or safetensors <-> our checkpoint")
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="from_format", choices=["official", "safetensors"],
                           help="IN.pt OUT_DIR, or SAFETENSORS_DIR OUT_DIR")
    direction.add_argument("--to", dest="to_format", choices=["official", "safetensors"],
                           help="CKPT_DIR OUT.pt, or CKPT_DIR SAFETENSORS_DIR")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--num-heads", type=int, help="attention heads (not stored in the official file; default 16)")
    p.add_argument("--attention", choices=["causal", "tokensynth-0.0.4"], default=None,
                   help="override the attention pattern (default causal; see convert.py)")
    p.set_defaults(run=_cmd_convert)

    p = sub.add_parser("synthesize", help="MIDI + timbre (recording, text or a mix) -> WAV")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--midi", nargs="+", required=True, metavar="FILE", help="rendered whole, 5 s window by window")
    p.add_argument("--timbre-embedding", metavar="E.npy", help="CLAP embedding [512] or [N, 512]")
    p.add_argument("--timbre-audio", nargs="+", metavar="WAV", help="reference recording(s): one, or one per MIDI file")
    p.add_argument("--text", help="a timbre description, e.g. 'a warm cello'")
    p.add_argument("--mix", type=float, metavar="A", help="A * audio + (1 - A) * text, renormalised (0 <= A <= 1)")
    p.add_argument("--clap", help="CLAP checkpoint or preset (default laion/larger_clap_music)")
    p.add_argument("--codec", help="codec to decode with (default and only choice: the checkpoint's)")
    p.add_argument("--offline", action="store_true", help="pretrained CLAP and codec from the local cache only")
    p.add_argument("--sampler", choices=["greedy", "top-k", "top-p"], default="top-p")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--unconditional-checkpoint", help="unconditional model for first-note guidance")
    p.add_argument("--max-rows", type=int, help="audio rows at most (default 450, as the reference)")
    p.add_argument("--midi-compat", choices=["tokensynth-0.0.4"], help="tokenize MIDI exactly as the reference")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="decode with parameters in this dtype (default: the checkpoint's; bfloat16 pays on GPU/TPU, not CPU)")
    p.add_argument("--tokens-out", metavar="OUT.npy")
    p.add_argument("--out", metavar="OUT.wav", help="the WAV (one MIDI file) or a folder of <stem>.wav")
    p.add_argument("--spectrogram", action="store_true", help="a spectrogram PNG beside each WAV")
    p.set_defaults(run=_cmd_synthesize)

    from data_prep.cli import add_prep_parser  # cheap: Beam is imported only when prep runs

    add_prep_parser(sub)
    from tokensynth_jax.sweep import add_sweep_parser

    add_sweep_parser(sub)
    from tokensynth_jax.inference_checkpoint import add_inference_checkpoint_parser

    add_inference_checkpoint_parser(sub)
    from tokensynth_jax.export import add_export_parser

    add_export_parser(sub)
    from tokensynth_jax.evaluate import add_eval_parser

    add_eval_parser(sub)
    from tokensynth_jax.clap_convert import add_convert_clap_parser

    add_convert_clap_parser(sub)

    from tokensynth_jax.demo import add_demo_parser

    add_demo_parser(sub)
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
    from tokensynth_jax import compile_cache
    from tokensynth_jax.checkpoint import CheckpointError
    from tokensynth_jax.convert import ConversionError
    from tokensynth_jax.export import ExportError
    from tokensynth_jax.input_pipeline import DataError
    from tokensynth_jax.midi_tokens import MidiTokenizationError
    from tokensynth_jax.synthesize import SynthesisError
    from tokensynth_jax.sweep import SweepError
    from tokensynth_jax.timbre import TimbreError
    from tokensynth_jax.metrics import MetricError

    try:
        compile_cache.enable(*compile_cache.resolve(args.compile_cache))  # before anything compiles
        return args.run(args)
    except (compile_cache.CompileCacheError, CheckpointError, ConversionError, MidiTokenizationError, SynthesisError, FileNotFoundError, KeyError,
            DataError, ExportError, SweepError, MetricError, TimbreError) as e:
        print(f"tokensynth {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
