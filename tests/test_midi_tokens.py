"""Tests of tokensynth_jax.tokens.midi_tokens, with parity against the reference tokenizer."""
import numpy as np
import pretty_midi
import pytest

from tokensynth_jax.tokens.midi_tokens import (
    MidiTokenizationError,
    MidiWindow,
    split_into_windows,
    tokenize_midi,
    tokens_to_notes,
)
from tokensynth_jax.tokens.token_layout import (
    OFFSET_BASE,
    ONSET_BASE,
    PITCH_BASE,
    TOKENS_PER_NOTE,
    VELOCITY_BASE,
)


@pytest.fixture(scope="module")
def reference_tokens(reference_module):
    utils = reference_module("utils")
    return lambda path, pitch_shift=0: utils.get_tokens_from_midi(str(path), pitch_shift).reshape(-1).numpy()


def write_midi(path, tracks, resolution=500, tempo=120.0):
    """tracks: [(is_drum, [(start, end, pitch, velocity), ...]), ...]; 500 ticks/beat at 120 bpm is a 1 ms grid."""
    pm = pretty_midi.PrettyMIDI(resolution=resolution, initial_tempo=tempo)
    for is_drum, notes in tracks:
        inst = pretty_midi.Instrument(program=0, is_drum=is_drum)
        inst.notes = [pretty_midi.Note(velocity=v, pitch=p, start=s, end=e) for s, e, p, v in notes]
        pm.instruments.append(inst)
    pm.write(str(path))
    return path


PIANO_FRAGILE = [(0.29, 0.57, 60, 37), (0.57, 1.13, 62, 38), (1.13, 2.01, 64, 75), (2.01, 4.99, 65, 113),
                 (0.29, 3.0, 48, 114), (3.5, 4.5, 67, 127), (4.0, 4.2, 69, 1)]
BASS = [(0.29, 1.0, 36, 100), (0.0, 4.0, 40, 50), (1.13, 1.5, 38, 25), (3.0, 3.01, 41, 64)]
FILES = {  # name -> (tracks, resolution); all notes have distinct (start, track order) ties handled stably
    "fragile_two_tracks": ([(False, PIANO_FRAGILE), (False, BASS)], 500),
    "default_resolution": ([(False, PIANO_FRAGILE), (False, BASS)], 220),
    "crossing_5s": ([(False, [(0.5, 1.0, 60, 90), (4.5, 5.5, 62, 90), (4.6, 4.89, 64, 90), (4.0, 5.0, 65, 90),
                              (5.0, 5.2, 66, 90), (7.0, 8.0, 67, 90)])], 500),
    "long_early_note": ([(False, [(0.1, 0.2, 60, 80), (0.5, 6.0, 48, 80)]),
                         (False, [(1.0, 1.5, 62, 80), (2.0, 2.5, 64, 80), (3.0, 3.5, 65, 80)])], 500),
    "with_drums": ([(True, [(0.0, 0.1, 36, 120), (0.5, 0.6, 38, 120), (6.0, 6.1, 42, 120)]),
                    (False, [(0.0, 1.0, 60, 64), (0.5, 2.0, 64, 64), (2.5, 4.9, 67, 64)])], 500),
}
CLEAN = ("fragile_two_tracks", "default_resolution")  # no drums, no note reaching 5 s


@pytest.fixture(scope="module")
def midi_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("midi")
    return {name: write_midi(root / f"{name}.mid", tracks, res) for name, (tracks, res) in FILES.items()}


@pytest.mark.parametrize("pitch_shift", [0, -3, 5])
@pytest.mark.parametrize("name", sorted(FILES))
def test_compat_mode_matches_reference(midi_files, reference_tokens, name, pitch_shift):
    window = tokenize_midi(midi_files[name], compat="tokensynth-0.0.4", pitch_shift=pitch_shift)
    expected = reference_tokens(midi_files[name], pitch_shift)
    assert window.tokens.dtype == np.int32
    np.testing.assert_array_equal(window.tokens, expected)
    assert window.num_notes * TOKENS_PER_NOTE == len(expected)


@pytest.mark.parametrize("name", CLEAN)
def test_default_mode_matches_reference_on_clean_files(midi_files, reference_tokens, name):
    window = tokenize_midi(midi_files[name])
    np.testing.assert_array_equal(window.tokens, reference_tokens(midi_files[name]))
    assert (window.cut_notes, window.dropped_drum_notes) == (0, 0)
    assert window.source == str(midi_files[name])


def test_onsets_truncate_like_the_reference(midi_files, reference_tokens):
    """0.29 s on a 1 ms grid reads back as 0.29, and int(0.29 * 100) == 28."""
    path = midi_files["fragile_two_tracks"]
    for rows in (tokenize_midi(path).tokens.reshape(-1, 4), reference_tokens(path).reshape(-1, 4)):
        assert rows[rows[:, 2] == PITCH_BASE + 60, 0].tolist() == [ONSET_BASE + 28]


def test_default_mode_keeps_notes_after_a_long_note(midi_files, reference_tokens):
    path = midi_files["long_early_note"]
    assert len(reference_tokens(path)) == 1 * TOKENS_PER_NOTE  # the reference stops at the long note
    window = tokenize_midi(path)
    onsets = window.tokens.reshape(-1, 4)[:, 0] - ONSET_BASE
    assert onsets.tolist() == [10, 100, 200, 300]
    assert (window.num_notes, window.cut_notes) == (4, 1)


def test_default_mode_cuts_notes_crossing_the_window_end(midi_files):
    window = tokenize_midi(midi_files["crossing_5s"])
    rows = window.tokens.reshape(-1, 4)
    assert (rows[:, 2] - PITCH_BASE).tolist() == [60, 64]  # 4.6-4.89 s kept after the 4.5-5.5 s note
    assert rows[1, 1] == OFFSET_BASE + 488  # 4.89 * 100 < 489: truncated like the reference
    assert (window.num_notes, window.cut_notes) == (2, 2)  # cut: ends at 5.5, ends at exactly 5.0


def test_drums_are_excluded_and_counted(midi_files, reference_tokens):
    path = midi_files["with_drums"]
    window = tokenize_midi(path)
    assert (window.num_notes, window.dropped_drum_notes) == (3, 2)  # the 6 s drum is outside
    assert (window.tokens.reshape(-1, 4)[:, 2] - PITCH_BASE).tolist() == [60, 64, 67]
    assert len(reference_tokens(path)) == 5 * TOKENS_PER_NOTE  # the reference keeps the drums


@pytest.mark.parametrize("velocity,cls", [(0, 0), (1, 0), (37, 0), (38, 1), (75, 1), (112, 2), (113, 2),
                                          (114, 3), (127, 3)])
def test_velocity_classes(velocity, cls):
    pm = pretty_midi.PrettyMIDI()  # in memory: a written velocity 0 would read back as a note-off
    inst = pretty_midi.Instrument(0)
    inst.notes.append(pretty_midi.Note(velocity=velocity, pitch=60, start=1.0, end=2.0))
    pm.instruments.append(inst)
    window = tokenize_midi(pm)
    assert window.tokens[3] == VELOCITY_BASE + cls
    assert window.source == "<PrettyMIDI>"


def test_equal_onsets_keep_track_order(midi_files):
    # Onset 0.29 s: piano 60, piano 48, bass 36 in that order (stable sort of the track chain).
    rows = tokenize_midi(midi_files["fragile_two_tracks"]).tokens.reshape(-1, 4)
    at_029 = rows[rows[:, 0] == ONSET_BASE + 28][:, 2] - PITCH_BASE
    assert at_029.tolist() == [60, 48, 36]


TWELVE_SECONDS = [(0.5, 1.5, 60, 80), (3.0, 7.0, 61, 80), (4.5, 4.9, 62, 80), (5.0, 5.25, 63, 80),
                  (6.125, 9.5, 64, 80), (9.75, 10.25, 65, 80), (10.0, 11.0, 66, 80), (11.5, 12.0, 67, 80)]


@pytest.fixture
def twelve_seconds(tmp_path):
    # 512 ticks/beat at 120 bpm: every time is a multiple of 1/1024 s, so t - 5 is exact.
    return write_midi(tmp_path / "twelve.mid", [(False, TWELVE_SECONDS[::2]), (False, TWELVE_SECONDS[1::2])],
                      resolution=512)


def test_window_equals_shifted_copy(twelve_seconds, tmp_path):
    shifted = [(s - 5, e - 5, p, v) for s, e, p, v in TWELVE_SECONDS if s >= 5]
    copy = write_midi(tmp_path / "shifted.mid", [(False, shifted)], resolution=512)
    window = tokenize_midi(twelve_seconds, start_seconds=5.0)
    np.testing.assert_array_equal(window.tokens, tokenize_midi(copy).tokens)
    assert window.start_seconds == 5.0
    assert (window.num_notes, window.cut_notes) == (2, 2)  # the 3-7 s note and the 9.75-10.25 s note


def test_split_into_windows_cuts_in_silence_then_clips_the_fewest_notes(twelve_seconds):
    windows = split_into_windows(twelve_seconds)
    # [0.5, 1.5): nothing sounds from 1.5 to 3 s, so it ends at the note-off and the next starts at
    # 3 s; [3, 8): no silent place in its latter half, so the latest cut that clips one note
    # (6.125..9.5, carried on from 8 s); [8, 12): the rest.
    assert [(w.start_seconds, w.seconds) for w in windows] == [(0.5, 1.0), (3.0, 5.0), (8.0, 4.0)]
    assert [w.num_notes for w in windows] == [1, 4, 4] and [w.clipped_notes for w in windows] == [0, 1, 0]
    assert windows[2].tokens[:4].tolist() == [ONSET_BASE + 0, OFFSET_BASE + 150, PITCH_BASE + 64, VELOCITY_BASE + 2]
    np.testing.assert_array_equal(windows[0].tokens, tokenize_midi(twelve_seconds, start_seconds=0.5).tokens[:4])


def test_split_skips_silence_and_tokenize_names_an_empty_window(tmp_path):
    path = write_midi(tmp_path / "gap.mid", [(False, [(1.0, 2.0, 60, 80), (11.0, 12.0, 62, 80)])])
    windows = split_into_windows(path)
    assert [(w.start_seconds, w.seconds, w.num_notes) for w in windows] == [(1.0, 1.0, 1), (11.0, 1.0, 1)]
    with pytest.raises(MidiTokenizationError, match=r"gap\.mid.*\[5, 10\).*12\.000 s"):
        tokenize_midi(path, start_seconds=5.0)


def test_split_refuses_more_notes_at_one_instant_than_any_window_holds(tmp_path):
    path = write_midi(tmp_path / "chord.mid", [(False, [(1.0, 2.0, p, 80) for p in (60, 64, 67)])])
    assert [w.num_notes for w in split_into_windows(path, max_notes=3)] == [3]
    with pytest.raises(MidiTokenizationError, match=r"chord\.mid: 3 notes sound in the 1\.000 s from 1\.000 s, "
                                                    r"more than the 2"):
        split_into_windows(path, max_notes=2)


def _bad_file(tmp_path, kind):
    path = tmp_path / f"bad_{kind}.mid"
    if kind == "text":
        path.write_text("this is not a MIDI file\n" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        write_midi(path, [(False, [(0.0, 1.0, 60, 80), (1.0, 2.0, 62, 80)])])
        path.write_bytes(path.read_bytes()[:-20])
    elif kind == "no_notes":
        write_midi(path, [(False, [])])
    elif kind == "no_instruments":
        write_midi(path, [])
    elif kind == "drums_only":
        write_midi(path, [(True, [(0.0, 0.5, 36, 100)])])
    elif kind == "missing":
        pass
    return path


@pytest.mark.parametrize("kind,problem", [
    ("text", "not a readable MIDI"), ("empty", "not a readable MIDI"), ("truncated", "not a readable MIDI"),
    ("no_notes", "no notes"), ("no_instruments", "no notes"), ("drums_only", "only drum"), ("missing", "no such file"),
])
@pytest.mark.parametrize("func", [tokenize_midi, split_into_windows])
def test_bad_files_raise(tmp_path, kind, problem, func):
    path = _bad_file(tmp_path, kind)
    with pytest.raises(MidiTokenizationError, match=problem) as info:
        func(path)
    assert path.name in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("call,problem", [
    (lambda p: tokenize_midi(p, pitch_shift=10), r"120 \+ shift 10 = 130"),
    (lambda p: tokenize_midi(p, pitch_shift=-10), r"5 \+ shift -10 = -5"),
    (lambda p: tokenize_midi(p, pitch_shift=10, compat="tokensynth-0.0.4"), "outside 0..127"),
    (lambda p: split_into_windows(p, pitch_shift=10), "outside 0..127"),
    (lambda p: tokenize_midi(p, start_seconds=-1.0), "negative"),
    (lambda p: tokenize_midi(p, start_seconds=20.0), r"\[20, 25\).*1\.000 s"),
    (lambda p: tokenize_midi(p, start_seconds=5.0, compat="tokensynth-0.0.4"), "only tokenizes the window at 0"),
    (lambda p: tokenize_midi(p, compat="tokensynth-9"), "unknown compat"),
    (lambda p: tokenize_midi(p, max_notes=1), "2 notes.*max_notes=1"),
    (lambda p: split_into_windows(p, max_notes=0), "1 notes sound.*more than the 0"),
    (lambda p: split_into_windows(p, window_seconds=6.0), "window_seconds=6.0.*at most 5 s"),
])
def test_bad_requests_raise(tmp_path, call, problem):
    path = write_midi(tmp_path / "two_notes.mid", [(False, [(0.0, 0.5, 120, 80), (0.5, 1.0, 5, 80)])])
    with pytest.raises(MidiTokenizationError, match=problem) as info:
        call(path)
    assert "two_notes.mid" in str(info.value)


def test_max_notes_at_the_limit_is_fine(midi_files):
    window = tokenize_midi(midi_files["long_early_note"], max_notes=4)
    assert isinstance(window, MidiWindow) and window.num_notes == 4


@pytest.mark.parametrize("name", sorted(FILES))
def test_tokens_to_notes_round_trips(midi_files, name):
    window = tokenize_midi(midi_files[name])
    notes = tokens_to_notes(window.tokens).instruments[0].notes
    assert len(notes) == len(window.tokens) // 4
    np.testing.assert_array_equal(tokenize_midi(tokens_to_notes(window.tokens)).tokens, window.tokens)


def test_tokens_to_notes_rejects_what_is_not_notes():
    with pytest.raises(MidiTokenizationError, match="whole number"):
        tokens_to_notes(np.array([ONSET_BASE, OFFSET_BASE + 3, PITCH_BASE + 60]))
    with pytest.raises(MidiTokenizationError, match="not an"):
        tokens_to_notes(np.array([PITCH_BASE + 60, OFFSET_BASE + 3, ONSET_BASE, VELOCITY_BASE]))
