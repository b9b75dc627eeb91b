"""The train step compiled for an H100 on a host without a GPU: XLA's optimized GPU program, read.

On a lent GPU the profile says where a step's time goes; between lends this says, from any CPU
host, what XLA makes of a variant: how many kernels, how many of them transpose (the batch-minor
residual stream that cost ~16 ms of a 105 ms step on the H100, 2026-11-27), the bytes XLA's cost
model counts outside cuBLAS/cuDNN calls, and the memory it plans. It times nothing: autotuning
needs the GPU, so every GEMM is a default Triton tiling here and only counts, not speed, compare.

Deviceless compilation goes through the CUDA PJRT plugin with a GPU target description
(`jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)`); the model
follows it through `config.compiling_for("cuda")`, so the "auto" choices are a GPU's. The plugin
and its compiler (ptxas, cuDNN) come with `jax[cuda13]`, about 4.6 GB, in a Python >= 3.12
environment of its own (jax 0.11):

    python3.12 -m venv /tmp/gpuaot && /tmp/gpuaot/bin/pip install 'jax[cuda13]==0.11.2' flax optax \\
        orbax-checkpoint ml_collections
    CUDA_VISIBLE_DEVICES= JAX_PLATFORMS=cpu XLA_FLAGS=--xla_gpu_autotune_level=0 \\
        /tmp/gpuaot/bin/python benchmarks/gpu_aot.py --out /tmp/gpu_aot [--variant NAME=model.F=V,...]

`--decode` compiles the generation loop instead (5 s windows, top-p, bf16 parameters) at batch
1 and 256 for the defaults and accelerator.py's DECODE_VARIANTS: a kernel that does not compile for
the H100 (a Pallas kernel through Triton's lowering and XLA's GPU compiler) fails here, not in a lent GPU's minutes, and the
decode step's kernel count (the `while` body's) is the launches a step costs.

Each variant's numbers go to OUT/results.jsonl as it finishes (its HLO to OUT/NAME.hlo.txt), and
the table to stdout. Results: docs/benchmarks.md, "Between lends: the train step compiled for an
H100 on this CPU host".
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: F401  (our packages importable from a bare checkout)

# An H100 80GB HBM3 (SXM) as XLA's GpuTargetConfigProto describes it.
H100 = """gpu_device_info { threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535 memory_bandwidth: 3352320000000
l2_cache_size: 52428800 clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536 }
platform_name: "CUDA" dnn_version_info { major: 9 minor: 10 } runtime_version { major: 13 minor: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
VARIANTS = {  # name -> config overrides on top of the reference model in bf16 (the accelerator benchmark's)
    "defaults": {},
    "row_major": {"model.residual_layout": "row_major"},
    "gelu_recompute": {"model.gelu_grad": "recompute"},
    "row_major+gelu_recompute": {"model.residual_layout": "row_major", "model.gelu_grad": "recompute"},
}
GB = 1e9
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64)\[([\d,]*)\](?:\{([\d,]*)[^}]*\})?")


def _arrays(type_text: str):
    """(dims, minor-to-major layout or None, bytes) of each array in an HLO instruction's type."""
    for dtype, dims, layout in _ARRAY.findall(type_text):
        shape = [int(d) for d in dims.split(",") if d]
        minor = [int(d) for d in layout.split(",") if d] if layout else None
        yield shape, minor, _DTYPE_BYTES[dtype] * math.prod(shape)


def _computations(text: str) -> dict[str, list[str]]:
    """An HLO module's instruction lines, by computation name."""
    computations, current = collections.defaultdict(list), None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s", line)
            current = head.group(1) if head and line.rstrip().endswith("{") else None
        elif current and "=" in line:
            computations[current].append(line.strip())
    return computations


def _op(line: str) -> str:
    """The opcode of an HLO instruction line."""
    found = re.search(r"\)?\s([\w\-]+)\(", line.split("=", 1)[1])
    return found.group(1) if found else ""


def hlo_counts(text: str, batch: int) -> dict:
    """Kernel-level counts of an optimized HLO module: the instructions of the computations that are
    not fusion bodies or reducers (each fusion, copy or custom-call there is a kernel or a library call)."""
    computations = _computations(text)
    bodies = set(re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", text))
    kernels = [i for name, lines in computations.items() if name not in bodies for i in lines]

    def out_type(line):
        return line.split("=", 1)[1].split(" " + _op(line) + "(")[0]

    fusions = [i for i in kernels if _op(i) == "fusion"]
    transposing = [i for i in fusions if "transpose" in i.split("=", 1)[0]]
    batch_minor = [i for i in kernels if _op(i) not in ("parameter", "get-tuple-element", "tuple", "bitcast")
                   and any(m and len(s) >= 3 and s[m[0]] == batch for s, m, _ in _arrays(out_type(i)))]
    calls = collections.Counter(re.search(r'custom_call_target="([^"]+)"', i).group(1)
                                for i in kernels if _op(i) == "custom-call" and "custom_call_target" in i)
    size = lambda items: sum(b for i in items for _, _, b in _arrays(out_type(i))) / GB
    return {"fusions": len(fusions), "transposing_fusions": len(transposing), "transposing_gb": size(transposing),
            "batch_minor_outputs": len(batch_minor), "batch_minor_gb": size(batch_minor),
            "library_calls": dict(sorted(calls.items()))}


def loop_kernels(text: str) -> int:
    """Kernels of the largest `while` body of an optimized HLO module: what one decode step launches
    (each fusion, library call, copy or in-place update; not parameters, tuples and bitcasts)."""
    computations = _computations(text)
    free = {"", "parameter", "get-tuple-element", "tuple", "bitcast", "constant"}
    return max((sum(1 for i in computations.get(b, []) if _op(i) not in free)
                for b in re.findall(r"\bbody=%([\w.\-]+)", text)), default=0)


def compile_variant(name: str, overrides: dict, devices, batch: int, seq: int, out: str) -> dict:
    import jax
    from flax import nnx
    from jax._src import xla_bridge
    from jax._src.lib import _jax

    from tokensynth_jax import sharding
    from tokensynth_jax.config import ModelConfig, compiling_for, load_config_file
    from tokensynth_jax.model import attention
    from tokensynth_jax.model.transformer import TokenSynth
    from tokensynth_jax.training import optim
    from tokensynth_jax.training import train_step as ts

    config = load_config_file("reference", {"model.dtype": "bfloat16", "data.global_batch": batch,
                                            "data.seq_len": seq, **overrides})
    with compiling_for("cuda"):
        cfg = ModelConfig.from_dict(config.model.to_dict())
        mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
        oc = optim.OptimConfig.from_dict(config.optim.to_dict())
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: (m := TokenSynth(cfg, rngs=nnx.Rngs(0)),
                                                               optim.optimizer_for(m, oc))))
        shardings = sharding.state_shardings(abstract, mesh)
        state = jax.tree.map(lambda s, v: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
                             shardings, abstract)
        batch_shardings = ts.batch_shardings(mesh)
        step = ts.jit_train_step(graphdef, shardings, batch_shardings, null_rate=config.train.null_rate,
                                 grad_accum=config.train.grad_accum)
        start = time.perf_counter()
        with jax.set_mesh(mesh):
            compiled = step.lower(state, ts.abstract_batch(cfg, batch, seq, batch_shardings),
                                  jax.ShapeDtypeStruct((2,), jax.numpy.uint32)).compile()
        seconds = time.perf_counter() - start
        resolved = {"attention": attention.resolve(cfg.attention_impl, cfg.dtype), "residual_layout": cfg.residual_layout_impl,
                    "gelu_grad": cfg.gelu_grad_impl, "dropout_rng": cfg.dropout_rng_impl,
                    "scans_layers": cfg.scans_layers}
    text = compiled.as_text()
    with open(os.path.join(out, f"{name}.hlo.txt"), "w") as f:
        f.write(text)
    memory = compiled.memory_analysis()
    # The compile-only executable has no cost analysis of its own: XLA's generic one over the same
    # optimized module, which counts nothing inside cuBLAS / cuDNN calls.
    cost = _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), compiled.runtime_executable().hlo_modules()[0])
    return {"variant": name, "overrides": overrides, "resolved": resolved, "batch": batch, "seq": seq,
            "compile_s": round(seconds, 1), "argument_gb": memory.argument_size_in_bytes / GB,
            "temp_gb": memory.temp_size_in_bytes / GB, "bytes_accessed_gb": cost.get("bytes accessed", 0) / GB,
            "host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,
            **hlo_counts(text, batch)}


def compile_decode(name: str, overrides: dict, devices, batch: int, rows: int, out: str) -> dict:
    """The generation loop of `sampling.generate` at `batch` (bf16 parameters, top-p 0.9, `rows` audio
    rows), compiled for `devices`; "gemv.NAME" keys set the Pallas kernels' module constants."""
    import importlib

    import jax
    from accelerator import TOP_P, _bench_midi
    from flax import nnx

    from tokensynth_jax.config import ModelConfig, compiling_for, load_config_file
    from tokensynth_jax.inference import sampling
    from tokensynth_jax.model.transformer import TokenSynth
    from tokensynth_jax.tokens.midi_tokens import tokenize_midi

    constants = {k: int(v) for k, v in overrides.items() if k.startswith("gemv.")}
    model_overrides = {k: v for k, v in overrides.items() if k.startswith("model.")}
    gemv = importlib.import_module("tokensynth_jax.model.gemv")
    saved = {k: getattr(gemv, k.split(".", 1)[1]) for k in constants}
    config = load_config_file("reference", {"model.dtype": "float32", **model_overrides})
    tokens = tokenize_midi(_bench_midi(argparse.Namespace(args=argparse.Namespace(out=out)))).tokens
    mesh = jax.sharding.Mesh(devices[:1], ("d",))
    place = lambda x: (jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec())) if hasattr(x, "shape") and hasattr(x, "dtype") else x)
    try:
        for k, v in constants.items():
            setattr(gemv, k.split(".", 1)[1], v)
        jax.clear_caches()  # no cache key holds the module constants
        sampling._decode_jits.clear()
        with compiling_for("cuda"):
            cfg = ModelConfig.from_dict(config.model.to_dict())
            model = TokenSynth(cfg, rngs=nnx.Rngs(0))  # on this host's CPU; only shapes go to the compile
            args, static = sampling._decode_args(
                model, [tokens] * batch, np.zeros((batch, cfg.timbre_dim), np.float32), sampler=sampling.TopP(TOP_P),
                seed=0, max_rows=rows, guidance=None, unconditional_model=None, dtype="bfloat16")
            args = jax.tree.map(place, args)
            start = time.perf_counter()
            with jax.set_mesh(mesh):  # Pallas' Triton lowering asks the mesh's device for its architecture
                compiled = sampling._decode_jit_for(cfg).lower(*args, **static).compile()
            seconds = time.perf_counter() - start
            resolved = {"decode_attention": cfg.decode_attention_impl, "decode_gemm": cfg.decode_gemm_impl,
                        "batch_1_as_2": cfg.decodes_as_gemm}
    finally:
        for k, v in saved.items():
            setattr(gemv, k.split(".", 1)[1], v)
        jax.clear_caches()
        sampling._decode_jits.clear()
    text = compiled.as_text()
    with open(os.path.join(out, re.sub(r"\W+", "_", f"{name}-b{batch}") + ".hlo.txt"), "w") as f:
        f.write(text)
    memory = compiled.memory_analysis()
    return {"variant": name, "overrides": overrides, "resolved": resolved, "batch": batch, "rows": rows,
            "compile_s": round(seconds, 1), "argument_gb": memory.argument_size_in_bytes / GB,
            "temp_gb": memory.temp_size_in_bytes / GB, "kernels_per_step": loop_kernels(text),
            "host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,
            **{k: v for k, v in hlo_counts(text, batch).items() if k in ("fusions", "library_calls")}}


def decode_table(rows: list[dict]) -> str:
    lines = ["| variant | batch | compile s | temp GB | kernels a step | fusions in all | library calls |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        calls = ", ".join(f"{k} {v}" for k, v in r["library_calls"].items())
        lines.append(f"| {r['variant']} | {r['batch']} | {r['compile_s']:.0f} | {r['temp_gb']:.2f} | "
                     f"{r['kernels_per_step']} | {r['fusions']} | {calls} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = [("| variant | compile s | temp GB | arguments GB | bytes accessed GB (outside library calls) | fusions "
              "| transposing fusions (n / GB written) | batch-minor outputs (n / GB) | library calls |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        calls = ", ".join(f"{k} {v}" for k, v in r["library_calls"].items())
        lines.append(f"| {r['variant']} | {r['compile_s']:.0f} | {r['temp_gb']:.2f} | {r['argument_gb']:.2f} | "
                     f"{r['bytes_accessed_gb']:.1f} | {r['fusions']} | {r['transposing_fusions']} / "
                     f"{r['transposing_gb']:.2f} | {r['batch_minor_outputs']} / {r['batch_minor_gb']:.2f} | {calls} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for results.jsonl and each variant's HLO")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--variant", action="append", default=[], metavar="NAME=model.F=V,...",
                   help="compile these instead of VARIANTS (NAME= alone: the defaults)")
    p.add_argument("--decode", action="store_true", help="the generation loop, with DECODE_VARIANTS")
    p.add_argument("--rows", type=int, default=449, help="audio rows of a decode (449: a 5 s window)")
    args = p.parse_args(argv)
    import jax
    from jax.experimental import topologies

    if jax.default_backend() != "cpu":
        p.error("run it where JAX's backend is the CPU (JAX_PLATFORMS=cpu): it compiles for an H100 it does not have")
    variants = VARIANTS
    if args.decode:
        from accelerator import DECODE_VARIANTS

        # XLA's options (the "xla." keys) change the runtime, not the program: those rows are left out.
        variants = {"defaults": {"batch": (1, 256)}, **{
            name: spec for name, spec in DECODE_VARIANTS.items() if not any(k.startswith("xla.") for k in spec)}}
    if args.variant:
        variants = {}
        for spec in args.variant:
            name, _, rest = spec.partition("=")
            variants[name] = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    devices = list(topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=H100).devices)
    os.makedirs(args.out, exist_ok=True)
    jobs = []
    for name, overrides in variants.items():
        if not args.decode:
            jobs.append((name, lambda n=name, o=overrides: compile_variant(n, o, devices, args.batch, args.seq, args.out)))
            continue
        spec = {k: v for k, v in overrides.items() if k != "batch"}
        for b in np.atleast_1d(overrides.get("batch", (1, 256))):
            jobs.append((f"{name}, batch {b}", lambda n=name, o=spec, b=int(b): compile_decode(
                n, o, devices, b, args.rows, args.out)))
    rows = []
    for name, job in jobs:
        try:
            rows.append(job())
        except Exception as e:  # noqa: BLE001  (one variant's failure, a kernel that does not lower, costs only its row)
            print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            continue
        with open(os.path.join(args.out, "results.jsonl"), "a") as f:
            f.write(json.dumps({**rows[-1], "device": devices[0].device_kind, "jax": jax.__version__,
                                "xla_flags": os.environ.get("XLA_FLAGS", "")}) + "\n")
        print(f"{name}: compiled in {rows[-1]['compile_s']:.0f} s", flush=True)
    if args.decode:
        print(f"\n{devices[0].device_kind}, decode of {args.rows} rows, bf16 parameters, jax {jax.__version__}\n")
        print(decode_table(rows))
    else:
        print(f"\n{devices[0].device_kind}, batch {args.batch} x {args.seq}, bf16 compute, jax {jax.__version__}\n")
        print(table(rows))
    print(f"\nDevice memory is XLA's plan (temporaries + arguments); this host's peak RSS: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB:.1f} GB")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
