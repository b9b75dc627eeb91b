"""`tokensynth demo`: the whole chain on the embedded default, offline, in minutes on two cores.

  prep      procedural MIDI phrases x General MIDI presets of the SoundFont inside pretty_midi,
            rendered, augmented, encoded (codec + CLAP) into ArrayRecord shards, instruments split
            into train / valid / test;
  train     configs/tiny.py sized to the codec, with held-out evaluation and generated samples;
  synth     for every test-split (never trained on) instrument: instrument cloning (timbre from a
            reference recording of it) and text-to-instrument (timbre from its name), WAV files
            and spectrograms;
  eval      the paper's metrics (MSS, CLAP score, transcription F1) as eval.json and eval.md.

Pretrained EnCodec 32 kHz and LAION CLAP are used when the Hugging Face cache has them (or
`--codec` / `--clap` name others); otherwise the tiny random presets, which make every stage run
and connect but whose numbers say nothing about quality. The reference recording and the target
of each test item are the codec's decoding of held-out records (a different clip of the same
instrument, and the clip of the same notes), since records store codes, not waveforms.

Every stage resumes: a rerun in the same --workdir reuses the finished data and training.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from tokensynth_jax.cli import checks

PRETRAINED = ("facebook/encodec_32khz", "laion/larger_clap_music")
TINY = ("tiny-encodec", "tiny-clap")
# Eight General MIDI families: keyboard, mallet, guitar, bass, strings, brass, reed, pipe.
DEMO_PROGRAMS = (0, 11, 24, 32, 40, 56, 71, 73)


def pick_encoders(codec: str | None, clap: str | None) -> tuple[str, str, bool]:
    """(codec, clap, pretrained?): the ones asked for, else pretrained if cached, else the tiny presets."""
    from tokensynth_jax.audio import encoders

    if codec or clap:
        return codec or TINY[0], clap or TINY[1], False
    try:
        encoders.codec_info(PRETRAINED[0], offline=True)
        encoders.check_clap(PRETRAINED[1], offline=True)
        return PRETRAINED[0], PRETRAINED[1], True
    except encoders.EncoderError:
        return TINY[0], TINY[1], False


def _stage(name: str) -> float:
    print(f"\n=== {name} ===", flush=True)
    return time.perf_counter()


def _prep(out: str, codec: str, clap: str, pairs: int, max_notes: int) -> dict:
    import argparse

    from tokensynth_jax.cli import prep

    args = ["prep", "--out", out, "--codec", codec, "--clap", clap, "--offline",
            "--programs", ",".join(map(str, DEMO_PROGRAMS)), "--valid-fraction", "0.25", "--test-fraction", "0.25",
            "--pairs-per-instrument", str(pairs), "--num-segments", str(4 * pairs), "--max-notes", str(max_notes),
            "--table-pitches", "36:96:4", "--table-velocities", "50,110", "--chunk-size", str(pairs)]
    parser = argparse.ArgumentParser(prog="tokensynth demo")
    prep.add_prep_parser(parser.add_subparsers())
    parsed = parser.parse_args(args)
    parsed.run(parsed)  # a UserError of prep reaches the demo's own one-line error
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


def train_config(manifest: dict, data: str, steps: int, max_notes: int):
    """configs/tiny.py with the codec's codebooks and a length budget that fits its 5 s clips."""
    from tokensynth_jax.config import load_config_file
    from tokensynth_jax.tokens import token_layout

    codec = manifest["codec"]
    frames = int(np.ceil(token_layout.WINDOW_SECONDS * codec["frame_rate"]))
    positions = 1 + token_layout.TOKENS_PER_NOTE * max_notes + 1 + \
        token_layout.audio_rows_for_frames(frames, codec["num_codebooks"]) + 1
    seq_len = -(-positions // 16) * 16
    every = max(steps // 3, 1)
    return load_config_file("tiny", {
        "model.num_codebooks": codec["num_codebooks"], "model.codebook_size": codec["codebook_size"],
        "model.max_len": seq_len, "codec.name": codec["name"], "codec.sample_rate": codec["sample_rate"],
        "codec.frame_rate": codec["frame_rate"], "data.paths": os.path.join(data, "train"),
        "data.eval_paths": os.path.join(data, "valid"), "data.seq_len": seq_len, "optim.total_steps": steps,
        "train.steps": steps, "train.log_every": max(steps // 10, 1), "train.eval_every": every,
        "train.checkpoint_every": every, "train.sample_every": every, "train.sample_count": 2,
    })


def _test_records(data: str, count: int) -> list:
    """Up to `count` test-split records, spread over the held-out instruments, plus one other clip
    of each instrument to serve as its reference recording."""
    import grain

    from tokensynth_jax.tokens import records
    from tokensynth_jax.training import input_pipeline

    source = grain.sources.ArrayRecordDataSource(input_pipeline.expand_paths([os.path.join(data, "test")]))
    by_instrument: dict[str, list] = {}
    for i in range(len(source)):
        rec = records.decode(source[i])
        by_instrument.setdefault(rec.instrument_id, []).append(rec)
    chosen = []
    for k in range(max(len(v) for v in by_instrument.values())):  # round robin over instruments
        for recs in by_instrument.values():
            if k < len(recs) - 1 and len(chosen) < count:  # keep the last clip of each as its reference
                chosen.append((recs[k], recs[-1]))
    return chosen


def instrument_text(instrument_id: str) -> str:
    """'sf2:TimGM6mb:000-040' -> 'a recording of a violin' (the GM program's name)."""
    import pretty_midi

    program = int(instrument_id.rsplit("-", 1)[-1])
    return f"a recording of a {pretty_midi.program_to_instrument_name(program).lower()}"


def _loss_plot(metrics_path: str, out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(x) for x in open(metrics_path)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, key in (("train", "loss"), ("eval", "ce")):
        points = [(x["step"], x[key]) for x in lines if x["split"] == split and key in x]
        if points:
            ax.plot(*zip(*points), marker="o" if split == "eval" else None, label=f"{split} {key}")
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", yscale="log", title="tokensynth demo: training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def run(workdir: str, *, steps: int = 300, pairs: int = 8, items: int = 4, max_notes: int = 16,
        codec: str | None = None, clap: str | None = None) -> dict:
    """Runs the demo in `workdir`; returns {"eval": rows, "paths": {...}}."""
    from tokensynth_jax import checkpoint
    from tokensynth_jax.evaluation import evaluate
    from tokensynth_jax.inference import sampling, synthesize, timbre
    from tokensynth_jax.inference.inference_checkpoint import write_inference_checkpoint
    from tokensynth_jax.tokens import midi_tokens
    from tokensynth_jax.training import train

    workdir = os.path.abspath(workdir)
    codec, clap, pretrained = pick_encoders(codec, clap)
    print(f"codec {codec}, CLAP {clap} ({'pretrained' if pretrained else 'tiny random: the numbers say nothing about quality'})")

    t = _stage("1/4 prep: render, augment, encode")
    data = os.path.join(workdir, "data")
    manifest = _prep(data, codec, clap, pairs, max_notes)
    print(f"records {manifest['records']} in {time.perf_counter() - t:.0f} s")

    t = _stage("2/4 train")
    config = train_config(manifest, data, steps, max_notes)
    run_dir = os.path.join(workdir, "train")
    train.train(config, run_dir)
    model_dir = os.path.join(workdir, "model")
    step = write_inference_checkpoint(config, run_dir, model_dir)
    plots = os.path.join(workdir, "plots")
    os.makedirs(plots, exist_ok=True)
    _loss_plot(os.path.join(run_dir, "metrics.jsonl"), os.path.join(plots, "loss.png"))
    print(f"model of step {step} in {model_dir} ({time.perf_counter() - t:.0f} s)")

    t = _stage("3/4 synthesize held-out instruments")
    clap_model = timbre.load_clap(clap, offline=True)
    from tokensynth_jax.audio import encoders

    codec_model = encoders.Codec(codec, batch_size=1, offline=True)
    rate = codec_model.info.sample_rate
    synth = os.path.join(workdir, "synth")
    os.makedirs(os.path.join(synth, "midi"), exist_ok=True)
    chosen = _test_records(data, items)
    midi_paths, targets, references, texts = [], [], [], []
    for rec, ref in chosen:
        program = int(rec.instrument_id.rsplit("-", 1)[-1])
        path = os.path.join(synth, "midi", f"{rec.pair_id}.mid")
        midi_tokens.tokens_to_notes(rec.midi_tokens, program=program).write(path)
        midi_paths.append(path)
        targets.append(codec_model.decode(np.asarray(rec.codes, np.int64)[None])[0])
        references.append(codec_model.decode(np.asarray(ref.codes, np.int64)[None])[0])
        texts.append(instrument_text(rec.instrument_id))
    timbres = {
        "cloning": np.stack([timbre.audio_embedding(clap_model, a, rate) for a in references]),
        "text": np.stack([timbre.text_embedding(clap_model, x) for x in texts]),
    }
    model, _ = checkpoint.load_model(model_dir)
    windows = synthesize.plan_windows(model.cfg, midi_paths, codec_model.info.frame_rate)
    eval_items, wavs = [], []
    for task, emb in timbres.items():
        result = synthesize.synthesize_audio(model, windows, emb, codec=codec_model, sampler=sampling.TopP(0.9),
                                             seed=0, progress=True)
        for i, (rec, ref) in enumerate(chosen):
            clip = f"{rec.instrument_id.rsplit(':', 1)[-1]}-{rec.pair_id[:8]}"
            name = f"{task}-{clip}"
            wav = os.path.join(synth, f"{name}.wav")
            synthesize.write_wav(wav, result.audio[i], rate)
            if task == "cloning":  # what the clip should sound like, and what the timbre came from
                synthesize.write_wav(os.path.join(synth, f"target-{clip}.wav"), targets[i], rate)
                synthesize.write_wav(os.path.join(synth, f"reference-{clip}.wav"), references[i], rate)
            synthesize.write_spectrogram(os.path.join(plots, f"{name}.png"), result.audio[i], rate, title=name)
            wavs.append(wav)
            eval_items.append(evaluate.EvalItem(
                id=name, task=task, generated=(result.audio[i], rate),
                midi=midi_paths[i], target=(targets[i], rate),
                reference=(references[i], rate) if task == "cloning" else None,
                text=texts[i] if task == "text" else None, instrument=rec.instrument_id,
            ))
    print(f"{len(wavs)} clips in {time.perf_counter() - t:.0f} s")

    t = _stage("4/4 evaluate")
    results = evaluate.evaluate_items(eval_items, clap=clap_model)
    json_path, md_path = (os.path.join(workdir, "eval", name) for name in evaluate.REPORT_FILES)
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    evaluate.write_report(
        results, json_path, md_path,
        {"codec": codec, "clap": clap, "pretrained_encoders": pretrained, "train_steps": step,
         "split": "test (instruments never trained on)", "target": "codec decoding of the held-out record"},
    )
    print(open(md_path).read())
    paths = {"wavs": os.path.join(synth, "{cloning,text,target,reference}-*.wav"), "plots": plots, "eval_json": json_path, "eval_md": md_path,
             "model": model_dir, "train": run_dir, "data": data}
    print("where things are:\n" + "\n".join(f"  {k:10s} {v}" for k, v in paths.items()))
    print(f"({time.perf_counter() - t:.0f} s for the evaluation)")
    return {"eval": evaluate.aggregate(results), "paths": paths, "generated": wavs}


def add_demo_parser(sub) -> None:
    p = checks.subcommand(sub, "demo", _demo, help="the embedded default end to end: prep -> train -> synthesize -> eval")
    p.add_argument("--workdir", default="runs/demo", help="every stage's output; a rerun resumes")
    p.add_argument("--steps", type=checks.positive_int, default=300, help="training steps")
    p.add_argument("--pairs-per-instrument", type=checks.positive_int, default=8)
    p.add_argument("--items", type=checks.positive_int, default=4, help="held-out clips synthesized per task")
    p.add_argument("--codec", help="codec preset or checkpoint (default: EnCodec 32 kHz if cached, else tiny-encodec)")
    p.add_argument("--clap", help="CLAP preset or checkpoint (default: LAION music CLAP if cached, else tiny-clap)")


def _demo(args) -> int:
    checks.output_dir(args.workdir, "--workdir")
    if args.codec or args.clap:  # before minutes of prep: the encoders asked for must exist
        from tokensynth_jax.audio import encoders

        codec, clap, _ = pick_encoders(args.codec, args.clap)
        encoders.codec_info(codec, offline=True)
        encoders.check_clap(clap, offline=True)
    run(args.workdir, steps=args.steps, pairs=args.pairs_per_instrument, items=args.items, codec=args.codec,
        clap=args.clap)
    return 0
