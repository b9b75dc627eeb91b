# Copyright 2022 Spotify AB
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
#
# Copied from basic-pitch 0.4.0, basic_pitch/inference.py, for tokensynth-jax: basic-pitch's
# published requirements pin tensorflow<2.15.1 on Linux (and numpy 1.x), which cannot be installed
# next to jax (see setup.py). Changed: `Model` keeps only its ONNX branch (onnxruntime, CPU
# provider, as before) and fetches only the note and onset outputs (the contour output fed the
# pitch bends, which are dropped); `window_audio_file` yields the windows without their times;
# `unwrap_output` loses its guard for non-3-D outputs (ONNX outputs are 3-D); `run_inference`
# takes samples at AUDIO_SAMPLE_RATE instead of a file path (it merges `get_audio_input`, whose
# librosa.load the caller replaces) and loses its debug file; the model path points at the
# nmp.onnx beside this file. Dropped: the TensorFlow, CoreML and TFLite branches, file and
# output-path checks, CSV/MIDI/NPZ writing and `predict`'s prints.
"""Runs basic-pitch's ONNX model over overlapping 2 s windows and stitches the frames back together."""
import os
import pathlib
from typing import Dict, Iterable

import numpy as np
import numpy.typing as npt

# Added for tokensynth-jax: onnxruntime (1.32, Linux) starts Microsoft's telemetry when it is
# imported: a device id and an event queue under ~/.cache/Microsoft/DeveloperTools, a `.ses` file
# in $TMPDIR, and DNS look-ups to post the events. Scoring clips has no business doing that; the
# variable must be set before the import, and a user's own setting wins.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort

from tokensynth_jax.evaluation.basic_pitch.constants import (
    ANNOTATIONS_FPS,
    AUDIO_N_SAMPLES,
    AUDIO_SAMPLE_RATE,
    FFT_HOP,
)

ICASSP_2022_MODEL_PATH = pathlib.Path(__file__).parent / "nmp.onnx"


class Model:
    """basic-pitch's ICASSP 2022 model on onnxruntime's CPU provider."""

    def __init__(self, model_path: pathlib.Path = ICASSP_2022_MODEL_PATH):
        self.model = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    def predict(self, x: npt.NDArray[np.float32]) -> Dict[str, npt.NDArray[np.float32]]:
        return {
            k: v
            for k, v in zip(
                ["note", "onset"],
                self.model.run(
                    [
                        "StatefulPartitionedCall:1",
                        "StatefulPartitionedCall:2",
                    ],
                    {"serving_default_input_2:0": x},
                ),
            )
        }


def window_audio_file(audio_original: npt.NDArray[np.float32], hop_size: int) -> Iterable[npt.NDArray[np.float32]]:
    """
    Pad appropriately an audio file, and return as
    windowed signal, with window length = AUDIO_N_SAMPLES

    Returns:
        audio_windowed: tensor with shape (n_windows, AUDIO_N_SAMPLES, 1)
            audio windowed into fixed length chunks

    """
    for i in range(0, audio_original.shape[0], hop_size):
        window = audio_original[i : i + AUDIO_N_SAMPLES]
        if len(window) < AUDIO_N_SAMPLES:
            window = np.pad(
                window,
                pad_width=[[0, AUDIO_N_SAMPLES - len(window)]],
            )
        yield np.expand_dims(window, axis=-1)


def unwrap_output(
    output: npt.NDArray[np.float32],
    audio_original_length: int,
    n_overlapping_frames: int,
) -> np.array:
    """Unwrap batched model predictions to a single matrix.

    Args:
        output: array (n_batches, n_times_short, n_freqs)
        audio_original_length: length of original audio signal (in samples)
        n_overlapping_frames: number of overlapping frames in the output

    Returns:
        array (n_times, n_freqs)
    """
    n_olap = int(0.5 * n_overlapping_frames)
    if n_olap > 0:
        # remove half of the overlapping frames from beginning and end
        output = output[:, n_olap:-n_olap, :]

    output_shape = output.shape
    n_output_frames_original = int(np.floor(audio_original_length * (ANNOTATIONS_FPS / AUDIO_SAMPLE_RATE)))
    unwrapped_output = output.reshape(output_shape[0] * output_shape[1], output_shape[2])
    return unwrapped_output[:n_output_frames_original, :]  # trim to original audio length


def run_inference(audio_original: npt.NDArray[np.float32], model: Model) -> Dict[str, np.array]:
    """Run the model on mono float32 samples at AUDIO_SAMPLE_RATE.

    Returns:
       A dictionary with the notes and onsets from model inference, each (n_times, 88).
    """
    # overlap 30 frames
    n_overlapping_frames = 30
    overlap_len = n_overlapping_frames * FFT_HOP
    hop_size = AUDIO_N_SAMPLES - overlap_len

    audio_original_length = audio_original.shape[0]
    audio_original = np.concatenate([np.zeros((int(overlap_len / 2),), dtype=np.float32), audio_original])
    output: Dict[str, list] = {"note": [], "onset": []}
    for audio_windowed in window_audio_file(audio_original, hop_size):
        for k, v in model.predict(np.expand_dims(audio_windowed, axis=0)).items():
            output[k].append(v)

    return {k: unwrap_output(np.concatenate(output[k]), audio_original_length, n_overlapping_frames) for k in output}
