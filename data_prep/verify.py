"""`tokensynth prep verify OUT`: checks a finished prep output against its manifest, offline.

A copy of a data set can lose a shard, cut one short or change bytes on the way (a half-finished
upload, a bad disk), and training would meet that as a bare error far from the cause, or not at
all. This reads every shard the manifest lists: its size and sha256 against the manifest, its
record count from the ArrayRecord footer and from reading, every record decoding under the
shared schema, in its split and of the manifest's codec, no pair id twice; then the per-split and
total counts, and no shard on disk that the manifest does not list. Local outputs only.
"""
from __future__ import annotations

import glob
import os

from array_record.python.array_record_module import ArrayRecordReader

from tokensynth_jax import integrity
from tokensynth_jax.tokens import records

from . import sink
from .midi_sources import is_remote


def _check_shard(path: str, entry: dict, codec_name: str | None, seen: dict) -> tuple[list[str], int]:
    """(problems, records read) of one shard against its manifest entry."""
    rel = entry["shard"]
    if not os.path.isfile(path):
        return [f"{rel}: missing"], 0
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        return [f"{rel}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)"], 0
    problems = []
    if integrity.sha256_file(path) != entry["sha256"]:
        problems.append(f"{rel}: sha256 differs from the manifest's (its bytes have changed)")
    reader = ArrayRecordReader(path)
    if not reader.ok():  # closing it would raise a bare RuntimeError; it is dropped instead
        return problems + [f"{rel}: not a readable ArrayRecord file"], 0
    try:
        data = reader.read_all()
    except RuntimeError as e:  # riegeli's checks (a chunk's hash, its header) raise a bare RuntimeError
        return problems + [f"{rel}: damaged ArrayRecord data ({str(e).splitlines()[0]:.160})"], 0
    finally:
        try:
            reader.close()
        except RuntimeError:  # a reader that failed fails again on close; the damage is reported above
            pass
    if len(data) != entry["records"]:
        problems.append(f"{rel}: {len(data)} records, the manifest says {entry['records']}")
    for i, raw in enumerate(data):
        try:
            rec = records.decode(raw)
        except records.RecordError as e:
            problems.append(f"{rel}: record {i} does not decode ({e})")
            continue
        if rec.split != entry["split"]:
            problems.append(f"{rel}: record {i} ({rec.pair_id}) is of split {rec.split!r}, not {entry['split']!r}")
        if codec_name is not None and rec.codec.get("name") != codec_name:
            problems.append(f"{rel}: record {i} ({rec.pair_id}) has codec {rec.codec.get('name')!r}, "
                            f"the manifest's is {codec_name!r}")
        if rec.pair_id in seen:
            problems.append(f"{rel}: record {i}: pair {rec.pair_id} is also in {seen[rec.pair_id]}")
        seen.setdefault(rec.pair_id, rel)
    return problems, len(data)


def _entry_problem(entry) -> str | None:
    """What is wrong with one of the manifest's shard entries (as sink writes them), or None."""
    if not isinstance(entry, dict):
        return f"{entry!r:.60} is not an object"
    for key, kind in (("shard", str), ("split", str), ("sha256", str), ("bytes", int), ("records", int)):
        value = entry.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            return f"{key} is {value!r:.60}, not {'a text' if kind is str else 'a whole number'}"
    rel = entry["shard"]
    if os.path.isabs(rel) or ".." in rel.replace(os.sep, "/").split("/"):
        return f"shard {rel!r:.60} is not a path inside the output"
    return None


def verify_output(output_dir: str) -> tuple[list[str], dict]:
    """Checks a prep output (see the module doc).

    Returns:
      (problems, one line each naming the shard or count; summary {"shards", "records"}).

    Raises:
      sink.SinkError: not a local directory holding a readable manifest.json.
    """
    if is_remote(output_dir):
        raise sink.SinkError(f"{output_dir}: prep verify reads local outputs; copy it here first")
    if not os.path.isdir(output_dir):
        raise sink.SinkError(f"{output_dir}: no such directory")
    try:
        manifest = sink.read_manifest(output_dir)
        if not isinstance(manifest["shards"], list):
            raise TypeError(f"shards is {manifest['shards']!r:.60}, not a list")
        shards, per_split = manifest["shards"], dict(manifest["records"])
    except FileNotFoundError as e:
        raise sink.SinkError(f"{output_dir}: no {sink.MANIFEST} (not a finished prep output)") from e
    except (ValueError, KeyError, TypeError, OSError) as e:  # OSError: a folder of that name, no permission
        raise sink.SinkError(f"{sink.join(output_dir, sink.MANIFEST)}: unreadable ({type(e).__name__}: {e})") from e
    for i, entry in enumerate(shards):  # a damaged manifest is named, not met as a KeyError below
        problem = _entry_problem(entry)
        if problem:
            raise sink.SinkError(f"{sink.join(output_dir, sink.MANIFEST)}: shards[{i}]: {problem}")
    codec_name = (manifest.get("codec") or {}).get("name")
    problems, seen, counted = [], {}, {}
    for entry in shards:
        found, n = _check_shard(sink.join(output_dir, entry["shard"]), entry, codec_name, seen)
        problems += found
        counted[entry["split"]] = counted.get(entry["split"], 0) + n
    for split, want in per_split.items():
        if not any(p.startswith(f"{split}/") for p in problems) and counted.get(split, 0) != want:
            problems.append(f"{split}: the shards hold {counted.get(split, 0)} records, the manifest says {want}")
    listed = {entry["shard"] for entry in shards}
    on_disk = {os.path.relpath(p, output_dir).replace(os.sep, "/")
               for p in glob.glob(os.path.join(output_dir, "*", "*.array_record"))}
    problems += [f"{rel}: a shard the manifest does not list" for rel in sorted(on_disk - listed)]
    return problems, {"shards": len(shards), "records": sum(counted.values())}
