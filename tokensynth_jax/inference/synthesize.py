"""The synthesis job: MIDI files + a timbre -> codec tokens -> audio.

Glue between the MIDI tokenizer, a loaded model, the sampler and a loaded codec, with errors that
name the file at fault. `synthesize_audio` renders whole files window by window and decodes them
(or returns their codes only). The command line (`tokensynth synthesize`, cli/synthesis.py) checks
its inputs, loads the model, CLAP and codec, and calls these, `timbre.py` and the writers below.

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

from tokensynth_jax.config import ModelConfig
from tokensynth_jax.errors import UserError
from tokensynth_jax.inference import sampling
from tokensynth_jax.tokens import token_layout

DEFAULT_MAX_ROWS = 450  # audio rows per window, as the reference (5.2 s of DAC 44.1 kHz frames)


class SynthesisError(UserError):
    """Bad synthesis input; the message names the file or option at fault."""


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
    from tokensynth_jax.audio import encoders

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
    model,
    windows: Sequence[Sequence],
    timbre: np.ndarray,
    *,
    codec=None,
    sampler=sampling.Greedy(),
    seed: int = 0,
    guidance: sampling.CFG | sampling.FirstNoteGuidance | None = None,
    unconditional_model=None,
    max_rows: int | None = None,
    progress: bool = False,
) -> AudioResult:
    """Renders whole MIDI files window by window and decodes them to audio.

    Args:
      model: a timbre-conditioned TokenSynth (`checkpoint.load_model`).
      windows: per MIDI file, its windows (`midi_tokens.file_windows` with `cfg.max_notes`).
      timbre: [len(windows), T] CLAP embeddings.
      codec: a loaded `encoders.Codec` to decode with (the model's own: `resolve_codec`), or
        None for codes only (`audio` is then empty).
      sampler: the sampling rule (sampling.Greedy / TopK / TopP).
      seed: window k samples with seed + k.
      guidance: sampling.CFG(scale) for a model with a null timbre, or the reference's
        sampling.FirstNoteGuidance(scale) with `unconditional_model`.
      max_rows: audio rows per window at most (default 450, as the reference).
      progress: a tqdm bar over windows.

    Returns:
      An AudioResult.
    """
    from tqdm import tqdm

    cfg = model.cfg
    if cfg.conditioning != "timbre":
        raise SynthesisError("an unconditional model cannot synthesize from a timbre")
    timbre = np.asarray(timbre, np.float32)
    if timbre.shape != (len(windows), cfg.timbre_dim):
        raise SynthesisError(f"timbres of shape {timbre.shape} for {len(windows)} MIDI files; "
                             f"the model takes [{len(windows)}, {cfg.timbre_dim}]")
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
            max_rows=max_rows or DEFAULT_MAX_ROWS, guidance=guidance, unconditional_model=unconditional_model,
        )
        for i, b in enumerate(items):
            codes[b][k], ended[b][k] = gen.codes[i, : gen.num_frames[i]], bool(gen.ended[i])
            if codec is not None and len(codes[b][k]):
                audio[b][k] = codec.decode(codes[b][k][None])[0]
    rate = codec.info.sample_rate if codec else 0
    tracks = [join_windows(a, rate) for a in audio] if codec else []
    return AudioResult(tracks, rate, codes, windows, ended, codec.info.name if codec else "")


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
