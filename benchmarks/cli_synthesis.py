"""Four 5 s clips through one `tokensynth synthesize` call (compile cache warm) against the
reference's `TokenSynth.synthesize` one clip after another.

Both sides run the reference's model size (configs/reference.py: 12 x 1024, 9 DAC codebooks, 450
rows a 5 s window), random weights (which never end early, so every clip is a full window), the
same 5 s MIDI piece (generation.write_midi) and a given CLAP embedding, top-p 0.9:
  ours  `tokensynth --compile-cache DIR synthesize --midi a.mid b.mid c.mid d.mid
        --timbre-embedding E.npy ...` as its own process, timed from launch to exit (interpreter
        start, imports, checkpoint load, generation, codec, files written): once cold (empty
        cache), then warm: with `--out` (WAVs through a full-size random DAC 44.1 kHz decoder,
        `random-dac_44khz`) and with `--tokens-out` only (codes, as the reference's synthesize
        returns).
  ref   one process that builds the reference's TokenSynth (torch default init) and times four
        `synthesize(clap, midi, top_p=0.9)` calls in a row (codes), then the reference's way to
        audio for them, its `DACDecoder.decode` (descript's DAC 44.1 kHz, random weights, without
        the 16 kHz resampling); its model construction is reported apart and left out of the
        ratios, which therefore favour the reference.
The goal is judged like for like: our codes against the reference's calls, our WAVs against the
reference's calls plus its decoding.
Peak RSS of every process comes from os.wait4, so each is its own.

Usage:
  python benchmarks/cli_synthesis.py            # writes the cli-synthesis section of docs/benchmarks.md
  python benchmarks/cli_synthesis.py --tiny     # smoke test: configs/tiny.py, tiny codec, no reference, no docs
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from generation import load_reference_model_module, write_midi  # noqa: E402

REPO = _common.REPO
CLIPS = 4
TOP_P = 0.9
GOAL = 2.0
SETUPS = {  # name -> (config, codec preset)
    "full": ("configs/reference.py", "random-dac_44khz"),
    "tiny": ("configs/tiny.py", "tiny-encodec"),
}


def timed_process(cmd: list, env: dict, log: str) -> dict:
    """Runs `cmd`; returns its wall time from launch to exit and its own peak RSS."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{cmd[:4]}... failed ({proc.returncode}); see {log}:\n" + open(log).read()[-3000:])
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def load_descript_dac():
    """descript's `dac.model.dac` module (the reference's `DACDecoder` model), or None if it is not
    installed. `dac/__init__.py` imports descript-audiotools, which imports torchaudio, which we never
    install: its submodules are imported under a bare `dac` package with a stand-in `audiotools`
    that has the two names the model code needs at import time (as tests/test_dac_parity.py does)."""
    import torch

    if not _common.install_bare_package("dac"):
        return None
    audiotools = types.ModuleType("audiotools")
    audiotools.ml = types.ModuleType("audiotools.ml")
    audiotools.ml.BaseModel = type("BaseModel", (torch.nn.Module,), {})
    audiotools.AudioSignal = audiotools.STFTParams = None  # compress() and the discriminator only
    sys.modules.update({"audiotools": audiotools, "audiotools.ml": audiotools.ml})
    return importlib.import_module("dac.model.dac")


def part_ref(args) -> None:
    """Inside its own process: four reference synthesize calls in a row, then the reference's way to
    audio for their codes: `DACDecoder.decode` (descript's DAC 44.1 kHz, random weights) without its
    resampling to 16 kHz (torchaudio is not installed; leaving it out favours the reference)."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)  # descript's weight_norm
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # descript's torch.jit.script
    torch.set_num_threads(os.cpu_count())
    ref = load_reference_model_module()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = ref.TokenSynth(device=torch.device("cpu"))
    build_s = time.perf_counter() - t0
    descript = load_descript_dac()
    codec = descript.DAC().eval() if descript else None  # its defaults are the 44.1 kHz 8 kbps model
    clap = torch.from_numpy(np.load(args.embedding))[None]
    with _common.CpuWatch() as watch:
        t0 = time.perf_counter()
        codes = []
        for i, midi in enumerate(args.midi):
            torch.manual_seed(i)
            with torch.no_grad():
                codes.append(model.synthesize(clap, midi, top_p=TOP_P))
        calls_s = time.perf_counter() - t0
        decode_s, samples = None, []
        if codec is not None:
            t0 = time.perf_counter()
            with torch.no_grad():
                for c in codes:  # DACDecoder.decode
                    samples.append(int(codec.decode(codec.quantizer.from_codes(c.permute(0, 2, 1))[0]).shape[-1]))
            decode_s = time.perf_counter() - t0
    with open(args.json_out, "w") as f:
        json.dump({"build_s": build_s, "calls_s": calls_s, "decode_s": decode_s, "samples": samples,
                   "frames": [int(c.shape[1]) for c in codes], "contention": watch.to_dict(),
                   "threads": torch.get_num_threads()}, f)


def run(args, work: str) -> dict:
    config, codec = SETUPS["tiny" if args.tiny else "full"]
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    env.pop("TOKENSYNTH_COMPILE_CACHE", None)
    ckpt, cache = os.path.join(work, "model"), os.path.join(work, "xla")
    cli = [sys.executable, "-m", "tokensynth_jax.cli", "--compile-cache", cache]
    subprocess.run(cli[:3] + ["--compile-cache", "off", "init", "--config", config, "--set", f"codec.name={codec}", ckpt],
                   check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    piece = os.path.join(work, "piece.mid")
    num_notes = write_midi(piece)
    midi = []
    for name in "abcd"[:CLIPS]:
        midi.append(os.path.join(work, f"{name}.mid"))
        shutil.copyfile(piece, midi[-1])
    emb = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    embedding = os.path.join(work, "timbre.npy")
    np.save(embedding, emb / np.linalg.norm(emb))
    synth = ["synthesize", "--checkpoint", ckpt, "--midi", *midi, "--timbre-embedding", embedding, "--sampler", "top-p",
             "--top-p", str(TOP_P), "--overwrite"]  # the warm runs rewrite the cold run's files
    wavs, tokens = ["--out", os.path.join(work, "wav")], ["--tokens-out", os.path.join(work, "codes.npy")]
    log = lambda name: os.path.join(work, f"{name}.log")

    out = {"config": config, "codec": codec, "num_notes": num_notes, "clips": CLIPS}
    out["cold"] = timed_process(cli + synth + wavs, env, log("cold"))
    out["cache_files"] = len(os.listdir(cache))
    with _common.CpuWatch() as watch:
        out["warm_wav"] = [timed_process(cli + synth + wavs, env, log(f"warm{i}")) for i in range(args.runs)]
        out["warm_tokens"] = [timed_process(cli + synth + tokens, env, log(f"tok{i}")) for i in range(args.runs)]
    out["ours_contention"] = watch.to_dict()
    codes = np.load(os.path.join(work, "codes.npy"))
    out["frames"] = [int((c[:, 0] >= 0).sum()) for c in codes]
    out["synthesize_stdout"] = open(log("warm0")).read()[-2000:]
    if not args.tiny:
        ref_json = os.path.join(work, "ref.json")
        proc = timed_process([sys.executable, os.path.abspath(__file__), "--ref-part", "--json-out", ref_json,
                              "--embedding", embedding, "--midi", *midi], env, log("ref"))
        with open(ref_json) as f:
            out["ref"] = {**json.load(f), **proc}
    return out


def summarize(r: dict, machine: dict, command: str, wait: dict) -> tuple[str, dict]:
    best = lambda runs: min(runs, key=lambda x: x["wall_s"])
    wav, tok, ref = best(r["warm_wav"]), best(r["warm_tokens"]), r.get("ref")
    # Like for like: our codes against the reference's synthesize (which returns codes), our WAVs
    # against the reference's way to audio (synthesize, then its DACDecoder).
    ref_codes = ref["calls_s"] if ref else None
    ref_audio = ref["calls_s"] + ref["decode_s"] if ref and ref.get("decode_s") is not None else None
    speedup = lambda ref_s, ours: f"{ref_s / ours['wall_s']:.2f}x" if ref_s else "-"
    rows = [["ours, cold cache (first run): one process, 4 WAVs", f"{r['cold']['wall_s']:.1f}", "",
             f"{r['cold']['peak_rss_mb']:.0f}"],
            ["**ours, warm cache: one process, 4 WAVs**", f"**{wav['wall_s']:.1f}**",
             f"**{speedup(ref_audio, wav)}** over the reference to audio", f"{wav['peak_rss_mb']:.0f}"],
            ["**ours, warm cache: one process, 4 clips' codes** (`--tokens-out`, no codec)", f"**{tok['wall_s']:.1f}**",
             f"**{speedup(ref_codes, tok)}** over the reference's calls", f"{tok['peak_rss_mb']:.0f}"]]
    verdict = {}
    if ref:
        rows.append(["reference: 4 `synthesize` calls one after another (codes; model built beforehand)",
                     f"{ref_codes:.1f}", "", f"{ref['peak_rss_mb']:.0f} (whole process)"])
        verdict["warm_tokens"] = ref_codes / tok["wall_s"] >= GOAL
        if ref_audio is not None:
            label = ("reference to audio: the same 4 calls, then `DACDecoder.decode` of each clip's codes "
                     f"(descript's DAC 44.1 kHz: {ref['decode_s']:.1f} s; its 16 kHz resampling left out)")
            rows.append([label, f"{ref_audio:.1f}", "", ""])
            verdict["warm_wav"] = ref_audio / wav["wall_s"] >= GOAL
        rows.append(["reference: its process from launch to exit (imports, models, calls, decoding)",
                     f"{ref['wall_s']:.1f}", "", ""])
    table = _common.md_table(["", "seconds", "speed-up, like for like", "peak RSS MB"], rows)
    other = max(r["ours_contention"]["other_cores"], ref["contention"]["other_cores"] if ref else 0.0)
    ref_note = (f"The reference sampled {', '.join(map(str, ref['frames']))} frames per clip with {ref['threads']} torch "
                f"threads; building its model took {ref['build_s']:.1f} s (not counted)." if ref else "")
    body = f"""## Synthesis through the command line: four clips, warm compile cache (CPU)

Command: `{command}`

- Machine: {machine['nproc']} cores ({machine['cpu']}), {machine['ram_gib']} GiB RAM, {machine['date']}. Load average
  {wait['load1']:.2f} before the run; other processes used up to {other:.2f} cores while timing{' (**contended**)' if other > 0.25 else ''}.
- Model `{r['config']}` (random weights), codec `{r['codec']}`, the same 5 s MIDI piece ({r['num_notes']} notes) under
  {r['clips']} names, a given timbre embedding, top-p {TOP_P}. Ours wrote {', '.join(map(str, r['frames']))} frames per
  clip. Best of {len(r['warm_wav'])} warm runs each; the cold run filled the cache with {r['cache_files']} files.
  {ref_note}

{table}

Goal: four clips through one warm `tokensynth synthesize` call at least {GOAL:.0f}x faster end to end than the
reference's `synthesize` one clip after another, like for like: {_verdict_line(verdict)}.
"""
    return body, verdict


def _verdict_line(verdict: dict) -> str:
    """The goal's verdict on each like-for-like pair: our codes against the reference's synthesize
    (which returns codes), our WAVs against the reference's way to audio (synthesize, then its
    DACDecoder)."""
    names = {"warm_tokens": "codes against its codes", "warm_wav": "WAVs against its audio"}
    if not verdict:
        return "not measured"
    return "; ".join(f"{names[k]} {'PASS' if ok else 'FAIL'}" for k, ok in verdict.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="smoke test: tiny model and codec, no reference, no docs")
    parser.add_argument("--runs", type=int, default=2, help="warm runs of each kind")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for an idle machine")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks.md"))
    parser.add_argument("--ref-part", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    parser.add_argument("--embedding", help=argparse.SUPPRESS)
    parser.add_argument("--midi", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ref_part:
        part_ref(args)
        return 0
    wait = {"load1": os.getloadavg()[0]} if args.no_wait or args.tiny else _common.wait_for_idle()
    with tempfile.TemporaryDirectory(prefix="tokensynth_cli_bench_") as work:
        result = run(args, work)
    print(json.dumps(result, indent=2))
    command = "python benchmarks/cli_synthesis.py" + (" --tiny" if args.tiny else "")
    body, verdict = summarize(result, _common.machine_info(), command, wait)
    print("\n" + body)
    if not args.tiny:
        _common.replace_section(args.out, "cli-synthesis", body)
        print(f"wrote the cli-synthesis section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
