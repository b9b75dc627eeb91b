"""Training speed and memory: our jitted train step against the same architecture's step in PyTorch.

The PyTorch side is the reference package's own `tokensynth.model.TokenSynth` (12 x 1024, 175M
parameters) in train mode, the model a PyTorch user would train. Three changes make it trainable:
its KV-cache buffers are resized to the batch (they are batch 1, and even its training forward
writes into them), its mask buffer is set causal (its default is inverted; see
tokensynth_jax/convert.py), and its position counter is reset before each forward. Both sides:
fp32, the same batch of random rows (every position a target), dropout 0.1, per-channel
cross-entropy averaged over positions x channels, AdamW, global norm clipping at 1.0. Ours is
`train_step.train_step` under `jax.jit` with the state donated.

FLOPs per token follow PaLM's MFU convention (flops.model_flops_per_token: 6 N + 12 L T D). A CPU
has no datasheet peak that XLA or torch can reach, so CPU MFU is stated against the fp32 matmul
throughput measured on this machine (`peak` part: a jitted 4096^3 matmul); on a GPU it is stated
against the datasheet bf16 dense peak (H100 SXM 989 TFLOP/s).

Each part runs in its own subprocess, so the peak RSS of each is its own; the parts alternate
(ours, torch, ours, torch...) so both see the same machine, and the speed ratio comes from one run.

Usage:
  python benchmarks/train.py                      # CPU: ours vs PyTorch, writes docs/benchmarks.md
  python benchmarks/train.py --quick              # sanity run: 2 layers, 1 timed step, no docs
  python benchmarks/train.py --platform gpu --dtype bfloat16 --batch 16   # ours on a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from generation import load_reference_model_module  # noqa: E402

REPO = _common.REPO
GPU_PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense bf16 FLOP/s, datasheets
GOAL_CPU_RATIO = 1.2  # issue 13: "train step at least 1.2x PyTorch" on the CPU
GOAL_GPU_MFU = 0.45


def _config(args):
    sys.path.insert(0, REPO)
    from tokensynth_jax.config import load_config_file

    overrides = {"model.dtype": args.dtype, "data.seq_len": args.seq_len, "data.global_batch": args.batch}
    if args.quick:
        overrides["model.num_layers"] = 2
    return load_config_file(os.path.join(REPO, "configs", "reference.py"), overrides)


def _batch(cfg, batch: int, seq_len: int) -> dict:
    """Random rows: channel 0 MIDI ids, channels 1..K codebook ids; every position is a target."""
    rng = np.random.default_rng(0)
    targets = np.concatenate([rng.integers(0, cfg.midi_vocab_size, (batch, seq_len, 1)),
                              rng.integers(0, cfg.codebook_vocab_size, (batch, seq_len, cfg.num_codebooks))], -1)
    return {"timbre": rng.standard_normal((batch, cfg.timbre_dim)).astype(np.float32),
            "rows": targets[:, :-1].astype(np.int32), "targets": targets.astype(np.int32),
            "mask": np.ones((batch, seq_len), bool)}


# --- subprocess parts ----------------------------------------------------------------------------------
def part_peak(args) -> dict:
    """fp32 matmul throughput this machine reaches under XLA (the CPU MFU denominator)."""
    import jax
    import jax.numpy as jnp

    n = 4096
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    with _common.CpuWatch() as watch:
        t0 = time.perf_counter()
        for _ in range(args.peak_runs):
            f(a).block_until_ready()
        dt = (time.perf_counter() - t0) / args.peak_runs
    return {"matmul_flops_per_s": 2 * n**3 / dt, "contention": watch.to_dict(), "peak_rss_mb": _common.peak_rss_mb()}


def part_ours(args) -> dict:
    import functools

    import jax
    from flax import nnx

    from tokensynth_jax.config import ModelConfig
    from tokensynth_jax.model.transformer import TokenSynth
    from tokensynth_jax.scaling.flops import param_counts
    from tokensynth_jax.training import optim, train
    from tokensynth_jax.training import train_step as ts

    config = _config(args)
    cfg = ModelConfig.from_dict(config.model.to_dict())
    oc = optim.OptimConfig.from_dict(config.optim.to_dict())
    model = TokenSynth(cfg, rngs=nnx.Rngs(0))
    opt = optim.optimizer_for(model, oc)
    graphdef, state = nnx.split((model, opt))
    batch = jax.device_put(_batch(cfg, args.batch, args.seq_len))
    step = jax.jit(functools.partial(ts.train_step, graphdef), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, jax.random.PRNGKey(0)).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    state, m = compiled(state, batch, jax.random.PRNGKey(0))  # warm-up step
    jax.block_until_ready(m)
    losses = []
    with _common.CpuWatch() as watch:
        t0 = time.perf_counter()
        for i in range(args.steps):
            state, m = compiled(state, batch, jax.random.PRNGKey(i + 1))
            losses.append(float(m["loss"]))  # a host sync per step, as a training loop that logs has
        dt = (time.perf_counter() - t0) / args.steps
    mb = lambda name: getattr(mem, name, 0) / _common.MB if mem is not None else None
    return {
        "params": param_counts(cfg).total, "flops_per_token": train.model_flops_per_token(cfg, args.seq_len),
        "s_per_step": dt, "tokens_per_s": args.batch * args.seq_len / dt, "compile_s": compile_s,
        "losses": losses, "device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
        "memory_analysis_mb": {"arguments": mb("argument_size_in_bytes"), "outputs": mb("output_size_in_bytes"),
                               "temporaries": mb("temp_size_in_bytes"), "generated_code": mb("generated_code_size_in_bytes")},
        "contention": watch.to_dict(), "peak_rss_mb": _common.peak_rss_mb(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }


def part_torch(args) -> dict:
    import torch
    import torch.nn.functional as F

    from tokensynth_jax.config import ModelConfig

    torch.manual_seed(0)
    torch.set_num_threads(args.threads or os.cpu_count())
    config = _config(args)
    cfg = ModelConfig.from_dict(config.model.to_dict())
    ref = load_reference_model_module()
    model = ref.TokenSynth(device=torch.device("cpu"))
    if args.quick:
        model.blocks = torch.nn.Sequential(*list(model.blocks)[: cfg.num_layers])
    for block in model.blocks:  # batch-sized cache buffers, causal mask (see the module docstring)
        attn = block.attn
        attn.k_cache = torch.zeros(args.batch, *attn.k_cache.shape[1:])
        attn.v_cache = torch.zeros(args.batch, *attn.v_cache.shape[1:])
        attn.mask = torch.tril(torch.ones(cfg.max_len, cfg.max_len, dtype=torch.bool))[None, None]
    model.train()
    oc = config.optim
    opt = torch.optim.AdamW(model.parameters(), lr=oc.peak_lr, betas=(oc.b1, oc.b2), eps=oc.eps,
                            weight_decay=oc.weight_decay)
    data = {k: torch.from_numpy(v) for k, v in _batch(cfg, args.batch, args.seq_len).items()}
    rows, targets, timbre = data["rows"].long(), data["targets"].long(), data["timbre"]
    vm, vc, k = cfg.midi_vocab_size, cfg.codebook_vocab_size, cfg.num_codebooks

    def step():
        # Its forward asserts current_length + T <= max_len even without the cache, with the length
        # left by the previous call, so a second full-length forward fails unless it is reset.
        model.current_length = 0
        logits = model(rows, timbre)  # [B, T, Vm + K Vc]
        ce = F.cross_entropy(logits[..., :vm].reshape(-1, vm), targets[..., 0].reshape(-1), reduction="sum")
        books = logits[..., vm:].reshape(-1, vc)
        ce = ce + F.cross_entropy(books, targets[..., 1:].reshape(-1), reduction="sum")
        loss = ce / (targets.shape[0] * targets.shape[1] * (k + 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), oc.clip_norm)
        opt.step()
        return float(loss)

    step()  # warm-up
    losses = []
    with _common.CpuWatch() as watch:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            losses.append(step())
        dt = (time.perf_counter() - t0) / args.steps
    return {"params": sum(p.numel() for p in model.parameters()), "s_per_step": dt,
            "tokens_per_s": args.batch * args.seq_len / dt, "losses": losses, "threads": torch.get_num_threads(),
            "contention": watch.to_dict(), "peak_rss_mb": _common.peak_rss_mb()}


PARTS = {"peak": part_peak, "ours": part_ours, "torch": part_torch}


# --- driver ----------------------------------------------------------------------------------------
def run_part(name: str, args) -> dict:
    out_json = os.path.join(args.workdir, f"{name}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--only", name, "--json-out", out_json,
           "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
           "--dtype", args.dtype, "--peak-runs", str(args.peak_runs)] + (["--quick"] if args.quick else [])
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one device: the whole machine, not fake CPU devices
    if args.platform:
        env["JAX_PLATFORMS"] = {"gpu": "cuda"}.get(args.platform, args.platform)
    if name == "ours":
        env = _common.cli_environment(env)
    return _common.run_part(name, cmd, out_json, env)


def _steps(runs) -> str:
    return ", ".join("%.2f" % r["s_per_step"] for r in runs)


def summarize(args, peak, ours_runs, torch_runs, machine, vers, waits) -> tuple[str, dict]:
    best = lambda runs: min(runs, key=lambda r: r["s_per_step"])
    ours = best(ours_runs)
    flops_tok = ours["flops_per_token"]
    gpu = ours["platform"] == "gpu"
    peak_name = next((k for k in GPU_PEAK_BF16 if k in ours["device"]), None) if gpu else None
    peak_flops = GPU_PEAK_BF16.get(peak_name) if gpu else peak["matmul_flops_per_s"]
    mfu = lambda r: r["tokens_per_s"] * flops_tok / peak_flops if peak_flops else float("nan")
    rows = [["ours (JAX, jit)", f"{ours['s_per_step']:.2f}", f"{ours['tokens_per_s']:.0f}",
             f"{ours['tokens_per_s'] * flops_tok / 1e12:.3f}", f"{mfu(ours):.1%}", f"{ours['peak_rss_mb']:.0f}"]]
    verdict = {}
    if torch_runs:
        pt = best(torch_runs)
        ratio = ours["tokens_per_s"] / pt["tokens_per_s"]
        verdict["cpu_ratio"] = ratio >= GOAL_CPU_RATIO
        rows.append(["PyTorch (reference module, eager)", f"{pt['s_per_step']:.2f}", f"{pt['tokens_per_s']:.0f}",
                     f"{pt['tokens_per_s'] * flops_tok / 1e12:.3f}", f"{mfu(pt):.1%}", f"{pt['peak_rss_mb']:.0f}"])
    if gpu and peak_flops:
        verdict["gpu_mfu"] = mfu(ours) >= GOAL_GPU_MFU
    ma = ours["memory_analysis_mb"]
    chance = (np.log(1133) + 9 * np.log(1025)) / 10  # uniform logits: mean of the channels' log-vocabularies
    fmt = lambda x: "n/a" if x is None else f"{x:.0f}"
    other = max([r["contention"]["other_cores"] for r in ours_runs + torch_runs] + [0.0])
    denominator = (f"the {peak_name} datasheet bf16 dense peak ({peak_flops / 1e12:.0f} TFLOP/s)" if gpu and peak_flops
                   else f"the fp32 matmul throughput XLA reaches on this machine ({peak['matmul_flops_per_s'] / 1e9:.0f} "
                        f"GFLOP/s, a jitted 4096^3 matmul)" if not gpu else "no known peak for this GPU")
    lines = [
        f"## Training step ({ours['platform']}, {machine['date']})", "",
        f"Command: `{args.command}`  ",
        f"Machine: {machine['cpu']}, {machine['nproc']} cores, {machine['ram_gib']} GiB; device {ours['device']}  ",
        f"Versions: {', '.join(f'{k} {v}' for k, v in vers.items())}", "",
        f"Model: the reference size, {ours['params']:,} parameters, {args.dtype} compute, fp32 master weights and "
        f"AdamW; batch {args.batch} x {args.seq_len} positions, dropout 0.1, every position a target. "
        f"FLOPs per token {flops_tok / 1e9:.3f} G (6 N + 12 L T D). MFU is against {denominator}. "
        f"Best of {len(ours_runs)} alternating runs of {args.steps} timed steps each (after a warm-up step).", "",
        _common.md_table(["", "s / step", "tokens / s", "model TFLOP/s", "MFU", "peak host RSS (MB)"], rows), "",
    ]
    if torch_runs:
        lines.append(f"**Ours / PyTorch: {ratio:.2f}x tokens/s** (goal >= {GOAL_CPU_RATIO:.1f}x: "
                     f"{'PASS' if verdict['cpu_ratio'] else 'FAIL'}). Every run: ours "
                     f"{_steps(ours_runs)} s/step; PyTorch {_steps(torch_runs)} s/step "
                     f"({pt['threads']} torch threads).  ")
    if "gpu_mfu" in verdict:
        lines.append(f"**MFU {mfu(ours):.1%}** (goal >= {GOAL_GPU_MFU:.0%}: {'PASS' if verdict['gpu_mfu'] else 'FAIL'}).  ")
    lines += [
        f"Ours, `memory_analysis()` of the compiled step (MB): arguments {fmt(ma['arguments'])}, outputs "
        f"{fmt(ma['outputs'])}, temporaries {fmt(ma['temporaries'])}; compile {ours['compile_s']:.1f} s.  ",
        f"Ours ran {_common.malloc_note(ours.get('glibc_tunables', ''))}.  ",
        f"Loss after the timed steps: ours {ours['losses'][-1]:.3f}"
        + (f", PyTorch {pt['losses'][-1]:.3f}" if torch_runs else "") + f" (chance: {chance:.2f}; the same task, "
        "not the same random numbers).  ",
        f"Other processes used at most {other:.2f} cores while timing; load before the runs: "
        f"{', '.join('%.2f' % w['load1'] for w in waits)}.",
    ]
    return "\n".join(lines), verdict


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 layers, 1 timed step, no docs written")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024, help="positions per example (the reference's max_len)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each side")
    parser.add_argument("--dtype", default="float32", help="compute dtype of ours (bfloat16 on GPU/TPU)")
    parser.add_argument("--platform", choices=["cpu", "gpu", "tpu"], help="JAX platform (default: JAX's choice)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--peak-runs", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true", help="ours only (GPU/TPU machines without torch)")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for an idle machine")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks.md"))
    parser.add_argument("--only", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.peak_runs = 1, 1, 1
    if args.only:
        with open(args.json_out, "w") as f:
            json.dump(PARTS[args.only](args), f, indent=2)
        return 0

    args.command = "python benchmarks/train.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    with_torch = not args.no_torch and args.platform in (None, "cpu")
    machine = _common.machine_info()
    from importlib.metadata import version

    vers = {p: version(p) for p in ("jax", "jaxlib", "flax", "optax") + (("torch",) if with_torch else ())}
    waits = []
    ours_runs, torch_runs = [], []
    with tempfile.TemporaryDirectory(prefix="tokensynth_train_bench_") as workdir:
        args.workdir = workdir
        if not (args.no_wait or args.quick):
            waits.append(_common.wait_for_idle())
        peak = run_part("peak", args)
        for _ in range(args.repeats):
            ours_runs.append(run_part("ours", args))
            if with_torch:
                torch_runs.append(run_part("torch", args))
    body, verdict = summarize(args, peak, ours_runs, torch_runs, machine, vers,
                              waits or [{"load1": os.getloadavg()[0]}])
    print("\n" + body)
    for goal, ok in verdict.items():
        print(f"{goal}: {'PASS' if ok else 'FAIL'}")
    if not args.quick:
        _common.replace_section(args.out, f"train-{ours_runs[0]['platform']}", body)
        print(f"wrote the training section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
