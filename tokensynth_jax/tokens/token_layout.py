"""Token layout of TokenSynth: the MIDI vocabulary, the codec delay pattern and row assembly.

Pure numpy data code that every part of the project may use and that uses nothing of ours.
A sequence position holds one *row* of `1 + K` channels: channel 0 is a MIDI token, channels
1..K are codec codebooks (code c stored as c + 1, 0 = empty). The model sees

    [timbre] [midi_1 .. midi_M] [separator] [audio rows (delayed)] [end row]

where the timbre is an embedding, not a row, and separator and end rows are all zeros. Codebook k
of audio frame t sits in audio row t + k (the delay pattern), so T frames take T + K - 1 rows.
The MIDI vocabulary is the reference model's and fixed so official checkpoints load.
"""
from __future__ import annotations

import numpy as np

# --- MIDI channel vocabulary (1133 ids), the reference model's layout. ---------------------------
WINDOW_SECONDS = 5.0  # one window of MIDI notes is one training / synthesis segment
TIME_BINS = 500  # 10 ms bins over the window
SECONDS_PER_BIN = WINDOW_SECONDS / TIME_BINS
EMPTY = 0  # empty channel, separator and end rows
ONSET_BASE = 1  # onset bin b -> ONSET_BASE + b
OFFSET_BASE = ONSET_BASE + TIME_BINS  # 501: offset bin b -> OFFSET_BASE + b
PITCH_BASE = OFFSET_BASE + TIME_BINS  # 1001: MIDI pitch p -> PITCH_BASE + p
NUM_PITCHES = 128
VELOCITY_BASE = PITCH_BASE + NUM_PITCHES  # 1129: velocity class c -> VELOCITY_BASE + c
VELOCITY_CLASSES = (25, 50, 100, 127)  # a note's velocity becomes the nearest (first on ties)
MIDI_VOCAB_SIZE = VELOCITY_BASE + len(VELOCITY_CLASSES)  # 1133
TOKENS_PER_NOTE = 4  # onset, offset, pitch, velocity


def codebook_vocab_size(codebook_size: int) -> int:
    """Ids per codebook channel: the codes shifted by one, plus 0 for empty."""
    return codebook_size + 1


def velocity_class(velocity: int) -> int:
    """Index of the nearest velocity class; ties go to the lower class, as in the reference."""
    return int(np.argmin([abs(q - velocity) for q in VELOCITY_CLASSES]))


# --- Delay pattern. --------------------------------------------------------------------------------
def apply_delay(codes_tk: np.ndarray) -> np.ndarray:
    """Codes [T, K] (values 0..C-1) -> delayed audio rows [T + K - 1, K] of ids (code + 1, 0 empty)."""
    codes_tk = np.asarray(codes_tk)
    if codes_tk.ndim != 2:
        raise ValueError(f"codes must be [frames, codebooks], got shape {codes_tk.shape}")
    num_frames, num_codebooks = codes_tk.shape
    rows_rk = np.zeros((num_frames + num_codebooks - 1, num_codebooks), dtype=np.int32)
    for k in range(num_codebooks):
        rows_rk[k : k + num_frames, k] = codes_tk[:, k] + 1
    return rows_rk


def remove_delay(rows_rk: np.ndarray) -> np.ndarray:
    """Delayed audio rows [R, K] -> codes [R - K + 1, K].

    Works on a leading batch axis too ([B, R, K]). Ids are shifted back by one and an empty id
    inside the frame range becomes code 0, exactly as the reference post-processes its output.
    numpy in, numpy out; a jax array (also inside jit, as in the exported loop) stays a jax array.
    """
    xp = rows_rk.__array_namespace__() if hasattr(rows_rk, "__array_namespace__") else np
    rows_rk = xp.asarray(rows_rk)
    num_rows, num_codebooks = rows_rk.shape[-2:]
    num_frames = num_rows - num_codebooks + 1
    if num_frames < 0:
        raise ValueError(f"{num_rows} audio rows are fewer than the {num_codebooks - 1} the delay needs")
    codes = xp.stack([rows_rk[..., k : k + num_frames, k] for k in range(num_codebooks)], axis=-1)
    return xp.maximum(codes.astype(xp.int32) - 1, 0)


# --- Rows. -------------------------------------------------------------------------------------------
def midi_rows(midi_tokens_m: np.ndarray, num_codebooks: int) -> np.ndarray:
    """MIDI tokens [M] -> rows [M, 1 + K] with empty codebook channels."""
    midi_tokens_m = np.asarray(midi_tokens_m, dtype=np.int32).reshape(-1)
    rows = np.zeros((midi_tokens_m.shape[0], 1 + num_codebooks), dtype=np.int32)
    rows[:, 0] = midi_tokens_m
    return rows


def prompt_rows(midi_tokens_m: np.ndarray, num_codebooks: int) -> np.ndarray:
    """The rows the sampler is prompted with: MIDI rows then the separator row, [M + 1, 1 + K]."""
    return np.concatenate(
        [midi_rows(midi_tokens_m, num_codebooks), np.zeros((1, 1 + num_codebooks), np.int32)]
    )


def training_rows(midi_tokens_m: np.ndarray, codes_tk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All token rows of one example and which of them are prediction targets.

    Returns:
      rows [M + 1 + R + 1, 1 + K]: MIDI, separator, delayed audio rows, end row. The model input is
        the timbre followed by `rows[:-1]`; the output at position p predicts `rows[p]`.
      target_mask [M + 1 + R + 1] bool: True for the audio rows and the end row (the model is not
        asked to predict the MIDI prompt or the separator, which are given).
    """
    codes_tk = np.asarray(codes_tk)
    num_codebooks = codes_tk.shape[1]
    prompt = prompt_rows(midi_tokens_m, num_codebooks)
    audio = np.zeros((codes_tk.shape[0] + num_codebooks - 1, 1 + num_codebooks), np.int32)
    audio[:, 1:] = apply_delay(codes_tk)
    end = np.zeros((1, 1 + num_codebooks), np.int32)
    rows = np.concatenate([prompt, audio, end])
    target_mask = np.zeros(rows.shape[0], dtype=bool)
    target_mask[prompt.shape[0] :] = True
    return rows, target_mask


def audio_rows_for_frames(num_frames: int, num_codebooks: int) -> int:
    """Audio rows a clip of `num_frames` frames takes under the delay pattern."""
    return num_frames + num_codebooks - 1


def training_positions(num_midi_tokens: int, num_frames: int, num_codebooks: int) -> int:
    """Positions one training example takes (the timbre, then `training_rows(...)[:-1]`): as many as
    `training_rows` has rows. What `data.seq_len` must hold."""
    return num_midi_tokens + 1 + audio_rows_for_frames(num_frames, num_codebooks) + 1
