"""The real Beam job on Beam's local runner (FnApiRunner, what the DirectRunner runs it on): tiny MIDI files (good and bad) x a 3-preset SoundFont
subset x tiny random codec and CLAP -> ArrayRecord shards read back with array_record.

Checks what the job promises: records decode and trace back to their sources (re-rendering the
target and re-encoding it gives the stored codes), two runs write byte-identical shards, a run
resumed after losing a shard, a sidecar and leaving a temporary file writes the same data without
redoing finished shards, and every bad input is counted per reason in the manifest.
"""
import collections
import dataclasses
import filecmp
import glob
import hashlib
import os
import shutil
import tempfile

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from conftest import write_midi as _write  # noqa: E402

from tokensynth_jax.audio import encoders
from tokensynth_jax.cli import main as cli
from tokensynth_jax.tokens import records
from tokensynth_prep import (
    instruments,
    midi_sources,
    nsynth,
    pairs,
    pipeline,
    plan,
    sink,
)
from tokensynth_prep.config import PrepConfig


def _midi_tree(root: str) -> None:
    rng = np.random.default_rng(7)
    melody = [(0.25 * i, 0.25 * i + 0.2, int(60 + rng.integers(-7, 8)), int(rng.integers(30, 127))) for i in range(48)]
    pad = [(2.0 * i, 2.0 * i + 1.5, p, 70) for i in range(5) for p in (48, 55, 60)]
    _write(f"{root}/songs/a.mid", [(0, False, melody), (48, False, pad), (0, True, [(0.0, 0.1, 36, 100)])])
    _write(f"{root}/songs/sub/deep/b.midi", [(73, False, [(0.5 * i, 0.5 * i + 0.4, 72 + i % 5, 90) for i in range(16)])])
    _write(f"{root}/c.mid", [(24, False, [(1.0, 2.0, 40, 80), (1.0, 2.0, 47, 80), (3.0, 4.5, 43, 100)])])
    _write(f"{root}/wide.mid", [(0, False, [(0.0, 1.0, 21, 80), (1.0, 2.0, 108, 80)])])  # no octave fits
    _write(f"{root}/ghost.mid", [(0, False, [(1.0, 1.003, 60, 80), (2.0, 2.003, 64, 80)])])  # 2 ms: silent
    dense = [(0.1 * i, 0.1 * i + 0.05, 60 + i % 12, 80) for i in range(30)] + [(6.0, 7.0, 64, 80)]
    _write(f"{root}/dense.mid", [(0, False, dense)])
    _write(f"{root}/bad/empty.mid", [])
    _write(f"{root}/bad/drums.mid", [(0, True, [(0.0, 0.2, 38, 100)])])
    _write(f"{root}/bad/fast.mid", [(0, False, [(0.0, 0.5, 60, 100)])], tempo=1000.0)
    with open(f"{root}/bad/corrupt.mid", "wb") as f:
        f.write(b"MThd\x00\x00\x00\x06\x00\x01\x00\x02garbage")
    with open(f"{root}/bad/lyrics.midi", "w") as f:
        f.write("not a MIDI file")
    with open(f"{root}/README.txt", "w") as f:
        f.write("ignored: not .mid")


def _config(out, midi_dir, **kw):
    base = dict(output_dir=str(out), midi_dir=midi_dir, num_segments=100, max_notes=24, programs=(0, 40, 73),
                valid_fraction=0.34, test_fraction=0.34, table_pitches=(36, 96, 4), table_velocities=(50, 110),
                note_hold_seconds=1.0, note_release_seconds=0.5, pairs_per_instrument=8, records_per_shard=3,
                chunk_size=4, codec="tiny-encodec", clap="tiny-clap", encode_batch_size=3, dry_fraction=0.25,
                fade_seconds=0.0, silence_peak=2e-3)
    base.update(kw)
    return PrepConfig(**base)


def _shards(out):
    return sorted(glob.glob(os.path.join(str(out), "*", "*.array_record")))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    midi = str(root / "midi")
    _midi_tree(midi)
    cfg = _config(root / "a", midi)
    result = pipeline.run(cfg)
    return cfg, result.manifest, result.counters


def test_manifest_counts_every_bad_input_per_reason(first_run):
    cfg, manifest, _ = first_run
    assert manifest["rejected"]["midi"] == {"drum_only": 1, "empty_midi": 1, "extreme_tempo": 1,
                                            "too_many_notes": 1, "unreadable_midi": 2}
    assert any("bad/corrupt.mid" in x for x in manifest["rejected_examples"]["midi"]["unreadable_midi"])
    assert manifest["midi"]["files"] == 11
    # wide.mid's segment fits no octave of any instrument, ghost.mid's 2 ms notes are silent: every
    # pair that uses either is rejected, for the first reason found (pitches are checked first).
    segs = [seg for f in midi_sources.list_midi_files(cfg.midi_dir)
            for seg in midi_sources.file_segments(cfg.midi_dir, f, max_notes=cfg.max_notes, min_tempo_bpm=20,
                                                  max_tempo_bpm=400)[0]]
    pool = sorted(segs, key=lambda seg: midi_sources.pool_rank(cfg.seed, seg.key))
    expected = collections.Counter()
    for spec in instruments.list_instruments(cfg):
        for p in (p for c in plan.plan_instrument(spec, pool, cfg, 1) for p in c):
            keys = (p.target.key, p.reference.key)
            if any(k.startswith("wide.mid") for k in keys):
                expected["instrument_missing_pitches"] += 1
            elif any(k.startswith("ghost.mid") for k in keys):
                expected["silent_render"] += 1
    assert manifest["rejected"]["pairs"] == dict(expected) and len(expected) == 2
    assert all("fit no octave" in x for x in manifest["rejected_examples"]["pairs"]["instrument_missing_pitches"])
    missing = sum(expected.values())
    for split, planned in manifest["pairs_planned"].items():
        assert planned == 8
        rejected = sum(sum(s["rejected"].values()) for s in manifest["shards"] if s["split"] == split)
        assert manifest["records"][split] == planned - rejected  # nothing lost silently
    assert manifest["total_records"] == 24 - missing
    assert {k: v["count"] for k, v in manifest["instruments"].items()} == {"train": 1, "valid": 1, "test": 1}
    assert manifest["schema"] == {"name": records.SCHEMA_NAME, "version": records.SCHEMA_VERSION}
    assert manifest["codec"] == encoders.codec_info("tiny-encodec").to_dict()
    assert manifest["config"] == cfg.to_dict() and manifest["config_fingerprint"] == cfg.fingerprint()


def test_beam_metrics_count_the_same_rejections(first_run):
    _, manifest, counters = first_run
    expected = {f"rejected.{r}": n for group in manifest["rejected"].values() for r, n in group.items()}
    assert {k: v for k, v in counters.items() if k.startswith("rejected.")} == expected
    assert counters["pairs_written"] == manifest["total_records"]


def test_shards_hold_decodable_sorted_records_split_by_instrument(first_run):
    cfg, manifest, _ = first_run
    paths = _shards(cfg.output_dir)
    assert [os.path.relpath(p, cfg.output_dir) for p in paths] == sorted(s["shard"] for s in manifest["shards"])
    split_of = {i: split for split, v in manifest["instruments"].items() for i in v["ids"]}
    total = 0
    for path, summary in zip(paths, sorted(manifest["shards"], key=lambda s: s["shard"])):
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == summary["sha256"]
        reader = ArrayRecordReader(path)
        assert "group_size:1" in reader.writer_options_string()
        reader.close()
        recs = [records.decode(b) for b in sink.read_shard(path)]
        assert len(recs) == summary["records"]
        assert [r.pair_id for r in recs] == sorted(r.pair_id for r in recs)
        for r in recs:
            assert r.split == summary["split"] == split_of[r.instrument_id]
            assert r.codes.shape == (250, 4) and r.timbre.shape == (512,) and r.midi_tokens.shape[0] % 4 == 0
            assert r.codec["name"] == "tiny-encodec" and r.clap_model == "tiny-clap|codec-rate"
        total += len(recs)
    assert total == manifest["total_records"]


def test_records_trace_back_to_what_was_rendered_and_encoded(first_run):
    cfg, manifest, _ = first_run
    recs = [records.decode(b) for p in _shards(cfg.output_dir) for b in sink.read_shard(p)]
    codec = encoders.Codec(cfg.codec, batch_size=cfg.encode_batch_size)
    clap = encoders.ClapEmbedder(cfg.clap, batch_size=cfg.encode_batch_size)
    tables = {s.instrument_id: instruments.build_note_table(s, 32000, cfg) for s in instruments.list_instruments(cfg)}
    checked_effects = 0
    for r in recs[::3]:
        table = tables[r.instrument_id]
        target = pairs.rerender(r, cfg, "target", table)
        reference = pairs.rerender(r, cfg, "reference", table)
        np.testing.assert_array_equal(codec.encode(target[None])[0], r.codes)
        np.testing.assert_array_equal(clap.embed(reference[None], 32000)[0].astype(np.float16), r.timbre)
        seg = midi_sources.segment_from_source(r.target_source, midi_dir=cfg.midi_dir, max_notes=cfg.max_notes)
        np.testing.assert_array_equal(midi_sources.tokenize(seg, r.target_source["transpose"], cfg.max_notes), r.midi_tokens)
        assert r.target_source["key"] != r.reference_source["key"]
        checked_effects += bool(r.augmentation["chain"])
    assert checked_effects > 0
    # Traceability is not vacuous: a different effect chain gives different codes.
    r = next(r for r in recs if r.augmentation["chain"])
    dry = pairs.rerender(dataclasses.replace(r, augmentation={"chain": []}), cfg, table=tables[r.instrument_id])
    assert not np.array_equal(codec.encode(dry[None])[0], r.codes)


def test_two_runs_write_byte_identical_shards(first_run, tmp_path):
    cfg, manifest, _ = first_run
    again = dataclasses.replace(cfg, output_dir=str(tmp_path / "b"))
    manifest_b = pipeline.run(again).manifest
    a, b = _shards(cfg.output_dir), _shards(again.output_dir)
    assert [os.path.relpath(p, cfg.output_dir) for p in a] == [os.path.relpath(p, again.output_dir) for p in b]
    for x, y in zip(a, b):
        assert filecmp.cmp(x, y, shallow=False), x
    manifest_b["config"]["output_dir"] = cfg.output_dir
    assert manifest_b == manifest


def test_a_killed_run_resumes_without_redoing_finished_shards(first_run, tmp_path):
    cfg, manifest, _ = first_run
    out = str(tmp_path / "c")
    shutil.copytree(cfg.output_dir, out)
    resumed = dataclasses.replace(cfg, output_dir=out)
    paths = _shards(out)
    os.remove(paths[0])  # a shard lost
    os.remove(paths[1] + ".json")  # killed between the shard's rename and its sidecar's
    with open(paths[2] + ".tmp-deadbeef", "wb") as f:  # killed while writing
        f.write(b"partial")
    with open(paths[3] + ".json", "w") as f:  # a sidecar damaged from outside: its shard is written again
        f.write("{not json")
    with open(paths[4] + ".json", "w") as f:
        f.write("[1, 2]")
    os.remove(os.path.join(out, "manifest.json"))
    inodes = {p: os.stat(p).st_ino for p in paths[2:3] + paths[5:]}
    result = pipeline.run(resumed)
    manifest_c = result.manifest
    assert result.counters["pairs_written"] < manifest["total_records"]  # only the redone shards' pairs
    assert [os.path.relpath(p, out) for p in _shards(out)] == [os.path.relpath(p, cfg.output_dir) for p in _shards(cfg.output_dir)]
    for x, y in zip(_shards(out), _shards(cfg.output_dir)):
        assert filecmp.cmp(x, y, shallow=False), x
    assert all(os.stat(p).st_ino == ino for p, ino in inodes.items())  # finished shards were not rewritten
    assert not glob.glob(os.path.join(out, "*", "*.tmp-*"))
    manifest_c["config"]["output_dir"] = cfg.output_dir
    assert manifest_c == manifest
    with pytest.raises(sink.SinkError, match="different configuration"):
        pipeline.run(dataclasses.replace(resumed, seed=1))
    for sidecar in glob.glob(os.path.join(out, "*", "*.json")):  # no finished shard, and a damaged manifest
        os.remove(sidecar)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        f.write("{")
    with pytest.raises(sink.SinkError, match=r"manifest.json: unreadable \(JSONDecodeError"):
        pipeline.run(resumed)


def test_missing_pretrained_models_fail_before_the_job_starts(tmp_path):
    cfg = _config(tmp_path / "d", None, codec="facebook/encodec_32khz", offline=True)
    with pytest.raises(encoders.EncoderError, match="tiny-encodec"):
        pipeline.run(cfg)
    assert not os.path.exists(cfg.output_dir)


def test_nsynth_raw_library_with_procedural_phrases(tmp_path):
    # A small NSynth tree in the release layout, its notes rendered from SoundFont presets.
    sf_cfg = _config(tmp_path / "x", None, table_pitches=(48, 84, 6), table_velocities=(50, 100),
                     note_hold_seconds=3.0, note_release_seconds=1.0)
    specs = {s.params["program"]: s for s in instruments.list_instruments(sf_cfg)}
    for split, programs in (("train", (0, 40)), ("test", (73,))):
        examples = []
        for program in programs:
            table = instruments.soundfont_note_table(specs[program], nsynth.NSYNTH_RATE, sf_cfg)
            for p in table.pitches:
                for v in (50, 100):
                    clip = table.clip(int(p), v)
                    audio = np.zeros(4 * nsynth.NSYNTH_RATE, np.float32)
                    audio[: clip.shape[0]] = clip[: audio.shape[0]]
                    examples.append({"id": f"keyboard_synthetic_{program:03d}-{p:03d}-{v:03d}", "pitch": p,
                                     "velocity": v, "instrument": {"label": program}, "audio": audio})
        if split == "train":  # an instrument whose recordings are all silent
            examples += [dict(ex, id=ex["id"].replace("_000-", "_099-"), instrument={"label": 99},
                              audio=np.zeros_like(ex["audio"])) for ex in examples[:4]]
        nsynth.write_raw_layout(examples, lambda label: f"keyboard_synthetic_{label:03d}", str(tmp_path / f"nsynth-{split}"))
    cfg = _config(tmp_path / "out", None, instruments="nsynth", nsynth_dir=str(tmp_path), programs=None,
                  procedural_candidates=12, num_segments=6, pairs_per_instrument=5, records_per_shard=10)
    manifest = pipeline.run(cfg).manifest
    assert manifest["instruments"]["train"]["ids"] == ["nsynth:keyboard_synthetic_000", "nsynth:keyboard_synthetic_040",
                                                       "nsynth:keyboard_synthetic_099"]
    assert manifest["rejected"]["pairs"]["instrument_unusable"] == 5
    assert manifest["instruments"]["test"]["ids"] == ["nsynth:keyboard_synthetic_073"]
    assert manifest["midi"] == {"source": "procedural-v1", "files": 0, "segments": 12, "pool": 6}
    recs = [records.decode(b) for p in _shards(cfg.output_dir) for b in sink.read_shard(p)]
    assert len(recs) == manifest["total_records"] > 0
    assert sum(manifest["rejected"]["pairs"].values()) + len(recs) == 20
    r = recs[0]
    table = instruments.build_note_table(next(s for s in instruments.list_instruments(cfg) if s.instrument_id == r.instrument_id), 32000, cfg)
    codec = encoders.Codec(cfg.codec, batch_size=cfg.encode_batch_size)
    np.testing.assert_array_equal(codec.encode(pairs.rerender(r, cfg, table=table)[None])[0], r.codes)


def test_cli_multiprocess_run_matches_the_in_process_run(tmp_path, capsys, monkeypatch):
    # Beam's DirectRunner would first try to download its Prism runner, and offline leave a
    # beam-temp* folder in the temporary directory on every run.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    common = ["--programs", "0,40", "--pairs-per-instrument", "6", "--procedural-candidates", "10", "--num-segments", "6",
              "--table-pitches", "36:96:4", "--table-velocities", "50,110", "--records-per-shard", "4",
              "--codec", "tiny-encodec", "--clap", "tiny-clap", "--encode-batch-size", "2", "--chunk-size", "3"]
    assert cli.main(["prep", "--out", str(tmp_path / "one"), *common]) == 0
    assert cli.main(["prep", "--out", str(tmp_path / "two"), "--workers", "2", *common]) == 0
    one, two = _shards(tmp_path / "one"), _shards(tmp_path / "two")
    assert len(one) == len(two) > 0
    for x, y in zip(one, two):
        assert filecmp.cmp(x, y, shallow=False), x
    assert '"train": 12' in capsys.readouterr().out
    assert not glob.glob(str(tmp_path / "beam-temp*"))
    assert cli.main(["prep", "--out", str(tmp_path / "three"), "--codec", "facebook/encodec_32khz", "--offline"]) == 2
    assert "not in the Hugging Face cache" in capsys.readouterr().err


def test_midi_without_a_usable_segment_stops_the_job_with_a_clear_error(tmp_path):
    os.makedirs(tmp_path / "midi")
    (tmp_path / "midi" / "junk.mid").write_bytes(b"not MIDI")
    cfg = _config(tmp_path / "out", str(tmp_path / "midi"), programs=(0,))
    with pytest.raises(midi_sources.SegmentError, match="segment pool has 0 segment"):
        pipeline.run(cfg)
    assert not glob.glob(str(tmp_path / "out" / "*" / "*.array_record"))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The offline demo's encoders: a codec fitted by the job (`demo-melrvq`) and spectral timbres."""
    root = tmp_path_factory.mktemp("prep-demo")
    cfg = _config(root / "a", None, codec="demo-melrvq", clap="demo-spectral", procedural_candidates=12,
                  num_segments=12, pairs_per_instrument=6, records_per_shard=4, max_notes=16)
    return cfg, pipeline.run(cfg).manifest


def test_a_fitted_codec_is_saved_with_the_data_and_recorded(demo_run):
    from tokensynth_jax.audio import melrvq

    cfg, manifest = demo_run
    state = os.path.join(cfg.output_dir, "codec", "demo-melrvq.npz")
    fitted = melrvq.MelRVQ.from_bytes(open(state, "rb").read())
    codec = manifest["codec"]
    assert codec["name"] == "demo-melrvq" and codec["state"] == "codec/demo-melrvq.npz"
    assert codec["fit_sha256"] == fitted.fingerprint and codec["fit"] == fitted.fingerprint[:16]
    assert (codec["num_codebooks"], codec["codebook_size"], codec["sample_rate"], codec["frame_rate"]) == (4, 256, 16000, 25.0)
    assert codec["fit_clips"] > 0  # fitted on train-instrument renders only
    recs = [records.decode(b) for p in _shards(cfg.output_dir) for b in sink.read_shard(p)]
    assert len(recs) == manifest["total_records"] > 0
    record_codec = {k: v for k, v in codec.items() if k not in ("state", "fit_sha256", "fit_clips", "fit_seconds")}
    assert all(r.codec == record_codec and r.clap_model == "demo-spectral|codec-rate" for r in recs)
    # Records trace back: re-rendering a target and encoding it with the saved state gives its codes.
    loaded = encoders.Codec(state, batch_size=1)
    spec = next(s for s in instruments.list_instruments(cfg) if s.instrument_id == recs[0].instrument_id)
    table = instruments.build_note_table(spec, 16000, cfg)
    np.testing.assert_array_equal(loaded.encode(pairs.rerender(recs[0], cfg, table=table)[None])[0], recs[0].codes)
    assert recs[0].codes.shape == (125, 4)


def test_a_resumed_or_repeated_run_with_a_fitted_codec_is_byte_identical(demo_run, tmp_path):
    cfg, manifest = demo_run
    out = str(tmp_path / "resumed")
    shutil.copytree(cfg.output_dir, out)
    paths = _shards(out)
    os.remove(paths[0])
    os.remove(paths[1] + ".json")
    os.remove(os.path.join(out, "manifest.json"))
    state = os.path.join(out, "codec", "demo-melrvq.npz")
    inode = os.stat(state).st_ino
    resumed = pipeline.run(dataclasses.replace(cfg, output_dir=out)).manifest
    assert os.stat(state).st_ino == inode  # the saved fit was reused, not refitted
    fresh = str(tmp_path / "fresh")
    again = pipeline.run(dataclasses.replace(cfg, output_dir=fresh)).manifest  # fits anew: the same fit
    for other, m in ((out, resumed), (fresh, again)):
        for x, y in zip(_shards(cfg.output_dir), _shards(other)):
            assert filecmp.cmp(x, y, shallow=False), y
        m["config"]["output_dir"] = cfg.output_dir
        assert m == manifest
    # Killed while fitting (state written, sidecar not): refitted, same state.
    os.remove(os.path.join(fresh, "codec", "demo-melrvq.json"))
    assert pipeline.run(dataclasses.replace(cfg, output_dir=fresh)).manifest["codec"] == manifest["codec"]
    with pytest.raises(sink.SinkError, match="different configuration"):
        pipeline.run(dataclasses.replace(cfg, output_dir=fresh, seed=1))
