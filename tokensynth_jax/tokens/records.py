"""The training-pair record schema, shared by `data_prep/` (writer) and the input pipeline (reader).

One ArrayRecord record per pair, msgpack-encoded with a fixed key order so the same pair always
gives the same bytes (deterministic shards). Every record carries the schema name and version.
Arrays are stored undelayed and unpadded: the delay pattern, padding and packing belong to the
input pipeline, so one prepared data set serves every model config.

Fields: MIDI tokens of the target, the target's codec codes [frames, codebooks], the reference's
CLAP embedding, the instrument, codec and CLAP identities, the augmentation applied, and the
source ids (MIDI file and segment start of target and reference) so any record can be traced
and re-rendered.

Versions: 2 adds `codec["padding"]`, how the target clip was padded before the codec ("whole-hop":
zeros on the right up to a whole number of hops, as descript's DAC `preprocess` pads, so 5 s at
44.1 kHz gives 431 frames; "none": the codec saw the clip as it is). Version 1 records still load:
their writer never padded, so they read as "none".
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import msgpack
import numpy as np

from tokensynth_jax.errors import UserError
from tokensynth_jax.tokens import token_layout

SCHEMA_NAME = "tokensynth-pair"
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
PADDING_NONE, PADDING_WHOLE_HOP = "none", "whole-hop"  # values of codec["padding"] (see the module doc)


class RecordError(UserError):
    """A record that is not of this schema or is malformed; the message says which field."""


@dataclasses.dataclass(frozen=True)
class PairRecord:
    """One training pair."""

    pair_id: str  # stable id (hash of the sources and seed), unique in a data set
    split: str  # "train" / "valid" / "test" (split by instrument)
    instrument_id: str  # e.g. "sf2:TimGM6mb:000-000" or an NSynth instrument name
    midi_tokens: np.ndarray  # int16 [M], the target's MIDI tokens (token_layout vocabulary)
    codes: np.ndarray  # int16 [T, K] target codec codes, undelayed
    timbre: np.ndarray  # float16 [D] CLAP embedding of the reference clip
    codec: dict  # {"name", "sample_rate", "frame_rate", "num_codebooks", "codebook_size", "padding"}
    clap_model: str  # which CLAP produced `timbre` (checkpoint id and front-end mode)
    augmentation: dict  # the effect chain applied to both clips ({"chain": []} when dry)
    target_source: dict  # {"midi": path or generator id, "start": seconds, "track": index}
    reference_source: dict  # same for the reference clip

    def to_bytes(self) -> bytes:
        return encode(self)

    def positions(self) -> int:
        """Positions this pair takes as a training example (`token_layout.training_positions`)."""
        return token_layout.training_positions(len(self.midi_tokens), *np.shape(self.codes))


def _array(a: np.ndarray, dtype) -> dict:
    a = np.ascontiguousarray(a, dtype=dtype)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def _unarray(d: dict, field: str) -> np.ndarray:
    try:
        return np.frombuffer(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()
    except (KeyError, TypeError, ValueError) as e:
        raise RecordError(f"field {field!r} is not a stored array ({e})") from e


def encode(record: PairRecord) -> bytes:
    """Deterministic bytes of a record (fixed key order, JSON-normalised dicts)."""
    codes = np.asarray(record.codes)
    if codes.ndim != 2:
        raise RecordError(f"{record.pair_id}: codes must be [frames, codebooks], got {codes.shape}")
    if np.asarray(record.midi_tokens).ndim != 1:
        raise RecordError(f"{record.pair_id}: midi_tokens must be 1-D")
    canon = lambda d: json.loads(json.dumps(d, sort_keys=True))  # plain, sorted, msgpack-able
    payload = [
        ("schema", SCHEMA_NAME),
        ("version", SCHEMA_VERSION),
        ("pair_id", record.pair_id),
        ("split", record.split),
        ("instrument_id", record.instrument_id),
        ("midi_tokens", _array(record.midi_tokens, np.int16)),
        ("codes", _array(codes, np.int16)),
        ("timbre", _array(record.timbre, np.float16)),
        ("codec", canon(record.codec)),
        ("clap_model", record.clap_model),
        ("augmentation", canon(record.augmentation)),
        ("target_source", canon(record.target_source)),
        ("reference_source", canon(record.reference_source)),
    ]
    return msgpack.packb(dict(payload), use_bin_type=True)


def decode(data: bytes) -> PairRecord:
    """Parses and validates a record; raises RecordError naming the problem."""
    try:
        d: dict[str, Any] = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several exception types for corrupt data
        raise RecordError(f"not a msgpack record ({e})") from e
    if not isinstance(d, dict) or d.get("schema") != SCHEMA_NAME:
        raise RecordError(f"not a {SCHEMA_NAME} record (schema {d.get('schema') if isinstance(d, dict) else None!r})")
    if d.get("version") not in READABLE_VERSIONS:
        raise RecordError(f"record version {d.get('version')}, this code reads versions {READABLE_VERSIONS}")
    names = [f.name for f in dataclasses.fields(PairRecord)]
    missing = [n for n in names if n not in d]
    if missing:
        raise RecordError(f"record {d.get('pair_id')!r} misses fields {missing}")
    if d["version"] == 1 and isinstance(d["codec"], dict):
        d["codec"] = {**d["codec"], "padding": PADDING_NONE}
    arrays = {n: _unarray(d[n], n) for n in ("midi_tokens", "codes", "timbre")}
    return PairRecord(**{n: arrays.get(n, d[n]) for n in names})
