"""A real prep job with the tiny DAC: its records have descript's frame count and say how they were
padded, and `tokensynth prep verify` finds a flipped byte, a missing shard and a stray one."""
import os
import shutil

import numpy as np
import pytest

from tokensynth_jax.audio import encoders
from tokensynth_jax.cli import main as cli
from tokensynth_jax.interop import dac_convert
from tokensynth_jax.tokens import records
from tokensynth_prep import instruments, pairs, pipeline, sink
from tokensynth_prep.config import PrepConfig

SR = 44100


@pytest.fixture(scope="module")
def dac_output(tmp_path_factory):
    """(config, manifest) of a 4-pair job: procedural MIDI x 2 presets, tiny DAC and CLAP."""
    cfg = PrepConfig(output_dir=str(tmp_path_factory.mktemp("prep") / "out"), num_segments=4, procedural_candidates=8,
                     max_notes=24, programs=(0, 40), valid_fraction=0.0, test_fraction=0.0, table_pitches=(36, 96, 6),
                     table_velocities=(50, 110), pairs_per_instrument=2, records_per_shard=3, chunk_size=4,
                     codec="tiny-dac", clap="tiny-clap", encode_batch_size=2)
    return cfg, pipeline.run(cfg).manifest


def _records(out):
    return [records.decode(b) for s in sink.read_manifest(out)["shards"] for b in sink.read_shard(os.path.join(out, s["shard"]))]


def test_dac_records_have_descripts_frame_count_and_say_their_padding(dac_output):
    cfg, manifest = dac_output
    assert manifest["codec"]["padding"] == records.PADDING_WHOLE_HOP and manifest["total_records"] == 4
    recs = _records(cfg.output_dir)
    assert len(recs) == 4
    for r in recs:
        assert r.codes.shape == (dac_convert.num_frames(5 * SR), 3) == (431, 3)  # not 220500 // 512 = 430
        assert r.codec["padding"] == records.PADDING_WHOLE_HOP
    # The stored codes are dac_convert.encode's (descript's preprocess + encode) of the rendered target.
    model = encoders.Codec(cfg.codec, batch_size=1).model
    spec = next(s for s in instruments.list_instruments(cfg) if s.instrument_id == recs[0].instrument_id)
    table = instruments.build_note_table(spec, SR, cfg)
    target = pairs.rerender(recs[0], cfg, "target", table)
    assert target.shape == (5 * SR,)
    np.testing.assert_array_equal(dac_convert.encode(model, target[None])[0].T, recs[0].codes)


def test_prep_verify_finds_a_flipped_byte_a_missing_and_a_stray_shard(dac_output, tmp_path, capsys):
    cfg, manifest = dac_output
    out = str(tmp_path / "copy")
    shutil.copytree(cfg.output_dir, out)
    assert cli.main(["prep", "verify", out]) == 0
    assert capsys.readouterr().out.strip() == f"{out}: 2 shards, 4 records read: ok"
    first, second = (s["shard"] for s in manifest["shards"])
    with open(os.path.join(out, first), "r+b") as f:  # one byte inside a record: the file still opens
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0x01]))
    with open(os.path.join(out, second), "r+b") as f:  # one byte inside the records' chunk: it opens, reading fails
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0x01]))
    assert cli.main(["prep", "verify", out]) == 2
    err = capsys.readouterr().err.splitlines()
    assert f"tokensynth prep verify: {out}/{first}: sha256 differs from the manifest's (its bytes have changed)" in err
    assert any(line.startswith(f"tokensynth prep verify: {out}/{second}: damaged ArrayRecord data (Corrupted Riegeli")
               for line in err), err
    shutil.move(os.path.join(out, second), os.path.join(out, "train", "stray.array_record"))
    assert cli.main(["prep", "verify", out]) == 2
    err = capsys.readouterr().err
    assert f"{out}/{second}: missing" in err and f"{out}/train/stray.array_record: a shard the manifest does not list" in err
    assert cli.main(["prep", "verify", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"tokensynth prep verify: error: {tmp_path}: no manifest.json (not a finished prep output)"
