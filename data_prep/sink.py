"""The sink: ArrayRecord shards written atomically, their sidecars, and the manifest.

Layout: `OUT/<split>/shard-IIIII-of-NNNNN.array_record` (`group_size:1`, records sorted by pair id)
with a sidecar `<shard>.json` (sha256, size, record count, rejected pairs per reason, the config
fingerprint, the most positions a record takes as a training example), and `OUT/manifest.json`. A shard is written under a temporary name and renamed into
place, then its sidecar likewise: a shard with a sidecar is complete, anything else is redone, so
a killed run re-run on the same path finishes without duplicates or losses. Local paths use
os.replace (atomic); other Beam filesystems (gs://, ...) get a local file uploaded under a
temporary name and renamed, which is as atomic as the store allows.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import uuid

from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from tokensynth_jax.errors import UserError
from tokensynth_jax.tokens.records import decode as decode_record

from . import paths
from .paths import exists, is_remote, join, read_bytes, size

log = logging.getLogger("tokensynth.prep")

WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access for the input pipeline
MANIFEST = "manifest.json"
_EXAMPLES_PER_REASON = 5


class SinkError(UserError):
    """An output directory that cannot be written or resumed; the message names it."""


def shard_name(split: str, index: int, num_shards: int) -> str:
    """The shard's path relative to the output directory."""
    return f"{split}/shard-{index:05d}-of-{num_shards:05d}.array_record"


def _publish(local_tmp: str, final: str) -> None:
    """Moves a finished local file to its final place atomically (see module doc)."""
    if not is_remote(final):
        os.replace(local_tmp, final)
        return
    fs, remote_tmp = paths.filesystems(), f"{final}.tmp-{uuid.uuid4().hex}"
    with open(local_tmp, "rb") as src, fs.create(remote_tmp) as dst:
        while block := src.read(1 << 24):
            dst.write(block)
    os.remove(local_tmp)
    fs.rename([remote_tmp], [final])


def _local_tmp(final: str) -> str:
    if is_remote(final):
        fd, path = tempfile.mkstemp(suffix=".array_record")
        os.close(fd)
        return path
    os.makedirs(os.path.dirname(final), exist_ok=True)
    return f"{final}.tmp-{uuid.uuid4().hex}"


def write_json_atomic(path: str, obj) -> None:
    """Writes JSON under a temporary name, then renames it into place."""
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Writes bytes under a temporary name, then renames them into place."""
    tmp = _local_tmp(path)
    with open(tmp, "wb") as f:
        f.write(data)
    _publish(tmp, path)


def rejection_summary(rejections) -> tuple[dict, dict]:
    """(counts per reason, a few sorted example items per reason) of (reason, item) pairs."""
    counts, examples = {}, {}
    for reason, item in sorted(rejections):
        counts[reason] = counts.get(reason, 0) + 1
        if len(examples.setdefault(reason, [])) < _EXAMPLES_PER_REASON:
            examples[reason].append(item)
    return counts, examples


def write_shard(output_dir: str, split: str, index: int, num_shards: int, records, rejections,
                fingerprint: str) -> dict:
    """Writes one shard and its sidecar atomically.

    Args:
      output_dir: the job's output directory.
      split, index, num_shards: which shard.
      records: (pair_id, record bytes) pairs, any order.
      rejections: (reason, item) pairs of this shard's pairs that were rejected.
      fingerprint: the config fingerprint.

    Returns:
      The shard's summary (also its sidecar's content).

    Raises:
      SinkError: two different records with one pair id.
    """
    by_id = {}
    for pair_id, data in records:
        if by_id.setdefault(pair_id, data) != data:
            raise SinkError(f"{shard_name(split, index, num_shards)}: two different records for pair {pair_id}")
    final = join(output_dir, shard_name(split, index, num_shards))
    tmp = _local_tmp(final)
    writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
    for pair_id in sorted(by_id):
        writer.write(by_id[pair_id])
    writer.close()
    with open(tmp, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    size = os.path.getsize(tmp)
    _publish(tmp, final)
    counts, examples = rejection_summary(rejections)
    summary = {"shard": shard_name(split, index, num_shards), "split": split, "index": index,
               "num_shards": num_shards, "records": len(by_id), "bytes": size, "sha256": digest,
               "rejected": counts, "rejected_examples": examples, "fingerprint": fingerprint,
               # what a trainer's data.seq_len must hold, checked before a run makes anything
               "max_positions": max((decode_record(data).positions() for data in by_id.values()), default=0)}
    write_json_atomic(final + ".json", summary)
    return summary


def completed_shards(output_dir: str, counts: dict[str, int], fingerprint: str) -> dict:
    """The shards a previous run finished: sidecar present, shard present with the recorded size.

    Args:
      output_dir: the job's output directory.
      counts: shards per split of this job.
      fingerprint: this job's config fingerprint.

    Returns:
      {(split, index): summary}.

    Raises:
      SinkError: the directory holds shards of a different configuration.
    """
    done = {}
    for split, num in counts.items():
        for index in range(num):
            final = join(output_dir, shard_name(split, index, num))
            if not exists(final + ".json"):
                continue
            try:  # written atomically; damaged only from outside (a bad disk, an edit): then not done
                summary = json.loads(read_bytes(final + ".json"))
                shard_bytes, shard_fingerprint = summary["bytes"], summary.get("fingerprint")
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                log.warning("%s.json: unreadable (%s: %s); the shard is written again", final, type(e).__name__, e)
                continue
            if shard_fingerprint != fingerprint:
                raise SinkError(f"{output_dir}: {shard_name(split, index, num)} was written by a different "
                                "configuration; use a new output directory or delete the old one")
            if exists(final) and size(final) == shard_bytes:
                done[(split, index)] = summary
    if not done and exists(join(output_dir, MANIFEST)):
        try:
            old_fingerprint = json.loads(read_bytes(join(output_dir, MANIFEST))).get("config_fingerprint")
        except (ValueError, AttributeError, OSError) as e:
            raise SinkError(f"{join(output_dir, MANIFEST)}: unreadable ({type(e).__name__}: {e}); "
                            "use a new output directory or delete the old one") from e
        if old_fingerprint != fingerprint:
            raise SinkError(f"{output_dir}: holds a data set of a different configuration; "
                            "use a new output directory or delete the old one")
    return done


def remove_stale_temporaries(output_dir: str) -> int:
    """Deletes `*.tmp-*` files left by killed runs (local output only); returns how many."""
    if is_remote(output_dir) or not os.path.isdir(output_dir):
        return 0
    removed = 0
    for d, _, files in os.walk(output_dir):
        for f in files:
            if ".tmp-" in f:
                os.remove(os.path.join(d, f))
                removed += 1
    return removed


def read_shard(path: str) -> list[bytes]:
    """Every record of a shard, in order."""
    reader = ArrayRecordReader(path)
    try:
        return list(reader.read_all())
    finally:
        reader.close()


def read_json(path: str):
    """A JSON file, local or on a Beam filesystem."""
    return json.loads(read_bytes(path))


def read_manifest(output_dir: str) -> dict:
    """The manifest of a finished job."""
    return read_json(join(output_dir, MANIFEST))
