# Copyright 2024 Spotify AB
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
# Copied from basic-pitch 0.4.0, basic_pitch/constants.py, for tokensynth-jax: basic-pitch's
# published requirements pin tensorflow<2.15.1 on Linux (and numpy 1.x), which cannot be installed
# next to jax (see setup.py). Changed: kept only the constants that the ONNX inference and note
# creation below use; dropped the frequency-bin tables, the training-data constants and `Split`.
"""basic-pitch's audio and frame constants (22.05 kHz input, 256-sample hop, 2 s model windows)."""

FFT_HOP = 256

AUDIO_SAMPLE_RATE = 22050

AUDIO_WINDOW_LENGTH = 2  # duration in seconds of training examples - original 1

ANNOTATIONS_FPS = AUDIO_SAMPLE_RATE // FFT_HOP

# ANNOT_N_TIME_FRAMES is the number of frames in the time-frequency representations we compute
ANNOT_N_FRAMES = ANNOTATIONS_FPS * AUDIO_WINDOW_LENGTH

# AUDIO_N_SAMPLES is the number of samples in the (clipped) audio that we use as input to the models
AUDIO_N_SAMPLES = AUDIO_SAMPLE_RATE * AUDIO_WINDOW_LENGTH - FFT_HOP
