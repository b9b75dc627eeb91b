"""The benchmarks run from a bare checkout, as a lent accelerator runs them: our dependencies are
installed there, our package is not (docs/benchmarks.md, "Running it"). On 2026-11-28 an H200's
run lost every section that builds our model to `No module named 'tokensynth_jax.configs'`, a name
only the installed package has; these tests run the same commands in such an environment here."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import _common  # noqa: E402


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """A Python with this environment's packages but not the editable install of ours: a .pth file
    lists our site-packages folders, and .pth files inside a folder added that way do not run, so
    the install's import hook never loads."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with open(os.path.join(site, "dependencies.pth"), "w") as f:
        f.write("\n".join(sorted(ours)) + "\n")
    return python


def _run(python: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    return subprocess.run([python, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)  # the callers assert on the exit status


def test_the_mapped_folders_are_setup_pys_package_dir():
    with open(os.path.join(REPO, "setup.py")) as f:
        tree = ast.parse(f.read())
    package_dir = next(ast.literal_eval(k.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                       for k in node.keywords if k.arg == "package_dir")
    assert _common.INSTALLED_AS == package_dir


def test_a_bare_checkout_loads_the_packaged_configs_and_the_prep_package(bare_python):
    bare = _run(bare_python, "-c", "import tokensynth_jax.configs")
    assert bare.returncode == 1 and "No module named 'tokensynth_jax.configs'" in bare.stderr  # truly bare
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import _common\n"
            "from tokensynth_jax.config import load_config_file\n"
            "import tokensynth_jax, tokensynth_prep\n"
            "print(load_config_file('tiny').model.num_layers, load_config_file('configs/reference.py').model.num_layers,"
            " tokensynth_jax.__file__, tokensynth_prep.__file__)")
    done = _run(bare_python, "-c", code)
    assert done.returncode == 0, done.stderr
    tiny, reference, package, prep = done.stdout.split()
    assert (int(tiny), int(reference)) == (2, 12)
    assert package == os.path.join(REPO, "tokensynth_jax", "__init__.py")
    assert prep == os.path.join(REPO, "data_prep", "__init__.py")


@pytest.mark.slow
def test_the_accelerator_benchmark_runs_its_sections_from_a_bare_checkout(bare_python, tmp_path):
    out = tmp_path / "accel"
    done = _run(bare_python, "benchmarks/accelerator.py", "--quick", "--out", str(out), "--budget", "400",
                "--train-best", "--sections", "train-variants,ours-train,torch-train,ours-decode",
                "--train-variant", "defaults:", "--train-variant", "flat:model.dense_dot=flat",
                "--decode-variant", "fused:model.decode_attention=pallas_fused,batch=1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / "results.json") as f:
        sections = json.load(f)["sections"]
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(
        ("train-variants", "ours-train", "torch-train", "ours-decode"), "ok")
    for name, section in sections.items():
        errors = {item: r["error"] for item, r in section["records"].items() if "error" in r}
        assert not errors, (name, errors)
    train = sections["ours-train"]["records"]
    assert all(train[f"train {b}"]["tokens_per_s"] > 0 for b in (1, 2, 4))
    # --train-best: the goal's rows ran with the variant's overrides if it beat the defaults by 1%
    variants = {r["overrides"].get("model.dense_dot", "defaults"): r["tokens_per_s"]
                for item, r in sections["train-variants"]["records"].items() if "tokens_per_s" in r}
    flat_won = variants["flat"] > 1.01 * variants["defaults"]
    assert train["model"]["overrides"] == ({"model.dense_dot": "flat"} if flat_won else {})
    decode = sections["ours-decode"]["records"]
    assert decode["decode 1, fused"]["ms_per_clip"] > 0 and decode["decode 8"]["clips_per_s"] > 0


@pytest.mark.parametrize("speeds, expected", [
    ({"defaults": 100.0, "row_major": 102.0, "no_dropout": 110.0}, {"model.residual_layout": "row_major"}),
    ({"defaults": 100.0, "row_major": 100.5, "no_dropout": 110.0}, {}),  # within noise: the defaults stay
    ({"row_major": 100.5}, {"model.residual_layout": "row_major"}),  # no defaults row measured
])
def test_train_best_takes_a_speed_knob_that_beats_the_defaults_by_more_than_noise(tmp_path, speeds, expected):
    import argparse

    import accelerator

    overrides = {"defaults": {}, "row_major": {"model.residual_layout": "row_major"},
                 "no_dropout": {"model.dropout": 0.0}}
    with open(tmp_path / "train-variants.jsonl", "w") as f:
        f.write(json.dumps({"item": "device", "device": "NVIDIA H200"}) + "\n")
        for name, speed in speeds.items():
            f.write(json.dumps({"item": f"train 32, {name}", "overrides": overrides[name], "batch": 32,
                                "tokens_per_s": speed}) + "\n")
        f.write(json.dumps({"item": "train 16, row_major", "overrides": {"model.dense_dot": "flat"}, "batch": 16,
                            "tokens_per_s": 1e9}) + "\n")  # another batch: not comparable
    args = argparse.Namespace(out=str(tmp_path), quick=False, part="ours-train", train_best=True)
    assert accelerator._train_winner(accelerator.Section(args)) == expected
    args.train_best = False
    assert accelerator._train_winner(accelerator.Section(args)) == {}


def test_kernel_time_is_the_difference_between_sweep_counts_and_noise_is_no_number():
    import time

    import kernels

    def make(repeats, fixed=0.02, sweep=0.01):  # a call's fixed cost (dispatch) and a sweep's
        return lambda: time.sleep(fixed + repeats * sweep)

    per_sweep = kernels._per_sweep(make, (), reps=3, repeats=(1, 3))
    assert 0.008 < per_sweep < 0.015  # the fixed 20 ms cancels
    with pytest.raises(RuntimeError, match="timing noise"):
        kernels._per_sweep(lambda r: make(r, sweep=-0.005), (), reps=2, repeats=(1, 2))  # 2 sweeps ran faster


def test_gpu_aot_counts_the_kernels_that_transpose_and_their_batch_minor_outputs():
    import gpu_aot

    hlo = """HloModule jit_train_step, is_scheduled=true

%fused_transpose (param_0: f32[32,1024,1024]) -> f32[1024,1024,32] {
  %param_0 = f32[32,1024,1024]{2,1,0} parameter(0)
  ROOT %transpose.1 = f32[1024,1024,32]{2,1,0} transpose(%param_0), dimensions={1,2,0}
}

%region_add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.2 = f32[] add(%a, %b)
}

ENTRY %main.1 (p: f32[32,1024,1024]) -> f32[] {
  %p = f32[32,1024,1024]{2,1,0} parameter(0)
  %input_transpose_fusion.26 = f32[1024,1024,32]{2,1,0} fusion(%p), kind=kInput, calls=%fused_transpose
  %loop_add_fusion.1 = bf16[32,1024,1024]{2,1,0} fusion(%p), kind=kLoop, calls=%fused_transpose
  %attention.3 = (bf16[32,16,1024,64]{3,1,2,0}, f32[32,16,1024]{2,1,0}) custom-call(%p), custom_call_target="__cudnn$fmhaSoftmax"
  %zero = f32[] constant(0)
  ROOT %reduce.4 = f32[] reduce(%p, %zero), dimensions={0,1,2}, to_apply=%region_add
}
"""
    counts = gpu_aot.hlo_counts(hlo, batch=32)
    # The transpose inside the fusion body is the fusion's, not a kernel of its own.
    assert counts["fusions"] == 2 and counts["transposing_fusions"] == 1
    assert counts["transposing_gb"] == pytest.approx(1024 * 1024 * 32 * 4 / 1e9)
    assert counts["batch_minor_outputs"] == 1 and counts["batch_minor_gb"] == counts["transposing_gb"]
    assert counts["library_calls"] == {"__cudnn$fmhaSoftmax": 1}


def test_gpu_aot_counts_the_kernels_of_a_decode_step():
    import gpu_aot

    hlo = """HloModule jit_decode, is_scheduled=true

%body.2 (state: (s32[], bf16[2,1024])) -> (s32[], bf16[2,1024]) {
  %state = (s32[], bf16[2,1024]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %x = bf16[2,1024]{1,0} get-tuple-element(%state), index=1
  %gemv.1 = bf16[2,1024]{1,0} fusion(%x), kind=kCustom, calls=%triton_gemv
  %y = bf16[2,1024]{1,0} bitcast(%gemv.1)
  %one = s32[] constant(1)
  %next = s32[] fusion(%i, %one), kind=kLoop, calls=%add
  %cache = bf16[2,1024]{1,0} copy(%y)
  ROOT %out = (s32[], bf16[2,1024]{1,0}) tuple(%next, %cache)
}

%small.3 (s: (s32[])) -> (s32[]) {
  %s = (s32[]) parameter(0)
  %k = s32[] get-tuple-element(%s), index=0
  %k1 = s32[] fusion(%k), kind=kLoop, calls=%add
  ROOT %t = (s32[]) tuple(%k1)
}

ENTRY %main.1 (p: bf16[2,1024]) -> bf16[2,1024] {
  %p = bf16[2,1024]{1,0} parameter(0)
  %w = (s32[], bf16[2,1024]{1,0}) while(%init), condition=%cond.1, body=%body.2
  %v = (s32[]) while(%init2), condition=%cond.2, body=%small.3
  ROOT %r = bf16[2,1024]{1,0} get-tuple-element(%w), index=1
}
"""
    # The largest loop's launches: the kernel, the counter's fusion and the copy (not its
    # parameter, tuples, bitcast or constant).
    assert gpu_aot.loop_kernels(hlo) == 3
