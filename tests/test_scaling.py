"""Scaling-law tools: the family's parameter and FLOP counts, the fitters on synthetic laws, and a
micro sweep (plan -> run -> fit) on data from `tokensynth prep`, end to end through the CLI."""
import json
import os
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from tokensynth_jax.cli import main as cli
from tokensynth_jax.config import ModelConfig, load_config_file
from tokensynth_jax.model.transformer import TokenSynth
from tokensynth_jax.scaling import fit as scaling
from tokensynth_jax.scaling import sweep
from tokensynth_jax.scaling.flops import model_flops_per_token, param_counts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILY = os.path.join(ROOT, "configs", "family.py")
CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al.'s fitted law


def _member(depth, base="tiny", **overrides):
    c = load_config_file(f"{FAMILY}:depth={depth},base={base}", overrides)
    return c, ModelConfig.from_dict(c.model.to_dict())


# --- the family and its counts ------------------------------------------------------------------
@pytest.mark.parametrize("depth", [3])
def test_counts_agree_with_the_initialised_parameters_and_6n_within_the_attention_term(depth):
    c, cfg = _member(depth)
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.head_dim) == (depth, 64 * depth, depth, 64)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(TokenSynth(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    top = lambda path: path[0].key  # noqa: E731
    last = lambda path: [k.key for k in path if hasattr(k, "key")][-1]  # the variable's name  # noqa: E731
    trunk = [(p, x) for p, x in leaves if top(p) in ("blocks", "final_ln", "head")]
    matmul = sum(x.size for p, x in trunk if last(p) == "kernel")
    counts = param_counts(cfg)
    assert counts.total == sum(x.size for _, x in leaves)
    assert counts.non_embedding == sum(x.size for _, x in trunk)
    assert counts.non_embedding - counts.non_matmul == matmul
    t, flops = c.data.seq_len, model_flops_per_token(cfg, c.data.seq_len)
    attention = 12 * cfg.num_layers * t * cfg.d_model
    assert flops - attention == 6 * matmul  # exactly 6 FLOPs per matmul weight per token
    # 6N misses the attention term and over-counts only biases and norms (no matmul):
    assert 0 < flops - 6 * counts.non_embedding <= attention
    assert flops - 6 * counts.non_embedding >= attention - 6 * counts.non_matmul


def test_the_family_spans_1m_to_1b_non_embedding_parameters_with_one_knob():
    sizes = [param_counts(_member(d, "encodec")[1]).non_embedding for d in (2, 8, 27)]
    assert 1e6 <= sizes[0] < 2e6 and 2e7 < sizes[1] < 4e7 and 0.9e9 < sizes[2] <= 1e9
    with pytest.raises(ValueError, match="family.py takes depth=N"):
        load_config_file(f"{FAMILY}:size=3")
    with pytest.raises(ValueError, match="unknown base 'dac'"):
        load_config_file(f"{FAMILY}:depth=3,base=dac")


# --- the fitters on known laws ------------------------------------------------------------------
def test_parametric_fit_recovers_a_known_law_from_noisy_runs():
    """45 runs, 9 sizes at each of 5 budgets over 4 decades, 0.5% log-normal noise on the loss.

    Stated tolerance (it holds for noise seeds 0..5): E within 5%, alpha and beta within 0.03,
    A and B within 35% (A trades off against alpha, so it is loosely pinned on its own), the
    compute-optimal exponent N_opt ~ C^(beta / (alpha + beta)) within 0.02.
    """
    rng = np.random.default_rng(0)
    law = scaling.LawFit(**CHINCHILLA, objective=0.0)
    runs = []
    for c in np.logspace(18, 22, 5):
        for n in np.logspace(np.log10(c) / 2 - 2.3, np.log10(c) / 2 - 0.3, 9):
            d = c / (6 * n)
            runs.append(dict(params=n, tokens=d, loss=float(law.predict(n, d)) * np.exp(rng.normal(0, 0.005))))
    fit = scaling.fit_law(*([r[k] for r in runs] for k in ("params", "tokens", "loss"))).to_dict()
    assert fit["E"] == pytest.approx(CHINCHILLA["E"], rel=0.05)
    assert fit["A"] == pytest.approx(CHINCHILLA["A"], rel=0.35)
    assert fit["B"] == pytest.approx(CHINCHILLA["B"], rel=0.35)
    assert fit["alpha"] == pytest.approx(CHINCHILLA["alpha"], abs=0.03)
    assert fit["beta"] == pytest.approx(CHINCHILLA["beta"], abs=0.03)
    assert fit["n_opt_exponent"] == pytest.approx(0.28 / 0.62, abs=0.02)
    with pytest.raises(scaling.FitError, match="at least 6 runs"):
        scaling.fit_law([1e6] * 5, [1e9] * 5, [3.0] * 5)


def test_isoflop_minima_and_their_power_law_are_recovered_from_synthetic_parabolas():
    """Per budget C, loss = L0(C) + 0.05 (ln N - ln N*)^2 with N* = 20 C^0.5, noise sd 1e-3:
    each vertex within 3%, the exponent within 0.01, and its bootstrap interval holds 0.5."""
    rng = np.random.default_rng(1)
    runs = []
    budgets = [1e16, 1e17, 1e18, 1e19]
    for c in budgets:
        n_star = 20 * c**0.5
        for n in n_star * np.exp(np.linspace(-1.5, 1.2, 7)):
            loss = 3.0 - 0.1 * np.log10(c) + 0.05 * np.log(n / n_star) ** 2 + rng.normal(0, 1e-3)
            runs.append(dict(budget=c, params=n, flops_per_token=6 * n, tokens=c / (6 * n), flops=c, loss=loss))
    iso = scaling.isoflop_fit(runs)
    for entry, c in zip(iso["budgets"], budgets):
        assert entry["n_opt"] == pytest.approx(20 * c**0.5, rel=0.03)
        assert entry["d_opt"] == pytest.approx(c / (6 * entry["n_opt"]), rel=1e-6)
    assert iso["n_opt"]["exponent"] == pytest.approx(0.5, abs=0.01)
    assert iso["d_opt"]["exponent"] == pytest.approx(0.5, abs=0.01)
    lo, hi = scaling.bootstrap(runs, None, samples=50)["intervals"]["isoflop_n_exponent"]
    assert lo < 0.5 < hi and hi - lo < 0.05
    # Sizes that do not bracket the optimum: no vertex claimed, and the reason says so.
    edge = scaling.isoflop_minimum([1e6, 2e6, 4e6], [3.0, 2.9, 2.85])
    assert edge["n_opt"] is None and "outside the sizes" in edge["why"]


# --- plans and run directories ------------------------------------------------------------------
def test_plan_commands_go_through_launch_tpu_vm(tmp_path):
    out = tmp_path / "plan"
    assert cli.main(["sweep", "plan", "--config", f"{FAMILY}:base=tiny", "--depths", "1,2", "--budgets", "1e11",
                     "--workdir", "gs://b/sweep", "--out", str(out), "--min-steps", "1",
                     "--launcher", f"{sys.executable} launch/tpu_vm.py --tpu v5e-64 --zone us-west4-a",
                     "--config.data.paths=gs://b/data/train"]) == 0
    plan = sweep.read_plan(str(out))
    for run in plan["runs"]:
        printed = subprocess.run(run["command"], shell=True, cwd=ROOT, check=True, capture_output=True,
                                 text=True).stdout
        assert "--worker=all" in printed and "TOKENSYNTH_DISTRIBUTED=auto" in printed
        assert (f"tokensynth_jax.cli train --config {FAMILY}:base=tiny,depth={run['depth']} --workdir "
                f"gs://b/sweep/{run['name']} --config.data.paths=gs://b/data/train "
                f"--config.train.steps={run['steps']}") in printed


def test_collect_prefers_held_out_loss_and_lists_unfinished_runs(tmp_path):
    runs = [dict(name=n, budget=1e12, depth=1, params=1000, tokens=64, flops=1e12, flops_per_token=1e6,
                 global_batch=2, seq_len=16, steps=4, workdir=str(tmp_path / "local" / n)) for n in ("a", "b", "c")]
    lines = {"a": [("train", 2, 3.0), ("train", 4, 2.5), ("eval", 4, 2.7)], "b": [("train", 4, 2.6)],
             "c": [("train", 2, 3.1)]}
    for name, rows in lines.items():
        os.makedirs(tmp_path / "local" / name)
        with open(tmp_path / "local" / name / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps({"step": s, "split": split, "ce": v}) + "\n" for split, s, v in rows)
    got, missing = sweep.collect({"runs": runs})
    assert [(r["name"], r["loss"], r["loss_source"]) for r in got] == [("a", 2.7, "eval"), ("b", 2.6, "train")]
    assert got[0]["curve"] == [[2 * 32 * 1e6, 3.0], [4 * 32 * 1e6, 2.5]] and missing == ["c"]
    assert [x["name"] for x in sweep.collect({"runs": runs}, "eval")[0]] == ["a"]
    assert sweep.frontier(got) == [[64e6, 3.0, "a"], [128e6, 2.5, "a"]]
    os.rename(tmp_path / "local", tmp_path / "copied")  # the run directories, somewhere else now (--workdir)
    assert sweep.collect({"runs": runs})[1] == ["a", "b", "c"]
    assert sweep.collect({"runs": runs}, root=str(tmp_path / "copied")) == (got, missing)


def test_a_file_that_is_not_a_plan_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps({"runs": []}))
    assert cli.main(["sweep", "fit", str(bad)]) == 2
    assert f"{bad}: not a sweep plan" in capsys.readouterr().err
    assert cli.main(["sweep", "run", str(tmp_path / "nowhere")]) == 2
    assert "no such plan" in capsys.readouterr().err


def test_hand_edited_plans_and_metrics_are_one_line_errors(tmp_path, capsys):
    """`sweep run` and `sweep fit` check what they read of plan.json and metrics.jsonl up front."""
    data, plan_dir = tmp_path / "data", str(tmp_path / "plan")
    base = ["sweep", "plan", "--config", f"{FAMILY}:base=tiny", "--depths", "1,2", "--budgets", "1e11",
            "--workdir", str(tmp_path / "runs"), "--min-steps", "1"]
    assert cli.main([*base, "--out", str(tmp_path / "nodata")]) == 2  # a plan that would train on nothing
    assert "--config.data.paths: no training data" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "nodata")
    os.makedirs(data)
    assert cli.main([*base, "--out", plan_dir, f"--config.data.paths={data}"]) == 0
    capsys.readouterr()
    path = os.path.join(plan_dir, "plan.json")
    with open(path) as f:
        good = json.load(f)
    first = good["runs"][0]["name"]

    def fails(argv, message):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err

    for edit, message in [(lambda p: p.update(runs="x"), "runs: expected a list, got 'x'"),
                          (lambda p: p["runs"].__setitem__(0, 7), "runs[0]: expected an object, got 7"),
                          (lambda p: p["runs"][0].pop("workdir"), "runs[0].workdir: expected a string, missing"),
                          (lambda p: p["runs"][1].update(params="many"), "runs[1].params: expected a positive number"),
                          (lambda p: p["runs"][1].update(steps=True), "runs[1].steps: expected a positive integer"),
                          (lambda p: p["runs"][1].update(name=first), f"runs[1].name: '{first}' is planned twice")]:
        edited = json.loads(json.dumps(good))
        edit(edited)
        with open(path, "w") as f:
            json.dump(edited, f)
        for step in ("run", "fit"):
            fails(["sweep", step, plan_dir], f"{path}: {message}")
    with open(path, "w") as f:
        json.dump(good, f)
    blocker = tmp_path / "runs" / first
    os.makedirs(blocker.parent, exist_ok=True)
    blocker.write_text("a file where the run's workdir goes")  # named before any run trains, not a traceback
    fails(["sweep", "run", plan_dir], f"{plan_dir}: run {first}: workdir {blocker}: is a file; give a directory")
    blocker.unlink()
    os.rmdir(data)  # the shards are gone by the time the sweep runs
    fails(["sweep", "run", plan_dir], f"{plan_dir}: run {first}: --config.data.paths: {data}: no such file")
    metrics = tmp_path / "runs" / first / "metrics.jsonl"
    os.makedirs(metrics.parent)
    for content, message in [(b"[1, 2]\n", ":1: not a JSON object: [1, 2]"), (b"\xff\xfe\n", ":1: not a JSON line"),
                             (b'{"step": 1}\n{"step": 2, "split": "train", "ce": "low"}\n', ":2: ce: expected a number"),
                             (b'{"step": "last"}\n', ":1: step: expected an integer")]:
        metrics.write_bytes(content)
        fails(["sweep", "fit", plan_dir, "--out", str(tmp_path / "fit")], f"{metrics}{message}")
    assert not os.path.exists(tmp_path / "fit")


# --- a micro sweep end to end -------------------------------------------------------------------
@pytest.fixture(scope="module")
def prep_data(tmp_path_factory):
    """A small `tokensynth prep` data set: 2 SoundFont presets x 8 pairs, tiny codec and CLAP."""
    out = str(tmp_path_factory.mktemp("scaling-prep"))
    assert cli.main(["prep", "--out", out, "--programs", "0,40", "--valid-fraction", "0", "--test-fraction", "0",
                     "--pairs-per-instrument", "8", "--procedural-candidates", "10", "--num-segments", "6",
                     "--max-notes", "12", "--table-pitches", "36:96:4", "--table-velocities", "50,110",
                     "--codec", "tiny-encodec", "--clap", "tiny-clap", "--encode-batch-size", "4"]) == 0
    return out


@pytest.mark.slow  # ~1.5 min on 2 cores: six tiny trainings, each compiled
def test_micro_sweep_plans_runs_and_fits_end_to_end(prep_data, tmp_path, capsys):
    plan_dir, runs_dir = str(tmp_path / "plan"), str(tmp_path / "runs")
    assert cli.main(["sweep", "plan", "--config", f"{FAMILY}:base=tiny", "--depths", "1,2,3",
                     "--budgets", "6e10,1.2e11", "--workdir", runs_dir, "--out", plan_dir, "--min-steps", "2",
                     f"--config.data.paths={prep_data}/train", "--config.data.seq_len=320"]) == 0
    plan = sweep.read_plan(plan_dir)
    assert [(r["budget"], r["depth"]) for r in plan["runs"]] == [(b, d) for b in (6e10, 1.2e11) for d in (1, 2, 3)]
    for run in plan["runs"]:  # each run spends its budget, up to rounding to whole steps
        per_step = run["flops_per_token"] * run["global_batch"] * run["seq_len"]
        assert abs(run["flops"] - run["budget"]) <= per_step / 2 and run["steps"] >= 2
    commands = open(os.path.join(plan_dir, "commands.sh")).read().splitlines()[3:]
    for command, run in zip(commands, plan["runs"], strict=True):  # the written commands are the runs
        overrides, rest = cli._split_config_overrides(shlex.split(command)[1:])
        args = cli.build_parser().parse_args(rest)
        config = load_config_file(args.config, overrides)
        assert (args.workdir, config.train.steps, config.optim.total_steps) == (run["workdir"], run["steps"], run["steps"])
        assert config.to_dict() == load_config_file(run["config"], run["overrides"]).to_dict()

    # `tokensynth sweep run` as a user runs it: its own process on one CPU device (compiles for the 8 fake
    # devices of this session cost more), with a compilation cache that each size's second budget reuses.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    done = subprocess.run([sys.executable, "-m", "tokensynth_jax.cli", "sweep", "run", plan_dir], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("[eval]") == 0 and done.stdout.count("[sweep] run ") == 6
    assert cli.main(["sweep", "run", plan_dir]) == 0  # everything finished: nothing trains again
    assert "trained 0 runs" in capsys.readouterr().out

    assert cli.main(["sweep", "fit", plan_dir, "--bootstrap", "10"]) == 0
    fit_dir = os.path.join(plan_dir, "fit")
    result = json.load(open(os.path.join(fit_dir, "fit.json")))
    assert result["missing"] == [] and len(result["runs"]) == 6
    for run in result["runs"]:
        assert run["loss_source"] == "train" and np.isfinite(run["loss"]) and np.isfinite(run["predicted"])
        assert run["curve"][-1] == [pytest.approx(run["flops"]), run["loss"]]
    assert all(np.isfinite(result["law"][k]) for k in scaling.PARAM_NAMES)
    assert [e["runs"] for e in result["isoflop"]["budgets"]] == [3, 3]
    assert result["bootstrap"]["samples"] == 10 and "alpha" in result["bootstrap"]["intervals"]
    frontier = np.array([f[:2] for f in result["frontier"]])
    assert np.all(np.diff(frontier[:, 0]) > 0) and np.all(np.diff(frontier[:, 1]) < 0)
    for name in ("loss_vs_compute.png", "isoflop.png", "fit_vs_observed.png"):
        with open(os.path.join(fit_dir, name), "rb") as f:
            data = f.read()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, name


def test_a_diverging_run_is_reported_and_the_sweep_goes_on(prep_data, tmp_path, capsys):
    plan_dir = str(tmp_path / "plan")
    assert cli.main(["sweep", "plan", "--config", f"{FAMILY}:base=tiny", "--depths", "1,2", "--budgets", "6e10",
                     "--workdir", str(tmp_path / "runs"), "--out", plan_dir, "--min-steps", "2",
                     f"--config.data.paths={prep_data}/train", "--config.data.seq_len=320"]) == 0
    with open(os.path.join(plan_dir, "plan.json")) as f:
        plan = json.load(f)
    bad, good = plan["runs"]  # an infinite learning rate: the first update makes every weight inf
    bad["overrides"].update({"optim.peak_lr": "1e999", "optim.warmup_steps": "0", "optim.clip_norm": "0"})
    with open(os.path.join(plan_dir, "plan.json"), "w") as f:
        json.dump(plan, f)
    capsys.readouterr()
    assert cli.main(["sweep", "run", plan_dir]) == 0
    out = capsys.readouterr().out
    assert f"[sweep] run {bad['name']} diverged: step " in out and "the sweep goes on" in out
    assert f"trained 1 runs: {good['name']}; 1 diverged: {bad['name']}" in out
    with open(os.path.join(bad["workdir"], sweep.DIVERGED)) as f:
        assert "training diverged" in f.read()
    assert cli.main(["sweep", "run", plan_dir]) == 0  # a rerun leaves the diverged run alone
    out = capsys.readouterr().out
    assert f"{bad['name']} diverged before" in out and "trained 0 runs: (all were finished); 1 diverged" in out
    assert sweep.collect(sweep.read_plan(plan_dir))[1] == [bad["name"]]  # the fit counts it as unfinished
