"""`tokensynth demo`: the whole chain on the embedded default, offline, in minutes on two cores.

  prep      procedural MIDI phrases x General MIDI presets of the SoundFont inside pretty_midi,
            rendered, augmented, encoded (codec + timbre embedding) into ArrayRecord shards,
            instruments split into train / valid / test;
  train     configs/demo.py sized to the codec, with held-out evaluation and generated samples;
  synth     for every test-split instrument (never trained on), on procedural phrases drawn from a
            seed the prep job never uses (MIDI never trained on): instrument cloning (timbre from a
            reference recording of it) and, with a real CLAP, text-to-instrument (from its name);
            per clip the target, reference and generated WAVs and one spectrogram figure;
  eval      the paper's metrics (MSS, timbre-embedding score, transcription F1) as eval.json and
            eval.md, with two ceilings: the rendered target and its codec round trip.

Pretrained EnCodec 32 kHz and LAION CLAP are used when the Hugging Face cache has them (or
`--codec` / `--clap` name others). Otherwise the offline encoders of `tokensynth_jax/audio/`,
named for what they are: the `demo-melrvq` codec, which prep fits on its own renders, and the
`demo-spectral` timbre embedding (spectral statistics; it has no text side, so the text task is
skipped, not scored). The target and reference of each test clip are rendered by the same
SoundFont preset as the training data, without effects.

Every stage resumes: a rerun in the same --workdir reuses the finished data and training.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from tokensynth_jax.cli import checks

PRETRAINED = ("facebook/encodec_32khz", "laion/larger_clap_music")
OFFLINE = ("demo-melrvq", "demo-spectral")  # tokensynth_jax/audio/: need no downloaded weights
# 24 General MIDI presets over the families: keyboards, mallets, organs, guitars, basses, strings,
# brass, reeds, pipes, a synth lead. A seeded sixth are held out as test, an eighth as valid.
DEMO_PROGRAMS = (0, 4, 6, 11, 12, 19, 21, 24, 25, 27, 32, 33, 40, 41, 42, 48, 56, 57, 60, 65, 68, 71, 73, 80)


def pick_encoders(codec: str | None, clap: str | None) -> tuple[str, str, bool]:
    """(codec, timbre embedder, pretrained?): the ones asked for, else pretrained if cached, else the offline ones."""
    from tokensynth_jax.audio import encoders

    if codec or clap:
        return codec or OFFLINE[0], clap or OFFLINE[1], False
    try:
        encoders.codec_info(PRETRAINED[0], offline=True)
        encoders.check_clap(PRETRAINED[1], offline=True)
        return PRETRAINED[0], PRETRAINED[1], True
    except encoders.EncoderError:
        return OFFLINE[0], OFFLINE[1], False


def _stage(name: str) -> float:
    print(f"\n=== {name} ===", flush=True)
    return time.perf_counter()


def _prep(out: str, codec: str, clap: str, pairs: int, max_notes: int, workers: int, programs) -> dict:
    import argparse

    from tokensynth_jax.cli import prep

    phrases = max(64, len(programs) * pairs // 2)  # most pairs get a phrase of their own
    # A sixth held out as test, but at least one: stage 3 synthesizes test instruments (with fewer
    # than 6 programs a sixth was none, and the demo failed after training).
    test_fraction = "0.167" if len(set(programs)) >= 6 else str(1.5 / len(set(programs)))
    args = ["prep", "--out", out, "--codec", codec, "--clap", clap, "--offline",
            "--programs", ",".join(map(str, programs)), "--valid-fraction", "0.125", "--test-fraction", test_fraction,
            "--pairs-per-instrument", str(pairs), "--procedural-candidates", str(phrases), "--num-segments",
            str(phrases), "--max-notes", str(max_notes), "--table-pitches", "36:96:4", "--table-velocities", "50,110",
            "--chunk-size", str(pairs), "--workers", str(workers)]
    parser = argparse.ArgumentParser(prog="tokensynth demo")
    prep.add_prep_parser(parser.add_subparsers())
    parsed = parser.parse_args(args)
    parsed.run(parsed)  # a UserError of prep reaches the demo's own one-line error
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


def codec_name(manifest: dict, data: str) -> str:
    """What training and synthesis load the data's codec by: a fitted codec's state path, else its name."""
    codec = manifest["codec"]
    return os.path.join(data, codec["state"]) if "state" in codec else codec["name"]


def train_config(manifest: dict, data: str, steps: int, max_notes: int):
    """configs/demo.py with the data's codec and a length budget that fits its 5 s clips."""
    from tokensynth_jax.config import load_config_file
    from tokensynth_jax.tokens import token_layout

    codec = manifest["codec"]
    frames = int(np.ceil(token_layout.WINDOW_SECONDS * codec["frame_rate"]))
    positions = 1 + token_layout.TOKENS_PER_NOTE * max_notes + 1 + \
        token_layout.audio_rows_for_frames(frames, codec["num_codebooks"]) + 1
    seq_len = -(-positions // 16) * 16
    every = max(steps // 3, 1)
    return load_config_file("demo", {
        "model.num_codebooks": codec["num_codebooks"], "model.codebook_size": codec["codebook_size"],
        "model.max_len": seq_len, "codec.name": codec_name(manifest, data), "codec.sample_rate": codec["sample_rate"],
        "codec.frame_rate": codec["frame_rate"], "data.paths": os.path.join(data, "train"),
        # Fewer than 8 programs hold none out as valid: no held-out evaluation then, rather than an error.
        "data.eval_paths": os.path.join(data, "valid") if manifest["records"].get("valid") else (),
        "data.seq_len": seq_len, "optim.total_steps": steps,
        "train.steps": steps, "train.log_every": max(steps // 10, 1), "train.eval_every": every,
        "train.checkpoint_every": every, "train.sample_every": every, "train.sample_count": 2,
    })


def held_out_clips(manifest: dict, sample_rate: int, count: int, max_notes: int, midi_dir: str) -> list[dict]:
    """`count` clips of the test instruments on phrases the data never holds (`tokensynth_prep.held_out`),
    each named and with its MIDI file written to `midi_dir`."""
    from tokensynth_jax.cli import prep

    os.makedirs(midi_dir, exist_ok=True)
    clips = prep.held_out.held_out_clips(manifest, sample_rate, count, max_notes)
    for j, c in enumerate(clips):
        c["name"] = f"{c['program']:03d}-{j:02d}"
        c["midi"] = os.path.join(midi_dir, f"{c['name']}.mid")
        prep.held_out.to_midi_file(c["notes"], c["program"], c["midi"])
    return clips


def _program_name(program: int) -> str:
    from tokensynth_jax.tokens.midi_library import pretty_midi

    return pretty_midi.program_to_instrument_name(program).lower()


def instrument_text(instrument_id: str) -> str:
    """'sf2:TimGM6mb:000-040' -> 'a recording of a violin' (the GM program's name)."""
    return f"a recording of a {_program_name(int(instrument_id.rsplit('-', 1)[-1]))}"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _loss_plot(metrics_path: str, out_png: str) -> None:
    plt = _plt()
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


def spectrogram_figure(path: str, panels: list[tuple[str, np.ndarray]], sample_rate: int, title: str) -> None:
    """One PNG of log-magnitude spectrograms (`synthesize.log_spectrogram`) side by side, with
    shared axes and colour scale."""
    from tokensynth_jax.inference import synthesize

    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), sharey=True, squeeze=False)
    for ax, (name, audio) in zip(axes[0], panels):
        freqs, times, db = synthesize.log_spectrogram(audio, sample_rate)
        mesh = ax.pcolormesh(times, freqs, db, cmap="magma", shading="auto", vmin=-100, vmax=-20)
        ax.set(xlabel="time (s)", title=name)
    axes[0][0].set_ylabel("frequency (Hz)")
    fig.colorbar(mesh, ax=axes[0].tolist(), label="power (dB)")
    fig.suptitle(title)
    fig.savefig(path, dpi=90)
    plt.close(fig)


SILENT_PEAK = 1e-3  # -60 dBFS: below it a generated clip is reported as silent
LISTENING_PEAK_DBFS = -0.1  # the WAVs are for listening: one that would clip in a player is scaled down to this


def silent_clips(names: list[str], audio: list[np.ndarray]) -> list[str]:
    """The names of the clips whose peak is below SILENT_PEAK: a model that wrote the quietest
    loudness code throughout, or ended at once. Said in eval.md, so that a listener who hears
    nothing knows it is the model's output, not a broken file."""
    return [n for n, a in zip(names, audio) if np.max(np.abs(a), initial=0.0) < SILENT_PEAK]


def _preamble(codec: dict, clap: str, pretrained: bool, clips: list[dict], text_skipped: bool,
              silent: dict[str, list[str]], scaled: dict[str, float]) -> str:
    fit = f", fitted by prep on its own train-instrument renders (fit {codec['fit']})" if codec.get("fit") else ""
    lines = [f"Codec: `{codec['name']}` ({codec['num_codebooks']} codebooks x {codec['codebook_size']}, "
             f"{codec['frame_rate']:g} frames/s, {codec['sample_rate']} Hz{fit}).",
             f"Timbre embedder: `{clap}`" + ("" if pretrained or clap != OFFLINE[1] else
                                              " (offline spectral statistics, not CLAP: its cosine fills the "
                                              "CLAP score column)") + ".",
             f"Held out: {len({c['instrument'] for c in clips})} test instruments never trained on, each clip a "
             "procedural phrase the data never holds. Ceilings: `rendered target` is the target itself, "
             "`codec round trip` the target after the codec."]
    if text_skipped:
        lines.append(f"Text-to-instrument: skipped, `{clap}` has no text side (it needs a pretrained CLAP).")
    for task, names in silent.items():
        if names:
            lines.append(f"Silent ({task}): {len(names)} of {len(clips)} generated clips peak below -60 dBFS "
                         f"({', '.join(names)}); they are scored as they are.")
    if scaled:
        gains = ", ".join(f"{name} by {gain:.1f} dB" for name, gain in scaled.items())
        lines.append(f"Scaled for listening: {gains}. These WAVs in synth/ peaked above full scale, where players "
                     f"clip; they now peak at {LISTENING_PEAK_DBFS:g} dBFS. The scores are of the audio as it came out.")
    return "\n\n".join(lines) + "\n"


def run(workdir: str, *, steps: int = 1200, pairs: int = 32, items: int = 8, max_notes: int = 16,
        codec: str | None = None, clap: str | None = None, workers: int = 1, programs=DEMO_PROGRAMS) -> dict:
    """Runs the demo in `workdir`; returns {"eval": rows, "paths": {...}, "generated": wavs, "f1": cloning F1}."""
    from tokensynth_jax import checkpoint
    from tokensynth_jax.audio import encoders
    from tokensynth_jax.evaluation import evaluate
    from tokensynth_jax.inference import sampling, synthesize, timbre
    from tokensynth_jax.inference.inference_checkpoint import write_inference_checkpoint
    from tokensynth_jax.training import train

    started = time.perf_counter()
    workdir = os.path.abspath(workdir)
    codec, clap, pretrained = pick_encoders(codec, clap)
    print(f"codec {codec}, timbre embedder {clap} ({'pretrained' if pretrained else 'asked for or offline'})")

    t = _stage("1/4 prep: render, augment, encode")
    data = os.path.join(workdir, "data")
    manifest = _prep(data, codec, clap, pairs, max_notes, workers, programs)
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

    t = _stage("3/4 synthesize held-out instruments on held-out MIDI")
    model, meta = checkpoint.load_model(model_dir)
    codec_path = synthesize.resolve_codec(model_dir, meta, None, model.cfg, offline=True)  # the checkpoint's own copy
    clap_model = timbre.load_clap(clap, offline=True)
    codec_model = encoders.Codec(codec_path, batch_size=1, offline=True)
    rate = codec_model.info.sample_rate
    synth = os.path.join(workdir, "synth")
    clips = held_out_clips(manifest, rate, items, max_notes, os.path.join(synth, "midi"))
    timbres = {"cloning": np.stack([timbre.audio_embedding(clap_model, c["reference"], rate) for c in clips])}
    try:
        timbres["text"] = np.stack([timbre.text_embedding(clap_model, instrument_text(c["instrument"])) for c in clips])
    except timbre.TimbreError as e:
        print(f"skipping text-to-instrument: {e}")
    windows = synthesize.plan_windows(model.cfg, [c["midi"] for c in clips], codec_model.info.frame_rate)
    sampler = sampling.TopK(4, 0.8)
    generated = {}
    for task, emb in timbres.items():
        audio = synthesize.synthesize_audio(model, windows, emb, codec=codec_model, sampler=sampler, seed=0,
                                            min_rows="last-note-off", progress=True).audio
        # A model that ends at once wrote silence: score it as silence (F1 0), don't fail on it.
        generated[task] = [a if len(a) else np.zeros(len(c["target"]), np.float32) for a, c in zip(audio, clips)]
    silent = {task: silent_clips([c["name"] for c in clips], g) for task, g in generated.items()}
    eval_items, wavs, scaled = [], [], {}
    for i, c in enumerate(clips):
        round_trip = codec_model.decode(codec_model.encode(c["target"][None]))[0]
        audio = {"target": c["target"], "reference": c["reference"], "codec round trip": round_trip,
                 **{task: g[i] for task, g in generated.items()}}
        for kind, samples in audio.items():
            path = os.path.join(synth, f"{kind.replace(' ', '-')}-{c['name']}.wav")
            gain = synthesize.write_wav(path, samples, rate, peak_ceiling_dbfs=LISTENING_PEAK_DBFS)
            if gain:
                scaled[os.path.basename(path)] = round(gain, 2)
            if kind in timbres:
                wavs.append(path)
        panels = [("target (rendered)", c["target"])] + [(f"generated ({task})", g[i]) for task, g in generated.items()]
        spectrogram_figure(os.path.join(plots, f"{c['name']}.png"), panels, rate,
                           f"{c['name']}: {_program_name(c['program'])} (held out), codec {codec_model.info.name}")
        common = dict(midi=c["midi"], target=(c["target"], rate), instrument=c["instrument"])
        for model_name, samples in (("tokensynth", audio["cloning"]), ("rendered target", c["target"]),
                                    ("codec round trip", round_trip)):
            eval_items.append(evaluate.EvalItem(id=f"cloning-{model_name.replace(' ', '-')}-{c['name']}",
                                                task="cloning", generated=(samples, rate),
                                                reference=(c["reference"], rate), model=model_name, **common))
        if "text" in generated:
            eval_items.append(evaluate.EvalItem(id=f"text-{c['name']}", task="text", generated=(audio["text"], rate),
                                                text=instrument_text(c["instrument"]), **common))
    print(f"{len(wavs)} clips in {time.perf_counter() - t:.0f} s")

    t = _stage("4/4 evaluate")
    results = evaluate.evaluate_items(eval_items, clap=clap_model)
    eval_dir = os.path.join(workdir, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    json_path, md_path = (os.path.join(eval_dir, name) for name in evaluate.REPORT_FILES)
    evaluate.write_report(
        results, json_path, md_path,
        {"codec": manifest["codec"], "timbre_embedder": clap, "pretrained_encoders": pretrained, "train_steps": step,
         "split": "test instruments (never trained on) x held-out procedural phrases",
         "target": "the phrase rendered by the instrument, dry", "sampler": repr(sampler),
         "silent_generated": silent, "wavs_scaled_db": scaled},
        preamble=_preamble(manifest["codec"], clap, pretrained, clips, "text" not in generated, silent, scaled),
    )
    board = os.path.join(eval_dir, "tensorboard")
    evaluate.write_tensorboard(eval_items, results, board, step=step)
    print(open(md_path).read())
    rows = evaluate.aggregate(results)
    paths = {"wavs": os.path.join(synth, "{cloning,text,target,reference,codec-round-trip}-*.wav"), "plots": plots,
             "eval_json": json_path, "eval_md": md_path, "tensorboard": f"{run_dir}/tensorboard, {board}",
             "model": model_dir, "train": run_dir, "data": data}
    print("where things are:\n" + "\n".join(f"  {k:11s} {v}" for k, v in paths.items()))
    print(f"({time.perf_counter() - t:.0f} s for the evaluation; {time.perf_counter() - started:.0f} s in all)")
    f1 = next(r["f1"] for r in rows if r["task"] == "cloning" and r["model"] == "tokensynth")
    return {"eval": rows, "paths": paths, "generated": wavs, "f1": f1}


def add_demo_parser(sub) -> None:
    p = checks.subcommand(sub, "demo", _demo, help="the embedded default end to end: prep -> train -> synthesize -> eval")
    p.add_argument("--workdir", default="runs/demo", help="every stage's output; a rerun resumes")
    p.add_argument("--steps", type=checks.positive_int, default=1200, help="training steps")
    p.add_argument("--pairs-per-instrument", type=checks.positive_int, default=32)
    p.add_argument("--items", type=checks.positive_int, default=8, help="held-out clips synthesized per task")
    p.add_argument("--workers", type=checks.positive_int, default=1, help="prep processes (Beam's FnApiRunner)")
    p.add_argument("--programs", type=checks.gm_programs, default=DEMO_PROGRAMS,
                   help="comma-separated General MIDI programs, at least 2 (a sixth, at least one, are held out as test, "
                        "an eighth as valid)")
    p.add_argument("--codec", help="codec preset or checkpoint (default: EnCodec 32 kHz if cached, else demo-melrvq)")
    p.add_argument("--clap", help="CLAP checkpoint or embedder (default: LAION music CLAP if cached, else demo-spectral)")


def _demo(args) -> int:
    checks.output_dir(args.workdir, "--workdir")
    if len(set(args.programs)) < 2:
        raise checks.UsageError(f"--programs {','.join(map(str, args.programs))}: the demo holds at least one program out "
                         "as a test instrument and trains on the others; give two or more")
    if args.codec or args.clap:  # before minutes of prep: the encoders asked for must exist
        from tokensynth_jax.audio import encoders

        codec, clap, _ = pick_encoders(args.codec, args.clap)
        if codec != OFFLINE[0]:  # demo-melrvq exists once prep fits it
            encoders.codec_info(codec, offline=True)
        encoders.check_clap(clap, offline=True)
    run(args.workdir, steps=args.steps, pairs=args.pairs_per_instrument, items=args.items, codec=args.codec,
        clap=args.clap, workers=args.workers, programs=tuple(args.programs))
    return 0
