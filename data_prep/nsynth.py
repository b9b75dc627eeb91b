"""NSynth as an instrument library: the raw release layout, and a one-time export from TFDS.

The raw layout is what the NSynth release unpacks to: `ROOT/nsynth-{train,valid,test}/examples.json`
(note_str -> pitch, velocity, instrument_str, ...) and `audio/<note_str>.wav` (16 kHz, 4 s: 3 s held,
1 s release). Each instrument_str is an instrument; its split is the directory it is in, and an
instrument found in two splits is an error (held-out instruments must stay held out). Notes are
resampled to the codec's rate when a worker builds the note table. The TensorFlow Datasets
`nsynth` builder (for people who have it prepared) is read once with `export_tfds`, which writes
the raw layout, because building one instrument's table from TFDS would scan the whole split.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np

from tokensynth_jax.audio import io as audio_io

from .instrument_spec import InstrumentError, InstrumentSpec
from .paths import exists, join, read_bytes

NSYNTH_RATE = 16000


def raw_instruments(root: str, splits: tuple[str, ...]) -> list[InstrumentSpec]:
    """The instruments of a raw NSynth tree.

    Args:
      root: the directory holding nsynth-train/, nsynth-valid/, nsynth-test/ (any of them).
      splits: which splits to read; missing split directories are skipped.

    Returns:
      One spec per instrument_str, sorted by id.

    Raises:
      InstrumentError: no split found, an unreadable examples.json, or an instrument in two splits.
    """
    specs, seen = [], {}
    for split in splits:
        split_dir = join(root, f"nsynth-{split}")
        index = join(split_dir, "examples.json")
        if not exists(index):
            continue
        try:
            examples = json.loads(read_bytes(index))
        except (OSError, ValueError) as e:
            raise InstrumentError(f"{index}: not a readable NSynth examples.json ({e})") from e
        notes: dict = {}
        for note_str, ex in sorted(examples.items()):
            try:
                notes.setdefault(ex["instrument_str"], []).append([int(ex["pitch"]), int(ex["velocity"]), note_str])
            except (KeyError, TypeError, ValueError) as e:
                raise InstrumentError(f"{index}: example {note_str!r} lacks instrument_str/pitch/velocity") from e
        for name, rows in sorted(notes.items()):
            if name in seen:
                raise InstrumentError(f"NSynth instrument {name} is in both {seen[name]} and {split}")
            seen[name] = split
            specs.append(InstrumentSpec(f"nsynth:{name}", split, "nsynth", {"dir": split_dir, "notes": rows}))
    if not specs:
        raise InstrumentError(f"{root}: no nsynth-{{{','.join(splits)}}}/examples.json found")
    return specs


def raw_notes(spec: InstrumentSpec, sample_rate: int) -> dict:
    """(pitch, velocity) -> float32 audio at `sample_rate` for one NSynth instrument.

    Raises:
      InstrumentError: a wav that is missing or not 16-bit mono PCM.
    """
    from scipy.io import wavfile

    out = {}
    for pitch, velocity, note_str in spec.params["notes"]:
        path = join(spec.params["dir"], "audio", f"{note_str}.wav")
        try:
            rate, pcm = wavfile.read(io.BytesIO(read_bytes(path)))
        except (OSError, ValueError) as e:
            raise InstrumentError(f"{path}: not a readable wav ({e})") from e
        if pcm.ndim != 1 or pcm.dtype != np.int16:
            raise InstrumentError(f"{path}: expected 16-bit mono PCM, got {pcm.dtype} {pcm.shape}")
        out[(int(pitch), int(velocity))] = audio_io.resample_polyphase(pcm.astype(np.float32) / 32768.0, rate,
                                                                       sample_rate)
    return out


def write_raw_layout(examples, instrument_names, out_dir: str) -> int:
    """Writes NSynth examples (TFDS's feature dicts) in the raw release layout.

    Args:
      examples: iterable of dicts with "id" (note_str), "pitch", "velocity", "audio" (float [n] at
        16 kHz) and "instrument": {"label": int}; TFDS's `nsynth` features, as numpy.
      instrument_names: label -> instrument_str.
      out_dir: the split directory to write (examples.json and audio/).

    Returns:
      How many notes were written.
    """
    from scipy.io import wavfile

    os.makedirs(os.path.join(out_dir, "audio"), exist_ok=True)
    index = {}
    for ex in examples:
        note_str = ex["id"].decode() if isinstance(ex["id"], bytes) else str(ex["id"])
        pcm = np.clip(np.round(np.asarray(ex["audio"], np.float32) * 32767.0), -32768, 32767).astype(np.int16)
        wavfile.write(os.path.join(out_dir, "audio", f"{note_str}.wav"), NSYNTH_RATE, pcm)
        index[note_str] = {"note_str": note_str, "pitch": int(ex["pitch"]), "velocity": int(ex["velocity"]),
                           "instrument_str": instrument_names(int(ex["instrument"]["label"])),
                           "sample_rate": NSYNTH_RATE}
    tmp = os.path.join(out_dir, "examples.json.tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, sort_keys=True)
    os.replace(tmp, os.path.join(out_dir, "examples.json"))  # examples.json last: its presence means done
    return len(index)


def export_tfds(data_dir: str | None, out_root: str, splits: tuple[str, ...]) -> dict:
    """Exports a prepared TFDS `nsynth` data set to the raw layout (skipping finished splits).

    Args:
      data_dir: TFDS's data directory (None: TFDS's default).
      out_root: where nsynth-<split>/ directories are written.
      splits: the splits to export.

    Returns:
      {split: notes written (0 when already there)}.

    Raises:
      InstrumentError: tensorflow-datasets is not installed, or the builder is not prepared.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise InstrumentError("reading NSynth from TFDS needs `pip install tensorflow-datasets tensorflow`; "
                              "or pass the raw release with --nsynth-dir") from e
    try:
        builder = tfds.builder("nsynth", data_dir=data_dir)
        names = builder.info.features["instrument"]["label"].int2str
    except Exception as e:  # TFDS raises several types for a missing or unprepared data set
        raise InstrumentError(f"TFDS nsynth in {data_dir or 'the default data dir'} is not prepared ({e})") from e
    written = {}
    for split in splits:
        out_dir = os.path.join(out_root, f"nsynth-{split}")
        if os.path.exists(os.path.join(out_dir, "examples.json")):
            written[split] = 0
            continue
        written[split] = write_raw_layout(tfds.as_numpy(builder.as_dataset(split=split)), names, out_dir)
    return written
