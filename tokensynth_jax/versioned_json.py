"""Reading the small versioned JSON files this package writes (checkpoint metadata, the safetensors
config, sweep plans): one set of checks, so that any damaged or foreign file is one line naming it."""
from __future__ import annotations

import json
import os

from tokensynth_jax.errors import UserError


def read(path: str | os.PathLike, *, what: str, fmt: str, version: int, error: type[UserError]) -> dict:
    """The JSON object at `path` whose "format" is `fmt` and whose "version" this code reads.

    The caller checks that the file exists (its message says what was expected there); anything
    else wrong raises `error` naming the file: not UTF-8 JSON, not an object, another format, or a
    newer version than `version`. `what` names the kind of file in the message ("sweep plan").
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not JSON ({e})") from e
    got = data.get("format") if isinstance(data, dict) else None
    if got != fmt:
        raise error(f"{path}: not a {what} (format {got!r}, expected {fmt!r})")
    if not isinstance(data.get("version", 0), int):
        raise error(f"{path}: format version {data['version']!r} is not a number")
    if data.get("version", 0) > version:
        raise error(f"{path}: format version {data['version']} is newer than this code ({version})")
    return data
