"""The synthesis job: MIDI files + a timbre -> codec tokens -> audio.

Glue between the MIDI tokenizer, a checkpoint, the sampler and the codec, with errors that name
the file at fault. `synthesize_audio` renders whole files window by window and decodes them
(or returns their codes only). The command line
(`tokensynth synthesize`) is a thin face over these, `timbre.py` and the writers below.

Long files: window k (MIDI time [5k, 5k + 5) s) is generated from its own notes with the file's
timbre, decoded, and overlap-added at 5k s into one track, so a window's release tail that runs
past 5 s sounds on under the next window instead of being cut; windows without notes are silence.
All files' window k are generated in one batched call (one jitted decode loop per window index).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import numpy as np

from tokensynth_jax import checkpoint, midi_tokens, sampling, token_layout
from tokensynth_jax.config import ModelConfig


DEFAULT_MAX_ROWS = 450  # audio rows per window, as the reference (5.2 s of DAC 44.1 kHz frames)


class SynthesisError(ValueError):
    """Bad synthesis input; the message names the file or option at fault."""


def load_timbre_embedding(path: str, batch: int, timbre_dim: int) -> np.ndarray:
    """Reads a [T] or [B, T] float array from a .npy file; a single embedding serves every item."""
    if not os.path.isfile(path):
        raise SynthesisError(f"{path}: no such timbre embedding file")
    try:
        emb = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError / OSError / UnpicklingError
        raise SynthesisError(f"{path}: not a .npy array ({e})") from e
    emb = np.asarray(emb)
    if not np.issubdtype(emb.dtype, np.floating):
        raise SynthesisError(f"{path}: timbre embedding has dtype {emb.dtype}, expected floats")
    if emb.ndim == 1:
        emb = emb[None]
    if emb.ndim != 2 or emb.shape[1] != timbre_dim:
        raise SynthesisError(f"{path}: timbre embedding of shape {emb.shape}, expected [{timbre_dim}] or [N, {timbre_dim}]")
    if emb.shape[0] == 1:
        emb = np.repeat(emb, batch, axis=0)
    if emb.shape[0] != batch:
        raise SynthesisError(f"{path}: {emb.shape[0]} embeddings for {batch} MIDI files")
    if not np.all(np.isfinite(emb)):
        raise SynthesisError(f"{path}: timbre embedding has NaN or Inf values")
    return emb.astype(np.float32)


def make_sampler(kind: str, top_k: int | None, top_p: float | None, temperature: float):
    """The sampler the command line names."""
    if temperature <= 0:
        raise SynthesisError(f"--temperature must be > 0, got {temperature}")
    if kind == "greedy":
        return sampling.Greedy()
    if kind == "top-k":
        if top_k is None:
            raise SynthesisError("--sampler top-k needs --top-k K")
        return sampling.TopK(top_k, temperature)
    if kind == "top-p":
        if top_p is None:
            raise SynthesisError("--sampler top-p needs --top-p P")
        return sampling.TopP(top_p, temperature)
    raise SynthesisError(f"unknown sampler {kind!r}")


def _max_notes(cfg: ModelConfig) -> int:
    """Notes a window may have and still leave the model room for audio rows."""
    return (cfg.max_len - 2 - cfg.num_codebooks) // token_layout.TOKENS_PER_NOTE


def _load(checkpoint_dir: str, guidance_scale: float | None, unconditional_dir: str | None):
    """(model, metadata, guidance, unconditional model) for a timbre-conditioned checkpoint."""
    model, meta = checkpoint.load_model(checkpoint_dir)
    cfg = model.cfg
    if cfg.conditioning != "timbre":
        raise SynthesisError(f"{checkpoint_dir}: an unconditional model cannot synthesize from a timbre")
    guidance, uncond = None, None
    if guidance_scale is not None:
        if cfg.null_timbre:
            guidance = sampling.CFG(guidance_scale)
        elif unconditional_dir is not None:
            uncond, _ = checkpoint.load_model(unconditional_dir)
            if uncond.cfg.conditioning != "unconditional":
                raise SynthesisError(f"{unconditional_dir}: not an unconditional model")
            guidance = sampling.FirstNoteGuidance(guidance_scale)
        else:
            raise SynthesisError(
                f"{checkpoint_dir}: --guidance-scale needs a model trained with a null timbre "
                "or --unconditional-checkpoint for first-note guidance"
            )
    return model, meta, guidance, uncond


# --- audio ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AudioResult:
    audio: list  # float32 [N] per MIDI file, at sample_rate
    sample_rate: int
    codes: list  # per file, per window: int32 [frames, K] codes
    windows: list  # per file, its MidiWindows
    ended: list  # per file, per window: stopped on an end row (False: length cap or no notes)
    codec: str


def resolve_codec(checkpoint_dir: str, meta: dict, asked: str | None, cfg: ModelConfig, *,
                  offline: bool = False) -> str:
    """The codec to decode a checkpoint's codes with: the one it records, checked against `asked`.

    A model's codes mean something only to the codec it was trained on, so a different codec is an
    error, not a conversion; a codec whose codebooks do not fit the model is one too.

    Raises:
      SynthesisError naming the checkpoint.
    """
    from data_prep import encoders

    recorded = (meta.get("metadata") or {}).get("codec", {}).get("name")
    if asked and recorded and asked != recorded:
        raise SynthesisError(f"{checkpoint_dir}: the model writes {recorded!r} codes, but --codec asks for "
                             f"{asked!r}; leave --codec out to decode with the checkpoint's own codec")
    name = asked or recorded
    if not name:
        raise SynthesisError(f"{checkpoint_dir}: the checkpoint records no codec; pass --codec NAME")
    try:
        info = encoders.codec_info(name, offline=offline)
    except encoders.EncoderError as e:
        raise SynthesisError(f"{checkpoint_dir}: {e}") from e
    if (info.num_codebooks, info.codebook_size) != (cfg.num_codebooks, cfg.codebook_size):
        raise SynthesisError(
            f"{checkpoint_dir}: the model writes {cfg.num_codebooks} codebooks of {cfg.codebook_size}, "
            f"codec {name!r} has {info.num_codebooks} of {info.codebook_size}"
        )
    return name


def join_windows(window_audio: Sequence[np.ndarray], sample_rate: int) -> np.ndarray:
    """One track: window k's audio overlap-added at k * 5 s (see the module doc)."""
    hop = round(token_layout.WINDOW_SECONDS * sample_rate)
    length = max((k * hop + len(a) for k, a in enumerate(window_audio) if len(a)), default=0)
    out = np.zeros(length, np.float32)
    for k, a in enumerate(window_audio):
        out[k * hop : k * hop + len(a)] += a
    return out


def synthesize_audio(
    checkpoint_dir: str,
    midi_paths: Sequence[str],
    timbre: np.ndarray,
    *,
    codec: str | None = None,
    sampler=sampling.Greedy(),
    seed: int = 0,
    guidance_scale: float | None = None,
    unconditional_dir: str | None = None,
    max_rows: int | None = None,
    midi_compat: str | None = None,
    decode: bool = True,
    device: str = "cpu",
    offline: bool = False,
    progress: bool = False,
    dtype: str | None = None,
) -> AudioResult:
    """Renders whole MIDI files window by window and decodes them to audio.

    Args:
      checkpoint_dir: a tokensynth-jax model checkpoint (timbre-conditioned).
      midi_paths: MIDI files.
      timbre: [len(midi_paths), T] CLAP embeddings.
      sampler: the sampling rule (`make_sampler`).
      guidance_scale: classifier-free guidance for a model with a null timbre, else the
        reference's first-note guidance with `unconditional_dir`.
      max_rows: audio rows per window at most (default 450, as the reference).
      codec: the codec to decode with (default: the checkpoint's; another one is an error).
      seed: window k samples with seed + k.
      midi_compat: "tokensynth-0.0.4": the reference's tokens, so its single window at 0 s.
      decode: False for codes only (no codec is loaded; `audio` is empty).
      device: torch device of the codec.
      offline: only look for a pretrained codec in the local Hugging Face cache.
      progress: a tqdm bar over windows.
      dtype: decode with parameters in this dtype ("bfloat16": faster on GPU/TPU, slower on CPU).

    Returns:
      An AudioResult.
    """
    from tqdm import tqdm

    model, meta, guidance, uncond = _load(checkpoint_dir, guidance_scale, unconditional_dir)
    cfg = model.cfg
    model = model.for_decoding(dtype)  # once, not once per window
    uncond = uncond.for_decoding(dtype) if uncond is not None else None
    codec_model = None
    if codec is not None and not decode:
        raise SynthesisError(f"--codec {codec}: codes only are asked for (no --out), so nothing is decoded")
    if decode:
        from data_prep import encoders

        name = resolve_codec(checkpoint_dir, meta, codec, cfg, offline=offline)
        try:
            codec_model = encoders.Codec(name, batch_size=1, device=device, offline=offline)
        except encoders.EncoderError as e:
            raise SynthesisError(f"{checkpoint_dir}: {e}") from e
    if midi_compat:
        windows = [[midi_tokens.tokenize_midi(p, compat=midi_compat, max_notes=_max_notes(cfg))] for p in midi_paths]
    else:
        windows = [midi_tokens.split_into_windows(p, max_notes=_max_notes(cfg)) for p in midi_paths]
    timbre = np.asarray(timbre, np.float32)
    if timbre.shape != (len(midi_paths), cfg.timbre_dim):
        raise SynthesisError(f"{checkpoint_dir}: timbres of shape {timbre.shape} for {len(midi_paths)} MIDI files; "
                             f"the model takes [{len(midi_paths)}, {cfg.timbre_dim}]")
    empty = np.zeros((0, cfg.num_codebooks), np.int32)
    codes = [[empty] * len(w) for w in windows]
    ended = [[False] * len(w) for w in windows]
    audio = [[np.zeros(0, np.float32)] * len(w) for w in windows]
    num_windows = max(len(w) for w in windows)
    for k in tqdm(range(num_windows), desc="windows", unit="window", disable=not progress):
        items = [b for b, w in enumerate(windows) if k < len(w) and w[k].num_notes]
        if not items:
            continue
        # Every call has all files' batch size (idle slots repeat an item, results dropped), so
        # the decode loop compiles once, not once per count of files still playing.
        batch = items + [items[0]] * (len(windows) - len(items))
        gen = sampling.generate(
            model, [windows[b][k].tokens for b in batch], timbre[batch], sampler=sampler, seed=seed + k,
            max_rows=max_rows or DEFAULT_MAX_ROWS, guidance=guidance, unconditional_model=uncond,
        )
        for i, b in enumerate(items):
            codes[b][k], ended[b][k] = gen.codes[i, : gen.num_frames[i]], bool(gen.ended[i])
            if codec_model is not None and len(codes[b][k]):
                audio[b][k] = codec_model.decode(codes[b][k][None])[0]
    rate = codec_model.info.sample_rate if codec_model else 0
    tracks = [join_windows(a, rate) for a in audio] if codec_model else []
    return AudioResult(tracks, rate, codes, windows, ended, codec_model.info.name if codec_model else "")


def write_wav(path: str, audio: np.ndarray, sample_rate: int) -> None:
    """A 32-bit float WAV (no clipping of codec output that overshoots +-1)."""
    import soundfile

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    soundfile.write(path, np.asarray(audio, np.float32), sample_rate, subtype="FLOAT")


def write_spectrogram(path: str, audio: np.ndarray, sample_rate: int, title: str = "") -> None:
    """A log-magnitude spectrogram PNG (~46 ms Hann windows, -100 dB floor; matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.signal import spectrogram

    nfft = 1 << max(8, math.ceil(math.log2(sample_rate * 0.046)))
    audio = np.asarray(audio, np.float64)
    if len(audio) < nfft:
        audio = np.pad(audio, (0, nfft - len(audio)))
    freqs, times, power = spectrogram(audio, fs=sample_rate, nperseg=nfft, noverlap=nfft * 3 // 4)
    fig, ax = plt.subplots(figsize=(10, 4))
    mesh = ax.pcolormesh(times, freqs, 10 * np.log10(power + 1e-10), cmap="magma", shading="auto")
    fig.colorbar(mesh, ax=ax, label="dB")
    ax.set(xlabel="time (s)", ylabel="frequency (Hz)", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def timbre_from_inputs(*, batch: int, timbre_dim: int, embedding: str | None = None,
                       audio: Sequence[str] | None = None, text: str | None = None, mix: float | None = None,
                       clap: str | None = None, device: str = "cpu", offline: bool = False,
                       trained_clap: str | None = None) -> np.ndarray:
    """[batch, timbre_dim] timbres from the command line's options.

    Exactly one source: an embedding file; reference recordings (one, or one per MIDI file);
    a text; or recordings and a text blended with `mix` (see `timbre.mix_embedding`).
    `trained_clap` is the checkpoint's record of the CLAP its training timbres came from
    ("name|front-end mode"): that CLAP and front end are the default, and another `clap` is an
    error, because embeddings of different CLAPs live in different spaces.
    """
    from tokensynth_jax import timbre as timbre_lib

    if embedding is not None:
        if audio or text is not None or mix is not None or clap is not None:
            raise SynthesisError("give the timbre one way: --timbre-embedding, or --timbre-audio / --text "
                                 "(with --mix, --clap)")
        return load_timbre_embedding(embedding, batch, timbre_dim)
    if not audio and text is None:
        raise SynthesisError("give the timbre: --timbre-audio WAV, --text TEXT (both with --mix A), "
                             "or --timbre-embedding E.npy")
    if audio and text is not None and mix is None:
        raise SynthesisError("--timbre-audio and --text together need --mix A (A * audio + (1 - A) * text)")
    if mix is not None and not (audio and text is not None):
        raise SynthesisError("--mix A blends --timbre-audio and --text; give both")
    if mix is not None and not 0.0 <= mix <= 1.0:  # before CLAP loads
        raise timbre_lib.TimbreError(f"--mix {mix}: the audio weight must be in [0, 1] (1 = the recording, 0 = the text)")
    if audio and len(audio) not in (1, batch):
        raise SynthesisError(f"{len(audio)} --timbre-audio files for {batch} MIDI files; give one or one each")
    if text is not None and not text.strip():
        raise timbre_lib.TimbreError(f"--text: a timbre description must be a non-empty text, got {text!r}")
    name, mode = clap or timbre_lib.DEFAULT_CLAP, "codec-rate"
    if trained_clap:
        trained_name, _, trained_mode = trained_clap.partition("|")
        if clap is not None and clap != trained_name:
            raise SynthesisError(f"--clap {clap}: the model was trained on timbres from CLAP {trained_name!r}; "
                                 "another CLAP's embeddings mean nothing to it (leave --clap out)")
        name, mode = trained_name, trained_mode or mode
    clap_model = timbre_lib.load_clap(name, device=device, offline=offline, input_mode=mode)
    if clap_model.dim != timbre_dim:
        raise SynthesisError(f"CLAP {clap_model.name!r} gives {clap_model.dim}-d embeddings, "
                             f"the model takes {timbre_dim}-d timbres")
    text_emb = timbre_lib.text_embedding(clap_model, text) if text is not None else None
    if audio:
        embs = [timbre_lib.audio_embedding(clap_model, p) for p in audio]
        if text_emb is not None:
            embs = [timbre_lib.mix_embedding(mix, e, text_emb) for e in embs]
    else:
        embs = [text_emb]
    embs = np.stack(embs)
    return np.repeat(embs, batch, axis=0) if len(embs) == 1 else embs
