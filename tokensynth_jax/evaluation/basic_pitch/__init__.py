"""basic-pitch 0.4.0's ONNX transcription path (Spotify, Apache-2.0), vendored: model, windowing, notes.

Copied from basic-pitch 0.4.0 (https://github.com/spotify/basic-pitch, the `basic_pitch` package
as published on PyPI), with its LICENSE and NOTICE beside this file. Why a copy: basic-pitch's
published requirements pin tensorflow<2.15.1 on Linux (and with it numpy 1.x), which cannot be
installed next to jax (see setup.py), so `pip install 'tokensynth-jax[eval]'` could not give a
working `tokensynth eval`. Only the ONNX path that metrics.transcribe uses is kept, run with
onnxruntime directly; tests/test_basic_pitch_vendored.py checks it gives exactly the notes that
the installed basic-pitch gives. Each file's header says what was changed.
"""
