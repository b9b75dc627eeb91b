"""The paper's three evaluation metrics on plain arrays: multi-scale spectral loss, CLAP score, note F1.

MSS compares generated audio with the ground-truth rendering of the same notes by the same
instrument (timbre and dynamics); the CLAP score compares CLAP embeddings (timbre, by a model that
never saw ours); the transcription F-score asks whether the right notes are played at the right
times, transcribing with basic-pitch (Bittner et al., ICASSP 2022; its ONNX path and weights are
vendored in `basic_pitch/`, so it runs offline and installs beside jax) and scoring with mir_eval.
Nothing here knows about files of ours or about the model: `evaluate.py` feeds these functions.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np

from tokensynth_jax.audio import io as audio_io
from tokensynth_jax.errors import UserError
from tokensynth_jax.evaluation.basic_pitch.constants import AUDIO_SAMPLE_RATE, FFT_HOP

# DDSP's multi-scale spectral loss (Engel et al., ICLR 2020, ddsp.losses.SpectralLoss as trained):
# FFT sizes 2048 ... 64, hop = size / 4 (75% overlap), Hann window, unnormalised magnitudes,
# per scale mean |S_gen - S_ref| + mean |log(S_gen + eps) - log(S_ref + eps)|, summed over scales.
MSS_FFT_SIZES = (2048, 1024, 512, 256, 128, 64)
MSS_LOG_EPS = 1e-5  # ddsp.core.safe_log
ONSET_TOLERANCE = 0.05  # mir_eval's default: an estimated onset within 50 ms of the reference one
PITCH_TOLERANCE_CENTS = 50.0  # mir_eval's default: within a quarter tone


class MetricError(UserError):
    """An input a metric cannot score; the message names the input and the problem."""


def load_audio(path: str) -> tuple[np.ndarray, int]:
    """Reads an audio file as mono float32 (stereo averaged): (samples [N], sample rate).

    Raises:
      MetricError: no such file, not audio, or no samples.
    """
    return audio_io.read_mono(path, MetricError)


def resample(audio: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
    """`audio` at `target_sr` (soxr, as librosa.load does for basic-pitch's own input)."""
    return audio_io.resample_soxr(audio, sr, target_sr)


def check_mono(audio, what: str) -> np.ndarray:
    """`audio` as float32 [N > 0] of finite samples, or a MetricError naming `what`."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 1 or audio.size == 0:
        raise MetricError(f"{what}: expected mono samples [N] with N > 0, got shape {audio.shape}")
    if not np.all(np.isfinite(audio)):
        raise MetricError(f"{what}: the audio holds NaN or Inf samples")
    return audio


def multiscale_spectral_loss(generated: np.ndarray, target: np.ndarray, *,
                             fft_sizes: tuple[int, ...] = MSS_FFT_SIZES) -> float:
    """DDSP's multi-scale spectral loss between two mono clips at the same rate (lower is better).

    Hand-written on scipy's STFT because the published definition is this short sum; the
    libraries that ship one either define it differently (auraloss: spectral convergence plus
    log power, on torch tensors) or live in TensorFlow (ddsp).

    Args:
      generated, target: float [N] and [M] mono samples at one sample rate. Clips of different
        lengths are compared after zero-padding the shorter one, so audio that is missing or
        extra costs loss (a generation that stops early is worse, not scored on its head only).
      fft_sizes: the scales.

    Returns:
      The loss summed over scales; 0.0 for identical clips.
    """
    from scipy.signal import ShortTimeFFT
    from scipy.signal.windows import hann

    generated, target = check_mono(generated, "generated audio"), check_mono(target, "target audio")
    n = max(generated.size, target.size)
    generated, target = np.pad(generated, (0, n - generated.size)), np.pad(target, (0, n - target.size))
    total = 0.0
    for size in fft_sizes:
        stft = ShortTimeFFT(hann(size, sym=False), hop=size // 4, fs=1.0, mfft=size)
        s_gen, s_ref = np.abs(stft.stft(generated)), np.abs(stft.stft(target))
        total += float(np.mean(np.abs(s_gen - s_ref)))
        total += float(np.mean(np.abs(np.log(s_gen + MSS_LOG_EPS) - np.log(s_ref + MSS_LOG_EPS))))
    return total


def cosine(a: np.ndarray, b: np.ndarray, *, what: str = "embeddings") -> float:
    """The CLAP score: cosine similarity of two embeddings (1 for the same direction)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise MetricError(f"{what}: embeddings of different sizes {a.shape} and {b.shape}")
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    if not np.isfinite(norm) or norm == 0:
        raise MetricError(f"{what}: an embedding is zero or not finite, its cosine is undefined")
    return float(a @ b / norm)


def midi_notes(path: str) -> np.ndarray:
    """The melodic notes of a MIDI file (drum tracks left out, as our tokenizer does).

    Returns:
      float64 [N, 3]: onset s, offset s, MIDI pitch; sorted by onset.

    Raises:
      MetricError: unreadable MIDI, or no melodic notes (an F-score needs reference notes).
    """
    from tokensynth_jax.tokens.midi_library import pretty_midi

    try:
        pm = pretty_midi.PrettyMIDI(path)
    except FileNotFoundError as e:
        raise MetricError(f"{path}: no such file") from e
    except Exception as e:  # mido and pretty_midi raise many kinds (OSError, EOFError, KeyError, ...)
        raise MetricError(f"{path}: not a MIDI file pretty_midi reads ({type(e).__name__}: {e})") from e
    notes = [(n.start, n.end, n.pitch) for inst in pm.instruments if not inst.is_drum for n in inst.notes]
    if not notes:
        raise MetricError(f"{path}: no melodic notes, nothing to score a transcription against")
    return np.array(sorted(notes), np.float64)


@functools.lru_cache(maxsize=1)
def _transcriber():
    """The vendored basic-pitch modules and its ONNX model, loaded once per process."""
    try:
        from tokensynth_jax.evaluation.basic_pitch import inference, note_creation
    except ImportError as e:
        raise MetricError(
            f"the transcription F-score needs onnxruntime, librosa and scipy ({e}): "
            "pip install 'tokensynth-jax[eval]'"
        ) from e
    return inference, note_creation, inference.Model()


def transcribe(audio: np.ndarray, sr: int, *, onset_threshold: float = 0.5, frame_threshold: float = 0.3,
               min_note_ms: float = 127.70) -> np.ndarray:
    """Notes that basic-pitch hears in a clip, with the defaults of its `predict`.

    Runs basic-pitch's steps on an array (its `predict` reads a file and prints to stdout), with the
    copy of its ONNX path in `basic_pitch/`: the same notes as basic-pitch 0.4.0 itself gives.

    Returns:
      float64 [N, 3]: onset s, offset s, MIDI pitch; sorted by onset (N may be 0).
    """
    inference, note_creation, model = _transcriber()
    audio = resample(check_mono(audio, "audio to transcribe"), sr, AUDIO_SAMPLE_RATE)
    output = inference.run_inference(audio, model)
    if output["note"].shape[0] == 0:  # shorter than one of basic-pitch's frames: nothing to hear
        return np.zeros((0, 3), np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):  # silence: basic-pitch rescales by a max of 0
        events = note_creation.model_output_to_notes(
            output, onset_thresh=onset_threshold, frame_thresh=frame_threshold,
            min_note_len=int(np.round(min_note_ms / 1000 * (AUDIO_SAMPLE_RATE / FFT_HOP))),
        )
    notes = [(float(start), float(end), int(pitch)) for start, end, pitch, _ in events]
    return np.array(sorted(notes), np.float64).reshape(-1, 3)


def note_f1(reference: np.ndarray, estimated: np.ndarray, *, onset_tolerance: float = ONSET_TOLERANCE) -> dict:
    """Note-level onset precision, recall and F1 (mir_eval.transcription, offsets ignored).

    A note is matched when its pitch is within 50 cents and its onset within `onset_tolerance`
    seconds of an unmatched reference note.

    Args:
      reference, estimated: [N, 3] notes (onset s, offset s, MIDI pitch); `estimated` may be empty.

    Returns:
      {"precision", "recall", "f1"}; all 0.0 when nothing was transcribed.
    """
    import mir_eval

    reference, estimated = np.asarray(reference, np.float64), np.asarray(estimated, np.float64).reshape(-1, 3)
    if reference.ndim != 2 or reference.shape[1] != 3 or len(reference) == 0:
        raise MetricError(f"reference notes: expected [N > 0, 3], got shape {reference.shape}")
    if len(estimated) == 0:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}

    def intervals_hz(notes):
        # mir_eval rejects zero-length intervals; offsets play no part in an onset-only score.
        intervals = np.stack([notes[:, 0], np.maximum(notes[:, 1], notes[:, 0] + 1e-3)], axis=1)
        return intervals, 440.0 * 2.0 ** ((notes[:, 2] - 69.0) / 12.0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # mir_eval's warnings restate the checks above
        p, r, f, _ = mir_eval.transcription.precision_recall_f1_overlap(
            *intervals_hz(reference), *intervals_hz(estimated), onset_tolerance=onset_tolerance,
            pitch_tolerance=PITCH_TOLERANCE_CENTS, offset_ratio=None,
        )
    return {"precision": float(p), "recall": float(r), "f1": float(f)}
