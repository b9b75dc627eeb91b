"""The paper's metrics on cases with known answers, and `tokensynth eval` end to end.

Audio is real: a piano phrase rendered by FluidSynth from the General MIDI SoundFont that ships in
pretty_midi, transcribed back by basic-pitch's shipped ONNX model; CLAP is the tiny random preset.
"""
import io
import json
import os

import numpy as np
import pretty_midi
import pytest
import soundfile
from conftest import read_tensorboard, write_midi

from tokensynth_jax.cli import main as cli
from tokensynth_jax.evaluation import evaluate, metrics
from tokensynth_jax.evaluation.evaluate import EvalItem
from tokensynth_jax.evaluation.metrics import MetricError

SR = 22050
# A monophonic phrase: 9 notes, 0.4 s apart, 0.35 s long (onset, offset, pitch, velocity).
PHRASE = [(0.2 + 0.4 * i, 0.55 + 0.4 * i, p, 100) for i, p in enumerate([60, 62, 64, 65, 67, 69, 71, 72, 67])]


def render(notes, program=0, sr=SR):
    """FluidSynth rendering of `notes` with a General MIDI program (pretty_midi's TimGM6mb.sf2)."""
    pm = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(program=program)
    inst.notes = [pretty_midi.Note(velocity=v, pitch=p, start=s, end=e) for s, e, p, v in notes]
    pm.instruments.append(inst)
    return (0.5 * pm.fluidsynth(fs=sr)).astype(np.float32)


@pytest.fixture(scope="module")
def piano():
    return render(PHRASE)


@pytest.fixture(scope="module")
def clap():
    return evaluate.load_clap("tiny-clap")


def notes_array(notes, shift=0.0):
    return np.array([(s + shift, e + shift, p) for s, e, p, _ in notes], np.float64)


def test_mss_is_zero_for_identical_audio_and_grows_with_noise(piano):
    assert metrics.multiscale_spectral_loss(piano, piano.copy()) == 0.0
    noise = np.random.default_rng(0).normal(size=piano.size).astype(np.float32)
    losses = [metrics.multiscale_spectral_loss(piano + level * noise, piano) for level in (1e-3, 1e-2, 1e-1)]
    assert 0 < losses[0] < losses[1] < losses[2], losses
    # Documented length handling: the shorter clip is zero-padded, so a truncated clip costs loss.
    half = piano[: piano.size // 2]
    padded = np.pad(half, (0, piano.size - half.size))
    assert metrics.multiscale_spectral_loss(half, piano) == metrics.multiscale_spectral_loss(padded, piano) > 1.0


def test_note_f1_matches_onsets_within_tolerance_and_pitch():
    ref = np.array([(0.0, 0.5, 60), (1.0, 1.5, 62), (2.0, 2.5, 64), (3.0, 3.5, 65)], np.float64)
    est = np.array([(0.04, 0.3, 60),  # 40 ms late: a match
                    (1.06, 1.5, 62),  # 60 ms late: not a match
                    (2.0, 2.5, 63),  # wrong pitch
                    (3.0, 3.1, 65)], np.float64)  # offset ignored: a match
    assert metrics.note_f1(ref, est) == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert metrics.note_f1(ref, est, onset_tolerance=0.1)["f1"] == 0.75
    assert metrics.note_f1(ref, np.zeros((0, 3))) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    with pytest.raises(MetricError, match="reference notes"):
        metrics.note_f1(np.zeros((0, 3)), est)


def test_rendered_phrase_transcribes_back_and_shifted_notes_do_not(piano):
    est = metrics.transcribe(piano, SR)
    assert metrics.note_f1(notes_array(PHRASE), est)["f1"] > 0.8
    assert metrics.note_f1(notes_array(PHRASE, shift=0.25), est)["f1"] < 0.2
    # A clip at another rate is resampled to basic-pitch's 22.05 kHz first: same notes heard.
    est_44k = metrics.transcribe(render(PHRASE, sr=44100), 44100)
    assert metrics.note_f1(notes_array(PHRASE), est_44k)["f1"] > 0.8
    assert len(metrics.transcribe(np.zeros(SR * 2, np.float32), SR)) == 0  # silence: no notes, F1 0


def test_clap_score_is_one_for_identical_audio(piano, clap, tmp_path):
    midi = str(tmp_path / "phrase.mid")
    write_midi(midi, [(0, False, PHRASE)])
    same = evaluate.evaluate_item(EvalItem("a", "cloning", (piano, SR), midi, target=(piano, SR),
                                           reference=(piano.copy(), SR)), clap=clap)
    assert same["mss"] == 0.0
    assert same["clap_score"] == same["clap_audio"] == pytest.approx(1.0, abs=1e-6)
    assert same["f1"] > 0.8 and same["notes_midi"] == len(PHRASE)
    organ = render(PHRASE, program=19)
    other = evaluate.evaluate_item(EvalItem("b", "text", (organ, SR), midi, reference=(piano, SR),
                                            text="a church organ"), clap=clap)
    assert other["mss"] is None  # no target given
    assert other["clap_score"] == other["clap_text"] and -1.0 <= other["clap_text"] <= 1.0
    assert other["clap_audio"] < 1.0 - 1e-6  # another instrument is not the reference


def test_a_silent_generation_is_scored_low_not_rejected(piano, clap):
    silent = np.zeros_like(piano)
    result = evaluate.evaluate_item(EvalItem("quiet", "cloning", (silent, SR), notes_array(PHRASE),
                                             target=(piano, SR), reference=(piano, SR)), clap=clap)
    assert result["f1"] == 0.0 and result["notes_transcribed"] == 0
    assert result["mss"] > metrics.multiscale_spectral_loss(piano + 1e-3, piano)
    assert -1.0 <= result["clap_score"] < 1.0 - 1e-6
    # A silent *reference* is an input error (timbre.py's check), named with the item.
    with pytest.raises(MetricError, match="item 'quiet': .*silent"):
        evaluate.evaluate_item(EvalItem("quiet", "cloning", (piano, SR), notes_array(PHRASE),
                                        reference=(silent, SR)), clap=clap)


def test_bad_inputs_give_clear_errors(tmp_path, piano):
    with pytest.raises(MetricError, match="none.wav: no such audio file"):
        metrics.load_audio(str(tmp_path / "none.wav"))
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not audio")
    with pytest.raises(MetricError, match="notes.wav: not an audio file"):
        metrics.load_audio(str(not_audio))
    with pytest.raises(MetricError, match="notes.wav: not a MIDI file"):
        metrics.midi_notes(str(not_audio))
    drums = str(tmp_path / "drums.mid")
    write_midi(drums, [(0, True, [(0.0, 0.1, 36, 100)])])
    with pytest.raises(MetricError, match="drums.mid: no melodic notes"):
        metrics.midi_notes(drums)
    with pytest.raises(MetricError, match="NaN or Inf"):
        metrics.multiscale_spectral_loss(np.full(100, np.nan), np.zeros(100))
    with pytest.raises(MetricError, match=r"mono samples \[N\]"):
        metrics.transcribe(np.zeros((2, 100)), SR)
    with pytest.raises(MetricError, match="zero"):
        metrics.cosine(np.zeros(4), np.ones(4))
    # Stereo is averaged to mono (documented), not rejected.
    stereo = tmp_path / "stereo.wav"
    soundfile.write(stereo, np.stack([piano, 0.5 * piano], axis=1), SR)
    mono, sr = metrics.load_audio(str(stereo))
    assert sr == SR and mono.shape == piano.shape and np.allclose(mono, 0.75 * piano, atol=1e-4)
    with pytest.raises(MetricError, match="needs the reference audio"):
        EvalItem("x", "cloning", (piano, SR), notes_array(PHRASE)).check()
    with pytest.raises(MetricError, match="non-empty 'text'"):
        EvalItem("x", "text", (piano, SR), notes_array(PHRASE), text="  ").check()
    with pytest.raises(MetricError, match="task 'cloner'"):
        EvalItem("x", "cloner", (piano, SR), notes_array(PHRASE)).check()


def test_eval_cli_writes_json_and_markdown(tmp_path, piano, capsys):
    write_midi(tmp_path / "midi" / "phrase.mid", [(0, False, PHRASE)])
    os.makedirs(tmp_path / "wav")
    soundfile.write(tmp_path / "wav" / "piano.wav", piano, SR)
    soundfile.write(tmp_path / "wav" / "organ.wav", render(PHRASE, program=19), SR)
    lines = [
        {"id": "clone", "task": "cloning", "generated": "wav/piano.wav", "midi": "midi/phrase.mid",
         "target": "wav/piano.wav", "reference": "wav/piano.wav", "instrument": "piano"},
        {"id": "text", "task": "text", "generated": "wav/organ.wav", "midi": "midi/phrase.mid", "text": "an organ",
         "instrument": "organ"},
    ]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "report"
    assert cli.main(["eval", str(tmp_path), "--clap", "tiny-clap", "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert [(r["task"], r["model"], r["n"]) for r in report["rows"]] == [("cloning", "tokensynth", 1),
                                                                       ("text", "tokensynth", 1)]
    clone, text = report["rows"]
    assert clone["mss"] == 0.0 and clone["clap_score"] == pytest.approx(1.0, abs=1e-6) and clone["f1"] > 0.8
    assert text["mss"] is None and text["n_mss"] == 0 and text["instruments"] == ["organ"]
    assert report["settings"]["mss_fft_sizes"] == [2048, 1024, 512, 256, 128, 64]
    table = (out / "eval.md").read_text().splitlines()
    assert table[0] == "| Task | Model | MSS ↓ | CLAP score ↑ | F1 ↑ | Items |"
    assert table[2].startswith("| Instrument cloning | tokensynth | 0.000 | 1.000 |")
    assert table[3].startswith("| Text-to-instrument | tokensynth | – |")
    assert "wrote" in capsys.readouterr().out
    # The clips, as audio and spectrogram images, and the table's numbers, in TensorBoard.
    events = read_tensorboard(out / "tensorboard")
    clips = ["eval/cloning/clone/generated", "eval/cloning/clone/target", "eval/cloning/clone/reference",
             "eval/text/text/generated"]
    assert sorted(events.Tags()["audio"]) == sorted(f"{c}/audio" for c in clips)
    assert sorted(events.Tags()["images"]) == sorted(f"{c}/spectrogram" for c in clips)
    organ = events.Audio("eval/text/text/generated/audio")[0]
    assert (organ.sample_rate, organ.length_frames, organ.content_type) == (SR, len(render(PHRASE, 19)), "audio/wav")
    heard, rate = soundfile.read(io.BytesIO(organ.encoded_audio_string), dtype="float32")
    np.testing.assert_allclose(heard, render(PHRASE, 19), atol=1e-4)  # 16-bit WAV of the clip
    image = events.Images("eval/cloning/clone/generated/spectrogram")[0]
    assert image.height == 256 and image.width > 100
    assert events.Scalars("eval/cloning/tokensynth/f1")[0].value == pytest.approx(clone["f1"])
    assert "eval/text/tokensynth/mss" not in events.Tags()["scalars"]  # no target, no MSS

    (tmp_path / "bad.jsonl").write_text(json.dumps({**lines[0], "colour": "red"}) + "\n")
    assert cli.main(["eval", str(tmp_path / "bad.jsonl"), "--clap", "none"]) == 2
    assert "unknown fields ['colour']" in capsys.readouterr().err
    missing = {**lines[0], "generated": "wav/none.wav"}
    (tmp_path / "missing.jsonl").write_text(json.dumps(missing) + "\n")
    assert cli.main(["eval", str(tmp_path / "missing.jsonl"), "--clap", "none"]) == 2
    assert "none.wav: no such file" in capsys.readouterr().err


def test_eval_scores_the_good_items_and_lists_the_ones_it_cannot(tmp_path, piano, capsys):
    """A batch keeps its good work: an unreadable clip, a drum-only MIDI and a NaN clip are each
    counted, named in eval.json and eval.md, and left out of the means; only when no item can be
    scored is it an error (exit 2, nothing written)."""
    write_midi(tmp_path / "phrase.mid", [(0, False, PHRASE)])
    write_midi(tmp_path / "drums.mid", [(0, True, [(0.0, 0.1, 36, 100)])])
    soundfile.write(tmp_path / "piano.wav", piano, SR)
    soundfile.write(tmp_path / "nan.wav", np.full(SR, np.nan, np.float32), SR, subtype="FLOAT")
    soundfile.write(tmp_path / "blip.wav", np.zeros(1, np.float32), SR)  # one sample: nothing to hear, F1 0
    (tmp_path / "garbage.wav").write_bytes(b"RIFF not really")
    item = {"task": "text", "midi": "phrase.mid", "text": "a piano"}
    lines = [{"id": "good", "generated": "piano.wav", **item}, {"id": "unreadable", "generated": "garbage.wav", **item},
             {"id": "drums", "generated": "piano.wav", **item, "midi": "drums.mid"},
             {"id": "nan", "generated": "nan.wav", **item}, {"id": "blip", "generated": "blip.wav", **item}]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "report"
    assert cli.main(["eval", str(tmp_path), "--clap", "none", "--out", str(out)]) == 0
    assert "3 of 5 items could not be scored" in capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    assert [r["id"] for r in report["items"]] == ["good", "blip"]
    assert report["items"][1]["f1"] == 0.0 and report["items"][1]["notes_transcribed"] == 0
    assert report["rows"][0]["n"] == 2 and report["rows"][0]["f1"] == pytest.approx(report["items"][0]["f1"] / 2)
    failed = {x["id"]: x["error"] for x in report["failed"]}
    assert sorted(failed) == ["drums", "nan", "unreadable"]
    assert "garbage.wav" in failed["unreadable"] and "drums.mid" in failed["drums"] and "nan.wav" in failed["nan"]
    assert "- drums: " in (out / "eval.md").read_text()

    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[1:3]))
    assert cli.main(["eval", str(tmp_path / "bad.jsonl"), "--clap", "none", "--out", str(tmp_path / "none")]) == 2
    assert "none of its 2 items could be scored" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_an_unreadable_reference_the_scores_do_not_read_is_left_out_of_tensorboard_only(tmp_path, piano, capsys):
    """Without CLAP a cloning item's reference is read for TensorBoard alone: a NaN one crashed the
    command there, after the report was written; now the item is scored and that clip left out."""
    write_midi(tmp_path / "phrase.mid", [(0, False, PHRASE)])
    soundfile.write(tmp_path / "piano.wav", piano, SR)
    soundfile.write(tmp_path / "nan.wav", np.full(SR, np.nan, np.float32), SR, subtype="FLOAT")
    line = {"id": "nanref", "task": "cloning", "generated": "piano.wav", "midi": "phrase.mid", "reference": "nan.wav"}
    (tmp_path / "items.jsonl").write_text(json.dumps(line) + "\n")
    assert cli.main(["eval", str(tmp_path), "--clap", "none", "--out", str(tmp_path / "r")]) == 0
    assert [r["id"] for r in json.loads((tmp_path / "r" / "eval.json").read_text())["items"]] == ["nanref"]
    err = capsys.readouterr().err
    assert "not in TensorBoard: item 'nanref' reference" in err and "NaN or Inf" in err and "Traceback" not in err
    tags = read_tensorboard(str(tmp_path / "r" / "tensorboard")).Tags()["audio"]
    assert "eval/cloning/nanref/generated/audio" in tags and not any("reference" in t for t in tags)


@pytest.mark.parametrize("content,message", [
    (b"\xff\xfe{}\n", "not UTF-8 text"),
    (b'{"id": 3, "task": "text", "generated": "a.wav", "midi": "a.mid", "text": "x"}\n', ":1: id: must be a string"),
    (b'{"id": "a", "task": "text", "generated": ["a.wav"], "midi": "a.mid", "text": 5}\n',
     ":1: generated, text: must be a string"),
    (b'{"id": "a", "task": "text", "generated": "a.wav", "midi": "a.mid", "text": "x"}\n' * 2, "'a' is listed twice"),
])
def test_a_malformed_manifest_is_one_line(tmp_path, capsys, content, message):
    (tmp_path / "items.jsonl").write_bytes(content)
    assert cli.main(["eval", str(tmp_path / "items.jsonl"), "--clap", "none"]) == 2
    err = capsys.readouterr().err
    assert message in err and "items.jsonl" in err and len(err.strip().splitlines()) == 1


def test_transcribing_leaves_no_onnxruntime_telemetry_behind(tmp_path):
    import subprocess
    import sys

    # onnxruntime's telemetry, on at import unless ORT_DISABLE_TELEMETRY is set, writes a device id
    # and an event queue into the user's cache folder and a session file into the temporary one.
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    dirs = {name: tmp_path / name for name in ("XDG_CACHE_HOME", "TMPDIR", "HOME")}
    for path in dirs.values():
        path.mkdir()
    code = ("import numpy as np; from tokensynth_jax.evaluation import metrics; "
            "print(len(metrics.transcribe(0.3 * np.sin(np.arange(22050) * 0.1255).astype(np.float32), 22050)))")
    run = subprocess.run([sys.executable, "-c", code], env={**env, **{k: str(v) for k, v in dirs.items()}},
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0 and int(run.stdout.split()[-1]) >= 1, run.stderr[-2000:]  # it heard the tone
    assert not [str(p) for d in dirs.values() for p in d.rglob("*")]
