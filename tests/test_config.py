"""Config files: packaged names resolve from any directory, and every ModelConfig field is settable."""
import dataclasses
import os

import pytest

from tokensynth_jax.config import ConfigError, ModelConfig, load_config_file

PACKAGED = ("reference", "encodec", "tiny")


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_configs_resolve_by_name_and_by_repo_path_from_any_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    by_name = load_config_file(name).to_dict()
    assert load_config_file(f"configs/{name}.py").to_dict() == by_name
    assert load_config_file(f"{name}.py").to_dict() == by_name
    assert load_config_file("family:depth=3,base=tiny").model.d_model == 192


def test_a_users_own_file_wins_and_can_derive_from_the_packaged_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("configs")
    with open("configs/tiny.py", "w") as f:  # the user's own file of the same name is theirs
        f.write("from tokensynth_jax.configs import tiny\n\n"
                "def get_config(arg=None):\n    c = tiny.get_config(arg)\n    c.model.num_layers = 5\n    return c\n")
    assert load_config_file("configs/tiny.py").model.num_layers == 5
    assert load_config_file("tiny").model.num_layers == 2  # a bare name is the packaged config


def test_every_model_config_field_can_be_set_from_the_command_line():
    defaults = ModelConfig()
    changed = {"num_layers": "3", "d_model": "96", "num_heads": "2", "mlp_ratio": "2", "num_codebooks": "5",
               "codebook_size": "33", "midi_vocab_size": "1133", "max_len": "77", "timbre_dim": "16",
               "timbre_hidden": "24", "dropout": "0.25", "conditioning": "unconditional", "null_timbre": "True",
               "attention": "tokensynth-0.0.4", "layer_norm_eps": "1e-6", "dtype": "bfloat16",
               "param_dtype": "bfloat16"}
    for field in dataclasses.fields(ModelConfig):
        value = changed.get(field.name)
        if value is None:  # a field added later: set it to its own default, as a string from the command line
            current = getattr(defaults, field.name)
            value = str(current) if not isinstance(current, (tuple, list)) else ",".join(map(str, current))
        config = load_config_file("tiny", {f"model.{field.name}": value})
        cfg = ModelConfig.from_dict(config.model.to_dict())
        assert str(getattr(cfg, field.name)) == str(type(getattr(defaults, field.name))(
            eval(value) if isinstance(getattr(defaults, field.name), (bool, int, float)) else value)), field.name
    assert set(load_config_file("reference").model.to_dict()) == {f.name for f in dataclasses.fields(ModelConfig)}


@pytest.mark.parametrize("value, expected", [("true", True), ("True", True), ("1", True), ("yes", True),
                                             ("false", False), ("FALSE", False), ("0", False), ("no", False)])
def test_bool_fields_take_what_absl_bool_flags_take(value, expected):
    assert load_config_file("tiny", {"model.null_timbre": value}).model.null_timbre is expected
    assert load_config_file("tiny", {"data.verify_sha256": value}).data.verify_sha256 is expected


@pytest.mark.parametrize("spec, overrides, message", [
    ("nonexistent.py", {}, "nonexistent.py: no such config file"),
    ("tiny", {"model.no_such_field": "1"}, "--config.model.no_such_field: no config field"),
    ("tiny", {"nothing.here": "1"}, "--config.nothing.here: no config field"),
    ("tiny", {"train.steps": "abc"}, "--config.train.steps=abc: not a value of type int"),
    ("tiny", {"model.null_timbre": "3"}, "--config.model.null_timbre=3: not a value of type bool (true or false)"),
    ("tiny", {"model.null_timbre": "maybe"}, "--config.model.null_timbre=maybe: not a value of type bool"),
    ("family:depth=0", {}, "family:depth=0: family depth must be at least 1"),
    ("tiny:xyz", {}, "tiny:xyz: takes no argument, got 'xyz'"),
    ("encodec:8", {}, "encodec:8: takes no argument, got '8'"),
])
def test_bad_configs_are_user_errors_naming_the_flag_or_file(spec, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config_file(spec, overrides)


def test_scan_layers_is_true_false_or_auto_from_a_file_or_the_command_line(tmp_path):
    import jax

    read = lambda spec, overrides=None: ModelConfig.from_dict(load_config_file(spec, overrides).model.to_dict())
    assert read("tiny").scan_layers == "auto"
    assert read("tiny").scans_layers == (jax.default_backend() == "tpu")  # unrolled on CPU and GPU
    assert read("tiny", {"model.dense_dot": "xla"}).scans_layers == (jax.default_backend() in ("cpu", "tpu"))
    for value, expected in (("False", False), ("true", True)):
        cfg = read("tiny", {"model.scan_layers": value})
        assert cfg.scan_layers is expected and cfg.scans_layers is expected
    assert read("tiny", {"model.scan_layers": "auto"}).scan_layers == "auto"
    own = tmp_path / "mine.py"  # a config file may set a bool into the field whose default is "auto"
    own.write_text("from tokensynth_jax.configs import tiny\n\n"
                   "def get_config(arg=None):\n    c = tiny.get_config(arg)\n    c.model.scan_layers = False\n    return c\n")
    assert read(str(own)).scan_layers is False
    assert ModelConfig.from_dict({"scan_layers": True}).scans_layers is True  # a checkpoint's JSON
    with pytest.raises(ConfigError, match="model.scan_layers='maybe': one of True, False, 'auto'"):
        read("tiny", {"model.scan_layers": "maybe"})


@pytest.mark.parametrize("gpu", [False, True])
def test_speed_knobs_resolve_auto_per_platform_and_keep_explicit_values(monkeypatch, tmp_path, gpu):
    """The "auto" knobs are the measured GPU choices on a GPU and the plain paths elsewhere; a
    value set in a file, a command line or a checkpoint wins on every platform."""
    from tokensynth_jax import config as config_module

    monkeypatch.setattr(config_module, "on_gpu", lambda: gpu)
    read = lambda overrides=None: ModelConfig.from_dict(load_config_file("tiny", overrides).model.to_dict())
    auto = read()
    knobs = ("dropout_rng", "logits_grad_dtype", "decode_attention", "matvec_as_gemm", "loss_chunk", "decode_gemm")
    assert tuple(getattr(auto, k) for k in knobs) == ("auto",) * 6
    resolved = lambda c: (c.dropout_rng_impl, c.logits_grad_impl, c.decode_attention_impl, c.decodes_as_gemm,
                          c.loss_chunk_size, c.decode_gemm_impl)
    assert resolved(auto) == (("rbg", "compute", "pallas_gpu", True, 0, "pallas") if gpu
                              else ("threefry", "float32", "xla", False, 256, "xla"))
    assert resolved(auto.replace(attention="tokensynth-0.0.4"))[2] == "xla"  # the kernel is causal only
    assert resolved(auto.replace(d_model=96, num_heads=2))[2] == "xla"  # head size 48: no Triton tile
    plain = read({"model.dropout_rng": "threefry", "model.logits_grad_dtype": "float32",
                  "model.decode_attention": "xla", "model.matvec_as_gemm": "False", "model.loss_chunk": "128",
                  "model.decode_gemm": "xla"})
    assert resolved(plain) == ("threefry", "float32", "xla", False, 128, "xla")
    fast = ModelConfig.from_dict({"dropout_rng": "rbg", "logits_grad_dtype": "compute", "decode_attention": "pallas_gpu",
                                  "matvec_as_gemm": True, "loss_chunk": 0, "decode_gemm": "pallas"})  # a checkpoint's JSON
    assert resolved(fast) == ("rbg", "compute", "pallas_gpu", True, 0, "pallas")
    assert ModelConfig.from_dict({"loss_chunk": 256}).loss_chunk_size == 256  # written before "auto"
    own = tmp_path / "mine.py"  # a config file may set a number or a bool into a field whose default is "auto"
    own.write_text("from tokensynth_jax.configs import tiny\n\n"
                   "def get_config(arg=None):\n    c = tiny.get_config(arg)\n    c.model.loss_chunk = 64\n"
                   "    c.model.matvec_as_gemm = True\n    return c\n")
    mine = ModelConfig.from_dict(load_config_file(str(own)).model.to_dict())
    assert (mine.loss_chunk_size, mine.decodes_as_gemm) == (64, True)
    with pytest.raises(ConfigError, match="model.matvec_as_gemm='often': one of True, False, 'auto'"):
        read({"model.matvec_as_gemm": "often"})
    with pytest.raises(ConfigError, match="model.loss_chunk='-3': 'auto' or a whole number >= 0"):
        read({"model.loss_chunk": "-3"})


def test_compiling_for_another_platform_resolves_its_auto_choices():
    """Inside `compiling_for("tpu")` (an ahead-of-time compile for a TPU topology from this CPU) the
    "auto" choices and Pallas switches are a TPU's; outside, this host's again."""
    import jax.numpy as jnp

    from tokensynth_jax import config as config_module
    from tokensynth_jax.model import attention

    cfg = ModelConfig()
    here = (config_module.platform(), cfg.scans_layers, cfg.dense_dot_impl, attention.resolve("auto", jnp.bfloat16))
    assert here == ("cpu", False, "flat", "xla")
    with config_module.compiling_for("tpu"):
        assert (config_module.platform(), config_module.on_cpu(), config_module.on_gpu()) == ("tpu", False, False)
        assert (cfg.scans_layers, cfg.dense_dot_impl, attention.resolve("auto", jnp.bfloat16)) == (True, "xla", "pallas_tpu")
    assert (config_module.platform(), cfg.scans_layers, cfg.dense_dot_impl, attention.resolve("auto", jnp.bfloat16)) == here
