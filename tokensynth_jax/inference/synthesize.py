"""The synthesis job: MIDI files + a timbre -> codec tokens -> audio.

Glue between the MIDI tokenizer, a loaded model, the sampler and a loaded codec, with errors that
name the file at fault. `plan_windows` places each file's windows, `synthesize_audio` renders them
and decodes them (or returns their codes only). The command line (`tokensynth synthesize`,
cli/synthesis.py) checks its inputs, loads the model, CLAP and codec, and calls these, `timbre.py`
and the writers below.

Long files (docs/synthesis.md): `midi_tokens.split_into_windows` places windows of up to 5 s so
that no note is lost (cuts where no note sounds when it can, else clips the notes at the cut and
carries their rest into the next window), within a note budget from the model (`RowBudget`): a
window of s seconds gets the audio rows of s + `release_seconds` at the codec's frame rate (5 s
of audio at most, the clips the model learned; within --max-rows), and its notes must fit in the
positions `max_len` leaves beside them.
Each window is generated from its own notes with the file's timbre, decoded, and overlap-added at
its start, so a release tail sounds on under the next window; the track is the MIDI's length plus
the release. All files' window k are generated in one batched call (one jitted decode loop per
window index). A window whose end row comes before its last note-off is reported (`early_ends`);
`min_rows="last-note-off"` forbids that.
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
from tokensynth_jax.tokens import midi_tokens, token_layout

DEFAULT_MAX_ROWS = 450  # audio rows of the reference's single window (--midi-compat): 5.2 s of DAC frames
RELEASE_SECONDS = 0.25  # audio rendered past a window's notes and past the file's last note-off
MIN_ROWS = ("none", "last-note-off")  # may a window end before its last note-off? ("none": as the model samples)


class SynthesisError(UserError):
    """Bad synthesis input; the message names the file or option at fault."""


@dataclasses.dataclass(frozen=True)
class RowBudget:
    """The audio rows and notes a window of a given length gets (see the module doc)."""

    frame_rate: float  # the codec's frames per second
    num_codebooks: int
    max_len: int  # the model's positions: timbre, MIDI rows, separator, audio rows
    max_rows: int | None  # --max-rows: audio rows per window at most (None: no cap of its own)
    release_seconds: float

    def rows(self, seconds: float) -> int:
        """Audio rows of a window: frames up to its end plus the release, delayed, within max_rows.
        The audio lasts 5 s at most, the clips the model learned (it ends them there itself)."""
        audio = min(seconds + self.release_seconds, token_layout.WINDOW_SECONDS)
        need = token_layout.audio_rows_for_frames(_frames(audio, self.frame_rate), self.num_codebooks)
        return need if self.max_rows is None else min(need, self.max_rows)

    def notes(self, seconds: float) -> int:
        """Notes a window may hold: the positions max_len leaves after timbre, separator and its rows."""
        return (self.max_len - 2 - self.rows(seconds)) // token_layout.TOKENS_PER_NOTE

    def longest(self) -> float:
        """The longest window: 5 s, or less where max_rows leaves fewer frames for its notes (its
        release may be cut there) or max_len leaves too few positions beside it for one note."""
        delay = self.num_codebooks - 1
        seconds = token_layout.WINDOW_SECONDS
        if self.max_rows is not None:
            seconds = min(seconds, (self.max_rows - delay) / self.frame_rate)
        room = self.max_len - 2 - token_layout.TOKENS_PER_NOTE  # rows that leave room for one note
        if self.rows(seconds) > room:
            seconds = min(seconds, (room - delay) / self.frame_rate - self.release_seconds)
        return seconds


def _frames(seconds: float, frame_rate: float) -> int:
    """Codec frames that cover `seconds` (a hair of float error does not add a frame)."""
    return math.ceil(seconds * frame_rate - 1e-9)


def note_off_seconds(window: midi_tokens.MidiWindow) -> float:
    """The window's last note-off (relative to its start) as its tokens say; 0 without notes."""
    offsets = window.tokens[1 :: token_layout.TOKENS_PER_NOTE] - token_layout.OFFSET_BASE
    return float(offsets.max()) * token_layout.SECONDS_PER_BIN if len(offsets) else 0.0


@dataclasses.dataclass(frozen=True)
class EarlyEnd:
    """A window whose end row came before its last note-off: the rest of it is silent."""

    window: int  # its index in the file's windows
    start_seconds: float  # where it starts in the file
    end_seconds: float  # where its audio ended, from its start
    note_off_seconds: float  # its last note-off, from its start


@dataclasses.dataclass(frozen=True)
class AudioResult:
    audio: list  # float32 [N] per MIDI file, at sample_rate
    sample_rate: int
    codes: list  # per file, per window: int32 [frames, K] codes
    windows: list  # per file, its MidiWindows
    ended: list  # per file, per window: stopped on an end row (False: length cap)
    codec: str
    early_ends: list  # per file, its EarlyEnds (empty: every window sounded to its last note-off)


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
    if recorded and encoders.is_fitted_state(recorded) and not os.path.isabs(recorded) and "://" not in recorded:
        recorded = os.path.join(checkpoint_dir, recorded)  # a fitted codec's state travels with the checkpoint
    if asked and recorded and asked != recorded and not _same_fit(asked, recorded, offline):
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


def _same_fit(a: str, b: str, offline: bool) -> bool:
    """Whether two names are copies of one fitted codec state (same fingerprint)."""
    from tokensynth_jax.audio import encoders

    if not (encoders.is_fitted_state(a) and encoders.is_fitted_state(b)):
        return False
    try:
        return encoders.codec_info(a, offline=offline).fit == encoders.codec_info(b, offline=offline).fit
    except encoders.EncoderError:
        return False


def join_windows(window_audio: Sequence[np.ndarray], starts: Sequence[float], sample_rate: int,
                 seconds: float | None = None) -> np.ndarray:
    """One track: each window's audio overlap-added at its start, cut or padded to `seconds`
    (default: to the end of the last window's audio)."""
    offsets = [round(s * sample_rate) for s in starts]
    length = max((o + len(a) for o, a in zip(offsets, window_audio)), default=0)
    if seconds is not None:
        length = round(seconds * sample_rate)
    out = np.zeros(length, np.float32)
    for o, a in zip(offsets, window_audio):
        a = a[: max(length - o, 0)]
        out[o : o + len(a)] += a
    return out


def codec_frame_rate(checkpoint_dir: str, meta: dict, cfg: ModelConfig, offline: bool, asked: str | None = None) -> float:
    """The checkpoint's codec frame rate (windows are planned in frames even when nothing is decoded);
    `asked`: the --codec of a checkpoint that records none."""
    recorded = (meta.get("metadata") or {}).get("codec") or {}
    if recorded.get("frame_rate"):
        return float(recorded["frame_rate"])
    from tokensynth_jax.audio import encoders

    name = resolve_codec(checkpoint_dir, meta, asked, cfg, offline=offline)
    return encoders.codec_info(name, offline=offline).frame_rate


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """Each file's windows, each window's audio-row cap, and what the track is cut to."""

    windows: list  # per file: midi_tokens.MidiWindow, in time order
    row_caps: list  # per file: audio rows each window may take
    frame_rate: float  # the codec's frames per second
    track_seconds: list  # per file: the track's length (None: the window's own audio, --midi-compat)


def plan_windows(cfg: ModelConfig, midi_paths: Sequence, frame_rate: float, *, max_rows: int | None = None,
                 release_seconds: float = RELEASE_SECONDS, midi_compat: str | None = None) -> WindowPlan:
    """Places every file's windows within the model's budget (see the module doc).

    Args:
      cfg: the model's config (max_len and codebooks set the budget).
      midi_paths: MIDI files (or PrettyMIDI objects).
      frame_rate: the codec's frames per second.
      max_rows: audio rows per window at most (default: what its notes and the release take);
        fewer rows make shorter windows, and may cut a window's release.
      release_seconds: audio rendered past each window's notes; the track is the MIDI's length plus this.
      midi_compat: "tokensynth-0.0.4": the reference's tokens, so its single window at 0 s, with
        max_rows (default 450) rows; the track is that window's audio.

    Raises:
      SynthesisError: limits that leave no room for a window of notes; MidiTokenizationError naming a file.
    """
    if release_seconds < 0:
        raise SynthesisError(f"release_seconds={release_seconds} is negative")
    if max_rows is not None and max_rows < cfg.num_codebooks:
        raise SynthesisError(f"--max-rows {max_rows}: one frame takes {cfg.num_codebooks} rows")
    if midi_compat:
        windows = [[midi_tokens.tokenize_midi(p, compat=midi_compat, max_notes=cfg.max_notes)] for p in midi_paths]
        return WindowPlan(windows, [[max_rows or DEFAULT_MAX_ROWS] for _ in midi_paths], frame_rate,
                          [None] * len(midi_paths))
    budget = RowBudget(frame_rate, cfg.num_codebooks, cfg.max_len, max_rows, release_seconds)
    longest = budget.longest()
    if longest < 2 * token_layout.SECONDS_PER_BIN:
        limits = f"max_len {cfg.max_len}" + (f" and --max-rows {max_rows}" if max_rows else "")
        raise SynthesisError(f"{limits} leave no room for a window of notes ({longest:.3f} s)")
    windows = [midi_tokens.split_into_windows(p, window_seconds=longest, max_notes=budget.notes) for p in midi_paths]
    return WindowPlan(windows, [[budget.rows(w.seconds) for w in ws] for ws in windows], frame_rate,
                      [max(w.start_seconds + w.seconds for w in ws) + release_seconds for ws in windows])


def synthesize_audio(
    model,
    plan: WindowPlan,
    timbre: np.ndarray,
    *,
    codec=None,
    sampler=sampling.Greedy(),
    seed: int = 0,
    guidance: sampling.CFG | sampling.FirstNoteGuidance | None = None,
    unconditional_model=None,
    min_rows: str = "none",
    progress: bool = False,
) -> AudioResult:
    """Renders whole MIDI files window by window and decodes them to audio (see the module doc).

    Args:
      model: a timbre-conditioned TokenSynth (`checkpoint.load_model`).
      plan: the files' windows (`plan_windows`).
      timbre: [len(plan.windows), T] CLAP embeddings.
      codec: a loaded `encoders.Codec` to decode with (the model's own: `resolve_codec`), or
        None for codes only (`audio` is then empty).
      sampler: the sampling rule (sampling.Greedy / TopK / TopP).
      seed: window k samples with seed + k.
      guidance: sampling.CFG(scale) for a model with a null timbre, or the reference's
        sampling.FirstNoteGuidance(scale) with `unconditional_model`.
      min_rows: "none" (a window ends when the model samples the end row) or "last-note-off"
        (no end row before the window's last note-off).
      progress: a tqdm bar over windows.

    Returns:
      An AudioResult.
    """
    from tqdm import tqdm

    cfg = model.cfg
    if cfg.conditioning != "timbre":
        raise SynthesisError("an unconditional model cannot synthesize from a timbre")
    if min_rows not in MIN_ROWS:
        raise SynthesisError(f"--min-rows {min_rows!r}: one of {', '.join(MIN_ROWS)}")
    windows, row_caps, frame_rate = plan.windows, plan.row_caps, plan.frame_rate
    timbre = np.asarray(timbre, np.float32)
    if timbre.shape != (len(windows), cfg.timbre_dim):
        raise SynthesisError(f"timbres of shape {timbre.shape} for {len(windows)} MIDI files; "
                             f"the model takes [{len(windows)}, {cfg.timbre_dim}]")
    note_off = [[note_off_seconds(w) for w in ws] for ws in windows]
    # Frames that reach the last note-off, within what the row cap leaves.
    needed = [[min(_frames(t, frame_rate), cap - cfg.num_codebooks + 1) for t, cap in zip(ts, caps)]
              for ts, caps in zip(note_off, row_caps)]
    codes = [[np.zeros((0, cfg.num_codebooks), np.int32)] * len(w) for w in windows]
    ended = [[False] * len(w) for w in windows]
    audio = [[np.zeros(0, np.float32)] * len(w) for w in windows]
    num_windows = max(len(w) for w in windows)
    for k in tqdm(range(num_windows), desc="windows", unit="window", disable=not progress):
        items = [b for b, w in enumerate(windows) if k < len(w)]
        # Every call has all files' batch size (idle slots repeat an item, results dropped), and
        # the longest window's rows as its buffer, so the decode loop compiles once per prompt width.
        batch = items + [items[0]] * (len(windows) - len(items))
        gen = sampling.generate(
            model, [windows[b][k].tokens for b in batch], timbre[batch], sampler=sampler, seed=seed + k,
            max_rows=max(max(caps) for caps in row_caps), guidance=guidance, unconditional_model=unconditional_model,
            row_caps=[row_caps[b][k] for b in batch],
            min_frames=[needed[b][k] for b in batch] if min_rows == "last-note-off" else None,
        )
        for i, b in enumerate(items):
            codes[b][k], ended[b][k] = gen.codes[i, : gen.num_frames[i]], bool(gen.ended[i])
            if codec is not None and len(codes[b][k]):
                audio[b][k] = codec.decode(codes[b][k][None])[0]
    early = [[EarlyEnd(k, w.start_seconds, len(c) / frame_rate, t)
              for k, (w, c, e, t, n) in enumerate(zip(ws, cs, es, ts, ns)) if e and len(c) < n]
             for ws, cs, es, ts, ns in zip(windows, codes, ended, note_off, needed)]
    tracks = []
    if codec is not None:
        for ws, a, seconds in zip(windows, audio, plan.track_seconds):
            tracks.append(join_windows(a, [w.start_seconds for w in ws], codec.info.sample_rate, seconds))
    return AudioResult(tracks, codec.info.sample_rate if codec else 0, codes, windows, ended,
                       codec.info.name if codec else "", early)


def peak_dbfs(audio: np.ndarray) -> float:
    """The peak sample level in dB relative to full scale (1.0); -inf for silence."""
    peak = float(np.max(np.abs(audio), initial=0.0))
    return 20.0 * math.log10(peak) if peak > 0 else -math.inf


def write_wav(path: str, audio: np.ndarray, sample_rate: int, peak_ceiling_dbfs: float | None = None) -> float:
    """A 32-bit float WAV; returns the gain applied, in dB (0.0: none).

    Without a ceiling, codec output that overshoots +-1 is kept as it is, not clipped. With
    `peak_ceiling_dbfs`, a clip whose peak is above it is scaled down (never up) to peak there:
    most players convert to integer samples and clip what lies above full scale.
    """
    import soundfile

    audio = np.asarray(audio, np.float32)
    gain_db, peak = 0.0, peak_dbfs(audio)
    if peak_ceiling_dbfs is not None and peak > peak_ceiling_dbfs:
        gain_db = peak_ceiling_dbfs - peak
        audio = audio * np.float32(10.0 ** (gain_db / 20.0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    soundfile.write(path, audio, sample_rate, subtype="FLOAT")
    return gain_db


def log_spectrogram(audio: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(freqs [F], times [T], power dB [F, T]) of mono audio: ~46 ms Hann windows, 75% overlap,
    a -100 dB floor; a clip shorter than a window is zero-padded to one."""
    from scipy.signal import spectrogram

    nfft = 1 << max(8, math.ceil(math.log2(sample_rate * 0.046)))
    audio = np.asarray(audio, np.float64)
    if len(audio) < nfft:
        audio = np.pad(audio, (0, nfft - len(audio)))
    freqs, times, power = spectrogram(audio, fs=sample_rate, nperseg=nfft, noverlap=nfft * 3 // 4)
    return freqs, times, 10 * np.log10(power + 1e-10)


def write_spectrogram(path: str, audio: np.ndarray, sample_rate: int, title: str = "") -> None:
    """A log-magnitude spectrogram PNG (`log_spectrogram`; matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    freqs, times, db = log_spectrogram(audio, sample_rate)
    mesh = ax.pcolormesh(times, freqs, db, cmap="magma", shading="auto")
    fig.colorbar(mesh, ax=ax, label="dB")
    ax.set(xlabel="time (s)", ylabel="frequency (Hz)", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
