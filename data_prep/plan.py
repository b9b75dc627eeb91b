"""Which pairs the job makes: a pure function of (config, instruments, segment pool).

Every random choice is drawn from a generator seeded by the job seed and a stable key (the
instrument id, the pair id), never from worker order, so any runner on any number of workers plans
the same pairs. Each instrument gets `pairs_per_instrument` pairs: targets walk seeded
permutations of the pool, each reference is another pool segment. A pair's shard is a stable hash
of its id, so a re-run finds the same pairs in the same shards and can skip the finished ones.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np

from .config import SPLITS, PrepConfig
from .instrument_spec import InstrumentSpec
from .midi_sources import Segment, SegmentError


@dataclasses.dataclass(frozen=True)
class PairPlan:
    """One pair to make."""

    pair_id: str
    split: str
    shard: int  # index within the split's shards
    index: int  # the pair's number within its instrument
    instrument: InstrumentSpec
    target: Segment
    reference: Segment


def rng_for(seed: int, *parts) -> np.random.Generator:
    """A generator seeded by the job seed and a stable key (strings hashed, not Python's hash)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(np.random.SeedSequence([seed, *np.frombuffer(digest[:16], np.uint32)]))


def make_pair_id(seed: int, instrument_id: str, index: int, target_key: str, reference_key: str) -> str:
    """A stable id from what defines the pair."""
    text = f"{seed}|{instrument_id}|{index}|{target_key}|{reference_key}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def shard_of(pair_id: str, num_shards: int) -> int:
    """The pair's shard within its split."""
    return int(pair_id[:12], 16) % num_shards


def shard_counts(instruments: list[InstrumentSpec], cfg: PrepConfig) -> dict[str, int]:
    """Shards per split: enough for `records_per_shard` each, for the splits that have instruments."""
    counts = {}
    for split in SPLITS:
        n = sum(s.split == split for s in instruments) * cfg.pairs_per_instrument
        if n:
            counts[split] = max(1, math.ceil(n / cfg.records_per_shard))
    return counts


def plan_instrument(instrument: InstrumentSpec, pool: list[Segment], cfg: PrepConfig, num_shards: int,
                    skip_shards: frozenset = frozenset()) -> list[list[PairPlan]]:
    """An instrument's pairs, in chunks of `cfg.chunk_size`.

    Args:
      instrument: the instrument.
      pool: the segment pool, in pool order (at least 2 segments).
      cfg: the job config.
      num_shards: shards of the instrument's split.
      skip_shards: (split, shard) pairs already written; their pairs are left out.

    Returns:
      Chunks of plans, in pair order.

    Raises:
      SegmentError: fewer than 2 segments in the pool; the whole job stops (no shard is written,
        so a re-run with better MIDI input starts clean).
    """
    n, size = cfg.pairs_per_instrument, len(pool)
    if size < 2:
        raise SegmentError(f"the segment pool has {size} segment(s), pairs need at least 2: every MIDI file or "
                           "window was rejected, or there are too few (the job's rejected.* counters say why)")
    rng = rng_for(cfg.seed, "pairs", instrument.instrument_id)
    targets = np.concatenate([rng.permutation(size) for _ in range(math.ceil(n / size))])[:n]
    refs = rng.integers(size - 1, size=n)
    refs = refs + (refs >= targets)  # any segment but the target
    plans = []
    for j, (t, r) in enumerate(zip(targets.tolist(), refs.tolist())):
        pid = make_pair_id(cfg.seed, instrument.instrument_id, j, pool[t].key, pool[r].key)
        shard = shard_of(pid, num_shards)
        if (instrument.split, shard) not in skip_shards:
            plans.append(PairPlan(pid, instrument.split, shard, j, instrument, pool[t], pool[r]))
    return [plans[i : i + cfg.chunk_size] for i in range(0, len(plans), cfg.chunk_size)]
