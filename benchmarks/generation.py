"""Generation speed and memory: the reference `tokensynth` 0.0.4 (PyTorch) against ours (JAX).

Both run the reference's model size (12 x 1024, 175M parameters, fp32) with the same seeded random
weights, the same 5 s MIDI file and the same timbre embedding, top-p 0.9 sampling. Random weights
never produce the end row, so every clip runs the full 5 s window (the reference's 450 steps; we
keep the same 449 rows it keeps). The attention pattern is causal on both sides: the weights are
converted to ours with `convert.from_official(..., attention="causal")` and written back with
`convert.to_official`, whose causal mask buffers the reference then loads (its own default buffer
computes inverted attention, see convert.py; the cost is the same either way).

Each part runs in its own subprocess, so the peak RSS of each is its own:
  prep  builds the reference model (torch.manual_seed), converts its weights both ways, writes the
        MIDI file, the timbre embedding and the weights to a scratch directory;
  ref   `TokenSynth.synthesize(clap, midi_path, top_p=0.9)`, batch 1 (it cannot batch);
  ours  `sampling.generate` at batch 1 and 16 (+ greedy batch 1), and the compiled decode loop's
        `memory_analysis()`.

Usage:
  python benchmarks/generation.py                      # full run, writes docs/benchmarks.md
  python benchmarks/generation.py --quick              # sanity run: ours only, 50 rows, no docs
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

SEED = 0
TOP_P = 0.9
FULL_ROWS = 449  # audio rows the reference keeps from its 450 steps (it drops the last sampled row)
QUICK_ROWS = 50
BATCH = 16
GOAL_BATCH1 = 2.0  # speed-up per clip at batch 1 (issue 13)
GOAL_BATCH16 = 10.0  # throughput at batch 16 / the reference's clips per second
CONTENDED_CORES = 0.25  # CPU used by other processes while timing above which a result is suspect
REPO = _common.REPO


# --- helpers ---------------------------------------------------------------------------------------
def load_reference_model_module():
    """`tokensynth.model` without the package __init__ (which imports laion_clap, dac, librosa)."""
    if not _common.install_bare_package("tokensynth"):
        raise SystemExit("the reference package tokensynth==0.0.4 is not installed (pip install --no-deps)")
    return importlib.import_module("tokensynth.model")


def flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = np.asarray(v)
    return out


def unflatten(flat):
    tree: dict = {}
    for key, v in flat.items():
        parts = [int(p) if p.isdigit() else p for p in key.split("/")]
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return tree


def write_midi(path: str) -> int:
    """A 5 s piano piece: four 3-note chords (0, 1.2, 2.4, 3.6 s) under a 12-note melody. 24 notes,
    all ending before 5 s (the reference stops at the first note that reaches 5 s)."""
    from tokensynth_jax.tokens.midi_library import pretty_midi

    pm = pretty_midi.PrettyMIDI(resolution=480, initial_tempo=120.0)
    chords = pretty_midi.Instrument(program=0, name="chords")
    for j, root in enumerate((48, 53, 55, 48)):
        start = 1.2 * j
        for interval in (0, 4, 7):
            chords.notes.append(pretty_midi.Note(velocity=70, pitch=root + interval, start=start, end=start + 1.1))
    melody = pretty_midi.Instrument(program=0, name="melody")
    for i, pitch in enumerate((72, 74, 76, 77, 79, 77, 76, 74, 72, 71, 74, 72)):
        start = 0.4 * i + 0.05
        melody.notes.append(pretty_midi.Note(velocity=100, pitch=pitch, start=start, end=start + 0.35))
    pm.instruments += [chords, melody]
    pm.write(path)
    return sum(len(inst.notes) for inst in pm.instruments)


# --- subprocess parts ----------------------------------------------------------------------------------
def part_prep(args) -> dict:
    import torch

    from tokensynth_jax import config as config_lib
    from tokensynth_jax.interop import convert
    from tokensynth_jax.tokens.midi_tokens import tokenize_midi

    ref_model = load_reference_model_module()
    ref_utils = importlib.import_module("tokensynth.utils")
    torch.manual_seed(SEED)
    ref = ref_model.TokenSynth(device=torch.device("cpu"))
    state = ref.state_dict()
    num_params = sum(p.numel() for p in ref.parameters())
    cfg, params, report = convert.from_official(state, attention="causal")
    assert cfg == config_lib.REFERENCE, (cfg, config_lib.REFERENCE)
    torch.save(convert.to_official(cfg, params), os.path.join(args.workdir, "ref_state.pt"))
    np.savez(os.path.join(args.workdir, "ours_params.npz"), **flatten(params))

    midi_path = os.path.join(args.workdir, "bench.mid")
    num_notes = write_midi(midi_path)
    ours_tokens = tokenize_midi(midi_path).tokens
    ref_tokens = ref_utils.get_tokens_from_midi(midi_path).reshape(-1).numpy()
    if not np.array_equal(ours_tokens, ref_tokens):
        raise SystemExit(f"tokenizers disagree on the benchmark MIDI:\n{ours_tokens}\n{ref_tokens}")
    timbre = np.random.default_rng(SEED).standard_normal(cfg.timbre_dim).astype(np.float32)
    np.save(os.path.join(args.workdir, "timbre.npy"), timbre / np.linalg.norm(timbre))  # CLAP is L2-normalised
    return {"num_params": int(num_params), "mask_buffer_found": report["mask_buffer"],
            "num_notes": num_notes, "num_midi_tokens": int(len(ours_tokens))}


def part_ref(args) -> dict:
    import torch

    from tokensynth_jax.interop import convert

    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    ref_model = load_reference_model_module()
    ref = ref_model.TokenSynth(device=torch.device("cpu"))
    result = ref.load_state_dict(torch.load(os.path.join(args.workdir, "ref_state.pt"), weights_only=True), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(("k_cache", "v_cache"))]
    if missing or result.unexpected_keys:
        raise SystemExit(f"reference load: missing {missing}, unexpected {result.unexpected_keys}")
    mask = convert.mask_kind(ref.blocks[0].attn.mask.numpy())
    clap = torch.from_numpy(np.load(os.path.join(args.workdir, "timbre.npy")))[None]
    midi_path = os.path.join(args.workdir, "bench.mid")
    rss_loaded = _common.rss_mb()

    decode_calls = [0]
    forward = ref.forward

    def counting_forward(x, clap_embedding=None, use_cache=False):
        decode_calls[0] += bool(use_cache)
        return forward(x, clap_embedding, use_cache=use_cache)

    ref.forward = counting_forward

    def run(seed, no_grad=False):
        torch.manual_seed(seed)
        decode_calls[0] = 0
        t0 = time.perf_counter()
        if no_grad:
            with torch.no_grad():
                out = ref.synthesize(clap, midi_path, top_p=TOP_P)
        else:
            out = ref.synthesize(clap, midi_path, top_p=TOP_P)  # as shipped: autograd on
        return time.perf_counter() - t0, decode_calls[0], int(out.shape[1])

    warm_s, steps, frames = run(100)
    with _common.CpuWatch() as watch:
        timed = [run(101 + i) for i in range(args.runs)]
    times = [t for t, _, _ in timed]
    assert all(s == steps and f == frames for _, s, f in timed), timed
    no_grad_s, ng_steps, _ = run(200, no_grad=True)
    return {
        "threads": threads, "mask": mask, "steps": steps, "frames": frames, "warmup_s": warm_s,
        "times_s": times, "s_per_clip": float(np.mean(times)), "ms_per_step": 1e3 * float(np.mean(times)) / steps,
        "no_grad_s_per_clip": no_grad_s, "no_grad_steps": ng_steps, "contention": watch.to_dict(),
        "rss_after_load_mb": rss_loaded, "peak_rss_mb": _common.peak_rss_mb(),
    }


def part_ours(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tokensynth_jax import config as config_lib
    from tokensynth_jax.inference import sampling
    from tokensynth_jax.model.transformer import abstract_model
    from tokensynth_jax.tokens.midi_tokens import tokenize_midi

    cfg = config_lib.REFERENCE
    with np.load(os.path.join(args.workdir, "ours_params.npz")) as f:
        params = unflatten({k: f[k] for k in f.files})
    abstract = abstract_model(cfg)
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    model = nnx.merge(graphdef, state)
    del params, state
    tokens = tokenize_midi(os.path.join(args.workdir, "bench.mid")).tokens
    timbre = np.load(os.path.join(args.workdir, "timbre.npy"))
    rss_loaded = _common.rss_mb()
    max_rows = args.max_rows

    def gen(batch, sampler, seed):
        t0 = time.perf_counter()
        g = sampling.generate(model, [tokens] * batch, np.tile(timbre, (batch, 1)), sampler=sampler,
                              seed=seed, max_rows=max_rows)
        elapsed = time.perf_counter() - t0
        assert (g.num_rows == max_rows).all() and not g.ended.any(), (g.num_rows, g.ended)
        return elapsed

    def bench(batch, sampler, runs):
        first = gen(batch, sampler, 0)
        with _common.CpuWatch() as watch:
            times = [gen(batch, sampler, 1 + i) for i in range(runs)]
        mean = float(np.mean(times))
        return {"batch": batch, "first_call_s": first, "compile_s": first - mean, "times_s": times,
                "s_per_call": mean, "s_per_clip": mean / batch, "clips_per_s": batch / mean,
                "ms_per_step": 1e3 * mean / max_rows, "contention": watch.to_dict()}

    def memory(batch, sampler):
        t0 = time.perf_counter()
        compiled = sampling.lower_generate(model, [tokens] * batch, np.tile(timbre, (batch, 1)), sampler=sampler,
                                           max_rows=max_rows).compile()
        seconds = time.perf_counter() - t0
        m = compiled.memory_analysis()
        mb = lambda name: getattr(m, name, 0) / _common.MB
        return {"batch": batch, "aot_compile_s": seconds, "argument_mb": mb("argument_size_in_bytes"),
                "output_mb": mb("output_size_in_bytes"), "temp_mb": mb("temp_size_in_bytes"),
                "alias_mb": mb("alias_size_in_bytes"), "generated_code_mb": mb("generated_code_size_in_bytes")}

    topp = sampling.TopP(TOP_P)
    out = {"max_rows": max_rows, "prompt_rows": int(len(tokens) + 1), "rss_after_load_mb": rss_loaded,
           "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
    out["batch1"] = bench(1, topp, args.runs)
    out["batch16"] = bench(BATCH, topp, args.runs)
    out["greedy1"] = bench(1, sampling.Greedy(), args.runs)
    out["peak_rss_timed_mb"] = _common.peak_rss_mb()  # before the extra AOT compiles below
    out["memory"] = [memory(1, topp), memory(BATCH, topp)]
    out["peak_rss_mb"] = _common.peak_rss_mb()
    out["jax_devices"] = [str(d) for d in jax.devices()]
    return out


PARTS = {"prep": part_prep, "ref": part_ref, "ours": part_ours}


# --- driver ----------------------------------------------------------------------------------------
def run_part(name: str, args, workdir: str) -> dict:
    out_json = os.path.join(workdir, f"{name}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--only", name, "--workdir", workdir,
           "--runs", str(args.runs), "--max-rows", str(args.max_rows), "--json-out", out_json]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, TQDM_DISABLE="1")
    return _common.run_part(name, cmd, out_json, _common.cli_environment(env) if name == "ours" else env)


def max_other_cores(part: dict) -> float:
    """The most CPU other processes used during any timed section of a part's result."""
    sections = [part] + [v for v in part.values() if isinstance(v, dict)]
    return max((s["contention"]["other_cores"] for s in sections if "contention" in s), default=0.0)


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("jax", "jaxlib", "flax", "torch", "tokensynth")}


def summarize(prep, ref, ours, machine, vers, command, waits) -> tuple[str, dict]:
    b1, b16, g1 = ours["batch1"], ours["batch16"], ours["greedy1"]
    ref_s = ref["s_per_clip"]
    speedup1 = ref_s / b1["s_per_clip"]
    throughput16 = b16["clips_per_s"] / (1.0 / ref_s)
    verdict = {"batch1": speedup1 >= GOAL_BATCH1, "batch16": throughput16 >= GOAL_BATCH16}
    pf = lambda ok: "PASS" if ok else "FAIL"

    results = _common.md_table(
        ["", "reference (torch, batch 1)", "ours (JAX)"],
        [
            ["top-p 0.9, batch 1: s per clip", f"{ref_s:.2f}", f"{b1['s_per_clip']:.2f}"],
            ["  ms per step", f"{ref['ms_per_step']:.1f} ({ref['steps']} steps)",
             f"{b1['ms_per_step']:.1f} ({ours['max_rows']} steps)"],
            ["top-p 0.9, batch 16: clips per s", f"{1 / ref_s:.3f} (cannot batch)",
             f"{b16['clips_per_s']:.3f} ({b16['s_per_call']:.1f} s per call)"],
            ["  ms per step (whole batch)", "-", f"{b16['ms_per_step']:.1f}"],
            ["greedy, batch 1: s per clip", "-", f"{g1['s_per_clip']:.2f} ({g1['ms_per_step']:.1f} ms per step)"],
            ["reference under `torch.no_grad()`: s per clip", f"{ref['no_grad_s_per_clip']:.2f} (1 run)", "-"],
            ["first call (compile + run): batch 1 / 16 / greedy", "-",
             f"{b1['first_call_s']:.1f} / {b16['first_call_s']:.1f} / {g1['first_call_s']:.1f} s"],
            ["compile time (first call - steady call): batch 1 / 16 / greedy", "-",
             f"{b1['compile_s']:.1f} / {b16['compile_s']:.1f} / {g1['compile_s']:.1f} s"],
            ["peak host RSS of the process", f"{ref['peak_rss_mb']:.0f} MB",
             f"{ours['peak_rss_timed_mb']:.0f} MB (timed part; {ours['peak_rss_mb']:.0f} MB after the AOT compiles)"],
            ["host RSS after loading the weights", f"{ref['rss_after_load_mb']:.0f} MB", f"{ours['rss_after_load_mb']:.0f} MB"],
        ],
    )
    memory = _common.md_table(
        ["decode loop", "arguments MB", "output MB", "temp MB", "aliased MB"],
        [[f"top-p, batch {m['batch']}, {ours['max_rows']} rows", f"{m['argument_mb']:.0f}", f"{m['output_mb']:.2f}",
          f"{m['temp_mb']:.0f}", f"{m['alias_mb']:.0f}"]
         for m in ours["memory"]],
    )
    goals = _common.md_table(
        ["goal", "measured", "verdict"],
        [[f"batch 1 speed-up per clip >= {GOAL_BATCH1}x", f"{speedup1:.2f}x", pf(verdict["batch1"])],
         [f"batch 16 throughput >= {GOAL_BATCH16}x the reference's clips/s", f"{throughput16:.1f}x", pf(verdict["batch16"])]],
    )
    worst = max(ref["contention"]["other_cores"], *(ours[k]["contention"]["other_cores"] for k in ("batch1", "batch16", "greedy1")))
    contended = worst > CONTENDED_CORES
    contention_note = (f" **Contended: other processes used up to {worst:.2f} cores while timing; the numbers are"
                       " pessimistic.**" if contended else "")
    mask_note = "causal (the converter's mask buffers, loaded with strict=False)" if ref["mask"] == "causal" else ref["mask"]
    body = f"""## Generation (CPU)

Command: `{command}`

- Machine: {machine['nproc']} cores ({machine['cpu']}), {machine['ram_gib']} GiB RAM; XLA:CPU ({', '.join(ours['jax_devices'])}),
  torch with {ref['threads']} threads. {machine['date']}. Python {machine['python']}, jax {vers['jax']}
  (jaxlib {vers['jaxlib']}), flax {vers['flax']}, torch {vers['torch']}, tokensynth {vers['tokensynth']}.
- Machine state: before the reference part, load average (1 min) {waits['ref']['load1']:.2f} and
  {waits['ref']['busy_cores']:.2f} cores busy (waited {waits['ref']['waited_s']:.0f} s for < 1.5 and < 0.25); before ours
  {waits['ours']['load1']:.2f} and {waits['ours']['busy_cores']:.2f} (waited {waits['ours']['waited_s']:.0f} s). CPU used by
  other processes during the timed runs (cores, measured from /proc/stat minus our own process):
  reference {ref['contention']['other_cores']:.2f}; ours {b1['contention']['other_cores']:.2f} (batch 1),
  {b16['contention']['other_cores']:.2f} (batch 16), {g1['contention']['other_cores']:.2f} (greedy); a part is rerun when
  this exceeds {CONTENDED_CORES} (attempts: reference {ref.get('attempts', 1)}, ours {ours.get('attempts', 1)}).{contention_note}
- Model: the reference's size, {prep['num_params'] / 1e6:.1f}M parameters, fp32, seeded random weights
  (`torch.manual_seed({SEED})`, PyTorch default init), converted with `convert.from_official(..., attention="causal")`
  and written back into the reference with `convert.to_official`, so both compute causal attention
  (reference attention mask: {mask_note}; the shipped default mask costs the same).
- Input: one 5 s MIDI file, {prep['num_notes']} notes (chords + melody), {prep['num_midi_tokens']} MIDI tokens
  (`tokenize_midi` equals the reference's tokenizer on it); one L2-normalised random timbre embedding.
- Reference: `TokenSynth.synthesize(clap, midi_path, top_p=0.9)` as shipped (autograd on), 1 warm-up then
  {len(ref['times_s'])} timed runs ({', '.join(f'{t:.2f}' for t in ref['times_s'])} s). With random weights it never
  samples the end row: {ref['steps']} decode steps per clip, {ref['frames']} codec frames out.
- Ours: `sampling.generate(model, [tokens] * B, timbre, sampler=TopP(0.9), max_rows={ours['max_rows']})` (the rows the
  reference keeps: it samples {ref['steps']} and drops the last), every item ran all {ours['max_rows']} rows. Per batch size
  1 untimed first call (compile) then {len(b1['times_s'])} timed calls; times include the prefill and the
  device-to-host copy of the result. Ours ran {_common.malloc_note(ours.get('glibc_tunables', ''))}.

{results}

Compiled decode loop (`sampling.lower_generate(...same arguments as generate...).compile().memory_analysis()`):

{memory}

Arguments are the weights (fp32) plus the prompt; temp holds the KV cache (12 layers x K and V x
B x 16 heads x (prompt slots + 1 + rows) x 64 x 4 bytes) and the loop's working buffers.

Goals:

{goals}
"""
    return body, {"speedup_batch1": speedup1, "throughput_ratio_batch16": throughput16, "pass": verdict,
                  "contended": contended}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"sanity run: ours only, {QUICK_ROWS} rows, 1 timed run, no docs written")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks.md"), help="markdown file to update")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per measurement (default 2, --quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--retries", type=int, default=2,
                        help="reruns of a timed part during which other processes used the CPU")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for the load average to drop")
    parser.add_argument("--only", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--max-rows", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 2)
    args.max_rows = args.max_rows or (QUICK_ROWS if args.quick else FULL_ROWS)

    if args.only:
        result = PARTS[args.only](args)
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
        return 0

    command = "python benchmarks/generation.py" + (" --quick" if args.quick else "")
    machine, vers = _common.machine_info(), versions()
    waits = {}

    def settle(name):
        if args.no_wait or args.quick:
            waits[name] = {"load1": os.getloadavg()[0], "busy_cores": float("nan"), "waited_s": 0.0, "idle": None}
        else:
            waits[name] = _common.wait_for_idle()
        print(f"[{time.strftime('%H:%M:%S')}] before {name}: {waits[name]}", flush=True)

    def measured(name, workdir):
        """Runs a timed part on an idle machine; reruns it (up to --retries times) if others used the CPU."""
        for attempt in range(args.retries + 1):
            settle(name)
            result = run_part(name, args, workdir)
            other = max_other_cores(result)
            if args.quick or args.no_wait or other <= CONTENDED_CORES:
                break
            print(f"{name}: other processes used {other:.2f} cores while timing "
                  f"({'retrying' if attempt < args.retries else 'giving up, keeping this result'})", flush=True)
        result["attempts"] = attempt + 1
        return result

    with tempfile.TemporaryDirectory(prefix="tokensynth_bench_") as workdir:
        prep = run_part("prep", args, workdir)
        ref = None if args.quick else measured("ref", workdir)
        ours = measured("ours", workdir)

    print(json.dumps({"prep": prep, "ref": ref, "ours": ours}, indent=2))
    if args.quick:
        b1, b16 = ours["batch1"], ours["batch16"]
        print(f"\nquick ({args.max_rows} rows, reference skipped): batch 1 {b1['ms_per_step']:.1f} ms/step "
              f"(compile {b1['compile_s']:.1f} s), batch {BATCH} {b16['ms_per_step']:.1f} ms/step, greedy batch 1 "
              f"{ours['greedy1']['ms_per_step']:.1f} ms/step, peak RSS {ours['peak_rss_mb']:.0f} MB")
        return 0
    body, verdict = summarize(prep, ref, ours, machine, vers, command, waits)
    print("\n" + body)
    if verdict["contended"]:
        print("WARNING: other processes used CPU during the timed runs; see the contention figures")
    for goal, ok in verdict["pass"].items():
        print(f"{goal}: {'PASS' if ok else 'FAIL'}")
    _common.replace_section(args.out, "generation", body)
    print(f"wrote the generation section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
