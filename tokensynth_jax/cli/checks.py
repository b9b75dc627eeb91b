"""Checks of what a command line gives, run before anything loads; each fails with one line naming the flag or file.

Two kinds: argparse types (`positive_int`, `probability`, ...), so argparse itself names the flag
of a bad number, and checks of paths, config overrides and sampler options that a command calls
first, before it imports the heavy stack or loads a model. Nothing here imports JAX. `subcommand`
is the one way a cli module adds its parser, so every command carries the same defaults.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile

from tokensynth_jax.errors import UserError

SAMPLERS = ("greedy", "top-k", "top-p")
DEFAULT_TOP_P = 0.9  # the reference's nucleus


class UsageError(UserError):
    """A flag or path of the command line that cannot be used; the message names it."""


def subcommand(sub, name: str, run, *, help: str, takes_config: bool = False, **kwargs):
    """Adds subcommand `name` to the subparsers `sub`; `run(args) -> int` is what it does.

    Args:
      takes_config: the command reads `--config`, so `--config.a.b=value` overrides are its own
        (elsewhere they are an error instead of being ignored).
      kwargs: more ArgumentParser arguments (description, formatter_class).
    Returns:
      The new parser, for the command's flags.
    """
    p = sub.add_parser(name, help=help, **kwargs)
    p.set_defaults(run=run, prog=p.prog, takes_config=takes_config)
    return p


# --- argparse types: a ValueError-free ArgumentTypeError makes argparse say "argument --x: <why>" ---------
def _number(kind, text: str, ok, want: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"{text} is not {want}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def seed(text: str) -> int:
    """A random seed: 0 <= seed < 2**32, what every PRNG we seed (numpy, JAX, Beam's workers) accepts."""
    return _number(int, text, lambda v: 0 <= v < 2**32, "a seed in [0, 2**32)")


def finite_float(text: str) -> float:
    return _number(float, text, lambda v: True, "a finite number")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: v > 0, "a positive number")


def dbfs_ceiling(text: str) -> float:
    """A peak level in dBFS: at most 0 (full scale)."""
    return _number(float, text, lambda v: v <= 0, "a level in dBFS, at most 0")


def probability(text: str) -> float:
    """A top-p mass: 0 < p <= 1."""
    return _number(float, text, lambda v: 0 < v <= 1, "in (0, 1]")


def unit_weight(text: str) -> float:
    """A blend weight: 0 <= a <= 1."""
    return _number(float, text, lambda v: 0 <= v <= 1, "in [0, 1]")


def open_fraction(text: str) -> float:
    """An interval coverage: 0 < x < 1."""
    return _number(float, text, lambda v: 0 < v < 1, "in (0, 1)")


def _list_of(item, text: str) -> list:
    values = [item(t.strip()) for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} lists nothing")
    return values


def positive_ints(text: str) -> list[int]:
    """Comma-separated positive integers, e.g. 4,6,8."""
    return _list_of(positive_int, text)


def non_negative_ints(text: str) -> list[int]:
    """Comma-separated integers >= 0, e.g. 0,40,73."""
    return _list_of(non_negative_int, text)


def gm_programs(text: str) -> tuple[int, ...]:
    """"0,40" -> General MIDI programs: each 0-127, none twice (a repeat names one instrument twice)."""
    values = tuple(non_negative_ints(text))
    bad = sorted({v for v in values if v > 127})
    if bad:
        raise argparse.ArgumentTypeError(f"{text!r}: GM programs are 0-127, not {bad[0]}")
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{text!r}: program {twice[0]} is listed twice")
    return values


def positive_floats(text: str) -> list[float]:
    """Comma-separated positive numbers, e.g. 1e17,3e17."""
    return _list_of(positive_float, text)


# --- paths ----------------------------------------------------------------------------------------------
def is_local(path: str) -> bool:
    """False for a filesystem URL (gs://, s3://, ...), whose checks are left to the job that reads it."""
    return "://" not in path


def input_file(path: str, flag: str) -> str:
    """An existing file (not a directory)."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a directory, not a file")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file")
    return path


def input_dir(path: str, flag: str) -> str:
    """An existing directory."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a file, not a directory")
    if not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: no such directory")
    return path


def output_dir(path: str, flag: str) -> str:
    """A directory that a resumable job (prep, train, sweep) creates or continues: anything but a file."""
    if is_local(path):
        if os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f"{flag} {path}: is a file; give a directory")
        writable_location(path, flag)
    return path


def writable_location(path: str, flag: str) -> None:
    """Checks, before any work, that `path` can be created: its nearest existing ancestor must be a
    writable directory (a file there, or a read-only folder, would fail only when the result is written)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: {parent} is a file, not a directory")
    try:  # a real write: os.access says yes to root on read-only and virtual file systems
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {parent} ({e.strerror})") from e


def model_checkpoint(path: str, flag: str):
    """(metadata, ModelConfig) of a tokensynth-jax model checkpoint, from its JSON alone."""
    from tokensynth_jax.checkpoint_meta import META_FILE, CheckpointError, read_metadata
    from tokensynth_jax.config import ConfigError, ModelConfig

    if not os.path.isdir(path):
        why = "a file" if os.path.exists(path) else "no such directory"
        raise UsageError(f"{flag} {path}: not a tokensynth-jax checkpoint ({why})")
    try:
        meta = read_metadata(path)
    except CheckpointError as e:
        raise UsageError(f"{flag} {e}") from e
    try:
        return meta, ModelConfig.from_dict(meta["model"])
    except ConfigError as e:  # the file's, not a flag's: say which file
        raise UsageError(f"{flag} {os.path.join(path, META_FILE)}: {e}") from e


# --- configs --------------------------------------------------------------------------------------------
def set_overrides(values) -> dict:
    """`--set KEY=VALUE` arguments -> {KEY: VALUE}."""
    out = {}
    for kv in values or ():
        key, eq, value = kv.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--set {kv}: expected KEY=VALUE, e.g. --set model.num_layers=2")
        out[key.strip()] = value
    return out


def runtime_overrides(values, cfg) -> dict:
    """`--set model.KEY=VALUE` for a checkpoint's model (synthesize): only its runtime fields
    (`config.RUNTIME_FIELDS`: how it computes, not its parameters, e.g. model.decode_attention), the
    text read as a config override reads it (as the type of the field's default: a number for
    dropout, the text itself for the "auto" fields, which ModelConfig reads) and checked by building
    the config. -> {KEY: value}."""
    import dataclasses

    from tokensynth_jax.config import RUNTIME_FIELDS, ConfigError, ModelConfig, coerce_override

    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    out = {}
    for key, text in set_overrides(values).items():
        name = key.removeprefix("model.")
        if not key.startswith("model.") or name not in RUNTIME_FIELDS:
            raise UsageError(f"--set {key}: a checkpoint's weights fix its other fields; these can be set: "
                             + ", ".join(f"model.{f}" for f in RUNTIME_FIELDS))
        out[name] = coerce_override(text, defaults[name], key, flag="--set ")
    try:
        cfg.replace(**out)
    except ConfigError as e:
        raise UsageError(f"--set: {e}") from None
    return out


def load_config(args):
    """`--config` with the `--set` and `--config.a.b=value` overrides, its model block checked.

    Raises:
      ConfigError (a UserError): no such config, an unknown field, a value of the wrong type, or a
      model config that cannot be built (e.g. heads that do not divide the width).
    """
    from tokensynth_jax.config import ModelConfig, apply_overrides, load_config_file, resolve_config_path

    # --set first, then --config.a.b=value (which wins); each error names the flag it came from.
    config = load_config_file(args.config, set_overrides(getattr(args, "set", ())), flag="--set ")
    config = apply_overrides(config, args.config_overrides, resolve_config_path(args.config.partition(":")[0]))
    ModelConfig.from_dict(config.model.to_dict())
    return config


# --- samplers -------------------------------------------------------------------------------------------
def add_sampler_flags(p) -> None:
    """--sampler, --top-k, --top-p and --temperature (synthesize and export)."""
    p.add_argument("--sampler", choices=SAMPLERS, default="top-p")
    p.add_argument("--top-k", type=positive_int, help="ids kept per channel (--sampler top-k)")
    p.add_argument("--top-p", type=probability, help=f"probability mass kept, 0 < P <= 1 (--sampler top-p; default {DEFAULT_TOP_P})")
    p.add_argument("--temperature", type=positive_float, help="logit divisor of top-k and top-p (default 1)")


def check_sampler_flags(args) -> None:
    """Refuses a sampler option that the chosen sampler would ignore, and a missing --top-k."""
    used = {"--top-k": args.top_k, "--top-p": args.top_p, "--temperature": args.temperature}
    ignored = {"greedy": ("--top-k", "--top-p", "--temperature"), "top-k": ("--top-p",), "top-p": ("--top-k",)}
    for flag in ignored[args.sampler]:
        if used[flag] is not None:
            raise UsageError(f"{flag} {used[flag]}: --sampler {args.sampler} does not use it "
                             f"(--top-k goes with --sampler top-k, --top-p with top-p, --temperature with both)")
    if args.sampler == "top-k" and args.top_k is None:
        raise UsageError("--sampler top-k needs --top-k K")


def check_top_k(args, cfg) -> None:
    """Refuses a --top-k that every channel's vocabulary is within (it would filter nothing)."""
    largest = max(cfg.midi_vocab_size, cfg.codebook_vocab_size)
    if args.sampler == "top-k" and args.top_k is not None and args.top_k >= largest:
        raise UsageError(f"--top-k {args.top_k}: keeps every id (the model's channels have at most {largest}); "
                         "use --sampler top-p 1 or a smaller K")


def make_sampler(args):
    """The sampling.Greedy / TopK / TopP that the checked sampler flags name."""
    from tokensynth_jax.inference import sampling

    check_sampler_flags(args)
    temperature = 1.0 if args.temperature is None else args.temperature
    if args.sampler == "greedy":
        return sampling.Greedy()
    if args.sampler == "top-k":
        return sampling.TopK(args.top_k, temperature)
    return sampling.TopP(DEFAULT_TOP_P if args.top_p is None else args.top_p, temperature)


# --- a training run's record -----------------------------------------------------------------------------
def run_record(workdir: str, flag: str = "WORKDIR") -> dict | None:
    """WORKDIR/run.json, which `tokensynth train` writes once a run has started (its model and codec),
    or None where there is none."""
    path = os.path.join(workdir, "run.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            run = json.load(f)
        dict(run["model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{flag} {workdir}: run.json is unreadable ({type(e).__name__}: {e})") from e
    return run


def model_differences(given: dict, recorded: dict,
                      form: str = "model.{key} is {given!r}, the run trained {recorded!r}") -> list[str]:
    """The model fields, other than those a run may change (config.RUNTIME_FIELDS), in which `given`
    differs from `recorded` (a run's record, or the run's own config): one `form` line each."""
    from tokensynth_jax.config import RUNTIME_FIELDS

    return [form.format(key=k, given=given.get(k), recorded=v) for k, v in sorted(recorded.items())
            if k not in RUNTIME_FIELDS and given.get(k) != v]
