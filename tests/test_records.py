"""The shared pair-record schema: exact round trip, deterministic bytes, clear errors."""
import msgpack
import numpy as np
import pytest

from tokensynth_jax.tokens import records, token_layout


def _record(**changes):
    rng = np.random.default_rng(1)
    fields = dict(
        pair_id="p-7", split="valid", instrument_id="sf2:TimGM6mb:000-040",
        midi_tokens=rng.integers(1, 1133, 44), codes=rng.integers(0, 2048, (251, 4)),
        timbre=rng.normal(size=512), codec={"name": "facebook/encodec_32khz", "sample_rate": 32000},
        clap_model="laion/larger_clap_music", augmentation={"chain": [{"name": "Chorus", "rate_hz": 1.5}]},
        target_source={"midi": "a.mid", "start": 5.0, "track": 1}, reference_source={"midi": "b.mid", "start": 0.0},
    )
    fields.update(changes)
    return records.PairRecord(**fields)


def test_round_trip_keeps_values_and_narrow_dtypes():
    rec = _record()
    back = records.decode(rec.to_bytes())
    np.testing.assert_array_equal(back.codes, rec.codes)
    np.testing.assert_array_equal(back.midi_tokens, rec.midi_tokens)
    assert back.codes.dtype == np.int16 and back.timbre.dtype == np.float16
    np.testing.assert_allclose(back.timbre, rec.timbre, rtol=1e-3, atol=1e-3)
    assert back.augmentation == rec.augmentation and back.target_source == rec.target_source


def test_bytes_are_deterministic_whatever_the_dict_order():
    a = _record(codec={"name": "x", "sample_rate": 1}).to_bytes()
    b = _record(codec={"sample_rate": 1, "name": "x"}).to_bytes()
    assert a == b
    assert records.decode(a).to_bytes() == a


def test_size_is_about_the_design_budget():
    # 5 s of DAC codes (431 x 9 int16) + CLAP (512 fp16) + 30 notes: ~10 KB per pair.
    rec = _record(codes=np.zeros((431, 9), np.int64), midi_tokens=np.zeros(120, np.int64))
    assert 8_000 < len(rec.to_bytes()) < 12_000


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\xc1garbage", "not a msgpack record"),
        (msgpack.packb({"schema": "other"}), "not a tokensynth-pair record"),
        (msgpack.packb({"schema": records.SCHEMA_NAME, "version": 99}), "version 99"),
        (msgpack.packb({"schema": records.SCHEMA_NAME, "version": records.SCHEMA_VERSION, "pair_id": "q"}), "misses fields"),
    ],
)
def test_bad_records_raise_clear_errors(payload, message):
    with pytest.raises(records.RecordError, match=message):
        records.decode(payload)


def test_malformed_arrays_are_rejected_on_encode():
    with pytest.raises(records.RecordError, match="frames, codebooks"):
        _record(codes=np.zeros(5)).to_bytes()


def test_version_1_records_still_load_and_read_as_unpadded():
    """Version 2 added codec["padding"]; records written before it never padded."""
    payload = msgpack.unpackb(_record().to_bytes(), raw=False)
    assert payload["version"] == records.SCHEMA_VERSION == 2
    payload["version"] = 1
    old = records.decode(msgpack.packb(payload, use_bin_type=True))
    assert old.codec == {"name": "facebook/encodec_32khz", "sample_rate": 32000, "padding": records.PADDING_NONE}
    padded = _record(codec={"name": "descript/dac_44khz", "padding": records.PADDING_WHOLE_HOP})
    assert records.decode(padded.to_bytes()).codec["padding"] == "whole-hop"


@pytest.mark.parametrize("tokens, frames, codebooks", [(44, 251, 4), (0, 1, 9), (3, 431, 9)])
def test_positions_are_the_training_rows_an_example_takes(tokens, frames, codebooks):
    rng = np.random.default_rng(tokens)
    rec = _record(midi_tokens=rng.integers(1, 1133, tokens), codes=rng.integers(0, 64, (frames, codebooks)))
    rows, _ = token_layout.training_rows(rec.midi_tokens, rec.codes)
    assert records.decode(rec.to_bytes()).positions() == rows.shape[0] == tokens + frames + codebooks + 1
