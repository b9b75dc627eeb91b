"""The Beam graph of `tokensynth prep`, and `run`, which plans, resumes and launches it.

    MIDI files | segments (+ rejections) -> seeded pool (Top.Smallest by hash)
    instruments x pool -> pair plans in chunks (finished shards skipped) | Reshuffle
      | render + augment (note tables cached per worker) (+ rejected pairs)
      | BatchElements | CLAP + codec (models loaded once per worker process)
    records + rejected pairs + shard keys | CoGroupByKey | write shards atomically
      | ToList | manifest (counts per split, rejections per reason, checksums)

Rendering, augmentation and encoding are fused stages, so only ~10 KB records cross a shuffle,
never audio. Rejections travel as data to the manifest (Beam metrics are counted too, but not
every runner reads them back reliably). Runner choice and worker settings are ordinary Beam
pipeline options, e.g. `--runner=DataflowRunner --project=... --region=...`; without a runner the
job runs on this machine (`with_local_runner`).
"""
from __future__ import annotations

import collections
import dataclasses
import threading

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils import shared

from tokensynth_jax.audio import encoders
from tokensynth_jax.tokens import records

from . import codec_fit, instrument_spec, instruments, midi_sources, pairs, paths, plan, render, sink
from .config import PrepConfig

_NS = "tokensynth_prep"
_REJECTED_PAIRS = "rejected_pairs"
_REJECTED_MIDI = "rejected_midi"


def _count(reason: str) -> None:
    Metrics.counter(_NS, f"rejected.{reason}").inc()


class _TableCache:
    """Note tables kept per worker process (LRU), shared by the DoFn threads of that process."""

    def __init__(self):
        self._tables: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec, sample_rate: int, cfg: PrepConfig):
        # Everything the table is built from: one worker process may run several jobs (tests,
        # DirectRunner in-process), and a table of other note lengths must never be reused.
        key = (repr(spec), sample_rate, cfg.table_pitches, cfg.table_velocities, cfg.note_hold_seconds,
               cfg.note_release_seconds, cfg.max_pitch_shift)
        with self._lock:
            if key in self._tables:
                self._tables.move_to_end(key)
                return self._tables[key]
        table = instruments.build_note_table(spec, sample_rate, cfg)  # outside the lock: slow
        with self._lock:
            self._tables[key] = table
            while len(self._tables) > cfg.note_table_cache:
                self._tables.popitem(last=False)
        return table


_TABLES = _TableCache()


class ExtractSegments(beam.DoFn):
    """A MIDI file -> (pool rank, segment)s; bad files and windows to the rejected output."""

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg

    def process(self, rel_path: str):
        cfg = self.cfg
        segments, rejected = midi_sources.file_segments(
            cfg.midi_dir, rel_path, max_notes=cfg.max_notes, min_tempo_bpm=cfg.min_tempo_bpm,
            max_tempo_bpm=cfg.max_tempo_bpm)
        for reason, item in rejected:
            _count(reason)
            yield beam.pvalue.TaggedOutput(_REJECTED_MIDI, (reason, item))
        for seg in segments:
            yield midi_sources.pool_rank(cfg.seed, seg.key), seg


class RejectionSummary(beam.CombineFn):
    """(reason, item)s -> (counts per reason, the 5 smallest items per reason): bounded in memory
    and independent of the order items arrive in, unlike collecting every rejection in a list."""

    def create_accumulator(self):
        return {}, {}

    def add_input(self, acc, rejection):
        return self.merge_accumulators([acc, ({rejection[0]: 1}, {rejection[0]: [rejection[1]]})])

    def merge_accumulators(self, accs):
        counts, examples = collections.Counter(), {}
        for c, e in accs:
            counts.update(c)
            for reason, items in e.items():
                examples[reason] = sorted(examples.get(reason, []) + items)[:5]
        return dict(counts), examples

    def extract_output(self, acc):
        return acc


def _staged(p: beam.Pipeline, label: str, output_dir: str, items: list):
    """A PCollection of JSON-able items read from a file written now (`OUT/_job/<label>.json`).

    Why: beam.Create inlines its values into the job graph, which Dataflow caps at 10 MB; the
    Lakh file list (178k paths) or the NSynth instruments (each with its notes) come close.
    """
    path = paths.join(output_dir, "_job", f"{label}.json")
    sink.write_json_atomic(path, items)
    return (p | f"{label} file" >> beam.Create([path])
            | f"Read {label}" >> beam.FlatMap(sink.read_json))


def _procedural(index: int, cfg: PrepConfig):
    seg = midi_sources.procedural_segment(cfg.seed, index, cfg.max_notes)
    return midi_sources.pool_rank(cfg.seed, seg.key), seg


def _plan(instrument, pool, cfg: PrepConfig, counts: dict, skip: frozenset):
    yield from plan.plan_instrument(instrument, pool, cfg, counts[instrument.split], skip)


class RenderPairs(beam.DoFn):
    """A chunk of one instrument's plans -> rendered pairs; rejected pairs to a side output."""

    def __init__(self, cfg: PrepConfig, sample_rate: int):
        self.cfg, self.sample_rate = cfg, sample_rate

    def _reject(self, p, reason: str, message: str):
        _count(reason)
        return beam.pvalue.TaggedOutput(_REJECTED_PAIRS, ((p.split, p.shard), (reason, f"{p.pair_id}: {message}")))

    def process(self, chunk):
        try:
            table = _TABLES.get(chunk[0].instrument, self.sample_rate, self.cfg)
        except (instrument_spec.InstrumentError, render.RenderError, OSError, ValueError) as e:
            for p in chunk:
                yield self._reject(p, pairs.UNUSABLE_INSTRUMENT, str(e))
            return
        for p in chunk:
            try:
                yield pairs.render_pair(p, table, self.cfg)
            except render.RenderError as e:
                yield self._reject(p, e.reason, str(e))
            except midi_sources.SegmentError as e:
                yield self._reject(p, pairs.TOKENIZE_ERROR, str(e))


class _Encoders:
    """The models of one worker process (weak-referenceable for `shared.Shared`)."""

    def __init__(self, cfg: PrepConfig, codec: str):
        kw = dict(batch_size=cfg.encode_batch_size, device=cfg.device, offline=cfg.offline)
        self.codec = encoders.Codec(codec, **kw)
        self.clap = encoders.ClapEmbedder(cfg.clap, input_mode=cfg.clap_input, **kw)


class EncodePairs(beam.DoFn):
    """A batch of rendered pairs -> ((split, shard), (pair id, record bytes))."""

    def __init__(self, cfg: PrepConfig, codec: str):
        self.cfg, self.codec = cfg, codec  # codec: what the encoders load (a fitted codec's state path)
        self._shared = shared.Shared()

    def setup(self):
        if self.cfg.torch_threads:
            encoders.set_torch_threads(self.cfg.torch_threads)
        self.models = self._shared.acquire(lambda: _Encoders(self.cfg, self.codec),
                                           tag=f"{self.cfg.fingerprint()}|{self.codec}")

    def process(self, batch):
        codec, clap = self.models.codec, self.models.clap
        codes = codec.encode(np.stack([p.target for p in batch]))
        timbre = clap.embed(np.stack([p.reference for p in batch]), codec.info.sample_rate)
        for p, c, t in zip(batch, codes, timbre):
            key = (p.plan.split, p.plan.shard)
            if not np.isfinite(t).all():
                _count("nonfinite_embedding")
                yield beam.pvalue.TaggedOutput(_REJECTED_PAIRS, (key, ("nonfinite_embedding", p.plan.pair_id)))
                continue
            rec = pairs.to_record(p, c, t, codec.info.to_dict(), clap.model_id)
            Metrics.counter(_NS, "pairs_written").inc()
            yield key, (p.plan.pair_id, records.encode(rec))


class WriteShard(beam.DoFn):
    """(shard key, grouped records and rejections) -> the shard's summary."""

    def __init__(self, cfg: PrepConfig, counts: dict):
        self.cfg, self.counts = cfg, counts

    def process(self, element):
        (split, index), groups = element
        yield sink.write_shard(self.cfg.output_dir, split, index, self.counts[split], groups["records"],
                               groups["rejected"], self.cfg.fingerprint())


def build_manifest(cfg: PrepConfig, *, specs, counts, codec: dict, clap_model: str, summaries,
                   midi_rejections, num_files: int, num_segments: int, pool_size: int) -> dict:
    """The manifest: what the data set holds and what was left out, per reason.

    Args:
      specs: (instrument id, split) of every instrument.
      midi_rejections: (counts per reason, examples per reason) of MIDI files and windows.
      The rest: shard counts, codec and CLAP identities, shard summaries, MIDI statistics.
    """
    summaries = sorted(summaries, key=lambda s: s["shard"])
    records_per_split = {split: sum(s["records"] for s in summaries if s["split"] == split) for split in counts}
    pair_rejections, pair_examples = collections.Counter(), {}
    for s in summaries:
        pair_rejections.update(s["rejected"])
        for reason, items in s["rejected_examples"].items():
            pair_examples.setdefault(reason, []).extend(items)
    midi_counts, midi_examples = midi_rejections
    by_split = {split: [i for i, s in specs if s == split] for split in counts}
    return {
        "schema": {"name": records.SCHEMA_NAME, "version": records.SCHEMA_VERSION},
        "config": cfg.to_dict(),
        "config_fingerprint": cfg.fingerprint(),
        "codec": codec,
        "clap_model": clap_model,
        "instruments": {split: {"count": len(ids), "ids": ids} for split, ids in by_split.items()},
        "midi": {"source": cfg.midi_dir or midi_sources.procedural.GENERATOR, "files": num_files,
                 "segments": num_segments, "pool": pool_size},
        "pairs_planned": {split: len(ids) * cfg.pairs_per_instrument for split, ids in by_split.items()},
        "records": records_per_split,
        "total_records": sum(records_per_split.values()),
        "rejected": {"midi": midi_counts, "pairs": dict(sorted(pair_rejections.items()))},
        "rejected_examples": {"midi": midi_examples,
                              "pairs": {r: sorted(x)[:5] for r, x in sorted(pair_examples.items())}},
        "shards": [{k: v for k, v in s.items() if k != "fingerprint"} for s in summaries],
    }


class WriteManifest(beam.DoFn):
    """All shard summaries -> manifest.json (this run's and the shards a previous run finished)."""

    def __init__(self, cfg: PrepConfig, info: dict):
        self.cfg, self.info = cfg, info

    def process(self, summaries, midi_rejections, num_segments, pool_size):
        info = dict(self.info)
        done = info.pop("done_summaries")
        manifest = build_manifest(self.cfg, summaries=list(summaries) + done, midi_rejections=midi_rejections,
                                  num_segments=num_segments, pool_size=pool_size, **info)
        sink.write_json_atomic(paths.join(self.cfg.output_dir, sink.MANIFEST), manifest)
        sink.remove_stale_temporaries(self.cfg.output_dir)
        yield manifest


def build(p: beam.Pipeline, cfg: PrepConfig, *, specs, counts: dict, done: dict, codec: encoders.CodecInfo,
          clap_model: str, midi_files: list[str] | None, codec_source: str | None = None,
          codec_manifest: dict | None = None):
    """Adds the job to a pipeline; returns the PCollection holding the manifest.

    `codec_source` is what the encoders load (default `cfg.codec`; a fitted codec's state path),
    `codec_manifest` what the manifest adds to the codec's entry (where a fitted state is).
    """
    if midi_files is None:
        segments = (p | "Phrases" >> beam.Create(range(cfg.procedural_candidates))
                    | "Reshuffle phrases" >> beam.Reshuffle()
                    | "Generate" >> beam.Map(_procedural, cfg))
        midi_rejected = p | "No MIDI rejections" >> beam.Create([])
    else:
        extracted = (_staged(p, "midi_files", cfg.output_dir, midi_files)
                     | "Reshuffle files" >> beam.Reshuffle()
                     | "Segments" >> beam.ParDo(ExtractSegments(cfg)).with_outputs(_REJECTED_MIDI, main="segments"))
        segments, midi_rejected = extracted.segments, extracted[_REJECTED_MIDI]
    pool = (segments | "Pool" >> beam.combiners.Top.Smallest(cfg.num_segments, key=lambda kv: kv[0])
            | "Pool segments" >> beam.Map(lambda kv: [seg for _, seg in kv]))
    skip = frozenset(done)
    rendered = (_staged(p, "instruments", cfg.output_dir, [dataclasses.asdict(s) for s in specs])
                | "Spec" >> beam.Map(lambda d: instrument_spec.InstrumentSpec(**d))
                | "Plan" >> beam.FlatMap(_plan, beam.pvalue.AsSingleton(pool), cfg, counts, skip)
                | "Reshuffle chunks" >> beam.Reshuffle()
                | "Render" >> beam.ParDo(RenderPairs(cfg, codec.sample_rate)).with_outputs(_REJECTED_PAIRS,
                                                                                         main="pairs"))
    encoded = (rendered.pairs
               | "Batch" >> beam.BatchElements(min_batch_size=cfg.encode_batch_size,
                                             max_batch_size=cfg.encode_batch_size)
               | "Encode" >> beam.ParDo(EncodePairs(cfg, codec_source or cfg.codec)).with_outputs(
                   _REJECTED_PAIRS, main="records"))
    rejected_pairs = ((rendered[_REJECTED_PAIRS], encoded[_REJECTED_PAIRS]) | "Rejected pairs" >> beam.Flatten())
    todo = [((split, i), None) for split, n in sorted(counts.items()) for i in range(n) if (split, i) not in done]
    summaries = ({"records": encoded.records, "rejected": rejected_pairs, "shard": p | "Shards" >> beam.Create(todo)}
                 | "Group by shard" >> beam.CoGroupByKey()
                 | "Write shards" >> beam.ParDo(WriteShard(cfg, counts)))
    info = {"specs": [(s.instrument_id, s.split) for s in specs], "counts": counts, "codec": {**codec.to_dict(), **(codec_manifest or {})},
            "clap_model": clap_model,
            "num_files": len(midi_files or []), "done_summaries": list(done.values())}
    return (summaries
            | "All summaries" >> beam.combiners.ToList()
            | "Manifest" >> beam.ParDo(
                WriteManifest(cfg, info),
                beam.pvalue.AsSingleton(midi_rejected
                                        | "MIDI rejections" >> beam.CombineGlobally(RejectionSummary())),
                beam.pvalue.AsSingleton(segments | "Count segments" >> beam.combiners.Count.Globally()),
                beam.pvalue.AsSingleton(pool | "Pool size" >> beam.Map(len))))


@dataclasses.dataclass
class JobResult:
    """What a finished run reports."""

    manifest: dict  # the data set's manifest (also in `output_dir/manifest.json`)
    counters: dict  # this run's Beam metric counters ("rejected.<reason>", "pairs_written"), where readable


def _counters(result) -> dict:
    try:
        found = result.metrics().query(MetricsFilter().with_namespace(_NS))["counters"]
    except Exception:  # some runners cannot report metrics; the manifest has the counts anyway
        return {}
    out = collections.Counter()
    for c in found:
        out[c.key.metric.name] += c.committed if c.committed is not None else c.attempted
    return dict(sorted(out.items()))


def with_local_runner(beam_args: list[str], workers: int = 1) -> list[str]:
    """`beam_args`, or where they name no runner, this machine's in front: `workers` processes
    (1: this process).

    That is Beam's FnApiRunner, named: the engine the DirectRunner runs a batch job like this one
    on, but the DirectRunner first tries the Prism runner, a Go binary it downloads at run time.
    Offline that attempt failed and left a `beam-temp*` folder in the temporary directory on every
    run; online the job would run on an engine that ignores `--direct_num_workers`.
    """
    if any(a.startswith("--runner") for a in beam_args):
        return list(beam_args)
    mode = "in_memory" if workers == 1 else "multi_processing"
    return ["--runner=FnApiRunner", f"--direct_num_workers={workers}", f"--direct_running_mode={mode}", *beam_args]


def run(cfg: PrepConfig, beam_args: list[str] | None = None) -> JobResult:
    """Plans the job, skips what a previous run finished, runs it and returns the manifest.

    Args:
      cfg: the job config.
      beam_args: Beam pipeline options (runner, workers, ...); without a runner, this machine's
        (`with_local_runner`).

    Returns:
      The manifest and this run's Beam counters.

    Raises:
      encoders.EncoderError, instrument_spec.InstrumentError, midi_sources.SegmentError, sink.SinkError:
        before anything runs, naming what is missing or wrong.
    """
    # A fitted codec has no info until it is fitted, below.
    codec = None if cfg.codec == codec_fit.melrvq.NAME else encoders.codec_info(cfg.codec, offline=cfg.offline)
    encoders.check_clap(cfg.clap, offline=cfg.offline)
    encoders.check_device(cfg.device)
    clap_model = f"{cfg.clap}|{cfg.clap_input}"
    specs = instruments.list_instruments(cfg)
    counts = plan.shard_counts(specs, cfg)
    done = sink.completed_shards(cfg.output_dir, counts, cfg.fingerprint())
    codec_source, codec_manifest = codec_fit.prepare(cfg, specs)  # a fitted codec: fitted now, or the saved fit reused
    codec = codec or encoders.codec_info(codec_source, offline=cfg.offline)
    midi_files = midi_sources.list_midi_files(cfg.midi_dir) if cfg.midi_dir else None
    p = beam.Pipeline(options=PipelineOptions(with_local_runner(beam_args or [])))
    build(p, cfg, specs=specs, counts=counts, done=done, codec=codec, clap_model=clap_model, midi_files=midi_files,
          codec_source=codec_source, codec_manifest=codec_manifest)
    result = p.run()
    result.wait_until_finish()
    return JobResult(sink.read_manifest(cfg.output_dir), _counters(result))
