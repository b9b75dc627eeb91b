"""End-to-end synthesis time: a 5 s clip from a reference WAV and a MIDI file to a decoded WAV.

Full size, random weights (the published architectures; pretrained weights cannot be downloaded
here and the cost does not depend on the values):
  CLAP   `random-larger_clap_music` (HTSAT-base audio tower, LAION's music checkpoint's shape);
  model  `configs/encodec.py` (the reference's 12 x 1024 transformer on EnCodec 32 kHz tokens,
         4 codebooks of 2048, bf16 compute), initialised by `tokensynth init`;
  codec  `random-encodec_32khz` (EnCodec 32 kHz, transformers' published configuration).
Random weights never sample the end row, so the model writes exactly 5 s: 250 frames, 253 rows.

One subprocess does the work, so its peak RSS is the pipeline's own. It times, with everything
loaded: the CLAP audio embedding of a 5 s 44.1 kHz stereo WAV, `sampling.generate` (top-p 0.9,
batch 1) and the codec decode; and once, cold, `synthesize.synthesize_audio` (checkpoint and codec
load + compile + generate + decode), what a single `tokensynth synthesize` call pays after CLAP.

Usage:
  python benchmarks/synthesis.py                         # full size, writes docs/benchmarks.md
  python benchmarks/synthesis.py --torch-device cuda     # CLAP and codec on the GPU too
  python benchmarks/synthesis.py --tiny                  # smoke test: tiny models, no docs written
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
from generation import write_midi  # noqa: E402  (the same 5 s, 24-note piece as the generation benchmark)

REPO = _common.REPO
SECONDS = 5.0
TOP_P = 0.9
CONTENDED_CORES = 0.25
SETUPS = {  # name -> (model config, CLAP, codec)
    "full": (os.path.join(REPO, "configs", "encodec.py"), "random-larger_clap_music", "random-encodec_32khz"),
    "tiny": (os.path.join(REPO, "configs", "tiny.py"), "tiny-clap", "tiny-encodec"),
}


def part_run(args) -> dict:
    """The measured work, in its own process (see the module doc)."""
    import jax

    from tokensynth_jax import checkpoint
    from tokensynth_jax.audio import encoders
    from tokensynth_jax.cli import main as cli
    from tokensynth_jax.inference import sampling, synthesize, timbre
    from tokensynth_jax.tokens.midi_tokens import tokenize_midi

    config, clap_name, codec_name = SETUPS["tiny" if args.tiny else "full"]
    work = args.workdir
    ckpt = os.path.join(work, "model")
    t0 = time.perf_counter()
    assert cli.main(["init", "--config", config, "--set", f"codec.name={codec_name}", ckpt]) == 0
    init_s = time.perf_counter() - t0
    midi = os.path.join(work, "bench.mid")
    num_notes = write_midi(midi)
    wav = os.path.join(work, "reference.wav")
    t = np.arange(int(SECONDS * 44100)) / 44100
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * np.exp(-0.5 * t)
    synthesize.write_wav(wav, np.stack([tone, 0.8 * tone], axis=1).astype(np.float32), 44100)

    loads = {}
    t0 = time.perf_counter()
    clap = timbre.load_clap(clap_name, device=args.torch_device)
    loads["clap_s"] = time.perf_counter() - t0
    info = encoders.codec_info(codec_name)
    frames = round(SECONDS * info.frame_rate)

    # Cold: one synthesize_audio call, as `tokensynth synthesize` makes it after the CLAP embedding.
    emb = timbre.audio_embedding(clap, wav)
    max_rows = frames + info.num_codebooks - 1
    t0 = time.perf_counter()
    cold_model, _ = checkpoint.load_model(ckpt)
    cold_codec = encoders.Codec(codec_name, batch_size=1, device=args.torch_device)
    plan = synthesize.plan_windows(cold_model.cfg, [midi], info.frame_rate, max_rows=max_rows)
    cold = synthesize.synthesize_audio(cold_model, plan, emb[None], codec=cold_codec, sampler=sampling.TopP(TOP_P))
    cold_s = time.perf_counter() - t0
    assert len(cold.codes[0]) == 1 and len(cold.codes[0][0]) == frames, [len(c) for c in cold.codes[0]]

    t0 = time.perf_counter()
    model, _ = checkpoint.load_model(ckpt)
    loads["model_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    codec = encoders.Codec(codec_name, batch_size=1, device=args.torch_device)
    loads["codec_s"] = time.perf_counter() - t0
    tokens = tokenize_midi(midi).tokens
    rss_loaded = _common.rss_mb()

    def once(seed):
        times = {}
        t0 = time.perf_counter()
        e = timbre.audio_embedding(clap, wav)
        times["clap_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        gen = sampling.generate(model, [tokens], e[None], sampler=sampling.TopP(TOP_P), seed=seed, max_rows=max_rows)
        times["generate_s"] = time.perf_counter() - t0
        assert gen.num_frames[0] == frames, gen.num_frames
        t0 = time.perf_counter()
        audio = codec.decode(gen.codes[:1, :frames])
        times["decode_s"] = time.perf_counter() - t0
        assert audio.shape == (1, frames * round(info.sample_rate / info.frame_rate)), audio.shape
        times["total_s"] = times["clap_s"] + times["generate_s"] + times["decode_s"]
        return times

    once(0)  # warm-up: the decode loop for this model is already compiled by the cold call
    with _common.CpuWatch() as watch:
        runs = [once(1 + i) for i in range(args.runs)]
    mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
    return {"setup": "tiny" if args.tiny else "full", "config": os.path.relpath(config, REPO), "clap": clap_name,
            "codec": codec_name, "codec_info": info.to_dict(), "frames": frames, "rows": max_rows,
            "num_notes": num_notes, "init_s": init_s, "loads": loads, "cold_synthesize_audio_s": cold_s,
            "runs": runs, "mean": mean, "contention": watch.to_dict(), "rss_after_load_mb": rss_loaded,
            "peak_rss_mb": _common.peak_rss_mb(), "model_dtype": model.cfg.dtype,
            "num_params": int(sum(x.size for x in jax.tree.leaves(checkpoint.params_to_numpy(model)))),
            "jax_devices": [str(d) for d in jax.devices()], "torch_device": args.torch_device}


def summarize(r: dict, machine: dict, command: str, wait: dict) -> str:
    m = r["mean"]
    rows = [["CLAP audio embedding (5 s WAV, resampled to 48 kHz)", f"{m['clap_s']:.2f}"],
            [f"generation ({r['rows']} rows, top-p {TOP_P}, batch 1)", f"{m['generate_s']:.2f}"],
            [f"codec decoding ({r['frames']} frames -> {SECONDS:g} s)", f"{m['decode_s']:.2f}"],
            ["**end to end, models loaded**", f"**{m['total_s']:.2f}**"],
            ["cold `synthesize_audio` (load checkpoint + codec, compile, generate, decode)",
             f"{r['cold_synthesize_audio_s']:.1f}"],
            ["loading: CLAP / model checkpoint / codec",
             f"{r['loads']['clap_s']:.1f} / {r['loads']['model_s']:.1f} / {r['loads']['codec_s']:.1f}"]]
    table = _common.md_table(["stage", "seconds"], rows)
    contended = r["contention"]["other_cores"] > CONTENDED_CORES
    return f"""## Synthesis end to end ({'GPU' if 'cuda' in ' '.join(r['jax_devices']).lower() else 'CPU'})

Command: `{command}`

- Machine: {machine['nproc']} cores ({machine['cpu']}), {machine['ram_gib']} GiB RAM; JAX on
  {', '.join(r['jax_devices'])}, CLAP and codec (torch) on `{r['torch_device']}`. {machine['date']}.
- Machine state: load average {wait['load1']:.2f}, {wait['busy_cores']:.2f} cores busy before the run; other
  processes used {r['contention']['other_cores']:.2f} cores while timing{' (**contended: pessimistic numbers**)' if contended else ''}.
- Models (random weights{', tiny smoke-test sizes' if r['setup'] == 'tiny' else ', published sizes'}): CLAP `{r['clap']}`; model `{r['config']}`
  ({r['num_params'] / 1e6:.1f}M parameters, {r['model_dtype']} compute); codec `{r['codec']}`
  ({r['codec_info']['sample_rate']} Hz, {r['codec_info']['num_codebooks']} x {r['codec_info']['codebook_size']} codes).
- Input: a {SECONDS:g} s stereo 44.1 kHz reference WAV and a {SECONDS:g} s MIDI file of {r['num_notes']} notes.
  Random weights never end early: every run writes {r['frames']} frames. Mean of {len(r['runs'])} runs after a warm-up.
- Peak host RSS of the process: {r['peak_rss_mb']:.0f} MB ({r['rss_after_load_mb']:.0f} MB with all three models loaded).

{table}
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="smoke test with tiny models; writes no docs unless --out")
    parser.add_argument("--out", default=None, help="markdown file to update (default docs/benchmarks.md, full size)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs")
    parser.add_argument("--torch-device", default="cpu", help="torch device of CLAP and the codec (cpu, cuda)")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for the machine to go idle")
    parser.add_argument("--only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.only:
        with open(args.json_out, "w") as f:
            json.dump(part_run(args), f, indent=2)
        return 0

    wait = ({"load1": os.getloadavg()[0], "busy_cores": float("nan")} if args.no_wait or args.tiny
            else _common.wait_for_idle())
    with tempfile.TemporaryDirectory(prefix="tokensynth_synth_bench_") as work:
        out_json = os.path.join(work, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--only", "--workdir", work, "--json-out", out_json,
               "--runs", str(args.runs), "--torch-device", args.torch_device] + (["--tiny"] if args.tiny else [])
        result = _common.run_part("synthesis", cmd, out_json, dict(os.environ, TQDM_DISABLE="1"))
    print(json.dumps(result, indent=2))
    command = "python benchmarks/synthesis.py" + "".join(
        f" {a}" for a in (["--tiny"] if args.tiny else []) + ([f"--torch-device {args.torch_device}"]
                                                             if args.torch_device != "cpu" else []))
    body = summarize(result, _common.machine_info(), command, wait)
    print("\n" + body)
    out = args.out or (None if args.tiny else os.path.join(REPO, "docs", "benchmarks.md"))
    if out:
        section = "synthesis" if "cuda" not in " ".join(result["jax_devices"]).lower() else "synthesis-gpu"
        _common.replace_section(out, section, body)
        print(f"wrote the {section} section of {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
