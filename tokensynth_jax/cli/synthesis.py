"""`tokensynth synthesize`: MIDI files + a timbre (recording, text or a mix) -> WAV files and/or codes.

Checks come in the order of their cost: flags, then the files named, then the outputs, then what
the checkpoint's JSON says (conditioning, codebooks, the CLAP and codec it was trained with) and
the inputs read against it (MIDI tokenized, reference recordings read, the embedding file's
shape); only then do the model, CLAP and codec load. Results are written atomically (atomic.py).
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from tokensynth_jax.cli import checks
from tokensynth_jax.cli.atomic import Outputs
from tokensynth_jax.cli.checks import UsageError

_HELP = """MIDI + timbre (a reference recording, a text, or a mix) -> WAV.

Windowing: the model reads at most 5 s of notes at a time, so a MIDI file (drums left out) is
cut into windows. A window starts at the first onset (or where the last one ended) and ends,
within 5 s, where no note sounds if it can (in its latter half, the latest such place); else it
ends where the fewest notes sound, clips those notes there and carries their rest into the next
window (a note longer than a window is split). A window holds only as many notes as the model's
max_len leaves room for beside its audio rows, so dense passages get shorter windows. Silence
between notes is skipped. Each window is generated on its own with the same timbre and its audio
is overlap-added at its start, so release tails ring on; the WAV lasts as long as the MIDI plus
0.25 s of release. One line per file reports the windows, and any window whose end row came
before its last note-off (--min-rows last-note-off forbids that). More: docs/synthesis.md."""


def add_synthesize_parser(sub) -> None:
    p = checks.subcommand(sub, "synthesize", _synthesize, help="MIDI + timbre (recording, text or a mix) -> WAV",
                          description=_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--midi", nargs="+", required=True, metavar="FILE",
                   help="rendered whole, in windows of up to 5 s (see above)")
    p.add_argument("--timbre-embedding", metavar="E.npy", help="CLAP embedding [512] or [N, 512]")
    p.add_argument("--timbre-audio", nargs="+", metavar="WAV", help="reference recording(s): one, or one per MIDI file")
    p.add_argument("--text", help="a timbre description, e.g. 'a warm cello'")
    p.add_argument("--mix", type=checks.unit_weight, metavar="A",
                   help="A * audio + (1 - A) * text, renormalised (0 <= A <= 1)")
    p.add_argument("--clap", help="CLAP checkpoint or preset (default: the one the model was trained with, "
                   "else laion/larger_clap_music)")
    p.add_argument("--codec", help="codec to decode with (default and only choice: the checkpoint's)")
    p.add_argument("--offline", action="store_true", help="pretrained CLAP and codec from the local cache only")
    checks.add_sampler_flags(p)
    p.add_argument("--seed", type=checks.seed, default=0)
    p.add_argument("--guidance-scale", type=checks.finite_float)
    p.add_argument("--unconditional-checkpoint", help="unconditional model for first-note guidance")
    p.add_argument("--max-rows", type=checks.positive_int, metavar="R",
                   help="audio rows per window at most (default: a window's notes plus 0.25 s of release, at "
                        "the codec's frame rate); fewer make shorter windows. --midi-compat: default 450")
    p.add_argument("--min-rows", choices=["none", "last-note-off"], default="none",
                   help="last-note-off: no end row before a window's last note-off (default none: the "
                        "model may end a window early, which is reported)")
    p.add_argument("--midi-compat", choices=["tokensynth-0.0.4"], help="tokenize MIDI exactly as the reference")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="decode with parameters in this dtype (default: the checkpoint's; bfloat16 pays on GPU/TPU, not CPU)")
    p.add_argument("--set", action="append", default=[], metavar="model.KEY=VALUE",
                   help="a runtime field of the model (how it computes, not its weights; config.RUNTIME_FIELDS), "
                        "e.g. model.decode_attention=xla")
    p.add_argument("--tokens-out", metavar="OUT.npy")
    p.add_argument("--out", metavar="OUT.wav", help="the WAV (one MIDI file) or a folder of <stem>.wav")
    p.add_argument("--peak-ceiling", type=checks.dbfs_ceiling, metavar="DBFS",
                   help="scale a WAV down (never up) so that its peak is at most DBFS, e.g. -1 (default: the "
                        "codec's output as it is, in 32-bit float, which keeps peaks above full scale)")
    p.add_argument("--spectrogram", action="store_true", help="a spectrogram PNG beside each WAV")
    p.add_argument("--overwrite", action="store_true", help="replace existing WAV, PNG and .npy files")


def _check_flags(args) -> None:
    if args.out is None and args.tokens_out is None:
        raise UsageError("give an output: --out OUT.wav (or a folder), and/or --tokens-out OUT.npy")
    if args.spectrogram and args.out is None:
        raise UsageError("--spectrogram draws the WAV of --out; give --out")
    if args.unconditional_checkpoint is not None and args.guidance_scale is None:
        raise UsageError("--unconditional-checkpoint is for first-note guidance; give --guidance-scale")
    checks.check_sampler_flags(args)
    batch = len(args.midi)
    audio, text, mix = args.timbre_audio, args.text, args.mix
    if args.timbre_embedding is not None:
        if audio or text is not None or mix is not None or args.clap is not None:
            raise UsageError("give the timbre one way: --timbre-embedding, or --timbre-audio / --text (with --mix, --clap)")
        return
    if not audio and text is None:
        raise UsageError("give the timbre: --timbre-audio WAV, --text TEXT (both with --mix A), or --timbre-embedding E.npy")
    if audio and text is not None and mix is None:
        raise UsageError("--timbre-audio and --text together need --mix A (A * audio + (1 - A) * text)")
    if mix is not None and not (audio and text is not None):
        raise UsageError("--mix A blends --timbre-audio and --text; give both")
    if audio and len(audio) not in (1, batch):
        raise UsageError(f"--timbre-audio: {len(audio)} files for {batch} MIDI files; give one or one each")
    if text is not None and not text.strip():
        raise UsageError(f"--text: a timbre description must be a non-empty text, got {text!r}")


def _wav_paths(out: str, midi: list) -> list:
    """OUT.wav for one MIDI file; for several, OUT is a folder and each gets its own <stem>.wav."""
    ext = os.path.splitext(out)[1].lower()
    if ext == ".wav" and not os.path.isdir(out):
        if len(midi) > 1:
            raise UsageError(f"--out {out}: {len(midi)} MIDI files need a folder, not one WAV file")
        return [out]
    if os.path.isfile(out) or (ext and not os.path.isdir(out)):
        raise UsageError(f"--out {out}: synthesis writes WAV files; give OUT.wav or a folder")
    paths = [os.path.join(out, os.path.splitext(os.path.basename(m))[0] + ".wav") for m in midi]
    if len(set(paths)) < len(paths):
        raise UsageError(f"--out {out}: several MIDI files share a name, so their WAVs would collide")
    return paths


def _clap_choice(args, meta) -> tuple[str, str]:
    """(CLAP name, front-end mode): the one the model's training timbres came from, else --clap or the default.

    Embeddings of different CLAPs live in different spaces, so another --clap than the trained one
    is an error.
    """
    from tokensynth_jax.inference.timbre import DEFAULT_CLAP

    trained = (meta.get("metadata") or {}).get("clap_model")  # "name|front-end mode", from run.json
    if not trained:
        return args.clap or DEFAULT_CLAP, "codec-rate"
    name, _, mode = trained.partition("|")
    if args.clap is not None and args.clap != name:
        raise UsageError(f"--clap {args.clap}: the model was trained on timbres from CLAP {name!r}; "
                         "another CLAP's embeddings mean nothing to it (leave --clap out)")
    return name, mode or "codec-rate"


def _synthesize(args) -> int:
    # 1. flags, files, outputs: nothing read yet.
    _check_flags(args)
    for path in args.midi:
        checks.input_file(path, "--midi")
    if args.timbre_embedding is not None:
        checks.input_file(args.timbre_embedding, "--timbre-embedding")
    for path in args.timbre_audio or ():
        checks.input_file(path, "--timbre-audio")
    outputs = Outputs(args.overwrite)
    wavs = [(path, outputs.file(path, "--out"),
             outputs.file(os.path.splitext(path)[0] + ".png", "--out") if args.spectrogram else None)
            for path in (_wav_paths(args.out, args.midi) if args.out is not None else [])]
    tokens_temp = outputs.file(args.tokens_out, "--tokens-out") if args.tokens_out is not None else None

    # 2. the checkpoint's JSON, and the inputs read against it.
    meta, cfg = checks.model_checkpoint(args.checkpoint, "--checkpoint")
    if args.codec is not None and args.out is None and (meta.get("metadata") or {}).get("codec"):
        # (a checkpoint that records no codec takes --codec for the frame rate its windows are planned in)
        raise UsageError(f"--codec {args.codec}: codes only are asked for (no --out), so nothing is decoded")
    runtime = checks.runtime_overrides(args.set, cfg)
    cfg = cfg.replace(**runtime)
    if cfg.conditioning != "timbre":
        raise UsageError(f"--checkpoint {args.checkpoint}: an unconditional model cannot synthesize from a timbre")
    checks.check_top_k(args, cfg)
    if args.max_rows is not None and args.max_rows < cfg.num_codebooks:
        raise UsageError(f"--max-rows {args.max_rows} is fewer than the {cfg.num_codebooks} rows one frame needs")
    if args.guidance_scale is not None:
        if cfg.null_timbre and args.unconditional_checkpoint is not None:
            raise UsageError(f"--unconditional-checkpoint: {args.checkpoint} has a null timbre, so --guidance-scale "
                             "is classifier-free guidance and needs no unconditional model")
        if not cfg.null_timbre and args.unconditional_checkpoint is None:
            raise UsageError(f"--guidance-scale: {args.checkpoint} was not trained with a null timbre; give "
                             "--unconditional-checkpoint for first-note guidance")
        if args.unconditional_checkpoint is not None:
            _, ucfg = checks.model_checkpoint(args.unconditional_checkpoint, "--unconditional-checkpoint")
            if ucfg.conditioning != "unconditional":
                raise UsageError(f"--unconditional-checkpoint {args.unconditional_checkpoint}: not an unconditional model")

    from tokensynth_jax.inference import (
        synthesize,
        timbre,  # numpy and soundfile only, as midi_tokens
    )

    frame_rate = synthesize.codec_frame_rate(args.checkpoint, meta, cfg, offline=args.offline, asked=args.codec)
    plan = synthesize.plan_windows(cfg, args.midi, frame_rate, max_rows=args.max_rows, midi_compat=args.midi_compat)
    embedding = (timbre.load_embedding(args.timbre_embedding, len(args.midi), cfg.timbre_dim)
                 if args.timbre_embedding is not None else None)
    references = [timbre.read_wav(p) for p in args.timbre_audio or ()]
    references = [(timbre.check_audio(a, sr, p), sr) for (a, sr), p in zip(references, args.timbre_audio or ())]
    clap_name, clap_mode = _clap_choice(args, meta) if embedding is None else (None, None)

    # 3. what the encoders' configs say (transformers loads, no weights yet).
    from tokensynth_jax.audio import encoders

    if clap_name is not None:
        encoders.check_clap(clap_name, offline=args.offline)
    codec_name = synthesize.resolve_codec(args.checkpoint, meta, args.codec, cfg, offline=args.offline) \
        if wavs else None

    # 4. load, generate, write.
    from tokensynth_jax import checkpoint
    from tokensynth_jax.inference import sampling

    sampler = checks.make_sampler(args)
    if embedding is None:
        clap = timbre.load_clap(clap_name, offline=args.offline, input_mode=clap_mode)
        if clap.dim != cfg.timbre_dim:
            raise UsageError(f"--clap {clap_name}: gives {clap.dim}-d embeddings, the model takes {cfg.timbre_dim}-d timbres")
        embedding = _embed(args, clap, references)
    model, _ = checkpoint.load_model(args.checkpoint, override=runtime)
    model = model.for_decoding(args.dtype)  # once, not once per window
    guidance, uncond = None, None
    if args.guidance_scale is not None and cfg.null_timbre:
        guidance = sampling.CFG(args.guidance_scale)
    elif args.guidance_scale is not None:
        guidance = sampling.FirstNoteGuidance(args.guidance_scale)
        uncond, _ = checkpoint.load_model(args.unconditional_checkpoint, override=runtime)
        uncond = uncond.for_decoding(args.dtype)
    codec = encoders.Codec(codec_name, batch_size=1, offline=args.offline) if codec_name else None
    result = synthesize.synthesize_audio(model, plan, embedding, codec=codec, sampler=sampler, seed=args.seed,
                                         guidance=guidance, unconditional_model=uncond, min_rows=args.min_rows,
                                         progress=True)
    codes = _codes_array(result.codes, cfg.num_codebooks) if tokens_temp is not None else None
    gains = []
    with outputs:
        for b, (_, wav, png) in enumerate(wavs):
            gains.append(synthesize.write_wav(wav, result.audio[b], result.sample_rate, args.peak_ceiling))
            if png is not None:
                synthesize.write_spectrogram(png, result.audio[b], result.sample_rate,
                                             title=os.path.basename(args.midi[b]))
        if tokens_temp is not None:
            with open(tokens_temp, "wb") as f:  # a file object: np.save adds no ".npy" to the temporary name
                np.save(f, codes)
    _report(args, result, wavs, gains, codes)
    return 0


def _embed(args, clap, references) -> np.ndarray:
    """[len(args.midi), T] timbres from the checked recordings and/or text (see timbre.py for the mix)."""
    from tokensynth_jax.inference import timbre

    text = timbre.text_embedding(clap, args.text) if args.text is not None else None
    if references:
        embs = [timbre.audio_embedding(clap, audio, sr) for audio, sr in references]
        if text is not None:
            embs = [timbre.mix_embedding(args.mix, e, text) for e in embs]
    else:
        embs = [text]
    embs = np.stack(embs)
    return np.repeat(embs, len(args.midi), axis=0) if len(embs) == 1 else embs


def _codes_array(codes: list, num_codebooks: int) -> np.ndarray:
    """Items x frames x codebooks: each file's windows one after another, -1 after its end."""
    per_file = [np.concatenate(c) for c in codes]
    out = np.full((len(per_file), max(len(c) for c in per_file), num_codebooks), -1, np.int32)
    for b, c in enumerate(per_file):
        out[b, : len(c)] = c
    return out


def _report(args, result, wavs, gains, codes) -> None:
    from tokensynth_jax.inference import synthesize

    for b, path in enumerate(args.midi):
        print(_window_report(path, result.windows[b], result.codes[b], result.ended[b], result.early_ends[b]))
        if wavs:
            final, _, png = wavs[b]
            audio = result.audio[b]
            print(f"wrote {final} ({len(audio) / result.sample_rate:.2f} s at {result.sample_rate} Hz, codec {result.codec}"
                  f"{_level_report(synthesize.peak_dbfs(audio), gains[b])})")
            if png is not None:
                print(f"wrote {os.path.splitext(final)[0]}.png")
    if codes is not None:
        print(f"wrote codes {codes.shape} (items x frames x codebooks, windows one after another, "
              f"-1 after each item's end) to {args.tokens_out}")


def _level_report(peak_dbfs: float, gain_db: float) -> str:
    """What the WAV's level needs said: the gain `--peak-ceiling` applied, or a peak above full scale."""
    if gain_db:
        return f"; scaled by {gain_db:.1f} dB: its peak was {peak_dbfs:+.1f} dBFS"
    if peak_dbfs > 0:
        return (f"; peaks at {peak_dbfs:+.1f} dBFS, kept in the float WAV, but players that convert to integer "
                "samples clip it: --peak-ceiling -1 scales it down")
    return ""


def _window_report(path: str, windows: list, codes: list, ended: list, early: list) -> str:
    """What became of a file's notes: windows, pieces, frames per window, and early end rows."""
    clipped, cut = sum(w.clipped_notes for w in windows), sum(w.cut_notes for w in windows)
    notes = sum(w.num_notes for w in windows) - clipped  # a clipped note's pieces are one note
    parts = [f"{clipped} split at window edges" if clipped else "",
             f"{cut} left out (--midi-compat)" if cut else ""]
    detail = ", ".join(p for p in parts if p)
    spans = ", ".join(f"{w.start_seconds:.2f}+{w.seconds:.2f} s: {len(c)} ({'end row' if e else 'cap'})"
                      for w, c, e in zip(windows, codes, ended))
    lines = [f"{path}: {notes} notes{f' ({detail})' if detail else ''} in {len(windows)} window(s); "
             f"frames per window {spans}"]
    if early:
        where = ", ".join(f"the window at {x.start_seconds:.2f} s at {x.end_seconds:.2f} s "
                          f"(last note-off {x.note_off_seconds:.2f} s)" for x in early)
        lines.append(f"{path}: early end row in {len(early)} window(s), silent after it: {where}; "
                     "--min-rows last-note-off forbids this")
    return "\n".join(lines)


