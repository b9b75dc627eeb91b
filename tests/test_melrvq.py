"""The offline demo codec `demo-melrvq`: fitted on General MIDI renders, it keeps the notes.

The codec is fitted here the way prep fits it (k-means on renders of procedural phrases), on piano
and string presets of the SoundFont inside pretty_midi, then judged on melodies it never saw:
basic-pitch's transcription of the decoded audio must still find the notes (F1 >= 0.8), different
notes must give different codes and different audio, and everything must be deterministic.
"""
import numpy as np
import pytest

from tokensynth_jax.audio import encoders
from tokensynth_prep import instruments, midi_sources, render
from tokensynth_prep.config import PrepConfig
from tokensynth_jax.evaluation import metrics
from tokensynth_jax.audio import melrvq

RATE = melrvq.MelRVQConfig().sample_rate
PIANO, VIOLIN, CELLO = 0, 40, 42


def _melody(pitches, step: float, velocity: int = 90) -> np.ndarray:
    return np.array([(step * i, step * i + 0.9 * step, p, velocity) for i, p in enumerate(pitches)], float)


# Held-out phrases (the fit never hears them): a scale at 120 bpm, a leaping line in eighths, an arpeggio.
PHRASES = (
    _melody([60, 62, 64, 65, 67, 65, 64, 62, 60], 0.5),
    _melody([67, 64, 72, 71, 69, 65, 67, 62, 64, 60, 59, 62, 60, 55, 57, 59], 0.28, velocity=100),
    _melody([55, 59, 62, 67, 71, 67, 62, 59, 55, 60, 64, 67], 0.38, velocity=80),
)


@pytest.fixture(scope="module")
def tables():
    cfg = PrepConfig(output_dir="unused", programs=(PIANO, VIOLIN, CELLO), table_pitches=(36, 96, 3),
                     table_velocities=(60, 110), valid_fraction=0, test_fraction=0)
    return cfg, {s.params["program"]: instruments.build_note_table(s, RATE, cfg) for s in instruments.list_instruments(cfg)}


def _render(tables, notes, program) -> np.ndarray:
    cfg, by_program = tables
    table = by_program[program]
    notes = notes.copy()
    notes[:, 2] += table.transpose_to_fit(notes[:, 2])
    return render.normalise(render.render(notes, table, fade_seconds=cfg.fade_seconds), peak=0.9, silence_peak=1e-4,
                            what="test phrase"), notes


@pytest.fixture(scope="module")
def codec(tables):
    clips = [_render(tables, midi_sources.procedural_segment(0, i, 16).notes, p)[0]
             for p in (PIANO, VIOLIN, CELLO) for i in range(14)]
    return melrvq.fit(clips)


def _f1(audio, notes) -> float:
    return metrics.note_f1(notes[:, :3], metrics.transcribe(audio, RATE))["f1"]


@pytest.mark.parametrize("program", [PIANO, VIOLIN, CELLO])
def test_round_trip_keeps_the_notes(codec, tables, program):
    scores, originals = [], []
    for phrase in PHRASES:
        audio, notes = _render(tables, phrase, program)
        codes = codec.encode(audio[None])
        assert codes.shape == (1, codec.num_frames(len(audio)), 4) and codes.dtype == np.int64
        decoded = codec.decode(codes)[0]
        assert decoded.shape == (codes.shape[1] * codec.config.hop,) and np.isfinite(decoded).all()
        scores.append(_f1(decoded, notes))
        originals.append(_f1(audio, notes))
    assert min(originals) >= 0.8  # the phrases themselves transcribe cleanly
    assert np.mean(scores) >= 0.8, (program, scores, originals)


def test_decoded_frames_are_as_loud_as_codebook_0_says(codec, tables):
    errors = []
    for program in (PIANO, VIOLIN, CELLO):
        for phrase in PHRASES:
            audio, _ = _render(tables, phrase, program)
            codes = codec.encode(audio[None])
            again = codec.encode(codec.decode(codes)[:, : len(audio)])
            errors.append(np.abs(again[0, :, 0] - codes[0, :, 0]).mean())
    # Re-encoded, the decoded audio's loudness codes stay near the ones it was decoded from. Without
    # the decoder's per-frame shift to code 0's level: 15.0 levels off on average, 22.1 on one phrase.
    assert np.mean(errors) < 13, np.round(errors, 1)


def test_different_notes_give_different_codes_and_audio(codec, tables):
    a, _ = _render(tables, PHRASES[0], PIANO)
    b, _ = _render(tables, PHRASES[0][:, :] + np.array([0, 0, 5, 0]), PIANO)  # a fourth higher
    codes = codec.encode(np.stack([a, b]))
    differ = (codes[0] != codes[1]).any(axis=1)
    assert differ[:50].mean() > 0.8  # where notes sound (the first 2 s), nearly every frame differs
    audio = codec.decode(codes)
    spec = [np.abs(np.fft.rfft(x[: RATE * 2])) for x in audio]
    assert np.corrcoef(spec[0], spec[1])[0, 1] < 0.5  # different pitches, not the same sound twice
    assert np.abs(audio[0] - audio[1]).mean() > 0.1 * np.abs(audio[0]).mean()


def test_deterministic_fit_codes_and_audio(codec, tables):
    clips = [_render(tables, midi_sources.procedural_segment(0, i, 16).notes, PIANO)[0] for i in range(4)]
    small = melrvq.MelRVQConfig(codebook_size=64, kmeans_iters=3)
    first, second = melrvq.fit(clips, small), melrvq.fit(clips, small)
    assert first.fingerprint == second.fingerprint
    audio, _ = _render(tables, PHRASES[1], VIOLIN)
    np.testing.assert_array_equal(codec.encode(audio[None]), codec.encode(audio[None]))
    codes = codec.encode(audio[None])
    np.testing.assert_array_equal(codec.decode(codes), codec.decode(codes))
    # The saved state is the codec: same codes and audio after a round trip through bytes.
    again = melrvq.MelRVQ.from_bytes(codec.to_bytes())
    assert again.fingerprint == codec.fingerprint
    np.testing.assert_array_equal(again.encode(audio[None]), codes)
    np.testing.assert_array_equal(again.decode(codes), codec.decode(codes))


def test_bad_states_and_codes_are_clear_errors(codec):
    with pytest.raises(melrvq.MelRVQError, match="not a demo-melrvq state"):
        melrvq.MelRVQ.from_bytes(b"not an npz", what="x.npz")
    with pytest.raises(melrvq.MelRVQError, match="codes must be in 0..255"):
        codec.decode(np.full((1, 3, 4), 256))
    with pytest.raises(melrvq.MelRVQError, match=r"codes \[B, T, 4\]"):
        codec.decode(np.zeros((1, 3, 9), int))
    with pytest.raises(melrvq.MelRVQError, match="frames to fit"):
        melrvq.fit([np.zeros(RATE)])


def test_encoders_load_a_fitted_state_by_its_path(codec, tmp_path, tables):
    path = str(tmp_path / "demo-melrvq.npz")
    with open(path, "wb") as f:
        f.write(codec.to_bytes())
    info = encoders.codec_info(path)
    assert info.to_dict() == {"name": "demo-melrvq", "sample_rate": RATE, "frame_rate": 25.0, "num_codebooks": 4,
                              "codebook_size": 256, "padding": "none", "fit": codec.fingerprint[:16]}
    wrapped = encoders.Codec(path, batch_size=3)
    audio, _ = _render(tables, PHRASES[2], CELLO)
    codes = wrapped.encode(audio[None])
    np.testing.assert_array_equal(codes, codec.encode(audio[None]))
    np.testing.assert_array_equal(wrapped.decode(codes), codec.decode(codes))
    with pytest.raises(encoders.EncoderError, match="fitted by `tokensynth prep --codec demo-melrvq`"):
        encoders.codec_info("demo-melrvq")
    with pytest.raises(encoders.EncoderError, match="cannot read the fitted demo-melrvq state"):
        encoders.Codec(str(tmp_path / "missing.npz"), batch_size=1)
