"""Ours against the reference in PyTorch on one accelerator, in one command of under 10 minutes.

Seven sections, each in its own subprocess with its share of a global time budget; each writes its
measurements as it makes them (OUT/<section>.jsonl), and the driver rewrites OUT/results.json and
OUT/results.md after every section, so an out-of-memory error, a missing package or a timeout in
one section costs that section (or the rest of it) and nothing else:
  ours-train      `train_step.train_step` under jit with the state donated: configs/reference.py
                  (12 x 1024, 175M parameters), bf16 compute, fp32 master weights, AdamW; random
                  rows, every position a target; batch 16, 32 and 64 x 1024. `--ours-set
                  model.KEY=VALUE` passes config overrides (attention implementation, remat, ...).
  torch-train     the reference package's own TokenSynth module (as benchmarks/train.py trains it:
                  batch-sized cache buffers, causal mask), eager, autocast bf16, fused AdamW.
  ours-decode     `sampling.generate`, a 5 s window (449 rows), top-p 0.9, random weights (never
                  end early), bf16 parameters on a GPU: batch 1, 16, 64 and 256; then, while time
                  is left, the decoding knobs at batch 1 and 256 (DECODE_VARIANTS, or
                  `--decode-variant`), the other top-p filter method, greedy and fp32 parameters.
  ref-decode      the reference's `TokenSynth.synthesize(clap, midi, top_p=0.9)` under no_grad
                  (batch 1, a Python loop), same MIDI file.
  kernels         the decode step's Pallas kernels alone (benchmarks/kernels.py): each gemv tiling
                  on each weight stage of a step (us a kernel, GB/s of weights), and a step's
                  attention as the library kernel + XLA's cache update against the fused kernel.
  train-variants  ours at batch 32 with one knob changed at a time (TRAIN_VARIANTS): what the
                  defaults are chosen from.
  profile         where the device's time goes in decode calls (PROFILE_DECODE: batch and
                  overrides of each) and a train step (batch 32): the busiest kernels of each GPU
                  line of a JAX profiler trace (OUT/profile.jsonl), the Perfetto traces (OUT/profile-*.json.gz), and the
                  optimized HLO of both (OUT/hlo/), where the kernels' fusion names are defined.
MFU: training FLOPs per token 6 N + 12 L T D (flops.py) against the bf16 dense peak of the card
(989 TFLOP/s for H100/H200 SXM). Memory: ours, the compiled step's arguments + temporaries +
outputs - aliased (`memory_analysis()`) and the device's peak so far; PyTorch,
`torch.cuda.max_memory_allocated()` for each batch.

The device machine has jax, flax, optax, torch and transformers; the rest comes as wheels
(`make wheels`, Python 3.12 manylinux). On it, from the repository root:
  pip install -q --no-deps wheels/*.whl && python benchmarks/accelerator.py --out accel
Here, a CPU smoke test at tiny sizes (2 layers, 64 positions, 16 rows; numbers not meaningful):
  python benchmarks/accelerator.py --quick --out /tmp/accel
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

REPO = _common.REPO
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 FLOP/s (SXM datasheets), by device name
SIZES = {  # full, and --quick (a CPU smoke test)
    False: {"train_batches": (16, 32, 64), "seq_len": 1024, "train_steps": 5, "layers": None, "variant_batch": 32,
            "decode_batches": (1, 16, 64, 256), "rows": 449, "ref_runs": 2},
    True: {"train_batches": (1, 2, 4), "seq_len": 64, "train_steps": 1, "layers": 2, "variant_batch": 2,
           "decode_batches": (1, 2, 4, 8), "rows": 16, "ref_runs": 1},
}
# Budget shares, in the order they run: the goal's rows first, then the variants that choose the
# defaults and a profile (their time is what the others left).
SECTIONS = {"ours-train": 0.25, "torch-train": 0.12, "ours-decode": 0.25, "ref-decode": 0.08, "kernels": 0.08,
            "train-variants": 0.15, "profile": 0.12}
MIN_SECTION_S = 20.0  # a section with less time than this is not started
GOALS = {"train_ratio": 1.5, "decode1_ms": 150.0, "decode256_clips_s": 300.0}
TOP_P = 0.9


# --- inside a section's subprocess -------------------------------------------------------------------
class Section:
    """What a section needs: its sizes, its deadline, and `emit` to record a measurement now."""

    def __init__(self, args):
        self.args, self.size = args, SIZES[args.quick]
        self.path = os.path.join(args.out, f"{args.part}.jsonl")

    def emit(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    def left_s(self) -> float:
        return self.args.deadline - time.time()

    def attempt(self, item: str, fn, min_left_s: float = 10.0) -> None:
        """Runs fn() -> record for `item`, recording an error or a skip instead of raising."""
        if self.left_s() < min_left_s:
            self.emit({"item": item, "skipped": f"time budget ({self.left_s():.0f} s left)"})
            return
        try:
            self.emit({"item": item, **fn()})
        except Exception as e:  # out of memory, a missing package: this item fails, the next one runs
            traceback.print_exc()
            self.emit({"item": item, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"})


def _ours_config(section: Section, dtype: str, extra: dict | None = None):
    from tokensynth_jax.config import ModelConfig, load_config_file

    overrides = {"model.dtype": dtype, "data.seq_len": section.size["seq_len"]}
    if section.size["layers"]:
        overrides["model.num_layers"] = section.size["layers"]
    overrides.update(dict(kv.split("=", 1) for kv in section.args.ours_set))
    overrides.update(extra or {})
    config = load_config_file(os.path.join(REPO, "configs", "reference.py"), overrides)
    return config, ModelConfig.from_dict(config.model.to_dict())


def _jax_setup(section: Section):
    import jax

    from tokensynth_jax import compile_cache

    if section.args.part != "profile":  # the profile compiles afresh: XLA dumps the HLO of what it compiles
        compile_cache.enable(os.path.join(section.args.out, "xla_cache"), "--out")  # a rerun skips compiles
    device = jax.devices()[0]
    section.emit({"item": "device", "device": device.device_kind, "platform": jax.default_backend(),
                  "jax": jax.__version__})
    return device


def _device_peak_gb(device):
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return stats["peak_bytes_in_use"] / 1e9 if stats and "peak_bytes_in_use" in stats else None


def _compiler_options(extra: dict) -> tuple[dict, dict]:
    """Splits overrides into config overrides and XLA compile options ("xla.NAME=VALUE": a debug
    option for this one compile, e.g. xla.xla_gpu_enable_triton_gemm=False; XLA wants bools and
    ints as such, not strings)."""
    def value(v):
        text = str(v)
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        return int(text) if text.lstrip("-").isdigit() else text

    options = {k[len("xla."):]: value(v) for k, v in extra.items() if k.startswith("xla.")}
    return {k: v for k, v in extra.items() if not k.startswith("xla.")}, options


def _train_measurer(section: Section, extra: dict | None = None):
    """(config, measure(batch) -> record) for ours with `--ours-set` and `extra` overrides (an
    "xla." key is an XLA compile option of the step)."""
    import jax
    from flax import nnx
    from train import _batch  # benchmarks/train.py: the same random rows as the CPU benchmark

    from tokensynth_jax.model.transformer import TokenSynth
    from tokensynth_jax.training import optim
    from tokensynth_jax.training import train_step as ts

    device = jax.devices()[0]
    extra, options = _compiler_options(extra or {})
    config, cfg = _ours_config(section, "bfloat16", extra)
    oc = optim.OptimConfig.from_dict(config.optim.to_dict())
    seq = section.size["seq_len"]

    def fresh():  # a failed call may have consumed the donated state
        model = TokenSynth(cfg, rngs=nnx.Rngs(0))
        opt = optim.optimizer_for(model, oc)
        return nnx.split((model, opt))

    graphdef, state = fresh()
    step = jax.jit(functools.partial(ts.train_step, graphdef), donate_argnums=0)
    holder = {"state": state}

    def run(compiled, batch, steps):
        for i in range(steps):
            holder["state"], metrics = compiled(holder["state"], batch, jax.random.PRNGKey(2 + i))
        return float(metrics["loss"])

    def measure(batch_size):
        if any(x.is_deleted() for x in jax.tree.leaves(holder["state"])):
            holder["state"] = fresh()[1]
        batch = jax.device_put(_batch(cfg, batch_size, seq))
        t0 = time.perf_counter()
        compiled = step.lower(holder["state"], batch, jax.random.PRNGKey(0)).compile(compiler_options=options or None)
        compile_s = time.perf_counter() - t0
        m = compiled.memory_analysis()
        footprint = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
                     - m.alias_size_in_bytes) / 1e9 if m is not None else None
        holder["compiled"], holder["batch"] = compiled, batch
        run(compiled, batch, 1)  # warm-up
        steps = section.size["train_steps"]
        t0 = time.perf_counter()
        loss = run(compiled, batch, steps)
        dt = (time.perf_counter() - t0) / steps
        return {"batch": batch_size, "s_per_step": dt, "tokens_per_s": batch_size * seq / dt, "compile_s": compile_s,
                "loss": loss, "memory_gb": footprint, "temp_gb": m.temp_size_in_bytes / 1e9 if m else None,
                "device_peak_gb": _device_peak_gb(device)}

    def again(steps):  # more steps of the last measured batch (no compile)
        return run(holder["compiled"], holder["batch"], steps)

    def release():
        holder.clear()

    measure.again = again
    return cfg, measure, release


NOT_SPEED_KNOBS = {"model.dropout"}  # variants that change what is trained: measured, never a default
WIN_MARGIN = 1.01  # a variant replaces the defaults by more than run-to-run noise (0.2-0.4%, H100 and H200)


def _train_winner(section: Section) -> dict:
    """With --train-best: the overrides of the fastest train variant this --out holds (train-variants
    ran first, at one batch), so the goal's rows measure what the defaults are about to become;
    {} when nothing beat the defaults by WIN_MARGIN or nothing was measured."""
    if not section.args.train_best:
        return {}
    measured = [r for r in read_records(section.args.out, "train-variants").values() if "tokens_per_s" in r]
    batch = section.size["variant_batch"]
    at_batch = [r for r in measured if r["batch"] == batch and not set(r["overrides"]) & NOT_SPEED_KNOBS]
    if not at_batch:
        return {}
    best = max(at_batch, key=lambda r: r["tokens_per_s"])
    defaults = next((r["tokens_per_s"] for r in at_batch if not r["overrides"]), 0.0)
    return dict(best["overrides"]) if best["tokens_per_s"] > WIN_MARGIN * defaults else {}


def part_ours_train(section: Section) -> None:
    from tokensynth_jax.scaling import flops

    _jax_setup(section)
    winner = _train_winner(section)
    cfg, measure, _ = _train_measurer(section, winner)
    seq = section.size["seq_len"]
    section.emit({"item": "model", "params": flops.param_counts(cfg).total, "overrides": winner,
                  "flops_per_token": flops.model_flops_per_token(cfg, seq), "config": cfg.to_dict()})
    for b in section.size["train_batches"]:
        section.attempt(f"train {b}", lambda: {"overrides": winner, **measure(b)}, min_left_s=30.0)


# Each knob of the step against the defaults, at one batch (what `auto` and the defaults are
# chosen from): name -> model overrides ("xla." keys: XLA compile options; "batch": another batch
# than the section's). The defaults first, so every run has its own baseline; then the ones no GPU
# has timed yet.
TRAIN_VARIANTS = {
    "defaults": {},
    "residual stream row-major": {"model.residual_layout": "row_major"},
    "Dense products flat, residual stream row-major": {"model.dense_dot": "flat", "model.residual_layout": "row_major"},
    "Dense products flat ([M, K] x [K, N])": {"model.dense_dot": "flat"},
    "residual stream row-major, GELU gradient recomputed": {"model.residual_layout": "row_major",
                                                            "model.gelu_grad": "recompute"},
}
# Timed on an H200 before (docs/benchmarks.md, 2026-11-27 run 1) and left out: cuBLAS for every GEMM
# (xla.xla_gpu_enable_triton_gemm=False, -0.4%), no dropout (+7.5%, not ours to drop), remat dots (-10%).


def _parse_variant(text: str) -> tuple[str, dict]:
    """"NAME:model.a=1,model.b=x" -> (NAME, {"model.a": "1", "model.b": "x"})."""
    name, _, spec = text.partition(":")
    return name, dict(kv.split("=", 1) for kv in spec.split(",") if kv)


def part_train_variants(section: Section) -> None:
    import gc

    from tokensynth_jax.scaling import flops

    _jax_setup(section)
    b = section.size["variant_batch"]
    cfg = _ours_config(section, "bfloat16")[1]
    section.emit({"item": "model", "params": flops.param_counts(cfg).total,
                  "flops_per_token": flops.model_flops_per_token(cfg, section.size["seq_len"]), "config": cfg.to_dict()})
    variants = dict(_parse_variant(v) for v in section.args.train_variant) or TRAIN_VARIANTS
    for name, extra in variants.items():
        extra = dict(extra)
        batch = int(extra.pop("batch", b))

        def run(extra=extra, batch=batch):
            _, measure, release = _train_measurer(section, extra)
            try:
                return {"overrides": extra, **measure(batch)}
            finally:
                release()
                gc.collect()

        section.attempt(f"train {batch}, {name}", run, min_left_s=40.0)


def part_torch_train(section: Section) -> None:
    import torch
    import torch.nn.functional as F
    from generation import load_reference_model_module

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    section.emit({"item": "device", "device": name, "torch": torch.__version__})
    ref = load_reference_model_module()
    torch.manual_seed(0)
    model = ref.TokenSynth(device=device)
    if section.size["layers"]:
        model.blocks = torch.nn.Sequential(*list(model.blocks)[: section.size["layers"]])
    model.train()
    hp, seq = model.hparams, section.size["seq_len"]
    # The reference's optimizer settings are not published; AdamW as configs/reference.py sets it.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            fused=device.type == "cuda")
    vm, vc = hp.midi_vocab_size, hp.audio_vocab_size

    def measure(batch_size):
        for block in model.blocks:  # batch-sized cache buffers, causal mask (benchmarks/train.py)
            attn = block.attn
            attn.k_cache = torch.zeros(batch_size, *attn.k_cache.shape[1:], device=device)
            attn.v_cache = torch.zeros(batch_size, *attn.v_cache.shape[1:], device=device)
            attn.mask = torch.tril(torch.ones(hp.max_len, hp.max_len, dtype=torch.bool, device=device))[None, None]
        g = torch.Generator().manual_seed(0)
        targets = torch.cat([torch.randint(0, vm, (batch_size, seq, 1), generator=g),
                             torch.randint(0, vc, (batch_size, seq, 9), generator=g)], -1).to(device)
        rows, timbre = targets[:, :-1], torch.randn(batch_size, 512, generator=g).to(device)

        def step():
            model.current_length = 0  # its forward checks the length left by the previous call
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(rows, timbre)
            logits = logits.float()
            ce = F.cross_entropy(logits[..., :vm].reshape(-1, vm), targets[..., 0].reshape(-1), reduction="sum")
            ce = ce + F.cross_entropy(logits[..., vm:].reshape(-1, vc), targets[..., 1:].reshape(-1), reduction="sum")
            loss = ce / (batch_size * seq * 10)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return loss

        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            step()  # warm-up
            sync()
            steps = section.size["train_steps"]
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = step()
            loss = float(loss)
            dt = (time.perf_counter() - t0) / steps
        finally:
            opt.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
        return {"batch": batch_size, "s_per_step": dt, "tokens_per_s": batch_size * seq / dt, "loss": loss,
                "memory_gb": peak}

    for b in section.size["train_batches"]:
        section.attempt(f"train {b}", lambda: measure(b), min_left_s=15.0)


# The decoding knobs against their "auto" choices (the defaults), each at batch 1 and the largest
# batch unless it names its batches ("batch": one or a tuple): name -> model overrides. On a GPU
# "auto" is the Pallas decode attention, the Pallas gemv stages and, at batch 1, a batch of two
# (ModelConfig.decode_attention_impl, decode_gemm_impl, decodes_as_gemm).
# "gemv.NAME" and "attention.NAME" keys set a tiling constant of tokensynth_jax/model/gemv.py or
# attention.py (the Pallas kernels) for that row; "xla.NAME" keys add an XLA option to the decode
# loop's compile (`sampling.decode_compile_options`).
WHOLE_LOOP_GRAPH = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,CONDITIONAL,WHILE"  # XLA's + 2
DECODE_VARIANTS = {
    "fused decode-step attention": {"model.decode_attention": "pallas_fused", "batch": (1, 256)},
    # Batch 1 runs as two rows ("auto", ModelConfig.decodes_as_gemm) since XLA's GEMMs decoded it in
    # 340 against 239 ms (H200, 2026-11-26). On XLA:CPU a size-one batch also made every step copy
    # the whole KV cache (2026-11-27, fixed there by the flat cache); one row may pay now.
    "batch 1 as one row, fused decode-step attention": {"model.matvec_as_gemm": False,
                                                        "model.decode_attention": "pallas_fused", "batch": 1},
    "fused decode-step attention, whole loop one CUDA graph, graphs from 1 command": {
        "model.decode_attention": "pallas_fused", "xla.xla_gpu_enable_command_buffer": WHOLE_LOOP_GRAPH,
        "xla.xla_gpu_graph_min_graph_size": 1, "batch": 1},
    "GEMV a row at a time": {"gemv.ROWS_LOOP": 1, "batch": 1},
    "GEMV weights loaded first": {"gemv.W_FIRST": 1, "batch": 1},
    "GEMV a row at a time, weights loaded first": {"gemv.ROWS_LOOP": 1, "gemv.W_FIRST": 1, "batch": 1},
    "fused decode-step attention, the middle batches": {"model.decode_attention": "pallas_fused", "batch": (16, 64)},
}
CONSTANT_MODULES = ("gemv", "attention")  # tokensynth_jax.model.<name>


PROFILE_TRAIN: dict = {}  # the defaults
# (batch, overrides) of each decode trace: the defaults, then the fused decode-step attention at batch 1
# (model.decode_attention="pallas_fused", not yet timed), last, as a crash in a new kernel ends the section.
PROFILE_DECODE = ((1, {}), (256, {}), (1, {"model.decode_attention": "pallas_fused"}))


def _bench_midi(section: Section) -> str:
    from generation import write_midi

    path = os.path.join(section.args.out, "bench.mid")
    if not os.path.exists(path):
        write_midi(path)
    return path


def _decode_measurer(section: Section):
    """(model setup record, measure(batch, sampler, runs, param_dtype) -> record) for ours."""
    import jax
    from flax import nnx

    from tokensynth_jax.inference import sampling
    from tokensynth_jax.model.transformer import TokenSynth
    from tokensynth_jax.tokens.midi_tokens import tokenize_midi

    device = jax.devices()[0]
    dtype = section.args.decode_dtype
    dtype = ("bfloat16" if jax.default_backend() != "cpu" else "float32") if dtype == "auto" else dtype
    models = {}

    def model_for(param_dtype, overrides):
        """The reference-size model (`--ours-set` and `overrides` applied; the same seeded
        weights whatever they change), prepared for decoding in `param_dtype`."""
        key = (param_dtype, tuple(sorted(overrides.items())))
        if key not in models:
            cfg = _ours_config(section, "float32", overrides)[1]
            models[key] = TokenSynth(cfg, rngs=nnx.Rngs(0)).for_decoding(param_dtype)
        return models[key]

    cfg = model_for(dtype, {}).cfg
    tokens = tokenize_midi(_bench_midi(section)).tokens
    timbre = np.random.default_rng(0).standard_normal(cfg.timbre_dim).astype(np.float32)
    rows = section.size["rows"]
    setup = {"dtype": dtype, "rows": rows, "layers": cfg.num_layers, "filter_auto": sampling.filter_method("auto"),
             "decode_attention": cfg.decode_attention_impl, "batch_1_as_2": cfg.decodes_as_gemm}

    def measure(batch, sampler=sampling.TopP(TOP_P), runs=2, param_dtype=dtype, overrides=None):
        overrides, options = _compiler_options(overrides or {})
        constants = {k: int(overrides.pop(k)) for k in list(overrides) if k.split(".")[0] in CONSTANT_MODULES}
        with _kernel_constants(constants), _decode_options(options):
            return _measure(batch, sampler, runs, param_dtype, overrides,
                            {**constants, **{f"xla.{k}": v for k, v in options.items()}})

    def _measure(batch, sampler, runs, param_dtype, overrides, constants):
        model = model_for(param_dtype, overrides)

        def call(seed):
            t0 = time.perf_counter()
            g = sampling.generate(model, [tokens] * batch, np.tile(timbre, (batch, 1)), sampler=sampler, seed=seed,
                                  max_rows=rows)
            assert (g.num_rows == rows).all(), g.num_rows  # random weights run the whole window
            return time.perf_counter() - t0

        first = call(0)
        times = [call(1 + i) for i in range(runs)]
        s = min(times or [first])
        overrides = {**overrides, **constants}
        return {"batch": batch, "sampler": repr(sampler), "dtype": param_dtype, "overrides": overrides,
                "first_call_s": first, "times_s": times, "s_per_call": s, "ms_per_clip": 1e3 * s / batch,
                "clips_per_s": batch / s, "ms_per_step": 1e3 * s / rows, "device_peak_gb": _device_peak_gb(device)}

    return setup, measure


@contextlib.contextmanager
def _kernel_constants(constants: dict):
    """Module constants of the Pallas kernels ("gemv.BLOCK_N": 2, ...) set inside, with JAX's and the
    decode loop's compile caches cleared on the way in and out (no cache key holds them)."""
    if not constants:
        yield
        return
    import importlib

    import jax

    from tokensynth_jax.inference import sampling

    targets = {}
    for key in constants:
        module, _, name = key.partition(".")
        targets[key] = (importlib.import_module(f"tokensynth_jax.model.{module}"), name)
        if not hasattr(*targets[key]):
            raise ValueError(f"tokensynth_jax.model.{module} has no constant {name}")
    saved = {key: getattr(*targets[key]) for key in constants}
    try:
        for key, value in constants.items():
            setattr(*targets[key], value)
        jax.clear_caches()
        sampling._decode_jits.clear()
        yield
    finally:
        for key, value in saved.items():
            setattr(*targets[key], value)
        jax.clear_caches()
        sampling._decode_jits.clear()


@contextlib.contextmanager
def _decode_options(options: dict):
    """XLA options added to the decode loop's compile inside (`sampling.decode_compile_options`)."""
    if not options:
        yield
        return
    from tokensynth_jax.inference import sampling

    plain = sampling.decode_compile_options
    sampling.decode_compile_options = lambda cfg: {**plain(cfg), **options}
    try:
        yield
    finally:
        sampling.decode_compile_options = plain


def part_ours_decode(section: Section) -> None:
    from tokensynth_jax.inference import sampling

    _jax_setup(section)
    setup, measure = _decode_measurer(section)
    section.emit({"item": "setup", **setup})
    for b in section.size["decode_batches"]:
        section.attempt(f"decode {b}", lambda: measure(b, runs=3 if b == 1 else 2 if b < 256 else 1), min_left_s=20.0)
    # Then, while time is left: the decode knobs (DECODE_VARIANTS, or --decode-variant) at batch 1
    # and the largest batch, the goals' rows; the top-p filter method against its `auto` choice,
    # greedy (what sampling costs), fp32 parameters.
    largest = section.size["decode_batches"][-1]
    variants = dict(_parse_variant(v) for v in section.args.decode_variant) or DECODE_VARIANTS
    batches = lambda extra: (1,) if section.args.quick else tuple(  # --quick: a smoke test of each row
        int(b) for b in np.atleast_1d(extra.get("batch", (1, largest))))
    extras = [(f"decode {b}, {name}", b, {"overrides": {k: v for k, v in extra.items() if k != "batch"}})
              for name, extra in variants.items() for b in batches(extra)]
    other = "sort" if setup["filter_auto"] == "bisect" else "bisect"
    extras += [(f"decode {b}, top-p by {other}", b, {"sampler": sampling.TopP(TOP_P, method=other)})
               for b in (1, largest)]
    extras.append(("decode 1, greedy", 1, {"sampler": sampling.Greedy()}))
    if setup["dtype"] != "float32":
        extras.append(("decode 1, fp32 parameters", 1, {"param_dtype": "float32"}))
    for item, b, kw in extras:
        section.attempt(item, lambda b=b, kw=kw: measure(b, runs=1, **kw), min_left_s=30.0)


def _trace(section: Section, name: str, fn) -> dict:
    """Runs fn() under the JAX profiler; keeps the Perfetto trace as OUT/profile-<name>.json.gz and
    returns where the device's time went: per GPU line, the busiest kernels (total ms, calls)."""
    import glob
    import gzip
    import shutil
    import tempfile
    from collections import Counter

    import jax

    folder = tempfile.mkdtemp()
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        fn()
    path = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    shutil.copy(path, os.path.join(section.args.out, f"profile-{name}.json.gz"))
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "thread_name"}
    lines = {}
    for e in events:
        if e.get("ph") != "X" or "device" not in processes.get(e["pid"], "").lower():
            continue
        line = f"{processes[e['pid']]} / {threads.get((e['pid'], e.get('tid')), e.get('tid'))}"
        total, calls, span = lines.setdefault(line, (Counter(), Counter(), [float("inf"), 0.0]))
        total[e["name"]] += e["dur"] / 1e3
        calls[e["name"]] += 1
        span[0], span[1] = min(span[0], e["ts"]), max(span[1], e["ts"] + e["dur"])
    return {line: {"busy_ms": sum(total.values()), "span_ms": (span[1] - span[0]) / 1e3, "events": sum(calls.values()),
                   "top": [[n, round(t, 3), calls[n]] for n, t in total.most_common(40)]}
            for line, (total, calls, span) in lines.items()}


def part_profile(section: Section) -> None:
    """Where decode calls (PROFILE_DECODE's batches and overrides) and a train step (batch 32, the
    overrides PROFILE_TRAIN) spend the device's time."""
    _jax_setup(section)
    _, measure = _decode_measurer(section)
    for i, (batch, overrides) in enumerate(PROFILE_DECODE):
        name = f"decode{batch}" + (f"-{i}" if overrides else "")  # OUT/profile-<name>.json.gz

        def decode(batch=batch, overrides=overrides, name=name):
            measured = measure(batch, runs=1, overrides=overrides)
            return {"overrides": overrides, "s_per_call": measured["s_per_call"],
                    "lines": _trace(section, name, lambda: measure(batch, runs=0, overrides=overrides))}

        section.attempt(f"profile {name}" if overrides else f"profile decode {batch}", decode, min_left_s=30.0)
    _, measure_train, release = _train_measurer(section, PROFILE_TRAIN)
    b = section.size["variant_batch"]

    def train():
        measured = measure_train(b)  # compiles, warms up and times, as the other sections do
        return {"overrides": PROFILE_TRAIN, "s_per_step": measured["s_per_step"], "steps": 2,
                "lines": _trace(section, "train", lambda: measure_train.again(2))}

    section.attempt(f"profile train {b}", train, min_left_s=60.0)
    release()


def part_kernels(section: Section) -> None:
    """The decode step's Pallas kernels alone (benchmarks/kernels.py), most telling first: a step's
    attention both ways (ATTENTION_CASES), the gemv tilings of GEMV_FIRST over every weight stage,
    the decode attention's tilings (ATTENTION_VARIANTS, both kernels), the other gemv tilings."""
    import kernels

    _jax_setup(section)
    quick = section.args.quick
    # --quick (Pallas interpret mode): shapes / 8, no more weights than a step's, best of 2 calls
    timing = {"reps": 2} if quick else {}
    gemv_sizes = {"shrink": 8, "min_bytes": 0} if quick else {}
    cases = ((2, 128, 70), (8, 128, 70)) if quick else kernels.ATTENTION_CASES

    def gemv(name):
        constants = dict(kernels.GEMV_VARIANTS[name])
        xla = bool(constants.pop("xla", 0))

        def run():
            with _kernel_constants(constants):
                stages = [kernels.time_gemv_stage(s, xla=xla, **timing, **gemv_sizes) for s in kernels.STAGES]
            layer = sum(r["us"] for r in stages if r["stage"] != "head")
            return {"constants": constants, "xla": xla, "us_a_layer": layer, "stages": stages}

        section.attempt(f"gemv, {name}", run, min_left_s=15.0)

    def attention(name, constants):
        for batch, slots, slot in cases:
            for fused in (False, True):
                what = "fused step kernel" if fused else "library kernel + XLA's cache update"

                def run(b=batch, n=slots, s=slot, f=fused):
                    with _kernel_constants(constants):
                        return {"constants": constants, **kernels.time_attention(b, n, s, fused=f, **timing)}

                section.attempt(f"attention, batch {batch}, {what}" + (f", {name}" if constants else ""), run,
                                min_left_s=15.0)

    attention("defaults", {})
    for name in kernels.GEMV_FIRST:
        gemv(name)
    for name, constants in kernels.ATTENTION_VARIANTS.items():
        attention(name, constants)
    for name in kernels.GEMV_VARIANTS:
        if name not in kernels.GEMV_FIRST:
            gemv(name)


def part_ref_decode(section: Section) -> None:
    import torch
    from generation import load_reference_model_module

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    section.emit({"item": "device", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  "torch": torch.__version__})
    ref = load_reference_model_module()
    torch.manual_seed(0)
    model = ref.TokenSynth(device=device)
    if section.size["layers"]:
        model.blocks = torch.nn.Sequential(*list(model.blocks)[: section.size["layers"]])
    clap = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 512)).astype(np.float32)).to(device)
    midi = _bench_midi(section)

    def run(seed):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.synthesize(clap, midi, top_p=TOP_P)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, int(out.shape[1])

    def measure():
        first, frames = run(0)
        times = [run(1 + i)[0] for i in range(section.size["ref_runs"])]
        s = min(times)
        return {"batch": 1, "first_call_s": first, "times_s": times, "ms_per_clip": 1e3 * s, "clips_per_s": 1 / s,
                "frames": frames}

    section.attempt("decode 1", measure, min_left_s=15.0)


PARTS = {"ours-train": part_ours_train, "torch-train": part_torch_train, "ours-decode": part_ours_decode,
         "ref-decode": part_ref_decode, "kernels": part_kernels, "train-variants": part_train_variants,
         "profile": part_profile}


# --- the driver --------------------------------------------------------------------------------------
def run_section(name: str, args, timeout: float) -> str:
    """Runs one section in its own process group for at most `timeout` s; returns its status."""
    log = os.path.join(args.out, f"{name}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--out", args.out,
           "--deadline", str(time.time() + timeout - 5), "--decode-dtype", args.decode_dtype]
    cmd += ["--quick"] * args.quick + ["--train-best"] * args.train_best + [f"--ours-set={kv}" for kv in args.ours_set]
    cmd += [f"--train-variant={v}" for v in args.train_variant] + [f"--decode-variant={v}" for v in args.decode_variant]
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)  # one real device, not fake CPU devices
    flags = args.xla_flags
    if name == "profile":  # the optimized HLO, to name the profile's kernels: OUT/hlo/*after_optimizations*
        flags += f" --xla_dump_to={os.path.join(args.out, 'hlo')} --xla_dump_hlo_as_text"
    if flags.strip():
        env["XLA_FLAGS"] = flags.strip()
    print(f"[{time.strftime('%H:%M:%S')}] {name}: up to {timeout:.0f} s, log {log}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"stopped at its time limit ({timeout:.0f} s)"
    if name == "profile":
        _keep_optimized_hlo(os.path.join(args.out, "hlo"))
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {status} after {time.perf_counter() - t0:.0f} s", flush=True)
    if status != "ok":
        with open(log) as f:
            print("".join(f.readlines()[-15:]), flush=True)
    return status


def _keep_optimized_hlo(folder: str) -> None:
    """Of XLA's dump (every module, LLVM IR, PTX, buffer assignments: thousands of files), keeps
    the optimized HLO text of the decode loop and the train step."""
    import re
    import shutil

    keep = re.compile(r"(decode|train_step).*_after_optimizations\.txt$")
    for entry in os.listdir(folder) if os.path.isdir(folder) else ():
        path = os.path.join(folder, entry)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif not keep.search(entry):
            os.remove(path)


def read_records(out: str, name: str) -> dict:
    path = os.path.join(out, f"{name}.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {r["item"]: r for r in map(json.loads, f)}


def _cell(rec, fmt) -> str:
    if rec is None:
        return "not measured"
    if "error" in rec:
        return "failed: " + rec["error"][:80]
    if "skipped" in rec:
        return "skipped: " + rec["skipped"]
    return fmt(rec)


def _peak(device_name) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in (device_name or "")), None)


def build_table(results: dict, quick: bool) -> tuple[str, list[str]]:
    """The one markdown table, and the goal lines."""
    get = lambda section, item: results.get(section, {}).get("records", {}).get(item)
    ours_model = get("ours-train", "model") or {}
    flops_tok = (ours_model or get("train-variants", "model") or {}).get("flops_per_token")
    sizes = SIZES[quick]
    g = lambda x: "-" if x is None else f"{x:.1f} GB"
    k = lambda x: f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"

    def mfu(rec, section):
        peak = _peak((get(section, "device") or {}).get("device"))
        return f"{rec['tokens_per_s'] * flops_tok / peak:.1%}" if peak and flops_tok else "n/a"

    rows, goals = [], []
    best = {"ours": 0.0, "torch": 0.0}
    for b in sizes["train_batches"]:
        o, t = get("ours-train", f"train {b}"), get("torch-train", f"train {b}")
        ok = lambda r: r is not None and "tokens_per_s" in r
        for who, r in (("ours", o), ("torch", t)):
            if ok(r):
                best[who] = max(best[who], r["tokens_per_s"])
        chosen = ", ".join(f"{key}={value}" for key, value in (ours_model.get("overrides") or {}).items())
        rows.append([f"train, batch {b} x {sizes['seq_len']}: tokens/s" + (f" (ours with {chosen})" if chosen else ""),
                     _cell(o, lambda r: k(r["tokens_per_s"])), _cell(o, lambda r: mfu(r, "ours-train")) if ok(o) else "-",
                     _cell(o, lambda r: g(r["memory_gb"])) if ok(o) else "-",
                     _cell(t, lambda r: k(r["tokens_per_s"])), _cell(t, lambda r: mfu(r, "torch-train")) if ok(t) else "-",
                     _cell(t, lambda r: g(r["memory_gb"])) if ok(t) else "-",
                     f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}x" if ok(o) and ok(t) else "-"])
    ref = get("ref-decode", "decode 1")
    ref_ok = ref is not None and "ms_per_clip" in ref
    for b in sizes["decode_batches"]:
        o = get("ours-decode", f"decode {b}")
        ok = o is not None and "ms_per_clip" in o
        if b == 1:
            what, mine, theirs = "decode, batch 1: ms per 5 s clip", _cell(o, lambda r: f"{r['ms_per_clip']:.0f}"), \
                _cell(ref, lambda r: f"{r['ms_per_clip']:.0f}")
            ratio = f"{ref['ms_per_clip'] / o['ms_per_clip']:.1f}x faster" if ok and ref_ok else "-"
        else:
            what, mine = f"decode, batch {b}: clips/s", _cell(o, lambda r: f"{r['clips_per_s']:.1f}")
            theirs = _cell(ref, lambda r: f"{r['clips_per_s']:.2f} (one at a time)")
            ratio = f"{o['clips_per_s'] / ref['clips_per_s']:.0f}x" if ok and ref_ok else "-"
        peak = o.get("device_peak_gb") if ok else None
        rows.append([what, mine, "-", "-" if peak is None else f"{peak:.1f} GB (device peak)", theirs, "-", "-", ratio])
    for item in results.get("train-variants", {}).get("records", {}):
        if "," in item:
            o = get("train-variants", item)
            ok = "tokens_per_s" in (o or {})
            t = get("torch-train", f"train {o['batch']}") if ok else None  # the reference at the same batch
            ratio = f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}x" if t and "tokens_per_s" in t else "-"
            rows.append([f"ours, {item}: tokens/s", _cell(o, lambda r: k(r["tokens_per_s"])),
                         mfu(o, "train-variants") if ok else "-", g(o["memory_gb"]) if ok else "-",
                         "-", "-", "-", ratio])
    for item in results.get("ours-decode", {}).get("records", {}):
        if "," in item:  # the extras
            o = get("ours-decode", item)
            peak = (o or {}).get("device_peak_gb")
            rows.append([f"ours, {item}", _cell(o, lambda r: f"{r['ms_per_clip']:.0f} ms per clip, "
                                                      f"{r['clips_per_s']:.1f} clips/s"), "-",
                         "-" if peak is None else f"{peak:.1f} GB (device peak)", "-", "-", "-", "-"])
    for item, o in results.get("kernels", {}).get("records", {}).items():
        if item.startswith("gemv, "):
            cell = _cell(o, lambda r: f"{r['us_a_layer']:.1f} us a layer; GB/s " + ", ".join(
                f"{s['stage']} {s['gb_s']:.2f}" for s in r["stages"]))
        elif item.startswith("attention, "):
            cell = _cell(o, lambda r: f"{r['us']:.1f} us a layer, {r['gb_s']:.2f} GB/s of cache")
        else:
            continue
        rows.append([f"ours, kernels: {item}", cell, "-", "-", "-", "-", "-", "-"])
    table = _common.md_table(["", "ours", "ours MFU", "ours memory", "reference (PyTorch)", "reference MFU",
                              "reference memory", "ours / reference"], rows)
    o1, o256 = get("ours-decode", "decode 1"), get("ours-decode", f"decode {sizes['decode_batches'][-1]}")
    largest = sizes["train_batches"][-1]
    b64 = get("ours-train", f"train {largest}") or next(  # else a defaults row of train-variants at that batch
        (r for r in results.get("train-variants", {}).get("records", {}).values()
         if r.get("batch") == largest and r.get("overrides") == {}), None)
    verdict = lambda ok: "PASS" if ok else "FAIL"
    if best["ours"] and best["torch"]:
        goals.append(f"train, best batch: {best['ours'] / best['torch']:.2f}x the reference (goal >= "
                     f"{GOALS['train_ratio']}x): {verdict(best['ours'] >= GOALS['train_ratio'] * best['torch'])}")
    remat = (ours_model or get("train-variants", "model") or {}).get("config", {}).get("remat")
    fits = "not measured" if b64 is None or "skipped" in b64 else verdict("tokens_per_s" in b64)
    goals.append(f"train batch {sizes['train_batches'][-1]} x {sizes['seq_len']} fits (remat={remat}): {fits}")
    if o1 and "ms_per_clip" in o1:
        goals.append(f"decode batch 1: {o1['ms_per_clip']:.0f} ms per clip (goal <= {GOALS['decode1_ms']:.0f}): "
                     f"{verdict(o1['ms_per_clip'] <= GOALS['decode1_ms'])}")
    if o256 and "clips_per_s" in o256:
        goals.append(f"decode batch {sizes['decode_batches'][-1]}: {o256['clips_per_s']:.0f} clips/s (goal >= "
                     f"{GOALS['decode256_clips_s']:.0f}): {verdict(o256['clips_per_s'] >= GOALS['decode256_clips_s'])}")
    if quick:
        goals = [g_ + " (quick sizes: not the goal's measurement)" for g_ in goals]
    return table, goals


def write_outputs(args, results: dict, started: str) -> str:
    table, goals = build_table(results, args.quick)
    devices = {s: (r["records"].get("device") or {}).get("device") for s, r in results.items()}
    status = "; ".join(f"{s}: {r['status']} ({r['wall_s']:.0f} of {r['timeout_s']:.0f} s)" for s, r in results.items())
    decode = results.get("ours-decode", {}).get("records", {}).get("setup") or {}
    md = "\n".join([
        f"Command: `{args.command}`  ",
        f"Decoding: ours {decode.get('rows', '?')} rows a clip ({decode.get('dtype', '?')} parameters, top-p {TOP_P}), "
        f"the reference its 450 steps; ours per clip = one call's time / batch.  ",
        f"Started {started}; devices: {', '.join(sorted({d for d in devices.values() if d}))}; "
        f"versions: {', '.join(f'{k} {v}' for k, v in args.versions.items())}  ",
        f"Sections: {status}", "", table, "", *[f"- {line}" for line in goals], "",
    ])
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"command": args.command, "started": started, "versions": args.versions, "sections": results}, f,
                  indent=2)
    return md


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "tokensynth"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "missing"
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="accel", help="folder for results.json, results.md, logs and partial results")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test that runs on a CPU")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all sections together")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset, in this order")
    parser.add_argument("--share", action="append", default=[], metavar="SECTION=WEIGHT",
                        help=f"a section's share of the budget instead of its default (SECTIONS: {SECTIONS})")
    parser.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for ours, e.g. model.remat=True (repeatable)")
    parser.add_argument("--train-variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="train-variants measures these instead of TRAIN_VARIANTS (repeatable), "
                             "e.g. dots-whole:model.remat=dots,model.loss_chunk=0")
    parser.add_argument("--train-best", action="store_true",
                        help="ours-train measures with the fastest train variant's overrides (train-variants first, "
                             "same --out)")
    parser.add_argument("--decode-variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="ours-decode measures these at batch 1 and 256 instead of DECODE_VARIANTS (repeatable), "
                             "e.g. pallas:model.decode_attention=pallas_gpu")
    parser.add_argument("--xla-flags", default="", help="XLA_FLAGS for every section of ours (an XLA option to try)")
    parser.add_argument("--decode-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="parameters of ours when decoding (auto: bfloat16 on an accelerator, float32 on CPU)")
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out = os.path.abspath(args.out)  # the sections run from the repository root
    os.makedirs(args.out, exist_ok=True)
    if args.part:
        section = Section(args)
        open(section.path, "w").close()
        PARTS[args.part](section)
        return 0

    args.command = "python benchmarks/accelerator.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.versions = versions()
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    names = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    shares = dict(SECTIONS)
    for text in args.share:
        name, _, weight = text.partition("=")
        try:
            shares[name] = float(weight)
        except ValueError:
            parser.error(f"--share {text!r}: expected SECTION=WEIGHT, e.g. train-variants=0.4")
        if name not in SECTIONS or shares[name] <= 0:
            parser.error(f"--share {text!r}: a section of {list(SECTIONS)} and a positive weight")
    t_start, results = time.perf_counter(), {}
    for i, name in enumerate(names):
        left = args.budget - (time.perf_counter() - t_start)
        timeout = left * shares[name] / sum(shares[n] for n in names[i:])  # unused time flows on
        t0 = time.perf_counter()
        status = run_section(name, args, timeout) if timeout >= MIN_SECTION_S else "not run (time budget spent)"
        results[name] = {"status": status, "timeout_s": timeout, "wall_s": time.perf_counter() - t0,
                         "records": read_records(args.out, name)}
        md = write_outputs(args, results, started)
    print("\n" + md)
    print(f"wrote {os.path.join(args.out, 'results.md')} and results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
