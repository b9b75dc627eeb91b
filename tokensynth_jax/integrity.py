"""File lists (size and sha256 of every file) written when an output is complete, checked before use.

Orbax, grain and array_record meet a damaged file with a long traceback, or with a bare error that
names no file. A list of what the complete output held lets a check name the damaged file in one
line before anything reads it: a missing file, a file of another size (truncated or half-copied)
and, with checksums, changed bytes. Paths go through etils.epath, the file layer Orbax uses, so a
checkpoint directory on gs:// is listed and checked like a local one. No Orbax, no JAX.
"""
from __future__ import annotations

import hashlib
import json
import os

from etils import epath

FILE_LIST_VERSION = 1
_BLOCK = 1 << 24


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in blocks (files can be larger than memory)."""
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def list_files(root: str | os.PathLike, *, checksums: bool = True, exclude: tuple[str, ...] = ()) -> dict:
    """Every file under `root`: relative path ("/"-separated) -> {"bytes": n[, "sha256": hex]}.

    Args:
      root: a directory.
      checksums: also hash every file (reads every byte); sizes alone need only a stat.
      exclude: relative paths left out (e.g. the list's own file).
    """
    root, out = epath.Path(root), {}
    for d, _, names in root.walk():
        for name in names:
            path = d / name
            rel = path.relative_to(root).as_posix()
            if rel in exclude:
                continue
            entry = {"bytes": path.stat().length}
            if checksums:
                entry["sha256"] = sha256_file(path)
            out[rel] = entry
    return dict(sorted(out.items()))


def write_file_list(root: str | os.PathLike, name: str, *, checksums: bool = True,
                    exclude: tuple[str, ...] = ()) -> dict:
    """Writes `root/name`, the JSON list of every other file under `root` (but `exclude`), atomically.

    Returns:
      The list written ({"version", "files"}).
    """
    files = list_files(root, checksums=checksums, exclude=(name, *exclude))
    listing = {"version": FILE_LIST_VERSION, "files": files}
    path = epath.Path(root) / name
    tmp = path.with_name(f"{name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(listing, indent=1))
    tmp.replace(path)
    return listing


def read_file_list(root: str | os.PathLike, name: str) -> dict | None:
    """The files of `root/name` (see `write_file_list`); None if there is no list.

    Raises:
      ValueError: the list exists but is not readable JSON of this format (the message names it).
    """
    path = epath.Path(root) / name
    if not path.exists():
        return None
    try:
        return dict(json.loads(path.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{name} is unreadable ({type(e).__name__}: {e})") from e


def check_files(root: str | os.PathLike, files: dict, *, checksums: bool = True) -> list[str]:
    """Problems of `root` against a file list, one line each naming the file (empty: intact).

    Args:
      root: the directory the relative paths of `files` start from.
      files: relative path -> {"bytes"[, "sha256"]}, as `list_files` returns.
      checksums: compare sha256 where the list has one (reads every byte); else sizes only.
    """
    if not isinstance(files, dict):
        return [f"the file list is a {type(files).__name__}, not an object of path -> size"]
    problems = []
    for rel, want in files.items():
        if not isinstance(want, dict) or not isinstance(want.get("bytes"), int) or isinstance(want["bytes"], bool):
            problems.append(f"{rel}: its file-list entry {want!r} has no byte count")
            continue
        path = epath.Path(root) / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = path.stat().length
        if size != want["bytes"]:
            what = "truncated" if size < want["bytes"] else "longer than written"
            problems.append(f"{rel} has {size} bytes, {want['bytes']} were written ({what})")
        elif checksums and "sha256" in want and sha256_file(path) != want["sha256"]:
            problems.append(f"{rel} has changed since it was written (sha256 differs)")
    return problems
