"""`tokensynth compile-step`: the sharded train step compiled without running it, for this host's 8
(fake) devices, and through libtpu for a Cloud TPU topology from this CPU host."""
import json
import os
import subprocess
import sys

import jax
import pytest

from tokensynth_jax.config import load_config_file
from tokensynth_jax.training import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBTPU = os.path.join(sys.prefix, "libtpu")  # `make setup` installs libtpu there, off the venv's path
TINY_ON_4 = ["--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.data.global_batch=8"]


def _tiny(**overrides):
    return load_config_file("tiny", {"data.global_batch": 8, "data.seq_len": 64, **overrides})


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices: XLA_FLAGS set in conftest")
def test_fsdp_plan_holds_an_eighth_of_the_state_per_device():
    replicated = plan.compile_train_step(_tiny(**{"mesh.data": 8}), jax.devices(), "this host")
    sharded = plan.compile_train_step(_tiny(**{"mesh.data": 1, "mesh.fsdp": 8}), jax.devices(), "this host")
    assert sharded.mesh == {"data": 1, "fsdp": 8, "tensor": 1} and sharded.devices == 8
    assert sharded.argument_gb < replicated.argument_gb / 4  # parameters and Adam moments split 8 ways
    assert sharded.collectives.get("all-gather", 0) > replicated.collectives.get("all-gather", 0)  # FSDP gathers
    assert "all-to-all" not in sharded.collectives
    assert sharded.pallas_tpu_kernels == 0 and sharded.hbm_gb is None and sharded.fits is None
    assert sharded.total_gb == pytest.approx(sharded.argument_gb + sharded.temp_gb + sharded.output_gb - sharded.alias_gb)


def _with_libtpu(*argv):
    """`python ARGV` with libtpu importable (and this suite's compile cache off, as conftest sets it), on a
    CI runner's environment: with $CI set pyfluidsynth prints to stdout unless imported through midi_library."""
    if not os.path.isfile(os.path.join(LIBTPU, "libtpu", "__init__.py")):
        pytest.skip(f"libtpu is not installed in {LIBTPU} (`make setup` puts it there)")
    env = {**os.environ, "PYTHONPATH": LIBTPU, "CI": "true"}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          check=False)


def _compile_step(*args):
    return _with_libtpu("-m", "tokensynth_jax.cli", "compile-step", "--config", "tiny", *args)


def test_a_tpu_topology_compiles_with_the_splash_kernels_from_this_host():
    """"auto" attention is the target's (Pallas splash on a TPU: forward, dq and dkv kernels lowered
    by Mosaic), not this host's; libtpu starts without a TPU VM's metadata, says nothing and writes
    no log files (it wrote two into /tmp/tpu_logs every run)."""
    logs = lambda: set(os.listdir("/tmp/tpu_logs")) if os.path.isdir("/tmp/tpu_logs") else set()
    before = logs()
    done = _compile_step("--json", "--topology", "v5e:2x2", *TINY_ON_4)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert logs() <= before
    auto = json.loads(done.stdout)
    assert (auto["device_kind"], auto["devices"], auto["target"]) == ("TPU v5 lite", 4, "v5e:2x2")
    assert auto["pallas_tpu_kernels"] >= 3
    assert "all-to-all" not in auto["collectives"] and auto["collectives"]["all-gather"] > 0
    assert auto["fits"] is True and auto["hbm_gb"] == pytest.approx(16 * 2**30 / 1e9)

    done = _compile_step("--json", "--topology", "v5e:2x2", *TINY_ON_4, "--set", "model.attention_impl=xla")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["pallas_tpu_kernels"] == 0


def test_a_step_over_the_chips_memory_is_one_line():
    """libtpu refuses to compile a plan over a chip's HBM: the answer "does not fit", as one line."""
    done = _compile_step("--json", "--topology", "v5e:2x2", *TINY_ON_4[:-1], "--config.data.global_batch=16384")
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith("tokensynth compile-step: error: --topology v5e:2x2: the train step at global batch "
                               "16384 x 128 does not fit a TPU v5 lite: ")
    assert "exceeds available HBM" in lines[0] and "model.remat=dots" in lines[0]


def test_an_unknown_topology_is_one_line():
    done = _compile_step("--topology", "v9z:2x2", *TINY_ON_4)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "--topology v9z:2x2" in done.stderr and "Traceback" not in done.stderr


# Batched, left-padded generation with classifier-free guidance, compiled for one v5e chip.
_GENERATE_FOR_A_TPU = """
import json, sys
from tokensynth_jax.training import plan
plan.prepare_environment("tpu")
import jax, numpy as np
from flax import nnx
from tokensynth_jax import config
from tokensynth_jax.inference import sampling
from tokensynth_jax.model.transformer import TokenSynth

on_chip = jax.sharding.SingleDeviceSharding(plan.topology_devices("v5e:2x2")[0])
cfg = config.ModelConfig(num_layers=2, d_model=128, num_heads=2, num_codebooks=3, codebook_size=64, max_len=256,
                         timbre_dim=16, timbre_hidden=32, null_timbre=True, attention_impl=sys.argv[1])
with config.compiling_for("tpu"):
    model = TokenSynth(cfg, rngs=nnx.Rngs(0))
    prompts = [np.arange(5, 5 + n) for n in (7, 20, 33)]  # three left paddings
    args, static = sampling._decode_args(model, prompts, np.zeros((3, 16), np.float32), sampler=sampling.TopP(0.9),
                                         seed=0, max_rows=40, guidance=sampling.CFG(2.0), unconditional_model=None,
                                         dtype="bfloat16")
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_chip)
                        if isinstance(a, jax.Array) else a, args)
    hlo = sampling._decode_jit_for(cfg).lower(*args, **static).compile().as_text()
print(json.dumps({"pallas_tpu_kernels": hlo.count('custom_call_target="tpu_custom_call"')}))
"""


def test_left_padded_generation_compiles_for_a_tpu_with_the_splash_prefill():
    """The prefill's splash kernel with left padding as segment ids lowers through Mosaic (the CPU
    tests run it in interpret mode, which checks numbers, not what a TPU can compile)."""
    kernels = {}
    for impl in ("auto", "xla"):
        done = _with_libtpu("-c", _GENERATE_FOR_A_TPU, impl)
        assert done.returncode == 0, done.stderr[-3000:]
        kernels[impl] = json.loads(done.stdout)["pallas_tpu_kernels"]
    assert kernels["auto"] >= 1 and kernels["xla"] == 0, kernels
