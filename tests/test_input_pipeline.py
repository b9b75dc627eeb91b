"""grain input pipeline over real ArrayRecord shards: layout, sharding, exact resume, errors."""
import dataclasses
import os

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from tokensynth_jax.config import ModelConfig
from tokensynth_jax.tokens import records, token_layout
from tokensynth_jax.training import input_pipeline as ip

CFG = ModelConfig(num_layers=1, d_model=32, num_heads=2, num_codebooks=3, codebook_size=17, max_len=64)


def _without_targets(batch) -> int:
    """Examples of a batch with no targets: the records the pipeline passed over."""
    return int((~np.asarray(batch["mask"]).any(-1)).sum())


def _write_shards(directory, num_shards=3, per_shard=7, frames=(11, 23), codebook_size=17, codebooks=3):
    rng = np.random.default_rng(0)
    written = {}
    for s in range(num_shards):
        writer = ArrayRecordWriter(os.path.join(directory, f"shard-{s:05d}.array_record"), "group_size:1")
        for i in range(per_shard):
            rec = records.PairRecord(
                f"p{s}-{i}", "train", f"inst{i % 2}", rng.integers(1, 1133, 4 * rng.integers(1, 4)),
                rng.integers(0, codebook_size, (rng.integers(*frames), codebooks)), rng.normal(size=512),
                {}, "clap", {"chain": []}, {"midi": "gen", "start": 0.0}, {"midi": "gen", "start": 5.0},
            )
            writer.write(rec.to_bytes())
            written[rec.pair_id] = rec
        writer.close()
    return written


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("shards"))
    return d, _write_shards(d)


def _find(written, batch, b):
    return next(r for r in written.values() if np.array_equal(r.timbre.astype(np.float16).astype(np.float32), batch["timbre"][b]))


def test_batches_hold_delay_patterned_rows_aligned_with_targets(shards):
    d, written = shards
    batch = next(iter(ip.make_dataset(ip.PipelineConfig((d,), global_batch=4, seq_len=40, seed=1), CFG)))
    assert batch["rows"].shape == (4, 39, 4) and batch["targets"].shape == (4, 40, 4)
    np.testing.assert_array_equal(batch["rows"], batch["targets"][:, :-1])  # teacher forcing
    for b in range(4):
        rec = _find(written, batch, b)
        m = len(rec.midi_tokens)
        np.testing.assert_array_equal(batch["targets"][b, :m, 0], rec.midi_tokens)
        audio = batch["targets"][b, m + 1 : m + 1 + len(rec.codes) + 2, 1:]
        np.testing.assert_array_equal(audio, token_layout.apply_delay(rec.codes))
        n = m + 1 + len(rec.codes) + 2 + 1  # prompt, audio rows, end row
        assert batch["mask"][b].sum() == len(rec.codes) + 2 + 1 and batch["mask"][b, m + 1 : n].all()
        assert not batch["targets"][b, n - 1 :].any()  # end row then padding


def test_every_record_once_per_epoch_and_processes_are_disjoint(shards):
    d, written = shards
    seen = []
    for proc in range(3):
        pc = ip.PipelineConfig((d,), global_batch=3, seq_len=40, seed=5, num_epochs=1)
        for batch in ip.make_dataset(pc, CFG, process_index=proc, process_count=3):
            seen += [_find(written, batch, b).pair_id for b in range(len(batch["timbre"]))]
    assert len(seen) == len(set(seen)) == len(written)


def test_restored_iterator_replays_the_same_batches(shards):
    d, _ = shards
    pc = ip.PipelineConfig((d,), global_batch=4, seq_len=40, seed=9)
    it = iter(ip.make_dataset(pc, CFG))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]  # crosses the epoch boundary (21 records)
    again = iter(ip.make_dataset(pc, CFG))
    again.set_state(state)
    for want in expected:
        got = next(again)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_seed_changes_the_order(shards):
    d, _ = shards
    first = lambda seed: next(iter(ip.make_dataset(ip.PipelineConfig((d,), 4, 40, seed=seed), CFG)))["timbre"]
    assert not np.array_equal(first(1), first(2))
    np.testing.assert_array_equal(first(1), first(1))


def test_errors_name_the_problem(tmp_path, shards):
    with pytest.raises(ip.DataError, match="no ArrayRecord shards"):
        ip.expand_paths([str(tmp_path / "missing-*.array_record")])
    d, _ = shards
    wide = CFG.replace(num_codebooks=2)
    with pytest.raises(ip.DataError, match="do not fit a model of 2 codebooks"):
        next(iter(ip.make_dataset(ip.PipelineConfig((d,), 2, 40), wide)))
    with pytest.raises(ip.DataError, match="exceed seq_len"):
        next(iter(ip.make_dataset(ip.PipelineConfig((d,), 2, 20), CFG)))
    with pytest.raises(ip.DataError, match="exceeds the model"):
        ip.make_dataset(ip.PipelineConfig((d,), 2, 65), CFG)


def test_a_bad_record_mid_data_becomes_an_example_with_no_targets_and_is_counted(tmp_path, caplog):
    rng = np.random.default_rng(3)
    good = [records.PairRecord(f"g{i}", "train", "inst", rng.integers(1, 1133, 4), rng.integers(0, 17, (12, 3)),
                               rng.normal(size=512), {}, "clap", {"chain": []}, {"midi": "gen", "start": 0.0},
                               {"midi": "gen", "start": 5.0}) for i in range(4)]
    too_long = dataclasses.replace(good[0], pair_id="long", codes=rng.integers(0, 17, (50, 3)))  # 58 positions
    path = str(tmp_path / "shard.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for data in (good[0].to_bytes(), good[1].to_bytes(), b"not a record", too_long.to_bytes(), good[2].to_bytes(),
                 good[3].to_bytes()):
        writer.write(data)
    writer.close()
    pc = ip.PipelineConfig((path,), global_batch=3, seq_len=40, shuffle=False, num_epochs=1)
    with caplog.at_level("WARNING", logger="tokensynth.data"):
        batches = list(ip.make_dataset(pc, CFG))
    assert [_without_targets(b) for b in batches] == [1, 1]
    assert [not b["mask"][i].any() for b in batches for i in range(3)] == [False, False, True, True, False, False]
    empty = batches[0]["targets"][2], batches[0]["rows"][2], batches[0]["timbre"][2]
    assert not any(x.any() for x in empty)
    expected = ip.build_example(records.decode(good[2].to_bytes()), CFG, 40)
    for key, value in expected.items():  # the good ones around them are what they always were
        np.testing.assert_array_equal(batches[1][key][1], value)
    # grain parses batches on prefetch threads, so the two warnings may come in either order
    skipped = sorted(r.getMessage() for r in caplog.records if "skipped a record" in r.getMessage())
    assert len(skipped) == 2 and "not a msgpack record" in skipped[0] and "record long: 58 positions" in skipped[1]


def test_a_record_whose_chunk_fails_its_hash_becomes_an_example_with_no_targets(tmp_path, caplog):
    rng = np.random.default_rng(4)
    good = [records.PairRecord(f"g{i}", "train", "inst", rng.integers(1, 1133, 4), rng.integers(0, 17, (12, 3)),
                               rng.normal(size=512), {}, "clap", {"chain": []}, {"midi": "gen", "start": 0.0},
                               {"midi": "gen", "start": 5.0}) for i in range(6)]
    path = str(tmp_path / "shard.array_record")
    writer = ArrayRecordWriter(path, "group_size:1,uncompressed")  # a chunk a record; its bytes as written
    for rec in good:
        writer.write(rec.to_bytes())
    writer.close()
    with open(path, "r+b") as f:  # one flipped byte inside record 3 (a bad disk): riegeli's chunk hash fails
        data = f.read()
        at = data.index(good[3].to_bytes()) + 100
        f.seek(at)
        f.write(bytes([data[at] ^ 0x01]))
    pc = ip.PipelineConfig((path,), global_batch=3, seq_len=40, shuffle=False, num_epochs=1)
    with caplog.at_level("WARNING", logger="tokensynth.data"):
        batches = list(ip.make_dataset(pc, CFG))
    assert [not b["mask"][i].any() for b in batches for i in range(3)] == [False, False, False, True, False, False]
    for n, rec in enumerate(good):  # the records around it are what they always were
        if n != 3:
            expected = ip.build_example(records.decode(rec.to_bytes()), CFG, 40)
            for key, value in expected.items():
                np.testing.assert_array_equal(batches[n // 3][key][n % 3], value)
    skipped = [r.getMessage() for r in caplog.records if "skipped a record" in r.getMessage()]
    assert len(skipped) == 1 and "record 3 of 6 cannot be read (Corrupted Riegeli" in skipped[0], skipped


def test_a_shard_that_cannot_be_opened_is_named_as_such_not_as_damaged(shards, monkeypatch):
    """array_record's reader says "not ok" for a file it may not read, as for a damaged one."""
    import builtins

    d, _ = shards
    path = ip.expand_paths([d])[0]
    real_open = builtins.open

    def refusing(file, *args, **kwargs):
        if file == path:
            raise PermissionError(13, "Permission denied", file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing)
    with pytest.raises(ip.DataError, match=r"shard-00000.array_record: cannot read the shard \(Permission denied\)"):
        ip.verify_shards([path])
