"""`tokensynth sweep`: IsoFLOP sweeps over a model family: plan, run locally, fit.

plan: compute budgets x family sizes -> for each pair the steps that spend the budget
(C = FLOPs per token x batch x seq_len x steps, FLOPs per token from flops.py), a cosine schedule
as long as the run (Hoffmann et al.: a longer cycle overstates the loss), written as plan.json,
a markdown table and one `tokensynth train` command per run (or one per run through a launch/
script, for TPU VMs and SLURM). run: the plan's runs one after another in this process, skipping
finished ones. fit: final losses and loss curves from each run's metrics.jsonl -> scaling.py's
fits -> fit.json and PNG plots (scaling_plots.py).
"""
from __future__ import annotations

import json
import math
import os
import shlex

from tokensynth_jax import versioned_json
from tokensynth_jax.errors import UserError

PLAN_FORMAT = "tokensynth-sweep-plan"
PLAN_VERSION = 1
FIT_FORMAT = "tokensynth-sweep-fit"
N_DEFINITION = "non-embedding parameters: blocks, final norm and output head (tokensynth_jax/flops.py)"


class SweepError(UserError):
    """A plan or run directory that cannot be used; the message names the file and the problem."""


# --- plan --------------------------------------------------------------------------------------
def member_spec(config: str, depth: int) -> str:
    """`configs/family.py[:base=tiny]` + depth -> `configs/family.py:base=tiny,depth=4`."""
    path, _, arg = config.partition(":")
    return f"{path}:{arg + ',' if arg else ''}depth={depth}"


def budget_label(budget: float) -> str:
    return f"{budget:.2g}".replace("e+", "e")


def run_command(spec: str, workdir: str, overrides: dict, launcher: str | None) -> str:
    """The shell command of one run: `tokensynth train ...`, or `LAUNCHER --config .. -- ...`."""
    flags = [f"--config.{k}={','.join(map(str, v)) if isinstance(v, (tuple, list)) else v}" for k, v in overrides.items()]
    if launcher:
        return f"{launcher} {shlex.join(['--config', spec, '--workdir', workdir, '--', *flags])}"
    return shlex.join(["tokensynth", "train", "--config", spec, "--workdir", workdir, *flags])


def plan_sweep(config: str, budgets, depths, workdir: str, *, overrides: dict | None = None,
               launcher: str | None = None, min_steps: int = 1) -> dict:
    """An IsoFLOP plan: every family size at every budget that gets at least `min_steps` steps.

    Args:
      config: a family config file whose get_config takes `depth=N` (configs/family.py[:arg]).
      budgets: training compute budgets in FLOPs.
      depths: family sizes to try at each budget.
      workdir: root of the run directories (local or gs://).
      overrides: dotted config overrides for every run (data paths, batch, seq_len, ...).
      launcher: a launch/ command prefix (e.g. "python launch/tpu_vm.py --tpu T --zone Z --run").
      min_steps: runs with fewer steps are listed as skipped.
    """
    from tokensynth_jax.config import ModelConfig, load_config_file
    from tokensynth_jax.scaling.flops import model_flops_per_token, param_counts

    overrides = dict(overrides or {})
    runs, skipped = [], []
    for depth in sorted(set(depths)):
        spec = member_spec(config, depth)
        c = load_config_file(spec, overrides)
        cfg = ModelConfig.from_dict(c.model.to_dict())
        counts = param_counts(cfg)
        per_token = model_flops_per_token(cfg, c.data.seq_len)
        tokens_per_step = c.data.global_batch * c.data.seq_len
        for budget in sorted(set(budgets)):
            steps = int(round(budget / (per_token * tokens_per_step)))
            name = f"c{budget_label(budget)}-d{depth}"
            if steps < min_steps:
                skipped.append({"name": name, "budget": budget, "depth": depth, "steps": steps,
                                "why": f"{steps} steps < --min-steps {min_steps}"})
                continue
            has_eval = bool(c.data.eval_paths)
            run_overrides = {**overrides, "train.steps": steps, "optim.total_steps": steps,
                             "optim.warmup_steps": min(c.optim.warmup_steps, max(1, steps // 10)),
                             "train.log_every": max(1, steps // 20), "train.eval_every": steps if has_eval else 0,
                             "train.checkpoint_every": steps, "train.keep_last": 1, "train.keep_every": 0}
            run_dir = os.path.join(workdir, name)
            runs.append({
                "name": name, "budget": budget, "depth": depth, "config": spec, "workdir": run_dir,
                "overrides": run_overrides, "num_layers": cfg.num_layers, "d_model": cfg.d_model,
                "num_heads": cfg.num_heads, "params": counts.non_embedding, "params_total": counts.total,
                "seq_len": c.data.seq_len, "global_batch": c.data.global_batch, "flops_per_token": per_token,
                "steps": steps, "tokens": steps * tokens_per_step, "flops": steps * tokens_per_step * per_token,
                "command": run_command(spec, run_dir, run_overrides, launcher),
            })
    runs.sort(key=lambda r: (r["budget"], r["params"]))
    return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "config": config, "budgets": sorted(set(budgets)),
            "depths": sorted(set(depths)), "workdir": workdir, "overrides": overrides, "launcher": launcher,
            "n_definition": N_DEFINITION, "runs": runs, "skipped": skipped}


def plan_table(plan: dict) -> str:
    """The plan as a markdown table."""
    head = "| run | budget | depth | layers x width (heads) | N | FLOPs/token | steps | tokens | tokens/N |"
    lines = [head, "|" + " --- |" * 9]
    for r in plan["runs"]:
        lines.append(f"| {r['name']} | {r['budget']:.3g} | {r['depth']} | {r['num_layers']} x {r['d_model']} "
                     f"({r['num_heads']}) | {r['params']:,} | {r['flops_per_token']:.3g} | {r['steps']:,} | "
                     f"{r['tokens']:,} | {r['tokens'] / r['params']:.3g} |")
    for s in plan["skipped"]:
        lines.append(f"| {s['name']} | {s['budget']:.3g} | {s['depth']} | skipped: {s['why']} | | | | | |")
    return "\n".join(lines) + "\n"


def write_plan(plan: dict, out_dir: str) -> list[str]:
    """plan.json, plan.md and commands.sh into `out_dir`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("plan.json", "plan.md", "commands.sh")]
    with open(paths[0], "w") as f:
        json.dump(plan, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(plan_table(plan))
    with open(paths[2], "w") as f:
        f.write("#!/bin/bash\n# one training run per line; `tokensynth sweep run` runs them here one after another\n")
        f.write("set -e\n" + "".join(r["command"] + "\n" for r in plan["runs"]))
    return paths


def read_plan(path: str) -> dict:
    """A plan from plan.json or the directory holding it."""
    if os.path.isdir(path):
        path = os.path.join(path, "plan.json")
    if not os.path.isfile(path):
        raise SweepError(f"{path}: no such plan (write one with `tokensynth sweep plan --out DIR`)")
    plan = versioned_json.read(path, what="sweep plan", fmt=PLAN_FORMAT, version=PLAN_VERSION, error=SweepError)
    check_plan(plan, path)
    return plan


# Checks of JSON values: (holds, what it should be).
_POSITIVE_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer")
_POSITIVE_NUMBER = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
                    "a positive number")
_STRING = (lambda v: isinstance(v, str), "a string")
# What `run` and `fit` read of each planned run: a hand-edited plan is checked against it up front.
_RUN_FIELDS = {"name": _STRING, "workdir": _STRING, "config": _STRING, "command": _STRING,
               "overrides": (lambda v: isinstance(v, dict), "an object"), "steps": _POSITIVE_INT,
               "depth": _POSITIVE_INT, "global_batch": _POSITIVE_INT, "seq_len": _POSITIVE_INT,
               "budget": _POSITIVE_NUMBER, "params": _POSITIVE_NUMBER, "tokens": _POSITIVE_NUMBER,
               "flops": _POSITIVE_NUMBER, "flops_per_token": _POSITIVE_NUMBER}
# Fields of metrics.jsonl that `fit` computes with, where a line has them (other fields are free).
_METRIC_FIELDS = {"step": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
                  "split": _STRING,
                  "ce": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")}


def check_plan(plan: dict, path: str) -> None:
    """Raises SweepError naming the first field of `plan` that `run` or `fit` could not use."""
    for key, kind in (("runs", list), ("skipped", list), ("workdir", str)):
        if not isinstance(plan.get(key), kind):
            raise SweepError(f"{path}: {key}: expected a {kind.__name__}, got {plan.get(key)!r:.60}")
    names = set()
    for i, run in enumerate(plan["runs"]):
        if not isinstance(run, dict):
            raise SweepError(f"{path}: runs[{i}]: expected an object, got {run!r:.60}")
        for key, (holds, what) in _RUN_FIELDS.items():
            if not holds(run.get(key)):
                got = f"got {run[key]!r:.60}" if key in run else "missing"
                raise SweepError(f"{path}: runs[{i}].{key}: expected {what}, {got}")
        if run["name"] in names:
            raise SweepError(f"{path}: runs[{i}].name: {run['name']!r} is planned twice")
        names.add(run["name"])


# --- run ---------------------------------------------------------------------------------------
def read_metrics(workdir: str) -> list[dict]:
    """The JSON lines of a run's metrics.jsonl ([] when the run has not started)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                m = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SweepError(f"{path}:{i}: not a JSON line ({e})") from e
            if not isinstance(m, dict):
                raise SweepError(f"{path}:{i}: not a JSON object: {line.strip():.60}")
            for key, (holds, what) in _METRIC_FIELDS.items():
                if key in m and not holds(m[key]):
                    raise SweepError(f"{path}:{i}: {key}: expected {what}, got {m[key]!r:.60}")
            out.append(m)
    return out


def finished(run: dict) -> bool:
    return any(m.get("split") == "train" and m.get("step") == run["steps"] for m in read_metrics(run["workdir"]))


DIVERGED = "diverged.txt"  # in a run's workdir: why it diverged; `sweep run` then leaves it alone


def run_sweep(plan: dict, only=None) -> tuple[list[str], dict[str, str]]:
    """Trains the plan's runs here, one after another (only those named in `only`, if given).

    A run that diverges does not stop the sweep (large sizes at a fixed learning rate may): why
    goes to its workdir's `diverged.txt`, and the next runs train. A rerun skips it while that
    file is there (delete it to try again); `sweep fit` lists it among the unfinished runs.

    Returns:
      The names trained now, and {name: why} of the runs that diverged, now or before.
    """
    from tokensynth_jax.config import load_config_file
    from tokensynth_jax.training import train

    done, diverged = [], {}
    for i, run in enumerate(plan["runs"], 1):
        marker = os.path.join(run["workdir"], DIVERGED)
        if (only and run["name"] not in only) or finished(run):
            continue
        if os.path.isfile(marker):
            with open(marker) as f:
                diverged[run["name"]] = f.read().strip()
            print(f"[sweep] run {i}/{len(plan['runs'])}: {run['name']} diverged before ({marker}; delete it to "
                  "train the run again)", flush=True)
            continue
        print(f"[sweep] run {i}/{len(plan['runs'])}: {run['name']} ({run['steps']} steps)", flush=True)
        try:
            train.train(load_config_file(run["config"], run["overrides"]), run["workdir"])
        except train.Diverged as e:
            with open(marker, "w") as f:
                f.write(f"{e}\n")
            diverged[run["name"]] = str(e)
            print(f"[sweep] run {run['name']} diverged: {e}; the sweep goes on", flush=True)
            continue
        done.append(run["name"])
    return done, diverged


# --- fit ---------------------------------------------------------------------------------------
def collect(plan: dict, loss: str = "auto", root: str | None = None) -> tuple[list[dict], list[str]]:
    """Final loss and loss curve of every finished run, and the names of unfinished ones.

    `loss`: "eval" (held-out cross-entropy at the last step), "train" (the last logged training
    cross-entropy) or "auto" (eval where the run has it, else train). `root`: where the run
    directories are now, if not where the plan put them (e.g. metrics copied down from a bucket).
    """
    runs, missing = [], []
    for run in plan["runs"]:
        metrics = read_metrics(os.path.join(root, run["name"]) if root else run["workdir"])
        final = {m["split"]: m for m in metrics if m.get("step") == run["steps"] and "ce" in m}
        source = ("eval" if "eval" in final else "train") if loss == "auto" else loss
        if source not in final:
            missing.append(run["name"])
            continue
        per_step = run["global_batch"] * run["seq_len"] * run["flops_per_token"]
        curve = sorted({m["step"]: m["ce"] for m in metrics if m.get("split") == "train" and "ce" in m}.items())
        runs.append({**{k: run[k] for k in ("name", "budget", "depth", "params", "tokens", "flops", "flops_per_token")},
                     "loss": float(final[source]["ce"]), "loss_source": source,
                     "curve": [[s * per_step, float(v)] for s, v in curve]})
    return runs, missing


def frontier(runs: list[dict]) -> list[list]:
    """Lower envelope of all training curves in (FLOPs, loss): the best loss reached at each compute."""
    points = sorted((c, l, r["name"]) for r in runs for c, l in r["curve"])
    out, best = [], float("inf")
    for c, l, name in points:
        if l < best:
            best = l
            out.append([c, l, name])
    return out


def fit_sweep(plan: dict, out_dir: str, *, loss: str = "auto", root: str | None = None, samples: int = 200,
              level: float = 0.9, seed: int = 0, delta: float = 1e-3) -> dict:
    """Collects the runs, fits IsoFLOP minima and the parametric law, bootstraps, writes fit.json and plots."""
    from tokensynth_jax.scaling import fit as scaling  # scipy and matplotlib: only here
    from tokensynth_jax.scaling import plots as scaling_plots

    runs, missing = collect(plan, loss, root)
    if not runs:
        raise SweepError(f"{root or plan['workdir']}: no finished runs to fit (run `tokensynth sweep run` first)")
    result = {"format": FIT_FORMAT, "version": 1, "loss": loss, "n_definition": plan.get("n_definition", N_DEFINITION),
              "missing": missing, "isoflop": scaling.isoflop_fit(runs)}
    try:
        law = scaling.fit_law([r["params"] for r in runs], [r["tokens"] for r in runs], [r["loss"] for r in runs],
                              delta=delta)
        result["law"] = law.to_dict()
        for r in runs:
            r["predicted"] = float(law.predict(r["params"], r["tokens"]))
    except scaling.FitError as e:
        law, result["law"] = None, {"why": str(e)}
    result["bootstrap"] = scaling.bootstrap(runs, law, samples=samples, level=level, seed=seed, delta=delta) \
        if samples else None
    result["frontier"] = frontier(runs)
    result["runs"] = runs
    os.makedirs(out_dir, exist_ok=True)
    result["plots"] = [os.path.basename(p) for p in scaling_plots.write_all(result, law, out_dir)]
    with open(os.path.join(out_dir, "fit.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result
