"""The JSON half of a model checkpoint (`DIR/tokensynth.json`), readable without JAX or Orbax.

`checkpoint.py` writes and restores checkpoints and re-exports these names; they live apart so
that the command line can check a checkpoint's format and model config before it imports the
heavy stack or loads a single array.
"""
from __future__ import annotations

import math
import os

from tokensynth_jax import versioned_json
from tokensynth_jax.errors import UserError

FORMAT = "tokensynth-jax-model"
FORMAT_VERSION = 1
META_FILE = "tokensynth.json"
PARAMS_DIR = "params"


class CheckpointError(UserError):
    """A checkpoint directory that is missing, of another format, or does not match its config."""


def read_metadata(directory: str | os.PathLike) -> dict:
    """The JSON beside the parameters; raises CheckpointError naming the directory if it is not ours."""
    path = os.path.join(os.fspath(directory), META_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: not a tokensynth-jax checkpoint (no {META_FILE})")
    meta = versioned_json.read(path, what="tokensynth-jax checkpoint", fmt=FORMAT, version=FORMAT_VERSION,
                               error=CheckpointError)
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{path}: no model config (\"model\" is {meta.get('model')!r}, not an object)")
    _check_codec(meta, path)
    return meta


def _check_codec(meta: dict, path: str) -> None:
    """`metadata.codec`, which synthesis plans windows and decodes with: absent, or a name and
    positive rates."""
    metadata = meta.get("metadata")
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: metadata is {metadata!r:.60}, not an object")
    codec = metadata.get("codec")
    if codec is None:
        return
    if not isinstance(codec, dict):
        raise CheckpointError(f"{path}: metadata.codec is {codec!r:.60}, not an object")
    if codec.get("name") is not None and not (isinstance(codec["name"], str) and codec["name"]):
        raise CheckpointError(f"{path}: metadata.codec.name is {codec['name']!r:.60}, not a codec name")
    for key in ("sample_rate", "frame_rate"):
        value = codec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise CheckpointError(f"{path}: metadata.codec.{key} is {value!r:.60}, not a positive number")
