"""Train-step speed and memory of the model config's speed knobs, one variant against another.

Every knob of the step is a ModelConfig field (attention_impl, remat, scan_layers, loss_chunk,
dtype); their defaults should be the fastest measured on each platform. This times our jitted,
donated `train_step` at one size for each variant (a set of `model.*` overrides), each in its own
process, alternating variants over the repeats so all see the same machine, and prints one table:
best seconds per step, tokens/s, XLA's temporaries of the compiled step, compile time and the
loss after the timed steps (equal across variants that compute the same function).

Usage:
  python benchmarks/train_variants.py                   # CPU: the reference size, batch 1 x 1024
  python benchmarks/train_variants.py --layers 2 --steps 1 --repeats 1   # quick
  python benchmarks/train_variants.py --set model.dtype=bfloat16 --batch 16 \
      --variant auto: --variant xla:attention_impl=xla --variant dots:remat=dots   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

DEFAULT_VARIANTS = ("default:", "whole-loss:loss_chunk=0", "unrolled:scan_layers=False",
                    "remat-full:remat=full", "remat-dots:remat=dots")


def _overrides(args, variant: str) -> dict:
    _, _, spec = variant.partition(":")
    out = {"data.seq_len": args.seq_len, "data.global_batch": args.batch}
    if args.layers:
        out["model.num_layers"] = args.layers
    for item in list(args.set) + [f"model.{kv}" for kv in spec.split(",") if kv]:
        key, _, value = item.partition("=")
        out[key] = value
    return out


def part(args) -> dict:
    """One variant: compile, one warm-up step, `steps` timed steps."""
    sys.path.insert(0, _common.REPO)
    import functools

    import jax
    from flax import nnx

    from tokensynth_jax.config import ModelConfig, load_config_file
    from tokensynth_jax.model.transformer import TokenSynth
    from tokensynth_jax.training import optim
    from tokensynth_jax.training import train_step as ts

    config = load_config_file(os.path.join(_common.REPO, "configs", "reference.py"), _overrides(args, args.only))
    cfg = ModelConfig.from_dict(config.model.to_dict())
    model = TokenSynth(cfg, rngs=nnx.Rngs(0))
    opt = optim.optimizer_for(model, optim.OptimConfig.from_dict(config.optim.to_dict()))
    graphdef, state = nnx.split((model, opt))
    rng = np.random.default_rng(0)
    targets = np.concatenate([rng.integers(0, cfg.midi_vocab_size, (args.batch, args.seq_len, 1)),
                              rng.integers(0, cfg.codebook_vocab_size, (args.batch, args.seq_len, cfg.num_codebooks))], -1)
    batch = jax.device_put({"timbre": rng.standard_normal((args.batch, cfg.timbre_dim)).astype(np.float32),
                            "rows": targets[:, :-1].astype(np.int32), "targets": targets.astype(np.int32),
                            "mask": np.ones((args.batch, args.seq_len), bool)})
    step = jax.jit(functools.partial(ts.train_step, graphdef), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, jax.random.PRNGKey(0)).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    state, m = compiled(state, batch, jax.random.PRNGKey(0))
    jax.block_until_ready(m)
    with _common.CpuWatch() as watch:
        t0 = time.perf_counter()
        for i in range(args.steps):
            state, m = compiled(state, batch, jax.random.PRNGKey(i + 1))
            loss = float(m["loss"])
        dt = (time.perf_counter() - t0) / args.steps
    return {"s_per_step": dt, "tokens_per_s": args.batch * args.seq_len / dt, "compile_s": compile_s, "loss": loss,
            "temp_mb": None if mem is None else mem.temp_size_in_bytes / _common.MB,
            "device": str(jax.devices()[0].device_kind), "other_cores": watch.to_dict()["other_cores"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", help="NAME:key=value,... (model fields; repeatable)")
    parser.add_argument("--set", action="append", default=[], help="config override for every variant, e.g. model.dtype=bfloat16")
    parser.add_argument("--layers", type=int, help="model.num_layers (default: the reference's 12)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each variant")
    parser.add_argument("--only", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only:
        with open(args.json_out, "w") as f:
            json.dump(part(args), f)
        return 0
    variants = args.variant or list(DEFAULT_VARIANTS)
    runs = {v: [] for v in variants}
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one device: the whole machine, not fake CPU devices
    with tempfile.TemporaryDirectory(prefix="tokensynth_variants_") as workdir:
        for _ in range(args.repeats):
            for v in variants:
                out = os.path.join(workdir, "part.json")
                cmd = [sys.executable, os.path.abspath(__file__), "--only", v, "--json-out", out,
                       "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
                cmd += [f"--set={s}" for s in args.set] + (["--layers", str(args.layers)] if args.layers else [])
                runs[v].append(_common.run_part(v, cmd, out, env))
    rows = []
    for v, rs in runs.items():
        best = min(rs, key=lambda r: r["s_per_step"])
        rows.append([v, ", ".join("%.3f" % r["s_per_step"] for r in rs), f"{best['tokens_per_s']:.0f}",
                     "n/a" if best["temp_mb"] is None else f"{best['temp_mb']:.0f}", f"{best['compile_s']:.1f}",
                     f"{best['loss']:.4f}", f"{max(r['other_cores'] for r in rs):.2f}"])
    print(f"train step, {args.batch} x {args.seq_len}, {args.layers or 12} layers, "
          f"overrides {args.set or 'none'}, device {best['device']}")
    print(_common.md_table(["variant", "s / step (each run)", "tokens / s (best)", "temporaries MB",
                            "compile s", "loss", "other cores"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
