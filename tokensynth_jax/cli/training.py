"""Commands that train: `train` (one run, resumed from its workdir) and `sweep` (plan, run, fit an IsoFLOP sweep).

Both resume into their own output, so they are not atomic; their checks (the config, its data
paths and sizes, a sweep's family and budgets) run before JAX is imported.
"""
from __future__ import annotations

import glob
import json
import os
import shutil

from tokensynth_jax.cli import checks
from tokensynth_jax.cli.checks import UsageError
from tokensynth_jax.errors import UserError

# Config fields that must be at least this (their meaning: configs/reference.py).
_MINIMUM = {"data.global_batch": 1, "data.seq_len": 2, "train.steps": 1, "train.grad_accum": 1,
            "train.log_every": 1, "train.checkpoint_every": 1, "train.keep_last": 1, "train.eval_every": 0,
            "train.eval_batches": 1, "train.keep_every": 0, "train.sample_every": 0, "optim.total_steps": 1,
            "optim.warmup_steps": 0, "data.worker_count": 0}
# Real-valued fields: (lowest, highest, whether the lowest itself is allowed).
_RANGE = {"optim.peak_lr": (0.0, float("inf"), False), "optim.end_lr_ratio": (0.0, 1.0, True),
          "optim.b1": (0.0, 1.0, True), "optim.b2": (0.0, 1.0, True), "optim.eps": (0.0, float("inf"), False),
          "optim.weight_decay": (0.0, float("inf"), True), "optim.clip_norm": (0.0, float("inf"), True)}


def _logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


# --- train ---------------------------------------------------------------------------------------------
def add_train_parser(sub) -> None:
    p = checks.subcommand(sub, "train", _train, takes_config=True,
                          help="train a model on `tokensynth prep` shards (resumes from --workdir)")
    p.add_argument("--config", required=True, help="a packaged config or configs/X.py[:arg]; override fields with "
                   "--config.a.b=value")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics and samples (a rerun resumes)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--init-from", help="a model checkpoint (e.g. a converted official one) to fine-tune")


def check_run_config(config, need_data: bool = True) -> None:
    """Refuses a run config that would fail late or train nonsense: sizes below their minimum,
    a sequence longer than the model's positions, and (`need_data`) no training data or data paths
    that match nothing."""
    for key, least in _MINIMUM.items():
        group, name = key.split(".")
        value = config[group].get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise UsageError(f"--config.{key}={value!r}: must be an integer >= {least}")
    for key, (low, high, low_ok) in _RANGE.items():
        group, name = key.split(".")
        value = config[group].get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                (value >= low if low_ok else value > low) and value <= high):
            bound = f"{'>=' if low_ok else '>'} {low:g}" + (f" and <= {high:g}" if high != float("inf") else "")
            raise UsageError(f"--config.{key}={value!r}: must be a number {bound}")
    if config.data.seq_len > config.model.max_len:
        raise UsageError(f"--config.data.seq_len={config.data.seq_len}: longer than the model's "
                         f"{config.model.max_len} positions (model.max_len)")
    if not need_data:
        return
    if not config.data.paths:
        raise UsageError("--config.data.paths: no training data; give the shards `tokensynth prep` wrote, "
                         "e.g. --config.data.paths=DATA/train")
    for key in ("paths", "eval_paths"):
        for pattern in config.data[key]:
            if checks.is_local(pattern) and not (os.path.isdir(pattern) or glob.glob(pattern)):
                raise UsageError(f"--config.data.{key}: {pattern}: no such file, folder or match")


# What `tokensynth train` keeps in its --workdir (training/train.py, train_samples.py, checkpoint.py):
# True for a folder, False for a file. A file where a folder belongs (or the reverse) fails only when
# the run first writes there, after compiling and training, and Orbax then waits five minutes on a
# checkpoint folder it could not make; so it is named before anything runs.
WORKDIR_ENTRIES = {"checkpoints": True, "tensorboard": True, "samples": True, "metrics.jsonl": False, "run.json": False}


def check_workdir_entries(workdir: str, flag: str = "--workdir") -> None:
    """Refuses a local workdir whose entries are of the wrong kind (WORKDIR_ENTRIES)."""
    if not checks.is_local(workdir):
        return
    for name, is_dir in WORKDIR_ENTRIES.items():
        path = os.path.join(workdir, name)
        if os.path.exists(path) and os.path.isdir(path) != is_dir:
            raise UsageError(f"{flag} {workdir}: {name} is a {'file' if is_dir else 'folder'}; a run keeps a "
                             f"{'folder' if is_dir else 'file'} there (move it away, or use another --workdir)")


def _train(args) -> int:
    from tokensynth_jax.config import ModelConfig

    config = checks.load_config(args)
    checks.output_dir(args.workdir, "--workdir")
    check_workdir_entries(args.workdir)
    saved = os.path.join(args.workdir, "checkpoints")
    resuming = checks.is_local(args.workdir) and os.path.isdir(saved) and any(d.isdigit() for d in os.listdir(saved))
    run = checks.run_record(args.workdir, "--workdir") if resuming else None
    differ = checks.model_differences(config.model.to_dict(), run["model"]) if run else []
    if differ:  # the checkpoints hold the recorded model
        raise UsageError(f"--workdir {args.workdir}: {'; '.join(differ)} (its run.json); resume with the run's "
                         "model, or train in another --workdir")
    check_run_config(config)
    if args.init_from is not None:
        _, loaded = checks.model_checkpoint(args.init_from, "--init-from")
        from tokensynth_jax import checkpoint

        # Sizes only: a file cut short is named before the run begins; load_model checks the sha256
        # when it loads.
        problems = checkpoint.verify_model(args.init_from, checksums=False)
        if problems:
            raise UsageError(f"--init-from {args.init_from}: damaged checkpoint: {problems[0]}"
                             + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        cfg = ModelConfig.from_dict(config.model.to_dict())
        if loaded.replace(**cfg.runtime()) != cfg:  # as train.train compares them
            differ = checks.model_differences(loaded.to_dict(), cfg.to_dict(),
                                              "model.{key} is {given!r} there, {recorded!r} in the run's config")
            raise UsageError(f"--init-from {args.init_from}: its model differs from the run's: {'; '.join(differ)}")
    from tokensynth_jax.training import train

    _logging()
    # A new local --workdir that the run fails in before it saves a step (a loss that diverges
    # before the first checkpoint) is removed again; a resumed one, or one with steps, is kept.
    fresh = checks.is_local(args.workdir) and not os.path.exists(args.workdir)
    try:
        train.train(config, args.workdir, init_from=args.init_from)
    except UserError:
        from tokensynth_jax import checkpoint

        if fresh and not checkpoint.train_steps(os.path.join(args.workdir, "checkpoints")):
            shutil.rmtree(args.workdir, ignore_errors=True)
        raise
    return 0


# --- compile-step --------------------------------------------------------------------------------------
def add_compile_step_parser(sub) -> None:
    p = checks.subcommand(sub, "compile-step", _compile_step, takes_config=True,
                          help="compile a config's sharded train step without running it, for a Cloud TPU slice "
                               "(from any host) or this host's devices: each device's memory, and whether it fits")
    p.add_argument("--config", required=True, help="as `train --config`; the step's sizes are data.global_batch, "
                   "data.seq_len, train.grad_accum and the mesh config.mesh")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--topology", help="a Cloud TPU topology, e.g. v5e:2x4, v5p:2x2x1, v6e:4x4 (needs libtpu: "
                   "pip install 'jax[tpu]'); default: this host's devices")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")


def _compile_step(args) -> int:
    import importlib.util

    from tokensynth_jax.training import plan

    config = checks.load_config(args)
    check_run_config(config, need_data=False)
    if args.topology is not None and importlib.util.find_spec("libtpu") is None:
        raise UsageError(f"--topology {args.topology}: compiling for a TPU slice needs libtpu, which is not "
                         "installed (pip install 'jax[tpu]')")
    plan.prepare_environment(args.topology)
    if args.topology is None:
        import jax

        devices, target = jax.devices(), "this host"
    else:
        from tokensynth_jax import compile_cache

        compile_cache.enable(None)  # a compile-only client cannot load executables from the persistent cache
        devices, target = plan.topology_devices(args.topology), args.topology
    result = plan.compile_train_step(config, devices, target)
    print(json.dumps(result.to_dict()) if args.json else "\n".join(result.lines()))
    return 0


# --- sweep ---------------------------------------------------------------------------------------------
def add_sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="scaling-law sweeps: IsoFLOP plan, local runs, fits and plots",
                       description="IsoFLOP sweeps over a model family: plan, run locally, fit (scaling/sweep.py).")
    steps = p.add_subparsers(dest="sweep_command", required=True, metavar="STEP")

    q = checks.subcommand(steps, "plan", _plan, takes_config=True,
                          help="an IsoFLOP plan: a table and one train command per run; "
                               "--config.a.b=value overrides go to every run")
    q.add_argument("--config", default="configs/family.py",
                   help="a family config taking depth=N (configs/family.py[:base=tiny])")
    q.add_argument("--budgets", type=checks.positive_floats, required=True,
                   help="compute budgets in FLOPs, e.g. 1e17,3e17,1e18")
    q.add_argument("--depths", type=checks.positive_ints, required=True,
                   help="family sizes to try at each budget, e.g. 4,6,8,10")
    q.add_argument("--workdir", required=True, help="root of the run directories (local or gs://)")
    q.add_argument("--out", required=True, help="where plan.json, plan.md and commands.sh go")
    q.add_argument("--launcher", help='a launch/ prefix, e.g. "python launch/tpu_vm.py --tpu T --zone Z --run"')
    q.add_argument("--min-steps", type=checks.positive_int, default=100, help="drop runs shorter than this")

    q = checks.subcommand(steps, "run", _run, help="train a plan's runs here, one after another (finished ones are skipped)")
    q.add_argument("plan", help="plan.json or its directory")
    q.add_argument("--only", nargs="+", metavar="NAME", help="just these runs")

    q = checks.subcommand(steps, "fit", _fit,
                          help="IsoFLOP minima and L(N, D) = E + A/N^a + B/D^b with bootstrap intervals; plots")
    q.add_argument("plan", help="plan.json or its directory")
    q.add_argument("--out", help="output directory (default: fit/ beside the plan)")
    q.add_argument("--workdir", help="where the run directories are, if not the plan's --workdir "
                   "(e.g. their metrics.jsonl copied down from a bucket)")
    q.add_argument("--loss", choices=["auto", "eval", "train"], default="auto",
                   help="final loss: held-out (eval), last training log (train), eval where present (auto)")
    q.add_argument("--bootstrap", type=checks.non_negative_int, default=200, help="resamples for the intervals (0: none)")
    q.add_argument("--level", type=checks.open_fraction, default=0.9, help="interval coverage, in (0, 1)")
    q.add_argument("--seed", type=checks.seed, default=0)


def check_family(spec: str, depths, overrides: dict) -> None:
    """Refuses a config whose `depth=N` does not change the model (a plan of identical runs).

    Each depth's config must load and give its own model; a single depth is compared with the next.
    """
    from tokensynth_jax.config import ConfigError, ModelConfig, load_config_file
    from tokensynth_jax.scaling.sweep import member_spec

    probe = sorted(set(depths))
    probe += [probe[-1] + 1] if len(probe) == 1 else []
    seen = {}
    for depth in probe:
        try:
            config = load_config_file(member_spec(spec, depth), overrides)
        except ConfigError as e:
            if "takes no argument" not in str(e):  # what the packaged configs other than family say
                raise
            raise UsageError(f"--config {spec}: not a model family: it takes no depth=N (use "
                             "configs/family.py[:base=...], whose depth=N sets the size)") from e
        key = json.dumps(ModelConfig.from_dict(config.model.to_dict()).to_dict(), sort_keys=True)
        if key in seen:
            raise UsageError(f"--config {spec}: not a model family: depth={seen[key]} and depth={depth} give the same "
                             "model (use configs/family.py[:base=...], whose depth=N sets the size)")
        seen[key] = depth


def _plan(args) -> int:
    from tokensynth_jax.scaling import sweep

    checks.output_dir(args.out, "--out")
    check_family(args.config, args.depths, args.config_overrides)
    from tokensynth_jax.config import load_config_file

    # Every run of the plan gets these overrides: a plan without training data trains nothing.
    check_run_config(load_config_file(sweep.member_spec(args.config, min(args.depths)), args.config_overrides))
    plan = sweep.plan_sweep(args.config, args.budgets, args.depths, args.workdir, overrides=args.config_overrides,
                            launcher=args.launcher, min_steps=args.min_steps)
    paths = sweep.write_plan(plan, args.out)
    print(sweep.plan_table(plan), end="")
    print(f"wrote {len(plan['runs'])} runs ({len(plan['skipped'])} skipped) to {', '.join(paths)}")
    return 0


def _run(args) -> int:
    from tokensynth_jax.scaling import sweep

    plan = sweep.read_plan(args.plan)
    unknown = sorted(set(args.only or ()) - {r["name"] for r in plan["runs"]})
    if unknown:
        raise UsageError(f"--only: no runs named {unknown} in {args.plan}")
    from tokensynth_jax.config import load_config_file

    for run in plan["runs"]:  # before the first run trains, as `tokensynth train` checks its own
        if not args.only or run["name"] in args.only:
            try:
                check_run_config(load_config_file(run["config"], run["overrides"]))
                checks.output_dir(run["workdir"], "workdir")
                check_workdir_entries(run["workdir"], "workdir")
            except UserError as e:
                raise UsageError(f"{args.plan}: run {run['name']}: {e}") from e
    _logging()
    done, diverged = sweep.run_sweep(plan, args.only)
    print(f"[sweep] trained {len(done)} runs: {' '.join(done) or '(all were finished)'}"
          + (f"; {len(diverged)} diverged: {' '.join(diverged)}" if diverged else ""))
    return 0


def _fit(args) -> int:
    from tokensynth_jax.scaling import sweep

    plan = sweep.read_plan(args.plan)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.plan)) if args.plan.endswith(".json")
                                   else args.plan, "fit")
    checks.output_dir(out, "--out")
    if args.workdir is not None:
        checks.input_dir(args.workdir, "--workdir")
    result = sweep.fit_sweep(plan, out, loss=args.loss, root=args.workdir, samples=args.bootstrap, level=args.level,
                             seed=args.seed)
    summary = {"runs": len(result["runs"]), "missing": result["missing"], "law": result["law"],
               "isoflop_n_opt": result["isoflop"]["n_opt"], "isoflop_d_opt": result["isoflop"]["d_opt"],
               "wrote": [os.path.join(out, n) for n in ("fit.json", *result["plots"])]}
    print(json.dumps(summary, indent=1))
    return 0
