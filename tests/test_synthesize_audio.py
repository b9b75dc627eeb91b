"""Timbres (CLAP of audio, text, mixes), codec decoding and `tokensynth synthesize` to a WAV.

Real parts: tiny random CLAP and EnCodec built by transformers, real WAV and MIDI files, a real
tiny checkpoint from `tokensynth init`.
"""
import os
import re

import numpy as np
import pytest
import soundfile
from conftest import write_midi
from scipy.signal import resample_poly

from tokensynth_jax import checkpoint
from tokensynth_jax.audio import encoders
from tokensynth_jax.cli import main as cli
from tokensynth_jax.config import ModelConfig
from tokensynth_jax.inference import synthesize, timbre

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
SR = 48000
HOP = 640  # tiny-encodec: 32 kHz, 50 frames/s


def _tone(seconds=1.0, sr=SR, freq=440.0):
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t) * np.exp(-3 * t)).astype(np.float32)


@pytest.fixture(scope="module")
def clap():
    return timbre.load_clap("tiny-clap")


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):
    d = tmp_path_factory.mktemp("wavs")
    x = _tone()
    paths = {"mono": d / "mono.wav", "stereo": d / "stereo.wav", "22k": d / "low_rate.wav"}
    soundfile.write(paths["mono"], x, SR)
    soundfile.write(paths["stereo"], np.stack([x, x], axis=1), SR)
    soundfile.write(paths["22k"], resample_poly(x, 147, 320).astype(np.float32), 22050)
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt") / "model")
    assert cli.main(["init", "--config", TINY, "--seed", "5", out]) == 0
    return out


def test_audio_text_and_mix_embeddings_are_unit_vectors_of_the_clap_size(clap, wavs):
    audio = timbre.audio_embedding(clap, wavs["mono"])
    text = timbre.text_embedding(clap, "a warm cello")
    assert audio.shape == text.shape == (512,) and audio.dtype == text.dtype == np.float32
    assert np.linalg.norm(audio) == pytest.approx(1, abs=1e-5) and np.linalg.norm(text) == pytest.approx(1, abs=1e-5)
    assert not np.allclose(audio, text, atol=1e-3)
    np.testing.assert_allclose(timbre.mix_embedding(1.0, audio, text), audio, atol=1e-6)
    np.testing.assert_allclose(timbre.mix_embedding(0.0, audio, text), text, atol=1e-6)
    half = timbre.mix_embedding(0.5, audio, text)
    assert np.linalg.norm(half) == pytest.approx(1, abs=1e-5)  # renormalised: the raw blend is shorter
    np.testing.assert_allclose(half, (audio + text) / np.linalg.norm(audio + text), atol=1e-6)
    assert half @ audio == pytest.approx(half @ text, abs=1e-5)  # halfway along the arc
    # an array at its own rate embeds as the file holding it (16-bit samples, read back)
    samples, rate = soundfile.read(wavs["mono"], dtype="float32")
    np.testing.assert_allclose(timbre.audio_embedding(clap, samples, rate), audio, atol=1e-6)
    other_text = timbre.text_embedding(clap, "distorted electric guitar")
    assert not np.allclose(text, other_text, atol=1e-3)


def test_stereo_is_downmixed_and_other_rates_are_resampled(clap, wavs):
    mono = timbre.audio_embedding(clap, wavs["mono"])
    np.testing.assert_allclose(timbre.audio_embedding(clap, wavs["stereo"]), mono, atol=1e-5)
    low = timbre.audio_embedding(clap, wavs["22k"])
    noise = timbre.audio_embedding(clap, np.random.default_rng(0).normal(size=SR).astype(np.float32) * 0.3, SR)
    # the same tone at 22.05 kHz lands far closer to the 48 kHz tone than another sound does
    assert 1 - low @ mono < 0.1 * (1 - noise @ mono)


@pytest.mark.parametrize("case, message", [
    ("silent", "silent"),
    ("short", "at least 0.5 s"),
    ("not_audio", "not an audio file"),
    ("no_samples", "no samples"),
    ("nan", "NaN"),
    ("missing", "no such audio file"),
])
def test_bad_reference_recordings_name_the_file(clap, tmp_path, case, message):
    path = tmp_path / f"{case}.wav"
    if case == "silent":
        soundfile.write(path, np.zeros(SR, np.float32), SR)
    elif case == "short":
        soundfile.write(path, _tone(0.1), SR)
    elif case == "not_audio":
        path.write_text("RIFF? no, just text pretending to be a WAV")
    elif case == "no_samples":
        soundfile.write(path, np.zeros(0, np.float32), SR)
    elif case == "nan":
        x = _tone()
        x[100] = np.nan
        soundfile.write(path, x, SR, subtype="FLOAT")
    with pytest.raises(timbre.TimbreError, match=message) as e:
        timbre.audio_embedding(clap, str(path))
    assert f"{case}.wav" in str(e.value)


def test_empty_text_and_bad_mix_weights_are_errors(clap, wavs):
    for text in ("", "   "):
        with pytest.raises(timbre.TimbreError, match="non-empty"):
            timbre.text_embedding(clap, text)
    e = timbre.audio_embedding(clap, wavs["mono"])
    with pytest.raises(timbre.TimbreError, match=r"\[0, 1\]"):
        timbre.mix_embedding(1.5, e, e)
    with pytest.raises(timbre.TimbreError, match="cancel"):
        timbre.mix_embedding(0.5, e, -e)


def test_pretrained_clap_missing_offline_is_a_clear_error():
    with pytest.raises(timbre.TimbreError, match="not in the Hugging Face cache.*tiny-clap"):
        timbre.load_clap(timbre.DEFAULT_CLAP, offline=True)


def test_codec_decode_inverts_encode_shapes_and_checks_codes():
    codec = encoders.Codec("tiny-encodec", batch_size=2)
    x = np.random.default_rng(1).normal(size=(3, 32000)).astype(np.float32) * 0.1
    codes = codec.encode(x)
    audio = codec.decode(codes)
    assert audio.shape == (3, codes.shape[1] * HOP) and audio.dtype == np.float32
    np.testing.assert_allclose(codec.decode(codes[1:2]), audio[1:2], atol=1e-5)  # batch padding is invisible
    with pytest.raises(encoders.EncoderError, match="codes 0..63"):
        codec.decode(np.full((1, 5, 4), 64))
    with pytest.raises(encoders.EncoderError, match=r"\[B, T, 4\]"):
        codec.decode(np.zeros((1, 5, 3), np.int64))


def test_a_codec_other_than_the_checkpoints_is_an_error(tiny_ckpt):
    meta = checkpoint.read_metadata(tiny_ckpt)
    cfg = ModelConfig.from_dict(meta["model"])
    assert synthesize.resolve_codec(tiny_ckpt, meta, None, cfg) == "tiny-encodec"
    with pytest.raises(synthesize.SynthesisError, match="'tiny-encodec' codes, but --codec asks for 'tiny-dac'"):
        synthesize.resolve_codec(tiny_ckpt, meta, "tiny-dac", cfg)
    bare = {**meta, "metadata": {}}  # a checkpoint that records no codec
    with pytest.raises(synthesize.SynthesisError, match="records no codec"):
        synthesize.resolve_codec(tiny_ckpt, bare, None, cfg)
    with pytest.raises(synthesize.SynthesisError, match="4 codebooks of 64, codec 'tiny-dac' has 3 of 64"):
        synthesize.resolve_codec(tiny_ckpt, bare, "tiny-dac", cfg)


def test_join_windows_overlap_adds_at_each_start_and_fits_the_length():
    sr = 10
    first, second = np.ones(70, np.float32), np.full(20, 2.0, np.float32)  # first rings on under the second
    out = synthesize.join_windows([first, second], [0.5, 6.0], sr)
    assert len(out) == 60 + 20
    np.testing.assert_array_equal(out[:5], 0)  # before the first onset
    np.testing.assert_array_equal(out[5:60], 1)
    np.testing.assert_array_equal(out[60:75], 3)  # overlap-added
    np.testing.assert_array_equal(out[75:], 2)
    np.testing.assert_array_equal(synthesize.join_windows([first, second], [0.5, 6.0], sr, seconds=7.0), out[:70])
    assert len(synthesize.join_windows([first], [0.5], sr, seconds=9.0)) == 90  # padded with silence


def test_cli_renders_a_wav_from_a_reference_recording(tiny_ckpt, wavs, tmp_path, capsys):
    midi = tmp_path / "tune.mid"
    write_midi(midi, [(0, False, [(0.1, 0.8, 60, 100), (0.9, 1.5, 67, 80)])])
    out, tokens = str(tmp_path / "tune.wav"), str(tmp_path / "tune.npy")
    argv = ["synthesize", "--checkpoint", tiny_ckpt, "--midi", str(midi), "--timbre-audio", wavs["22k"],
            "--clap", "tiny-clap", "--seed", "2", "--out", out, "--tokens-out", tokens, "--spectrogram"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    # One window from the first onset to the last note-off, 1.4 s, plus 0.25 s of release: 83 frames.
    assert "tune.mid: 2 notes in 1 window(s); frames per window 0.10+1.40 s: 83 (cap)" in printed
    assert "tune.wav (1.75 s at 32000 Hz, codec tiny-encodec" in printed  # the MIDI's 1.5 s + the release
    audio, sr = soundfile.read(out, dtype="float32")
    peak = synthesize.peak_dbfs(audio)
    codes = np.load(tokens)[0]
    assert sr == 32000 and codes.shape == (83, 4) and (codes >= 0).all()
    assert len(audio) == round(1.75 * sr) and np.abs(audio).max() > 0
    decoded = encoders.Codec("tiny-encodec", batch_size=1).decode(codes[None])[0]
    np.testing.assert_array_equal(audio[: sr // 10], 0)  # before the first onset
    np.testing.assert_allclose(audio[sr // 10 :], decoded[: len(audio) - sr // 10], atol=1e-5)
    assert os.path.getsize(tmp_path / "tune.png") > 1000
    # --peak-ceiling scales a WAV whose peak is above it down to it, and leaves the others as they are.
    argv = argv[: argv.index("--tokens-out")] + ["--overwrite", "--peak-ceiling"]
    assert cli.main(argv + [f"{peak - 6:.3f}"]) == 0
    assert f"scaled by -6.0 dB: its peak was {peak:+.1f} dBFS" in capsys.readouterr().out
    np.testing.assert_allclose(soundfile.read(out, dtype="float32")[0], audio * 10 ** (-6 / 20), rtol=1e-3, atol=1e-6)
    assert peak < -1  # tiny-encodec's level at this seed: a ceiling above it changes nothing
    assert cli.main(argv + ["-1"]) == 0
    assert "scaled" not in capsys.readouterr().out
    assert soundfile.read(out, dtype="float32")[0].tobytes() == audio.tobytes()


def test_write_wav_keeps_peaks_above_full_scale_unless_given_a_ceiling(tmp_path):
    from tokensynth_jax.cli import synthesis

    loud = (3.0 * np.sin(np.linspace(0, 200, 8000))).astype(np.float32)
    assert synthesize.write_wav(str(tmp_path / "a.wav"), loud, 16000) == 0.0
    assert soundfile.read(tmp_path / "a.wav", dtype="float32")[0].tobytes() == loud.tobytes()
    gain = synthesize.write_wav(str(tmp_path / "b.wav"), loud, 16000, peak_ceiling_dbfs=-1.0)
    assert gain == pytest.approx(-1.0 - synthesize.peak_dbfs(loud)) and gain < -10
    assert synthesize.peak_dbfs(soundfile.read(tmp_path / "b.wav", dtype="float32")[0]) == pytest.approx(-1.0, abs=1e-5)
    assert synthesize.peak_dbfs(np.zeros(4)) == -np.inf
    # What `tokensynth synthesize` says of each WAV's level.
    assert "peaks at +9.5 dBFS" in synthesis._level_report(9.54, 0.0) and "--peak-ceiling -1" in synthesis._level_report(9.54, 0.0)
    assert synthesis._level_report(-3.0, 0.0) == ""
    assert synthesis._level_report(9.54, -10.54) == "; scaled by -10.5 dB: its peak was +9.5 dBFS"


def test_cli_renders_long_midi_window_by_window_and_many_files_in_one_run(tiny_ckpt, wavs, tmp_path, capsys):
    long = tmp_path / "long.mid"  # notes in windows 0 and 2, none in window 1 (5-10 s)
    write_midi(long, [(0, False, [(0.1, 0.9, 60, 100), (2.0, 3.0, 64, 90), (11.0, 12.2, 72, 100)])])
    short = tmp_path / "short.mid"
    write_midi(short, [(0, False, [(0.2, 0.6, 67, 100)])])
    out = tmp_path / "wavs"
    argv = ["synthesize", "--checkpoint", tiny_ckpt, "--midi", str(long), str(short), "--timbre-audio", wavs["mono"],
            "--text", "a bright marimba", "--mix", "0.7", "--clap", "tiny-clap", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    # The silence from 3 to 11 s is skipped: a window ends at the last note-off before it.
    assert ("long.mid: 3 notes in 2 window(s); frames per window 0.10+2.90 s: 158 (cap), 11.00+1.20 s: 73 (cap)"
            in printed)
    assert "short.mid: 1 notes in 1 window(s); frames per window 0.20+0.40 s: 33 (cap)" in printed
    long_audio, sr = soundfile.read(out / "long.wav", dtype="float32")
    short_audio, _ = soundfile.read(out / "short.wav", dtype="float32")
    assert sr == 32000 and len(short_audio) == round(0.85 * sr)  # each file as long as its MIDI + 0.25 s
    assert len(long_audio) == round(12.45 * sr)
    first_end = sr // 10 + 158 * HOP  # the first window's audio, from 0.1 s
    assert np.abs(long_audio[:first_end]).max() > 0 and np.abs(long_audio[11 * sr :]).max() > 0
    np.testing.assert_array_equal(long_audio[first_end : 11 * sr], 0)  # the skipped silence


@pytest.mark.parametrize("extra, message", [
    (["--timbre-audio", "WAV:silent"], "silent.wav: the audio is silent"),
    (["--timbre-audio", "WAV:text"], "text.wav: not an audio file"),
    (["--text", ""], "non-empty"),
    (["--text", "a cello", "--timbre-audio", "WAV:mono"], "need --mix A"),
    (["--text", "a cello", "--mix", "0.5"], "give both"),
    (["--timbre-audio", "WAV:mono", "--text", "a cello", "--mix", "2"], r"\[0, 1\]"),
    (["--timbre-audio", "WAV:mono", "--codec", "tiny-dac"], "--codec asks for 'tiny-dac'"),
    (["--timbre-audio", "WAV:mono", "--peak-ceiling", "3"], "--peak-ceiling.*at most 0"),
    (["--timbre-audio", "WAV:mono", "--clap", "laion/no_such_clap", "--offline"], "not in the Hugging Face cache"),
])
def test_cli_bad_timbre_and_codec_inputs_exit_2_with_one_line(tiny_ckpt, wavs, tmp_path, capsys, extra, message):
    soundfile.write(tmp_path / "silent.wav", np.zeros(SR, np.float32), SR)
    (tmp_path / "text.wav").write_text("hello")
    files = {"WAV:silent": str(tmp_path / "silent.wav"), "WAV:text": str(tmp_path / "text.wav"), "WAV:mono": wavs["mono"]}
    extra = [files.get(a, a) for a in extra]
    if "--clap" not in extra and any(a in extra for a in ("--timbre-audio", "--text")):
        extra += ["--clap", "tiny-clap"]
    midi = tmp_path / "a.mid"
    write_midi(midi, [(0, False, [(0.1, 0.9, 60, 100)])])
    argv = ["synthesize", "--checkpoint", tiny_ckpt, "--midi", str(midi), "--out", str(tmp_path / "o.wav")] + extra
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokensynth synthesize: error:") and len(err.strip().splitlines()) == 1
    assert re.search(message, err)
    assert not os.path.exists(tmp_path / "o.wav")
