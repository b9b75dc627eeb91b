"""`tokensynth eval`: the paper's evaluation of generated clips, per item and per task and model.

Two tasks, as in the paper: instrument cloning (the timbre came from a reference recording of the
instrument) and text-to-instrument (it came from a text). Each generated clip is scored with the
multi-scale spectral loss against the ground-truth rendering of its notes (when one is given), a
CLAP score (cosine of CLAP embeddings: generated vs reference audio for cloning, generated vs text
for text-to-instrument) and the note F1 of its transcription against its MIDI. Which instruments
are held out is the caller's choice: the items passed in are the split, and every row lists the
instruments it covers. `evaluate_items` takes arrays or paths, so `tokensynth demo` calls it directly.
`write_tensorboard` puts the clips (generated, target, reference) in TensorBoard as audio and
spectrogram images, with the table's numbers as scalars, so they can be heard where they are read.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Callable, Sequence, Union

import numpy as np

from tokensynth_jax.evaluation import metrics
from tokensynth_jax.evaluation.metrics import MetricError

log = logging.getLogger("tokensynth.eval")
TASKS = {"cloning": "Instrument cloning", "text": "Text-to-instrument"}
MANIFEST_NAME = "items.jsonl"  # what `tokensynth eval DIR` reads
REPORT_FILES = ("eval.json", "eval.md")  # what `tokensynth eval` writes
Audio = Union[str, os.PathLike, tuple]  # a file, or (mono samples [N], sample rate)

_REQUIRED = {"id", "task", "generated", "midi"}  # fields every manifest line gives
_COLUMNS = (("mss", "MSS ↓"), ("clap_score", "CLAP score ↑"), ("f1", "F1 ↑"))


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One generated clip and what it is scored against."""

    id: str
    task: str  # "cloning" or "text"
    generated: Audio  # the model's output
    midi: Union[str, os.PathLike, np.ndarray]  # the notes it was asked to play: a file or [N, 3] (onset, offset, pitch)
    target: Audio | None = None  # ground-truth rendering of the same notes by the same instrument (for MSS)
    reference: Audio | None = None  # the timbre's reference recording (cloning)
    text: str | None = None  # the timbre's text (text-to-instrument)
    model: str = "tokensynth"  # the table row
    instrument: str | None = None  # which (held-out) instrument, for the report

    def check(self) -> None:
        """Raises MetricError if the item lacks what its task needs."""
        if self.task not in TASKS:
            raise MetricError(f"item {self.id!r}: task {self.task!r} is not one of {sorted(TASKS)}")
        if self.task == "cloning" and self.reference is None:
            raise MetricError(f"item {self.id!r}: instrument cloning needs the reference audio ('reference')")
        if self.task == "text" and not (self.text or "").strip():
            raise MetricError(f"item {self.id!r}: text-to-instrument needs a non-empty 'text'")


def _audio(value: Audio, what: str) -> tuple[np.ndarray, int]:
    if isinstance(value, tuple):
        samples, sr = value
        return metrics.check_mono(samples, what), int(sr)
    samples, sr = metrics.load_audio(os.fspath(value))
    return metrics.check_mono(samples, what), sr  # a file's NaN or Inf samples too


def _notes(value, what: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        if value.ndim != 2 or value.shape[1] != 3 or len(value) == 0:
            raise MetricError(f"{what}: expected notes [N > 0, 3] (onset, offset, pitch), got {value.shape}")
        return value.astype(np.float64)
    return metrics.midi_notes(os.fspath(value))


def _name(value) -> str:
    return os.fspath(value) if isinstance(value, (str, os.PathLike)) else "<array>"


def load_clap(name: str, *, offline: bool = True):
    """A CLAP model for the CLAP score (`timbre.load_clap`: a checkpoint, or `tiny-clap` in tests).

    Raises:
      MetricError: a pretrained checkpoint that is not in the local cache.
    """
    from tokensynth_jax.inference import timbre

    try:
        return timbre.load_clap(name, offline=offline)
    except timbre.TimbreError as e:
        raise MetricError(f"CLAP score: {e}") from e


def _clap_scores(clap, item: EvalItem, gen: np.ndarray, sr: int, where: str) -> tuple[float | None, float | None]:
    """(generated vs reference audio, generated vs text) cosines; None where the item has no such input."""
    from tokensynth_jax.inference import timbre

    # The generated clip goes to CLAP as it is: a silent or short generation is a result to score
    # low, not an input error (timbre.audio_embedding rejects those, rightly, for references).
    gen_emb = clap.embed(gen[None], sr)[0]
    try:
        if isinstance(item.reference, tuple):  # (samples, rate)
            ref_emb = timbre.audio_embedding(clap, *item.reference)
        else:  # a file, or None
            ref_emb = None if item.reference is None else timbre.audio_embedding(clap, item.reference)
        text_emb = None if item.text is None else timbre.text_embedding(clap, item.text)
    except timbre.TimbreError as e:
        raise MetricError(f"{where}: {e}") from e
    return tuple(None if e is None else metrics.cosine(gen_emb, e, what=where) for e in (ref_emb, text_emb))


def evaluate_item(item: EvalItem, *, clap=None, onset_tolerance: float = metrics.ONSET_TOLERANCE) -> dict:
    """The metrics of one item.

    Args:
      item: the clip and its references.
      clap: a loaded CLAP (`load_clap`); None leaves the CLAP scores out (null).
      onset_tolerance: seconds within which a transcribed onset matches a MIDI onset.

    Returns:
      A JSON-able dict: the item's names, `mss` (null without a target), `clap_audio` (vs the
      reference recording, when given), `clap_text` (vs the text, when given), `clap_score` (the
      task's one of the two), `precision`, `recall`, `f1`, note counts and durations.

    Raises:
      MetricError: a missing or unreadable file, or an item its task cannot score.
    """
    item.check()
    where = f"item {item.id!r}"
    gen, sr = _audio(item.generated, f"{where} generated {_name(item.generated)}")
    out = {"id": item.id, "task": item.task, "model": item.model, "instrument": item.instrument,
           "generated": _name(item.generated), "seconds_generated": gen.size / sr}
    out["mss"] = out["seconds_target"] = None
    if item.target is not None:
        target, target_sr = _audio(item.target, f"{where} target {_name(item.target)}")
        out["seconds_target"] = target.size / target_sr
        out["mss"] = metrics.multiscale_spectral_loss(gen, metrics.resample(target, target_sr, sr))
    out["clap_audio"], out["clap_text"] = (None, None) if clap is None else _clap_scores(clap, item, gen, sr, where)
    out["clap_score"] = out["clap_audio"] if item.task == "cloning" else out["clap_text"]
    ref_notes = _notes(item.midi, f"{where} midi {_name(item.midi)}")
    try:
        est_notes = metrics.transcribe(gen, sr)
    except MetricError as e:
        raise MetricError(f"{where} generated {_name(item.generated)}: {e}") from e
    out.update(metrics.note_f1(ref_notes, est_notes, onset_tolerance=onset_tolerance))
    out.update(notes_midi=len(ref_notes), notes_transcribed=len(est_notes))
    return out


def evaluate_items(items: Sequence[EvalItem], *, clap=None, onset_tolerance: float = metrics.ONSET_TOLERANCE,
                   progress: Callable[[int, dict], None] | None = None,
                   on_error: Callable[[int, EvalItem, MetricError], None] | None = None) -> list[dict]:
    """`evaluate_item` of every item (see there); `progress(i, result)` after each.

    With `on_error`, an item that cannot be scored (a MetricError: unreadable audio, a MIDI without
    notes, ...) is reported to it and left out, and the others are still scored: a batch does not
    lose its good items to one bad one. Without it, the error propagates.
    """
    results = []
    for i, item in enumerate(items):
        try:
            results.append(evaluate_item(item, clap=clap, onset_tolerance=onset_tolerance))
        except MetricError as e:
            if on_error is None:
                raise
            on_error(i, item, e)
            continue
        if progress is not None:
            progress(i, results[-1])
    return results


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def aggregate(results: Sequence[dict]) -> list[dict]:
    """Rows of the table: one per (task, model), in task order, with means over items.

    A metric's mean is taken over the items that have it (MSS only where a target was given) and
    is null when none has; `n_<metric>` says how many items it averages.
    """
    rows = []
    for task in TASKS:
        for model in dict.fromkeys(r["model"] for r in results if r["task"] == task):
            group = [r for r in results if r["task"] == task and r["model"] == model]
            row = {"task": task, "model": model, "n": len(group),
                   "instruments": sorted({r["instrument"] for r in group if r["instrument"] is not None})}
            for key in ("mss", "clap_score", "clap_audio", "clap_text", "precision", "recall", "f1"):
                row[key] = _mean(r[key] for r in group)
                row[f"n_{key}"] = sum(r[key] is not None for r in group)
            rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    """The paper's table: rows task / model, columns MSS (lower is better), CLAP score, F1."""
    lines = ["| Task | Model | " + " | ".join(title for _, title in _COLUMNS) + " | Items |",
             "| --- | --- | " + " | ".join("---:" for _ in _COLUMNS) + " | ---: |"]
    for row in rows:
        cells = ["–" if row[key] is None else f"{row[key]:.3f}" for key, _ in _COLUMNS]
        lines.append(f"| {TASKS[row['task']]} | {row['model']} | " + " | ".join(cells) + f" | {row['n']} |")
    return "\n".join(lines) + "\n"


def write_report(results: Sequence[dict], json_path: str, md_path: str, settings: dict, preamble: str = "",
                 failed: Sequence[dict] = ()) -> None:
    """Writes the report: JSON (settings, rows, items, failed) to `json_path`, and to `md_path` the
    `preamble` (what made the numbers: codec, embedder, split), the markdown table, and the items
    that could not be scored (`failed`: {"id", "error"} each)."""
    rows = aggregate(results)
    metric_settings = {"mss_fft_sizes": list(metrics.MSS_FFT_SIZES), "mss_hop": "fft_size / 4",
                       "mss_log_eps": metrics.MSS_LOG_EPS, "pitch_tolerance_cents": metrics.PITCH_TOLERANCE_CENTS,
                       "transcriber": "basic-pitch icassp_2022 (onnx)"}
    with open(json_path, "w") as f:
        json.dump({"settings": {**metric_settings, **settings}, "rows": rows, "items": list(results),
                   "failed": list(failed)}, f, indent=2)
    with open(md_path, "w") as f:
        f.write(preamble + ("\n" if preamble else "") + markdown_table(rows))
        if failed:
            f.write(f"\n{len(failed)} of {len(results) + len(failed)} items could not be scored and are left out:\n\n"
                    + "".join(f"- {x['id']}: {x['error']}\n" for x in failed))


def item_files(item: EvalItem) -> list[tuple[str, str]]:
    """(field, path) of each file an item names, so a caller can check them all before scoring any."""
    return [(field, os.fspath(value)) for field in ("generated", "midi", "target", "reference")
            if isinstance(value := getattr(item, field), (str, os.PathLike))]


def write_tensorboard(items: Sequence[EvalItem], results: Sequence[dict], log_dir: str, *, step: int = 0) -> bool:
    """Each item's clips as `eval/<task>/<id>/<generated|target|reference>` audio and spectrogram
    images, and each table row's means as `eval/<task>/<model>/<metric>` scalars, at `step`.

    Returns:
      False (writing nothing) when tensorboardX is not installed, else True.
    """
    from tokensynth_jax import tensorboard_media

    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return False
    with SummaryWriter(log_dir) as tb:
        for item in items:
            for role in ("generated", "target", "reference"):
                value = getattr(item, role)
                if value is None:
                    continue
                try:  # a clip the scores did not read (a reference without CLAP) may be unreadable
                    audio, sr = _audio(value, f"item {item.id!r} {role} {_name(value)}")
                except MetricError as e:
                    log.warning("not in TensorBoard: %s", e)
                    continue
                tensorboard_media.add_clip(tb, f"eval/{item.task}/{item.id}/{role}", audio, sr, step)
        for row in aggregate(results):
            for key, _ in _COLUMNS:
                if row[key] is not None:
                    tb.add_scalar(f"eval/{row['task']}/{row['model']}/{key}", row[key], step)
    return True


def read_manifest(path: str) -> list[EvalItem]:
    """Items from a JSON-lines manifest (or a folder holding `items.jsonl`); see `tokensynth eval -h`.

    Relative paths are taken from the manifest's folder.

    Raises:
      MetricError: a missing manifest, a line that is not a JSON object, unknown or missing fields.
    """
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise MetricError(f"{path}: no such manifest (a JSON-lines file, or a folder holding {MANIFEST_NAME})")
    root = os.path.dirname(os.path.abspath(path))
    fields = {f.name for f in dataclasses.fields(EvalItem)}
    items = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise MetricError(f"{path}: not UTF-8 text ({e})") from e
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise MetricError(f"{path}:{number}: not JSON ({e})") from e
            if not isinstance(entry, dict):
                raise MetricError(f"{path}:{number}: expected a JSON object, got {type(entry).__name__}")
            unknown, missing = set(entry) - fields, _REQUIRED - set(entry)
            if unknown or missing:
                raise MetricError(f"{path}:{number}: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")
            wrong = sorted(k for k, v in entry.items() if not isinstance(v, str) and (v is not None or k in _REQUIRED))
            if wrong:
                raise MetricError(f"{path}:{number}: {', '.join(wrong)}: must be a string (a path or a name)")
            for key in ("generated", "midi", "target", "reference"):
                if entry.get(key) is not None:
                    entry[key] = os.path.join(root, entry[key])
            item = EvalItem(**entry)
            try:
                item.check()
            except MetricError as e:
                raise MetricError(f"{path}:{number}: {e}") from e
            items.append(item)
    if not items:
        raise MetricError(f"{path}: the manifest lists no items")
    seen = set()
    for item in items:
        if item.id in seen:
            raise MetricError(f"{path}: item id {item.id!r} is listed twice")
        seen.add(item.id)
    return items
