"""Paths of the data job: local files or any Beam filesystem URL (gs://, s3://, ...), one set of helpers.

Beam's FileSystems is imported only for URLs, so local runs and tests never need a cloud client.
"""
from __future__ import annotations

import os


def is_remote(path: str) -> bool:
    """Whether a path is a Beam filesystem URL (gs://, s3://, ...) rather than a local path."""
    return "://" in path


def filesystems():
    """Beam's FileSystems (for URLs only)."""
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


def join(*parts: str) -> str:
    """Joins path parts, local or URL."""
    return "/".join(p.rstrip("/") for p in parts) if is_remote(parts[0]) else os.path.join(*parts)


def exists(path: str) -> bool:
    return filesystems().exists(path) if is_remote(path) else os.path.exists(path)


def size(path: str) -> int:
    """Size in bytes of an existing file."""
    return filesystems().match([path])[0].metadata_list[0].size_in_bytes if is_remote(path) else os.path.getsize(path)


def read_bytes(path: str) -> bytes:
    """Reads a local file or a Beam filesystem URL."""
    if is_remote(path):
        with filesystems().open(path) as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()
