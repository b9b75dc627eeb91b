"""Training input pipeline: grain over the ArrayRecord shards that `tokensynth prep` writes.

Order (flax lm1b / maxtext): source -> seeded shuffle -> repeat -> global batches -> this
process's contiguous block of each -> parse (shared record schema) and build rows -> stack ->
multiprocess prefetch. All randomness is seeded inside grain, so an iterator restored from its
saved state replays exactly. Taking a block of every *global* batch (rather than every P-th
record) means any number of processes sees the same global batches in the same row order as one
process, so dropout masks and losses match across topologies.

Examples are *padded* to `seq_len`, not packed: every example owns position 0 (its timbre) and
absolute learned positions, so packing would need per-segment position resets and block-diagonal
masks, and a 5 s clip already fills most of a budget sized for it. A batch holds
    timbre [b, T] float32     the reference clip's CLAP embedding
    rows [b, seq_len - 1, C]  int32 model input rows after position 0
    targets [b, seq_len, C]   int32 the row each position predicts
    mask [b, seq_len]         bool  positions whose target is an audio or end row
where b is this process's share of the global batch.

A record that cannot be an example (damaged: its chunk fails riegeli's hash, or it does not decode;
longer than `seq_len`; codes the model has no ids for) does not stop a run: it becomes an example
with no targets (all of `mask` False, so it adds nothing to the loss or the metrics), is logged, and
the train step counts it over the global batch (`skipped_examples`). The batches keep their shape
and order, so resuming stays exact. A data set that does not fit at all is refused before the run
begins (`verify_shards`, and the first record in `make_dataset`).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from typing import Sequence

import grain
import numpy as np

from tokensynth_jax import integrity
from tokensynth_jax.config import ModelConfig
from tokensynth_jax.errors import UserError
from tokensynth_jax.tokens import records, token_layout

log = logging.getLogger("tokensynth.data")


class DataError(UserError):
    """Shards that are missing or do not fit the model; the message names the file or record."""


def expand_paths(patterns: Sequence[str]) -> list[str]:
    """Shard files from paths, globs or directories (all `*.array_record` inside), sorted."""
    out: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            if os.path.isfile(os.path.join(pattern, "manifest.json")):  # `tokensynth prep --out`: every split
                raise DataError(f"{pattern}: a prep output, whose folders hold its train, valid and test splits; "
                                f"give one split ({os.path.join(pattern, 'train')}; valid as data.eval_paths)")
            found = glob.glob(os.path.join(pattern, "**", "*.array_record"), recursive=True)
        else:
            found = glob.glob(pattern)
        if not found:
            raise DataError(f"{pattern}: no ArrayRecord shards found")
        out.extend(found)
    return sorted(set(out))


def build_example(rec: records.PairRecord, cfg: ModelConfig, seq_len: int) -> dict:
    """One record -> padded model arrays (see the module docstring for the layout)."""
    codes = np.asarray(rec.codes, np.int64)
    if codes.shape[1] != cfg.num_codebooks or codes.max(initial=0) >= cfg.codebook_size or codes.min(initial=0) < 0:
        raise DataError(
            f"record {rec.pair_id}: codes {codes.shape} in [{codes.min(initial=0)}, {codes.max(initial=0)}] do not fit "
            f"a model of {cfg.num_codebooks} codebooks of {cfg.codebook_size}"
        )
    rows, target_mask = token_layout.training_rows(rec.midi_tokens, codes)
    if rows.shape[0] > seq_len:
        raise DataError(f"record {rec.pair_id}: {rows.shape[0]} positions exceed seq_len {seq_len} (data.seq_len)")
    targets = np.zeros((seq_len, cfg.num_channels), np.int32)
    targets[: rows.shape[0]] = rows
    mask = np.zeros(seq_len, bool)
    mask[: rows.shape[0]] = target_mask
    return {
        "timbre": np.asarray(rec.timbre, np.float32),
        "rows": targets[:-1].copy(),
        "targets": targets,
        "mask": mask,
    }


class _ParseBlock(grain.transforms.Map):
    """A global batch of raw records -> this process's block, parsed and stacked."""

    def __init__(self, cfg: ModelConfig, seq_len: int, start: int, stop: int):
        self.cfg, self.seq_len, self.start, self.stop = cfg, seq_len, start, stop

    def map(self, raw: list) -> dict:
        examples = [self._example(r) for r in raw[self.start : self.stop]]
        # The last batch of a finite pass (`drop_remainder=False`) is short: it is filled with
        # examples that have no targets, so it keeps its shape and adds nothing to the sums.
        examples += [skipped_example(self.cfg, self.seq_len)] * (self.stop - self.start - len(examples))
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    def _example(self, raw: bytes) -> dict:
        if isinstance(raw, Unreadable):
            log.warning("skipped a record: %s", raw)
            return skipped_example(self.cfg, self.seq_len)
        try:
            return build_example(records.decode(raw), self.cfg, self.seq_len)
        except (DataError, records.RecordError) as e:  # one bad record never ends a run (module docstring)
            log.warning("skipped a record: %s", e)
            return skipped_example(self.cfg, self.seq_len)


class Unreadable(str):
    """What `TolerantSource` returns for a record its shard's reader cannot read: why, in a line."""


class TolerantSource:
    """A grain source whose damaged records (riegeli's chunk or header hash fails: a flipped byte, a
    bad disk, a half-copied shard) come back as `Unreadable` instead of raising a RuntimeError that
    ends the run. A damaged chunk costs its own records only; the reader goes on with the next."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        try:
            return self.source[index]
        except RuntimeError as e:
            return Unreadable(f"record {int(index)} of {len(self.source)} cannot be read ({str(e).splitlines()[0]:.200})")


def skipped_example(cfg: ModelConfig, seq_len: int) -> dict:
    """An example with no targets (`mask` all False): what a record that cannot be one becomes."""
    return {"timbre": np.zeros(cfg.timbre_dim, np.float32), "rows": np.zeros((seq_len - 1, cfg.num_channels), np.int32),
            "targets": np.zeros((seq_len, cfg.num_channels), np.int32), "mask": np.zeros(seq_len, bool)}


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How the training stream is read."""

    paths: tuple[str, ...]  # shard files, globs or directories
    global_batch: int  # examples per step over all processes
    seq_len: int  # positions per example (timbre + rows), at most the model's max_len
    seed: int = 0  # shuffle seed
    shuffle: bool = True
    num_epochs: int | None = None  # None repeats forever
    worker_count: int = 0  # grain worker processes (0: in the main process)
    prefetch_buffer: int = 2  # batches each worker prepares ahead
    allow_mixed_clap: bool = False  # train on shards whose timbres come from different CLAPs
    verify_sha256: bool = False  # check each shard's sha256 against its prep sidecar (reads every byte)
    drop_remainder: bool = True  # False: a last short batch (num_epochs) is kept, filled with examples with no targets


def verify_shards(paths: Sequence[str], *, sha256: bool = False, seq_len: int | None = None) -> None:
    """Checks that every shard opens, and matches its prep sidecar (`<shard>.json`) when it has one.

    array_record's reader meets a truncated file with a bare RuntimeError (or silently reads no
    records), so each shard is opened here first. A sidecar gives the record count and size that
    prep wrote, and its sha256 (checked with `sha256`: it reads every byte, so it is off by
    default for large data sets), and the most positions a record takes (`max_positions`,
    written since 2026-11-28), checked against `seq_len` so that a run refuses records it cannot
    hold before it makes anything, rather than at the batch that meets the first of them.

    Raises:
      DataError: naming the first damaged shard and what is wrong with it, or else the shard with
        the longest records when any are longer than `seq_len` (`check_seq_len`).
    """
    from array_record.python.array_record_module import ArrayRecordReader

    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such shard file")
        try:  # the reader says "not ok" for a file it may not read, as for a damaged one
            with open(path, "rb"):
                pass
        except OSError as e:
            raise DataError(f"{path}: cannot read the shard ({e.strerror})") from e
        reader = ArrayRecordReader(path)
        ok = reader.ok()
        if ok:  # closing a reader that failed to open raises a bare RuntimeError; it is dropped instead
            count = reader.num_records()
            reader.close()
        if not ok:
            raise DataError(f"{path}: not a readable ArrayRecord shard (truncated or damaged: its footer "
                            f"does not parse; {os.path.getsize(path)} bytes)")
        sidecar = path + ".json"
        if not os.path.isfile(sidecar):
            continue
        try:
            with open(sidecar) as f:
                want = json.load(f)
            want_records, want_bytes, want_sha = int(want["records"]), int(want["bytes"]), want["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{sidecar}: unreadable shard sidecar ({type(e).__name__}: {e})") from e
        size = os.path.getsize(path)
        if size != want_bytes or count != want_records:
            raise DataError(f"{path}: {count} records in {size} bytes, prep wrote {want_records} records in "
                            f"{want_bytes} bytes ({sidecar})")
        if sha256 and integrity.sha256_file(path) != want_sha:
            raise DataError(f"{path}: sha256 differs from the one prep wrote ({sidecar}); the shard has changed")
    if seq_len is not None:
        check_seq_len(paths, seq_len)


def check_seq_len(paths: Sequence[str], seq_len: int) -> None:
    """Raises DataError when the prep sidecars say that records are longer than `seq_len`, naming
    the shard with the longest of them, so that one retry is enough (training checks its train and
    held-out shards in one call). Shards without a readable sidecar are `verify_shards`' to report."""
    too_long = {}
    for path in paths:
        try:
            with open(path + ".json") as f:
                longest = json.load(f).get("max_positions")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(longest, int) and longest > seq_len:
            too_long[path] = longest
    if too_long:
        path = max(too_long, key=too_long.get)
        others = f" (and {len(too_long) - 1} more of the {len(paths)} shards)" if len(too_long) > 1 else ""
        raise DataError(f"--config.data.seq_len={seq_len}: {path} holds records of up to {too_long[path]} positions"
                        f"{others}; raise data.seq_len to at least {too_long[path]} or prep shorter clips")


def readable_records(source):
    """The records of a grain source that decode, in order: a damaged one is logged and passed over,
    as the batches pass over it."""
    source = source if isinstance(source, TolerantSource) else TolerantSource(source)
    for i in range(len(source)):
        raw = source[i]
        if isinstance(raw, Unreadable):
            log.warning("passed over %s", raw)
            continue
        try:
            yield records.decode(raw)
        except records.RecordError as e:
            log.warning("passed over record %d of %d: %s", i, len(source), e)


def shard_clap(path: str) -> str | None:
    """The CLAP (`clap_model`) of a shard's timbres, from its first readable record; None if it has none."""
    first = next(readable_records(grain.sources.ArrayRecordDataSource([path])), None)
    return first.clap_model if first is not None else None


def check_one_clap(paths: Sequence[str]) -> str:
    """The CLAP (`clap_model`) all shards' timbres come from; raises DataError naming two that differ.

    Embeddings of different CLAPs (or front ends) live in different spaces, so mixing them is an
    error unless asked for. One prep job writes one CLAP, so each shard's first record speaks for it.
    """
    seen: dict[str, str] = {}
    for path in paths:
        clap = shard_clap(path)
        if clap is not None:
            seen.setdefault(clap, path)
        if len(seen) > 1:
            (a, pa), (b, pb) = seen.items()
            raise DataError(f"{pb}: timbres from CLAP {b!r}, but {pa} has CLAP {a!r}; embeddings of different "
                            "CLAPs do not mix (set allow_mixed_clap to train on both anyway)")
    return next(iter(seen), "")


def _absl_flags_parsed() -> None:
    """Marks absl's flags parsed (at their defaults) unless an absl app has parsed them.

    Why: grain's multiprocess prefetch reads an absl flag (`grain_enable_multiprocess_worker_profiling`)
    and, outside `absl.app.run`, that raised UnparsedFlagAccessError at the first batch, so any
    `data.worker_count` > 0 ended the run in a traceback (grain 0.2.18; google/grain#1355, fixed
    upstream by reading the flag's default)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_dataset(pc: PipelineConfig, cfg: ModelConfig, process_index: int = 0, process_count: int = 1):
    """The grain IterDataset of this process's batches (dicts of numpy arrays)."""
    if pc.global_batch % process_count:
        raise DataError(f"global batch {pc.global_batch} does not split over {process_count} processes")
    if pc.seq_len > cfg.max_len:
        raise DataError(f"seq_len {pc.seq_len} exceeds the model's {cfg.max_len} positions")
    paths = expand_paths(pc.paths)
    verify_shards(paths, sha256=pc.verify_sha256, seq_len=pc.seq_len)
    if not pc.allow_mixed_clap:
        check_one_clap(paths)
    source = TolerantSource(grain.sources.ArrayRecordDataSource(paths))
    # Records that do not fit the model or data.seq_len, found before the run begins: the first
    # readable record must fit.
    first = next(readable_records(source), None)
    if first is not None:
        build_example(first, cfg, pc.seq_len)
    ds = grain.MapDataset.source(source)
    if pc.shuffle:
        ds = ds.shuffle(seed=pc.seed)
    ds = ds.repeat(pc.num_epochs)
    ds = ds.batch(pc.global_batch, drop_remainder=pc.drop_remainder, batch_fn=list)
    local = pc.global_batch // process_count
    ds = ds.map(_ParseBlock(cfg, pc.seq_len, process_index * local, (process_index + 1) * local))
    it = ds.to_iter_dataset()
    if pc.worker_count > 0:
        _absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=pc.worker_count, per_worker_buffer_size=pc.prefetch_buffer))
        # The workers' batches live in shared-memory blocks that grain unlinks when their arrays go.
        # JAX on CPU takes host arrays without copying, and then the last batches' blocks were still
        # held at exit ("resource_tracker: There appear to be 4 leaked shared_memory objects").
        # Copied out here, in the main process (a batch is KBs to MBs), every block goes with its batch.
        it = it.map(_own_memory)
    return it


def _own_memory(batch: dict) -> dict:
    return {key: np.array(value, copy=True) for key, value in batch.items()}
