"""safetensors + config.json checkpoints: exact round trips through the command line, strict
errors that name the tensor and the file, and docs/checkpoint_format.md's numpy snippet computing
our model's logits in a process without tokensynth_jax."""
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tokensynth_jax import checkpoint
from tokensynth_jax.cli import main as cli
from tokensynth_jax.interop import safetensors_format

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
DOC = os.path.join(ROOT, "docs", "checkpoint_format.md")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny checkpoint with large random weights (every tensor non-trivial, biases included)."""
    root = tmp_path_factory.mktemp("st")
    init, out = str(root / "init"), str(root / "model")
    assert cli.main(["init", "--config", TINY, "--set", "model.max_len=97", init]) == 0
    model, meta = checkpoint.load_model(init)
    rng = np.random.default_rng(3)  # numpy draws: no compile per parameter shape
    params = jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(x.dtype), checkpoint.params_to_numpy(model))
    checkpoint.save_model(out, model.cfg, params, meta["metadata"])
    return out


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("st") / "model-st")
    assert cli.main(["convert", "--to", "safetensors", ckpt, out]) == 0
    return out


def test_ours_to_safetensors_and_back_is_exact(ckpt, exported, tmp_path):
    back = str(tmp_path / "back")
    assert cli.main(["convert", "--from", "safetensors", exported, back]) == 0
    a, b = checkpoint.read_metadata(ckpt), checkpoint.read_metadata(back)
    assert a["model"] == b["model"] and a["metadata"] == b["metadata"]
    pa = checkpoint.params_to_numpy(checkpoint.load_model(ckpt)[0])
    pb = checkpoint.params_to_numpy(checkpoint.load_model(back)[0])
    assert jax.tree.structure(pa) == jax.tree.structure(pb)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_files_hold_documented_names_and_config(ckpt, exported):
    config = json.load(open(os.path.join(exported, "config.json")))
    assert config["format"] == "tokensynth-jax-safetensors" and config["model"]["max_len"] == 97
    assert config["metadata"]["codec"]["name"] == "tiny-encodec"
    tensors = load_file(os.path.join(exported, "model.safetensors"))
    doc = open(DOC).read()
    documented = {re.sub(r"blocks\.\d+\.", "blocks.{i}.", n).rsplit(".", 1)[0] for n in tensors}
    for name in documented:  # every tensor family has a row in the doc's table
        assert f"`{name}" in doc, name
    assert tensors["blocks.1.attn.query.kernel"].shape == (64, 4, 16)  # [D, H, h]
    assert tensors["head.kernel"].shape == (64, 1133 + 4 * 65)  # [D, V]


def test_doc_snippet_computes_our_logits_without_the_package(ckpt, exported, tmp_path):
    snippet = re.search(r"## Loading without this package.*?```python\n(.*?)```", open(DOC).read(), re.S).group(1)
    rows = np.random.default_rng(0).integers(0, 60, size=(11, 5)).astype(np.int32)
    timbre = np.random.default_rng(1).normal(size=512).astype(np.float32)
    np.savez(tmp_path / "in.npz", rows=rows, timbre=timbre)
    os.symlink(exported, tmp_path / "model-st")
    script = snippet + (
        "\nimport sys\nassert 'tokensynth_jax' not in sys.modules and 'jax' not in sys.modules\n"
        "inp = np.load('in.npz')\nnp.save('logits.npy', forward(inp['rows'], inp['timbre']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    model, _ = checkpoint.load_model(ckpt)
    ours = np.asarray(model(rows[None], timbre[None]))[0]
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), ours, rtol=2e-4, atol=2e-4)


def _broken(exported, tmp_path, change):
    """A copy of `exported` whose tensors went through `change(dict)`."""
    out = tmp_path / "broken"
    out.mkdir()
    tensors = load_file(os.path.join(exported, "model.safetensors"))
    change(tensors)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(open(os.path.join(exported, "config.json")).read())
    return str(out)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("blocks.1.mlp.fc2.bias"), "missing tensor blocks.1.mlp.fc2.bias (64,)"),
    (lambda t: t.update({"blocks.2.ln1.scale": np.ones(64, np.float32)}), "unexpected tensor blocks.2.ln1.scale (64,)"),
    (lambda t: t.update({"pos_embed": np.zeros((96, 64), np.float32)}), "shape mismatch pos_embed: (96, 64), expected (97, 64)"),
])
def test_bad_tensors_are_named_with_the_file(exported, tmp_path, capsys, change, message):
    broken = _broken(exported, tmp_path, change)
    assert cli.main(["convert", "--from", "safetensors", broken, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and os.path.join(broken, "model.safetensors") in err
    assert not os.path.exists(tmp_path / "out")


def test_all_problems_are_listed_at_once(exported, tmp_path):
    def change(t):
        t.pop("head.bias")
        t["extra"] = np.zeros(3, np.float32)
    with pytest.raises(safetensors_format.SafetensorsFormatError) as e:
        safetensors_format.load(_broken(exported, tmp_path, change))
    assert "missing tensor head.bias" in str(e.value) and "unexpected tensor extra (3,)" in str(e.value)


def test_unreadable_inputs_are_clear_errors(exported, ckpt, tmp_path, capsys):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "config.json").write_text(open(os.path.join(exported, "config.json")).read())
    (junk / "model.safetensors").write_bytes(b"not a safetensors file")
    assert cli.main(["convert", "--from", "safetensors", str(junk), str(tmp_path / "o")]) == 2
    assert f"{junk / 'model.safetensors'}: not a readable safetensors file" in capsys.readouterr().err
    assert cli.main(["convert", "--from", "safetensors", str(tmp_path), str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert cli.main(["convert", "--to", "safetensors", "--num-heads", "4", ckpt, str(tmp_path / "o")]) == 2
    assert "--num-heads and --attention are for official .pt files" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    (b"[1, 2]", "not a tokensynth-jax safetensors checkpoint (format None"),
    (b"\xff\xfe{}", "not JSON"),
    (b'{"format": "tokensynth-jax-safetensors", "version": "2"}', "format version '2' is not a number"),
    (b'{"format": "tokensynth-jax-safetensors", "version": 99}', "format version 99 is newer than this code"),
])
def test_a_damaged_config_is_one_line_naming_it(exported, tmp_path, capsys, content, message):
    """The same checks as a checkpoint's tokensynth.json and a sweep's plan.json (versioned_json.py)."""
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    (bad / "config.json").write_bytes(content)
    assert cli.main(["convert", "--from", "safetensors", str(bad), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{bad / 'config.json'}: {message}" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "o")


def test_bfloat16_parameters_go_to_safetensors_and_back_exactly(tmp_path):
    """`model.param_dtype=bfloat16` checkpoints convert too (they were refused before safetensors 0.8)."""
    init, st, back = str(tmp_path / "init"), str(tmp_path / "st"), str(tmp_path / "back")
    assert cli.main(["init", "--config", TINY, "--set", "model.param_dtype=bfloat16", init]) == 0
    assert cli.main(["convert", "--to", "safetensors", init, st]) == 0
    assert {str(x.dtype) for x in load_file(os.path.join(st, "model.safetensors")).values()} == {"bfloat16"}
    assert cli.main(["convert", "--from", "safetensors", st, back]) == 0
    pa = checkpoint.params_to_numpy(checkpoint.load_model(init)[0])
    pb = checkpoint.params_to_numpy(checkpoint.load_model(back)[0])
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        assert x.dtype == y.dtype == np.dtype("bfloat16") and x.tobytes() == y.tobytes()
