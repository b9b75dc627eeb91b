"""The parts of data prep, each on real inputs: MIDI segments, phrases, SoundFont note tables,
the renderer, effect chains, pair plans, shards, tiny encoders and the NSynth raw layout."""
import dataclasses
import json
import logging
import os

import numpy as np
import pretty_midi
import pytest
from conftest import write_midi as _write_midi  # noqa: E402

from tokensynth_jax.audio import encoders
from tokensynth_jax.tokens import midi_tokens, records, token_layout
from tokensynth_prep import (
    augment,
    instrument_spec,
    instruments,
    midi_sources,
    nsynth,
    plan,
    procedural,
    render,
    sink,
)
from tokensynth_prep.config import AUG_EFFECTS, ConfigError, PrepConfig

SR = 32000


def _cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), programs=(0, 40), table_pitches=(36, 96, 4),
                table_velocities=(50, 110), note_hold_seconds=1.0, note_release_seconds=0.5)
    base.update(kw)
    return PrepConfig(**base)




# --- procedural phrases ----------------------------------------------------------------------------
def test_phrases_are_seeded_varied_and_fit_the_window():
    a = [procedural.generate(0, i, 40) for i in range(60)]
    assert all(np.array_equal(x, procedural.generate(0, i, 40)) for i, x in enumerate(a))
    assert not np.array_equal(a[0], procedural.generate(1, 0, 40))
    for notes in a:
        assert 1 <= notes.shape[0] <= 40
        assert (notes[:, 0] >= 0).all() and (notes[:, 1] < 5.0).all() and (notes[:, 1] > notes[:, 0]).all()
        assert (notes[:, 2] >= 21).all() and (notes[:, 2] <= 108).all()
        assert (notes[:, 3] >= 1).all() and (notes[:, 3] <= 127).all()
    # Variety: textures differ in polyphony, register and rhythm.
    assert len({n.shape[0] for n in a}) > 10
    assert np.ptp([n[:, 2].mean() for n in a]) > 24
    assert any((np.diff(n[:, 0]) == 0).any() for n in a) and any((np.diff(n[:, 0]) > 0).all() for n in a)


def test_every_phrase_note_is_tokenized():
    for i in range(30):
        seg = midi_sources.procedural_segment(3, i, 128)
        tokens = midi_sources.tokenize(seg, 0, 128)
        assert tokens.shape[0] == token_layout.TOKENS_PER_NOTE * seg.notes.shape[0]


# --- MIDI files ------------------------------------------------------------------------------------
def test_file_segments_cut_single_tracks_into_windows(tmp_path):
    piano = [(0.5, 1.0, 60, 90), (4.0, 5.5, 62, 90), (6.0, 7.0, 64, 40), (12.0, 12.5, 67, 100)]
    strings = [(0.0, 4.0, 55, 70)]
    _write_midi(tmp_path / "deep" / "x" / "a.MID", [(0, False, piano), (48, False, strings), (0, True, [(0, .1, 36, 100)])])
    assert midi_sources.list_midi_files(str(tmp_path)) == ["deep/x/a.MID"]
    segs, rejected = midi_sources.file_segments(str(tmp_path), "deep/x/a.MID", max_notes=10,
                                                min_tempo_bpm=20, max_tempo_bpm=400)
    assert rejected == []
    by_key = {s.key: s for s in segs}
    # Piano: window 0 keeps the note inside it and cuts the one crossing 5 s; window 5 keeps the
    # note starting at 6; window 10 the one at 12. Strings: one window. Drums: never.
    assert sorted(by_key) == ["deep/x/a.MID#0@0", "deep/x/a.MID#0@10", "deep/x/a.MID#0@5", "deep/x/a.MID#1@0"]
    assert by_key["deep/x/a.MID#0@0"].source["cut_notes"] == 1
    np.testing.assert_allclose(by_key["deep/x/a.MID#0@5"].notes, [[1.0, 2.0, 64, 40]], atol=1e-5)
    # Tokens of a segment are the tokenizer's tokens of that track's window.
    seg = by_key["deep/x/a.MID#0@0"]
    only_piano = pretty_midi.PrettyMIDI(str(tmp_path / "deep/x/a.MID"))
    only_piano.instruments = only_piano.instruments[:1]
    ref = midi_tokens.tokenize_midi(only_piano, start_seconds=0.0)
    np.testing.assert_array_equal(midi_sources.tokenize(seg, 0, 10), ref.tokens)
    # Rebuilt from its source dict (traceability).
    back = midi_sources.segment_from_source(seg.source, midi_dir=str(tmp_path), max_notes=10)
    np.testing.assert_array_equal(back.notes, seg.notes)


@pytest.mark.parametrize("name, content, reason", [
    ("corrupt.mid", b"MThd\x00\x00\x00\x06garbage", midi_sources.UNREADABLE),
    ("text.mid", b"this is not a MIDI file at all", midi_sources.UNREADABLE),
    ("empty.mid", None, midi_sources.EMPTY),
    ("drums.mid", [(0, True, [(0.0, 0.2, 36, 100)])], midi_sources.DRUM_ONLY),
    ("fast.mid", [(0, False, [(0.0, 0.2, 60, 100)])], midi_sources.EXTREME_TEMPO),
])
def test_bad_files_are_rejected_with_a_reason_never_raised(tmp_path, name, content, reason):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        _write_midi(path, content or [], tempo=1000.0 if name == "fast.mid" else 120.0)
    segs, rejected = midi_sources.file_segments(str(tmp_path), name, max_notes=10, min_tempo_bpm=20, max_tempo_bpm=400)
    assert segs == [] and [r for r, _ in rejected] == [reason]
    assert name in rejected[0][1]


def test_dense_windows_are_rejected_and_the_others_kept(tmp_path):
    dense = [(0.1 * i, 0.1 * i + 0.05, 60 + i % 12, 80) for i in range(30)] + [(6.0, 6.5, 60, 80)]
    _write_midi(tmp_path / "d.mid", [(0, False, dense)])
    segs, rejected = midi_sources.file_segments(str(tmp_path), "d.mid", max_notes=20, min_tempo_bpm=20, max_tempo_bpm=400)
    assert [s.key for s in segs] == ["d.mid#0@5"]
    assert [r for r, _ in rejected] == [midi_sources.TOO_MANY_NOTES] and "30 notes > 20" in rejected[0][1]


def test_a_missing_midi_directory_is_a_clear_error(tmp_path):
    with pytest.raises(midi_sources.SegmentError, match="does not exist"):
        midi_sources.list_midi_files(str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(midi_sources.SegmentError, match="no .mid"):
        midi_sources.list_midi_files(str(tmp_path))


# --- instruments and the renderer ------------------------------------------------------------------
@pytest.fixture(scope="module")
def violin(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("v"))
    spec = next(s for s in instruments.list_instruments(cfg) if s.params["program"] == 40)
    return cfg, spec, instruments.build_note_table(spec, SR, cfg)


def test_soundfont_presets_and_held_out_splits(tmp_path):
    specs = instruments.list_instruments(_cfg(tmp_path, programs=None, valid_fraction=0.1, test_fraction=0.1))
    assert len(specs) == 128 and specs[40].params["name"] == "Violin"
    splits = [s.split for s in specs]
    assert splits.count("test") == 12 and splits.count("valid") == 12
    again = instruments.list_instruments(_cfg(tmp_path, programs=None, valid_fraction=0.1, test_fraction=0.1))
    assert [s.split for s in again] == splits
    with pytest.raises(instrument_spec.InstrumentError, match="no such SoundFont"):
        instruments.list_instruments(_cfg(tmp_path, soundfonts=(str(tmp_path / "missing.sf2"),)))


def test_worker_table_cache_keys_on_what_builds_the_table(violin):
    """Two jobs in one worker process (DirectRunner in-process) with other note lengths must not
    share a cached table: the second job would render with the first job's notes."""
    from tokensynth_prep import pipeline

    cfg, spec, _ = violin
    longer = dataclasses.replace(cfg, note_hold_seconds=cfg.note_hold_seconds + 0.5)
    a, b = pipeline._TABLES.get(spec, SR, cfg), pipeline._TABLES.get(spec, SR, longer)
    assert a is not b and len(b.clip(60, 110)) > len(a.clip(60, 110))
    assert pipeline._TABLES.get(spec, SR, cfg) is a


def test_soundfont_note_tables_are_deterministic_and_fill_pitches_by_shifting(violin):
    cfg, spec, table = violin
    again = instruments.build_note_table(spec, SR, cfg)
    assert all(np.array_equal(table.clip(p, v), again.clip(p, v)) for p in (36, 60, 96) for v in (50, 110))
    assert list(table.pitches) == list(range(36, 97, 4))
    # 62 is not recorded: it is 60 resampled up two semitones (shorter by 2^(2/12)).
    shifted, source = table.clip(62, 110), table.clip(60, 110)
    assert abs(shifted.shape[0] - source.shape[0] / 2 ** (2 / 12)) <= 1
    f = lambda x: np.argmax(np.abs(np.fft.rfft(x[:8192] * np.hanning(8192))))
    assert abs(f(shifted) / f(source) - 2 ** (2 / 12)) < 0.04
    assert table.playable[30] and not table.playable[29] and table.playable[102] and not table.playable[103]


def test_render_places_fades_and_normalises(violin):
    cfg, _, table = violin
    notes = np.array([[1.0, 1.5, 60, 110]])
    audio = render.render(notes, table, fade_seconds=0.05)
    assert audio.shape == (5 * SR,) and audio.dtype == np.float32
    assert np.abs(audio[: SR - 1]).max() == 0  # silent before the onset
    after_fade = int((1.5 + 0.05) * SR) + 1
    assert np.abs(audio[after_fade:]).max() == 0 and np.abs(audio[SR : SR + 1000]).max() > 0
    quiet = render.render(np.array([[1.0, 1.5, 60, 50]]), table)
    assert np.abs(quiet).max() < np.abs(audio).max()  # the nearest velocity layer is used
    two = render.render(np.array([[1.0, 1.5, 60, 110], [1.0, 1.5, 67, 110]]), table)
    np.testing.assert_allclose(two, audio + render.render(np.array([[1.0, 1.5, 67, 110]]), table), atol=1e-6)
    out = render.normalise(two, peak=0.9, silence_peak=1e-4, what="x")
    assert np.isclose(np.abs(out).max(), 0.9)
    with pytest.raises(render.RenderError, match="silent") as e:
        render.normalise(np.zeros(10, np.float32), peak=0.9, silence_peak=1e-4, what="x")
    assert e.value.reason == render.SILENT
    with pytest.raises(render.RenderError) as e:
        render.normalise(np.array([0.1, np.nan], np.float32), peak=0.9, silence_peak=1e-4, what="x")
    assert e.value.reason == render.NONFINITE


def test_segments_move_by_octaves_into_range_or_are_rejected(violin):
    _, _, table = violin
    assert table.transpose_to_fit(np.array([60, 64])) == 0
    assert table.transpose_to_fit(np.array([24, 28])) == 12
    assert table.transpose_to_fit(np.array([21, 108])) is None
    with pytest.raises(render.RenderError, match="semitones") as e:
        render.render(np.array([[0.0, 1.0, 110, 100]]), table)
    assert e.value.reason == render.MISSING_PITCHES


# --- augmentation ----------------------------------------------------------------------------------
def test_chains_are_seeded_recorded_and_replay_exactly():
    rng = lambda: plan.rng_for(0, "augment", "p1")
    chain = augment.sample_chain(rng(), effects=AUG_EFFECTS, max_effects=3, dry_fraction=0.0)
    assert chain == augment.sample_chain(rng(), effects=AUG_EFFECTS, max_effects=3, dry_fraction=0.0)
    assert 1 <= len(chain["chain"]) <= 3
    stored = json.loads(json.dumps(chain))  # what a record holds
    x = np.random.default_rng(0).normal(size=SR).astype(np.float32) * 0.3
    y1 = augment.apply(x, SR, augment.board(chain))
    y2 = augment.apply(x, SR, augment.board(stored))
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(y1, x)
    many = [augment.sample_chain(plan.rng_for(0, "augment", i), effects=AUG_EFFECTS, max_effects=3,
                                 dry_fraction=0.25) for i in range(400)]
    dry = sum(not c["chain"] for c in many)
    assert 60 < dry < 140
    used = {e["name"] for c in many for e in c["chain"]}
    assert used == set(AUG_EFFECTS)


@pytest.mark.parametrize("name", AUG_EFFECTS)
def test_every_effect_changes_the_sound_and_stays_finite(name):
    chain = {"version": augment.AUG_VERSION, "chain": [augment._sample(name, np.random.default_rng(2))]}
    t = np.arange(SR) / SR
    x = (0.5 * np.sin(2 * np.pi * 220 * t) * np.exp(-2 * t)).astype(np.float32)
    y = augment.apply(x, SR, augment.board(chain))
    assert y.shape == x.shape and np.isfinite(y).all() and not np.allclose(x, y, atol=1e-4)


def test_unknown_stored_chains_are_clear_errors():
    with pytest.raises(ValueError, match="version"):
        augment.board({"version": "other", "chain": [{"name": "reverb"}]})
    with pytest.raises(ValueError, match="unknown effect 'wah'"):
        augment.board({"version": augment.AUG_VERSION, "chain": [{"name": "wah"}]})


# --- plans -----------------------------------------------------------------------------------------
def test_plans_are_deterministic_and_pair_different_segments(tmp_path):
    cfg = _cfg(tmp_path, pairs_per_instrument=25, chunk_size=7)
    pool = [midi_sources.procedural_segment(0, i, 128) for i in range(10)]
    spec = instrument_spec.InstrumentSpec("x", "train", "soundfont", {})
    chunks = plan.plan_instrument(spec, pool, cfg, 3)
    assert [len(c) for c in chunks] == [7, 7, 7, 4]
    flat = [p for c in chunks for p in c]
    assert all(p.target.key != p.reference.key for p in flat)
    assert len({p.pair_id for p in flat}) == 25
    assert sorted(p.target.key for p in flat[:10]) == sorted(s.key for s in pool)  # a permutation first
    assert [p.pair_id for p in flat] == [p.pair_id for c in plan.plan_instrument(spec, pool, cfg, 3) for p in c]
    skipped = [p for c in plan.plan_instrument(spec, pool, cfg, 3, frozenset({("train", 1)})) for p in c]
    assert [p.pair_id for p in skipped] == [p.pair_id for p in flat if p.shard != 1]
    assert plan.shard_counts([spec] * 3, dataclasses_replace(cfg, records_per_shard=10)) == {"train": 8}


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="effects"):
        _cfg(tmp_path, effects=("wah",))
    with pytest.raises(ConfigError, match="nsynth_dir"):
        _cfg(tmp_path, instruments="nsynth")
    cfg = _cfg(tmp_path)
    assert PrepConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.fingerprint() == dataclasses_replace(cfg, output_dir="elsewhere", chunk_size=3).fingerprint()
    assert cfg.fingerprint() != dataclasses_replace(cfg, seed=1).fingerprint()


# --- sink ------------------------------------------------------------------------------------------
def _record(pair_id, num_midi_tokens, num_frames, num_codebooks=4):
    return records.PairRecord(
        pair_id, "train", "inst", np.arange(1, num_midi_tokens + 1), np.zeros((num_frames, num_codebooks), int),
        np.zeros(512), {}, "clap", {"chain": []}, {"midi": "gen", "start": 0.0}, {"midi": "gen", "start": 5.0}).to_bytes()


def test_shards_are_sorted_atomic_and_resumable(tmp_path):
    out = str(tmp_path)
    recs = [("b", _record("b", 8, 30)), ("a", _record("a", 12, 20)), ("c", _record("c", 4, 10))]
    summary = sink.write_shard(out, "train", 0, 2, recs, [("silent_render", "x: quiet")], "fp")
    path = tmp_path / "train" / "shard-00000-of-00002.array_record"
    assert sink.read_shard(str(path)) == [data for _, data in sorted(recs)]
    assert summary["records"] == 3 and summary["rejected"] == {"silent_render": 1}
    # the longest example: "b", 8 MIDI rows + separator + 30 frames delayed over 4 codebooks + end row
    assert summary["max_positions"] == 8 + 1 + 33 + 1
    assert json.loads((tmp_path / "train" / "shard-00000-of-00002.array_record.json").read_text()) == summary
    assert not [f for f in os.listdir(tmp_path / "train") if ".tmp-" in f]
    assert set(sink.completed_shards(out, {"train": 2}, "fp")) == {("train", 0)}
    with open(path, "ab") as f:  # a shard that does not match its sidecar is redone
        f.write(b"x")
    assert sink.completed_shards(out, {"train": 2}, "fp") == {}
    with pytest.raises(sink.SinkError, match="different configuration"):
        sink.completed_shards(out, {"train": 2}, "other")
    with pytest.raises(sink.SinkError, match="two different records"):
        sink.write_shard(out, "train", 1, 2, [("a", _record("a", 1, 1)), ("a", _record("a", 2, 1))], [], "fp")


# --- encoders --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, rate, frames, k, size", [("tiny-encodec", 32000, 250, 4, 64), ("tiny-dac", 44100, 431, 3, 64)])
def test_tiny_codecs_code_audio_and_ignore_batch_mates(name, rate, frames, k, size):
    codec = encoders.Codec(name, batch_size=3)
    assert codec.info == encoders.codec_info(name) and codec.info.sample_rate == rate
    x = np.random.default_rng(0).normal(size=(4, 5 * rate)).astype(np.float32) * 0.2
    codes = codec.encode(x)
    assert codes.shape == (4, frames, k) and codes.min() >= 0 and codes.max() < size
    assert len(np.unique(codes[:, :, 0])) > 8  # different audio, different codes
    np.testing.assert_array_equal(codec.encode(x[2:3]), codes[2:3])  # alone or in a batch: the same
    np.testing.assert_array_equal(encoders.Codec(name, batch_size=3).encode(x), codes)  # seeded weights


def test_tiny_clap_embeds_unit_vectors_independent_of_batch():
    clap = encoders.ClapEmbedder("tiny-clap", batch_size=2)
    x = np.random.default_rng(1).normal(size=(3, 5 * SR)).astype(np.float32) * 0.2
    emb = clap.embed(x, SR)
    assert emb.shape == (3, 512) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(clap.embed(x[2:], SR), emb[2:])
    compat = encoders.ClapEmbedder("tiny-clap", batch_size=2, input_mode="tokensynth-0.0.4")
    assert compat.model_id == "tiny-clap|tokensynth-0.0.4" and not np.array_equal(compat.embed(x[:1], SR), emb[:1])


def test_missing_pretrained_weights_are_an_error_not_random_weights():
    with pytest.raises(encoders.EncoderError, match="not in the Hugging Face cache.*tiny-encodec"):
        encoders.codec_info("facebook/encodec_32khz", offline=True)
    with pytest.raises(encoders.EncoderError, match="--clap tiny-clap"):
        encoders.check_clap("laion/larger_clap_music", offline=True)
    for local in ("./my_clap", "/models/clap", "~/clap", "runs/a/clap"):  # a path is no hub id to download
        with pytest.raises(encoders.EncoderError, match=f"--clap {local}: no such directory") as e:
            encoders.check_clap(local, offline=True)
        assert "huggingface-cli" not in str(e.value)


def test_offline_asks_no_host_for_anything(tmp_path):
    """With local_files_only alone, huggingface_hub (2.4) still fetched its registry of AI-agent
    harnesses from the hub, in a fresh cache; --offline must not look a host up at all."""
    import subprocess
    import sys

    code = """
import socket, sys
asked = []
sys.addaudithook(lambda event, args: asked.append(args[0]) if event in ("socket.getaddrinfo", "socket.connect") else None)
from tokensynth_jax.audio import encoders
for check in (lambda: encoders.codec_info("facebook/encodec_32khz", offline=True),
              lambda: encoders.check_clap("laion/larger_clap_music", offline=True)):
    try:
        check()
    except encoders.EncoderError as e:
        print(e)
print("asked:", asked)
"""
    env = {**{k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}, "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("is not in the Hugging Face cache, and --offline keeps off the hub") == 2, run.stdout
    assert run.stdout.strip().endswith("asked: []")


def test_a_local_encoder_that_is_a_file_or_an_empty_folder_is_named_as_such(tmp_path, monkeypatch):
    """An existing path was said to be "no such directory", or taken for a hub id (one slash)."""
    (tmp_path / "weights.bin").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(encoders.EncoderError, match=r"--clap \./weights.bin: is a file \(a local clap is a folder"):
        encoders.check_clap("./weights.bin", offline=True)
    os.makedirs("models/empty")
    with pytest.raises(encoders.EncoderError, match="--codec models/empty: holds no config.json"):
        encoders.codec_info("models/empty", offline=True)


def test_an_unreachable_hub_is_answered_from_the_cache_at_once(caplog):
    """No network: a hub id missing from the cache fails without huggingface_hub's five retries."""
    if not encoders.hub_unreachable():
        pytest.skip("the Hugging Face hub is reachable from here")
    with caplog.at_level(logging.WARNING):
        with pytest.raises(encoders.EncoderError, match="not in the Hugging Face cache"):
            encoders.check_clap("laion/larger_clap_music", offline=False)
        with pytest.raises(encoders.EncoderError, match="not in the Hugging Face cache"):
            encoders.codec_info("facebook/encodec_32khz", offline=False)
    assert not [r.getMessage() for r in caplog.records if "Retrying" in r.getMessage()]


def test_device_is_checked_before_the_job():
    encoders.check_device("cpu")
    for device, message in (("bogus", "not a torch device"), ("cpu:x", "not a torch device"),
                            ("cuda:0", "torch sees no CUDA device")):
        if device.startswith("cuda") and __import__("torch").cuda.is_available():
            continue
        with pytest.raises(encoders.EncoderError, match=f"device '{device}'.*{message}"):
            encoders.check_device(device)


# --- NSynth raw layout -----------------------------------------------------------------------------
def test_nsynth_raw_layout_round_trip(tmp_path):
    t = np.arange(4 * nsynth.NSYNTH_RATE) / nsynth.NSYNTH_RATE
    examples = [{"id": f"flute_acoustic_00{i}-0{p}-{v}", "pitch": p, "velocity": v, "instrument": {"label": i},
                 "audio": 0.5 * np.sin(2 * np.pi * 440 * 2 ** ((p - 69) / 12) * t) * (v / 127)}
                for i in (1, 2) for p in (60, 64) for v in (50, 100)]
    names = lambda label: f"flute_acoustic_00{label}"
    assert nsynth.write_raw_layout(examples[:4], names, str(tmp_path / "nsynth-train")) == 4
    nsynth.write_raw_layout(examples[4:], names, str(tmp_path / "nsynth-test"))
    specs = nsynth.raw_instruments(str(tmp_path), ("train", "valid", "test"))
    assert [(s.instrument_id, s.split) for s in specs] == [("nsynth:flute_acoustic_001", "train"),
                                                           ("nsynth:flute_acoustic_002", "test")]
    notes = nsynth.raw_notes(specs[0], SR)
    assert sorted(notes) == [(60, 50), (60, 100), (64, 50), (64, 100)]
    assert notes[(60, 100)].shape == (4 * SR,)
    np.testing.assert_allclose(notes[(60, 100)][1000:2000], 0.5 * np.sin(2 * np.pi * 261.6256 * np.arange(1000, 2000) / SR) * 100 / 127, atol=2e-3)
    nsynth.write_raw_layout(examples[:1], names, str(tmp_path / "nsynth-valid"))
    with pytest.raises(instrument_spec.InstrumentError, match="in both train and valid"):
        nsynth.raw_instruments(str(tmp_path), ("train", "valid"))


def test_cli_passes_beam_options_through_and_defaults_to_the_local_runner(tmp_path):
    import argparse

    from tokensynth_jax.cli import prep as cli

    parser = argparse.ArgumentParser()
    cli.add_prep_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prep", "--out", "gs://b/x", "--programs", "0,40", "--table-pitches", "36:96:4",
                              "--", "--runner=DataflowRunner", "--project=p"])
    assert cli.beam_options(args) == ["--runner=DataflowRunner", "--project=p"]
    cfg = cli.config_from_args(args)
    assert cfg.programs == (0, 40) and cfg.table_pitches == (36, 96, 4) and cfg.output_dir == "gs://b/x"
    args = parser.parse_args(["prep", "--out", str(tmp_path), "--workers", "3"])
    assert cli.beam_options(args) == ["--runner=FnApiRunner", "--direct_num_workers=3",
                                      "--direct_running_mode=multi_processing"]


def test_data_prep_stays_behind_its_wall():
    import subprocess
    import sys

    code = ("import sys, tokensynth_prep.pipeline, tokensynth_prep.pairs, tokensynth_prep.nsynth; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'jax', 'flax') "
            "or (m.startswith('tokensynth_jax.') and m not in ('tokensynth_jax.tokens', 'tokensynth_jax.tokens.records', "
            "'tokensynth_jax.tokens.token_layout', 'tokensynth_jax.tokens.midi_tokens', "
            "'tokensynth_jax.tokens.midi_library', 'tokensynth_jax.errors', "
            "'tokensynth_jax.audio', 'tokensynth_jax.audio.encoders', 'tokensynth_jax.audio.io', "
            "'tokensynth_jax.audio.melrvq', 'tokensynth_jax.audio.spectral_embedder'))); print(bad)")
    # CI=true: pyfluidsynth then prints where it found libfluidsynth unless imported through midi_library
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "CI": "true"},
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # prep uses our tokens, records and audio front end (the offline encoders are numpy); torch and transformers
    # load only when an encoder is built
    assert out.stdout == "[]\n"
