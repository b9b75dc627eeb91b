"""Long MIDI without loss: windows that hold every note, dense passages in shorter windows, a
synthesized track as long as the MIDI, and early end rows reported (or forbidden).

Real parts: MIDI files written by pretty_midi, a tiny checkpoint from `tokensynth init`, the tiny
EnCodec preset as the codec.
"""
import os

import jax
import numpy as np
import pytest
import soundfile
from conftest import write_midi
from flax import nnx

from tokensynth_jax import checkpoint
from tokensynth_jax.cli import main as cli
from tokensynth_jax.inference import synthesize
from tokensynth_jax.tokens.midi_tokens import split_into_windows, tokens_to_notes
from tokensynth_jax.tokens.token_layout import WINDOW_SECONDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
FPS, SR, K = 50.0, 32000, 4  # tiny-encodec
TOL = 0.011  # token times are 10 ms bins, read back at their centres

# 12 s with no silence: an 11 s bass note, a legato melody, chords, one across 5 s, a held note.
BASS = [(0.5, 11.5, 36, 90)]
MELODY = [(0.75 * i, 0.75 * (i + 1), 72 + (i % 5) * 2, 100) for i in range(15)]
CHORDS = [(s, e, p, 70) for s, e, pitches in ((2.0, 4.0, (60, 64, 67)), (4.5, 6.5, (62, 65, 69)),
                                              (8.0, 10.5, (59, 62, 67))) for p in pitches]
HELD = [(4.0, 7.5, 48, 60)]
NOTES = BASS + MELODY + CHORDS + HELD


@pytest.fixture(scope="module")
def long_midi(tmp_path_factory):
    path = tmp_path_factory.mktemp("midi") / "long.mid"
    write_midi(path, [(0, False, MELODY + HELD), (32, False, BASS), (48, False, CHORDS)])
    return str(path)


def _pieces(windows):
    """Every tokenized note as (pitch, start, end, window index), in file time."""
    return [(n.pitch, w.start_seconds + n.start, w.start_seconds + n.end, k)
            for k, w in enumerate(windows) for n in tokens_to_notes(w.tokens).instruments[0].notes]


def _assert_every_note_is_in_the_windows(notes, windows):
    """Each input note is one piece, or pieces joined at window cuts; no piece is left over."""
    unused = _pieces(windows)
    for start, end, pitch, _ in notes:
        at = start
        while True:
            piece = next((x for x in unused if x[0] == pitch and abs(x[1] - at) <= TOL), None)
            assert piece is not None, f"note {pitch} at {start}-{end}: nothing from {at:.3f} s"
            unused.remove(piece)
            if abs(piece[2] - end) <= TOL:
                break
            w = windows[piece[3]]
            assert piece[2] < end and abs(piece[2] - (w.start_seconds + w.seconds)) <= TOL  # clipped at the cut
            at = windows[piece[3] + 1].start_seconds  # its rest starts the next window
    assert not unused, unused


def test_every_note_of_a_long_file_is_in_some_window(long_midi):
    windows = split_into_windows(long_midi)
    assert len(windows) >= 3 and all(w.seconds <= WINDOW_SECONDS for w in windows)
    for a, b in zip(windows, windows[1:]):
        assert b.start_seconds == a.start_seconds + a.seconds  # no silence here: each starts at the last cut
    _assert_every_note_is_in_the_windows(NOTES, windows)
    assert sum(w.num_notes for w in windows) == len(NOTES) + sum(w.clipped_notes for w in windows)
    bass = [p for p in _pieces(windows) if p[0] == 36]
    assert len(bass) == len(windows)  # the 11 s note is split into one piece per window


def test_a_note_longer_than_the_windows_is_split_to_its_end(tmp_path):
    path = tmp_path / "drone.mid"
    write_midi(path, [(0, False, [(0.5, 12.5, 40, 80)])])
    windows = split_into_windows(path)
    assert [(w.start_seconds, w.seconds, w.num_notes, w.clipped_notes) for w in windows] == [
        (0.5, 5.0, 1, 1), (5.5, 5.0, 1, 1), (10.5, 2.0, 1, 0)]
    _assert_every_note_is_in_the_windows([(0.5, 12.5, 40, 80)], windows)


def test_a_dense_passage_gets_shorter_windows_instead_of_an_error(tmp_path):
    # 98 notes in 5 s (14 seven-note chords), as a ragtime passage; the tiny model's budget is
    # 96 notes in a 5 s window, the demo's 16, the reference's 145.
    chords = [(0.35 * i, 0.35 * i + 0.3, 48 + 5 * j + i % 3, 90) for i in range(14) for j in range(7)]
    path = tmp_path / "dense.mid"
    write_midi(path, [(0, False, chords)])
    tiny = synthesize.RowBudget(FPS, K, 640, None, 0.25)
    for max_notes in (78, tiny.notes):
        windows = split_into_windows(path, max_notes=max_notes)
        assert len(windows) == 2 and windows[0].seconds < WINDOW_SECONDS
        assert all(w.num_notes <= (max_notes if max_notes == 78 else tiny.notes(w.seconds)) for w in windows)
        _assert_every_note_is_in_the_windows(chords, windows)
    assert tiny.notes(WINDOW_SECONDS) == 96 and tiny.notes(2.0) == 130  # shorter windows leave room for more
    assert synthesize.RowBudget(FPS, K, 320, None, 0.25).notes(WINDOW_SECONDS) == 16  # the demo's max_len
    assert synthesize.RowBudget(44100 / 512, 9, 1024, None, 0.25).notes(WINDOW_SECONDS) == 145  # reference


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt") / "model")
    assert cli.main(["init", "--config", TINY, "--seed", "3", out]) == 0
    return out


def test_synthesized_track_lasts_as_long_as_the_midi(tiny_ckpt, long_midi):
    from tokensynth_jax.audio import encoders

    timbre = np.random.default_rng(0).normal(size=(1, 512)).astype(np.float32)
    model, _ = checkpoint.load_model(tiny_ckpt)
    plan = synthesize.plan_windows(model.cfg, [long_midi], FPS)
    codec = encoders.Codec("tiny-encodec", batch_size=1)
    result = synthesize.synthesize_audio(model, plan, timbre, codec=codec, seed=1)
    windows, codes = result.windows[0], result.codes[0]
    assert result.sample_rate == SR and len(windows) >= 3
    assert len(result.audio[0]) == round((11.5 + synthesize.RELEASE_SECONDS) * SR)
    budget = synthesize.RowBudget(FPS, K, 640, None, synthesize.RELEASE_SECONDS)
    for w, c, ended in zip(windows, codes, result.ended[0]):
        assert len(c) == budget.rows(w.seconds) - (K - 1) and not ended  # random weights write to the cap
        assert len(c) / FPS >= min(w.seconds + synthesize.RELEASE_SECONDS, WINDOW_SECONDS)
    assert result.early_ends == [[]]
    # Window k's audio is the decoded codes overlap-added at its start.
    first = codec.decode(codes[0][None])[0]
    second_at = round(windows[1].start_seconds * SR)
    np.testing.assert_allclose(result.audio[0][:second_at], first[:second_at], atol=1e-5)


def _ending_checkpoint(src: str, dst: str) -> str:
    """The tiny checkpoint with an output bias that makes every row the all-zero end row."""
    model, meta = checkpoint.load_model(src)
    params = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for start, _ in model.cfg.channel_slices():
        params["head"]["bias"][start] = 100.0  # id 0 of every channel
    checkpoint.save_model(dst, model.cfg, params, meta["metadata"])
    return dst


def test_early_end_rows_are_reported_and_min_rows_forbids_them(tiny_ckpt, tmp_path, capsys):
    ending = _ending_checkpoint(tiny_ckpt, str(tmp_path / "ending"))
    midi = tmp_path / "two.mid"
    write_midi(midi, [(0, False, [(0.0, 1.0, 60, 100), (0.5, 6.5, 48, 80)])])
    emb = tmp_path / "timbre.npy"
    np.save(emb, np.ones(512, np.float32) / np.sqrt(512))
    argv = ["synthesize", "--checkpoint", ending, "--midi", str(midi), "--timbre-embedding", str(emb),
            "--sampler", "greedy"]
    assert cli.main(argv + ["--out", str(tmp_path / "early.wav")]) == 0
    printed = capsys.readouterr().out
    # [0, 5): the 6 s note is clipped at 5 s and carried into [5, 6.5).
    assert "two.mid: 2 notes (1 split at window edges) in 2 window(s)" in printed
    assert "0.00+5.00 s: 0 (end row), 5.00+1.50 s: 0 (end row)" in printed
    assert ("two.mid: early end row in 2 window(s), silent after it: the window at 0.00 s at 0.00 s (last "
            "note-off 4.99 s), the window at 5.00 s at 0.00 s (last note-off 1.50 s); --min-rows last-note-off "
            "forbids this") in printed
    early, sr = soundfile.read(tmp_path / "early.wav", dtype="float32")
    assert len(early) == round(6.75 * sr) and not early.any()  # as long as the MIDI, and silent

    assert cli.main(argv + ["--min-rows", "last-note-off", "--out", str(tmp_path / "held.wav"),
                            "--tokens-out", str(tmp_path / "held.npy")]) == 0
    printed = capsys.readouterr().out
    # Frames up to each last note-off (4.99 s -> 250, which is the 5 s window's cap; 1.5 s -> 75),
    # then the end row.
    assert "0.00+5.00 s: 250 (cap), 5.00+1.50 s: 75 (end row)" in printed and "early end row" not in printed
    held, _ = soundfile.read(tmp_path / "held.wav", dtype="float32")
    assert len(held) == round(6.75 * sr) and np.abs(held[: 5 * sr]).max() > 0
    assert (np.load(tmp_path / "held.npy")[0] >= 0).sum() == (250 + 75) * K
