"""Data-prep throughput on this machine: render + augment per core, CLAP and codecs per pair.

    python benchmarks/prep.py                      # everything (a few minutes on 2 cores)
    python benchmarks/prep.py --skip-models        # render + augment and the Beam run only
    python benchmarks/prep.py --json out.json      # also write the numbers
    python benchmarks/prep.py --device cuda --batch-sizes 1,32   # encoders on a GPU

Render + augment runs in this one process and thread (so pairs/s is per core) on the packaged
General MIDI SoundFont with the default note tables, procedural phrases and the default effect
mix. The encoders are full-size models with random weights and the published architectures
(`random-*` presets: EnCodec 32 kHz, DAC 44.1 kHz, CLAP HTSAT-base), at one torch thread, so
seconds per pair are core-seconds; the share of time outside the model's forward pass (resampling,
CLAP's mel features, padding, copies) shows whether batching leaves Python overhead in charge. The
Beam run times the whole job end to end on the local runner (FnApiRunner) with tiny encoders, i.e. the cost of
everything but the models. docs/benchmarks.md turns these into the cost of the 9.53M-pair job.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokensynth_prep import augment, instruments, midi_sources, pairs, plan, render  # noqa: E402
from tokensynth_prep.config import PrepConfig  # noqa: E402

PROGRAMS = (0, 25, 40, 56, 73, 81)  # piano, steel guitar, violin, trumpet, flute, saw lead
PAPER_PAIRS = 9_530_000


def bench_render_augment(num_pairs: int, sample_rate: int = 32000) -> dict:
    cfg = PrepConfig(output_dir="unused", programs=PROGRAMS, pairs_per_instrument=num_pairs // len(PROGRAMS))
    specs = instruments.list_instruments(cfg)
    pool = [midi_sources.procedural_segment(cfg.seed, i, cfg.max_notes) for i in range(256)]
    t0 = time.perf_counter()
    tables = {s.instrument_id: instruments.build_note_table(s, sample_rate, cfg) for s in specs}
    table_s = (time.perf_counter() - t0) / len(specs)
    plans = [p for s in specs for c in plan.plan_instrument(s, pool, cfg, 1) for p in c]
    for p in plans[:20]:  # warm the pitch-shift caches a long job would have warm
        pairs.render_pair(p, tables[p.instrument.instrument_id], cfg)
    t0 = time.perf_counter()
    rejected = 0
    for p in plans:
        try:
            pairs.render_pair(p, tables[p.instrument.instrument_id], cfg)
        except render.RenderError:
            rejected += 1
    total = time.perf_counter() - t0
    # The same pairs without effects: what rendering alone costs.
    t0 = time.perf_counter()
    for p in plans:
        table = tables[p.instrument.instrument_id]
        for seg in (p.target, p.reference):
            shift = table.transpose_to_fit(seg.notes[:, 2])
            if shift is not None:
                render.normalise(render.render(seg.notes, table, transpose=shift), peak=0.9, silence_peak=1e-4, what="")
    render_only = time.perf_counter() - t0
    chains = [augment.sample_chain(plan.rng_for(0, "augment", p.pair_id), effects=cfg.effects,
                                   max_effects=cfg.max_effects, dry_fraction=cfg.dry_fraction) for p in plans]
    table_mb = np.mean([t.num_samples * 4 / 2**20 for t in tables.values()])
    return {"pairs": len(plans), "rejected": rejected, "pairs_per_s_per_core": len(plans) / total,
            "ms_per_pair": 1000 * total / len(plans), "render_only_ms_per_pair": 1000 * render_only / len(plans),
            "mean_effects_per_chain": float(np.mean([len(c["chain"]) for c in chains])),
            "note_table_build_s": table_s, "note_table_mb": float(table_mb),
            "mean_notes_per_segment": float(np.mean([s.notes.shape[0] for s in pool]))}


def bench_encoder(kind: str, name: str, batch_sizes, repeats: int, device: str = "cpu") -> dict:
    import torch

    from tokensynth_jax.audio import encoders
    from tokensynth_jax.audio import io as audio_io

    torch.set_num_threads(1)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out = {}
    for bs in batch_sizes:
        if kind == "codec":
            enc = encoders.Codec(name, batch_size=bs, device=device)
            rate, model_call = enc.info.sample_rate, None
        else:
            enc = encoders.ClapEmbedder(name, batch_size=bs, device=device)
            rate = 32000
        x = np.random.default_rng(0).normal(size=(bs, 5 * rate)).astype(np.float32) * 0.1
        run = (lambda: enc.encode(x)) if kind == "codec" else (lambda: enc.embed(x, rate))
        run()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            run()
        total = (time.perf_counter() - t0) / repeats
        # The model's forward pass alone, on the same (pre-processed) inputs.
        with torch.inference_mode():
            if kind == "codec":
                xt = torch.from_numpy(x)[:, None, :].to(enc.device)
                model_call = (lambda: enc.model.encode(xt, bandwidth=enc._bandwidth)) if enc.kind == "encodec" \
                    else (lambda: enc.model.encode(xt))
            else:
                feats = enc.features(list(audio_io.resample_polyphase(x, rate, encoders.CLAP_SAMPLE_RATE)),
                                     sampling_rate=encoders.CLAP_SAMPLE_RATE, return_tensors="pt")
                feats = {k: v.to(enc.device) for k, v in feats.items()}
                model_call = lambda: enc.model.get_audio_features(**feats)
            sync()
            t0 = time.perf_counter()
            for _ in range(repeats):
                model_call()
            sync()
            model = (time.perf_counter() - t0) / repeats
        out[f"batch_{bs}"] = {"s_per_pair": total / bs, "model_share": model / total}
    return out


def bench_beam(pairs_per_instrument: int) -> dict:
    from tokensynth_prep import pipeline

    with tempfile.TemporaryDirectory() as d:
        cfg = PrepConfig(output_dir=d, programs=PROGRAMS[:4], pairs_per_instrument=pairs_per_instrument,
                         num_segments=256, procedural_candidates=512, codec="tiny-encodec", clap="tiny-clap",
                         records_per_shard=100, chunk_size=100)
        t0 = time.perf_counter()
        manifest = pipeline.run(cfg).manifest
        wall = time.perf_counter() - t0
    return {"pairs": manifest["total_records"], "wall_s": wall, "pairs_per_s": manifest["total_records"] / wall,
            "runner": "FnApiRunner in process, tiny-encodec + tiny-clap"}


def cost(results: dict) -> dict:
    """Core-hours of the 9.53M-pair job from the per-core numbers."""
    c = {"render_augment_core_h": PAPER_PAIRS / results["render_augment"]["pairs_per_s_per_core"] / 3600}
    for key in ("random-encodec_32khz", "random-dac_44khz", "random-larger_clap_music"):
        if key in results:
            best = min(v["s_per_pair"] for v in results[key].values())
            c[f"{key}_core_h"] = PAPER_PAIRS * best / 3600
    return c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=600, help="pairs for render + augment")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--beam-pairs-per-instrument", type=int, default=100)
    ap.add_argument("--skip-models", action="store_true")
    ap.add_argument("--device", default="cpu", help="torch device for the encoders (cuda on a GPU worker)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "load_avg_at_start": os.getloadavg()}}
    results["render_augment"] = bench_render_augment(args.pairs)
    print(json.dumps({"render_augment": results["render_augment"]}), flush=True)
    if not args.skip_models:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        for kind, name in (("codec", "random-encodec_32khz"), ("clap", "random-larger_clap_music"),
                           ("codec", "random-dac_44khz")):
            results[name] = bench_encoder(kind, name, sizes, args.repeats, args.device)
            print(json.dumps({name: results[name]}), flush=True)
    results["beam"] = bench_beam(args.beam_pairs_per_instrument)
    results["job_cost_9.53M"] = cost(results)
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
