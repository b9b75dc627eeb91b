"""Checkpoints for people without this package: `model.safetensors` + `config.json`.

The tensors keep our own layout (Dense kernels [in..., out...], attention kernels split per
head), named by their path in the parameter tree joined with dots (`blocks.0.attn.query.kernel`).
docs/checkpoint_format.md lists every name and shape. The same flat names key the parameters of
the exported generation function (export.py), so one naming serves both.

Loading is strict: every missing, unexpected or mis-shaped tensor is listed in one error that
names the file. `safetensors` is imported lazily, only by the functions that read or write it.
"""
from __future__ import annotations

import json
import os
import stat
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from tokensynth_jax import versioned_json
from tokensynth_jax.config import ModelConfig
from tokensynth_jax.interop.convert import ConversionError
from tokensynth_jax.model.transformer import abstract_model

FORMAT = "tokensynth-jax-safetensors"
FORMAT_VERSION = 1
TENSORS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class SafetensorsFormatError(ConversionError):
    """A safetensors checkpoint that is missing, unreadable, or does not match its config."""


def _name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_structure(cfg: ModelConfig) -> tuple[list[str], Any, dict[str, tuple[tuple[int, ...], np.dtype]]]:
    """(flat names in tree order, treedef of the nested parameter dict, name -> (shape, dtype)).

    Read off the model built abstractly (`nnx.eval_shape`), so the names follow the code.
    """
    abstract = abstract_model(cfg)
    pure = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
    names = [_name(path) for path, _ in leaves]
    specs = {n: (tuple(x.shape), np.dtype(x.dtype)) for n, (_, x) in zip(names, leaves)}
    return names, treedef, specs


def flatten_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A nested parameter dict (as `checkpoint.params_to_numpy` returns) -> {dotted name: array}."""
    leaves = jax.tree_util.tree_flatten_with_path(dict(params))[0]
    return {_name(path): np.asarray(x) for path, x in leaves}


def check_tensors(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raises SafetensorsFormatError listing every missing, unexpected or mis-shaped tensor."""
    _, _, specs = param_structure(cfg)
    problems = [f"unexpected tensor {n} {tuple(s)}" for n, s in shapes.items() if n not in specs]
    problems += [
        f"shape mismatch {n}: {tuple(s)}, expected {specs[n][0]}"
        for n, s in shapes.items() if n in specs and tuple(s) != specs[n][0]
    ]
    problems += [f"missing tensor {n} {specs[n][0]}" for n in specs if n not in shapes]
    if problems:
        raise SafetensorsFormatError(f"{source}: tensors do not match {CONFIG_FILE}:\n  " + "\n  ".join(problems))


def unflatten_params(cfg: ModelConfig, flat: Mapping[str, Any], source: str = "parameters") -> dict:
    """{dotted name: array} -> the nested parameter dict of a model of `cfg` (strict)."""
    check_tensors(cfg, {n: np.shape(x) for n, x in flat.items()}, source)
    names, treedef, _ = param_structure(cfg)
    return jax.tree.unflatten(treedef, [flat[n] for n in names])


def save(directory: str | os.PathLike, cfg: ModelConfig, params: Mapping[str, Any], metadata: dict | None = None):
    """Writes DIR/model.safetensors (flat names) and DIR/config.json (format, model config, metadata)."""
    from safetensors.numpy import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    flat = flatten_params(params)
    check_tensors(cfg, {n: x.shape for n, x in flat.items()}, "parameters to save")
    # bfloat16 (`model.param_dtype`) is ml_dtypes' numpy type, which safetensors >= 0.8 writes as BF16
    # and reads back as such.
    unsupported = sorted({str(x.dtype) for x in flat.values()} - {"float32", "float16", "float64", "bfloat16"})
    if unsupported:
        raise SafetensorsFormatError(f"{directory}: parameters of dtype {unsupported} have no safetensors type here")
    tensors = os.path.join(directory, TENSORS_FILE)
    save_file({n: np.ascontiguousarray(x) for n, x in flat.items()}, tensors,
              metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
    config = {"format": FORMAT, "version": FORMAT_VERSION, "tensors_file": TENSORS_FILE,
              "model": cfg.to_dict(), "metadata": metadata or {}}
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    # safetensors >= 0.8 writes through a private temporary file, which leaves the tensors 0600: a
    # file written to be shared gets the mode the umask gives a new file, as config.json has.
    os.chmod(tensors, stat.S_IMODE(os.stat(os.path.join(directory, CONFIG_FILE)).st_mode))


def read_config(directory: str | os.PathLike) -> dict:
    """DIR/config.json, checked to be ours; raises SafetensorsFormatError naming the file."""
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    if not os.path.isfile(path):
        raise SafetensorsFormatError(f"{directory}: not a tokensynth-jax safetensors checkpoint (no {CONFIG_FILE})")
    return versioned_json.read(path, what="tokensynth-jax safetensors checkpoint", fmt=FORMAT,
                               version=FORMAT_VERSION, error=SafetensorsFormatError)


def load(directory: str | os.PathLike) -> tuple[ModelConfig, dict, dict]:
    """Reads a checkpoint written by `save`; returns (config, nested numpy params, metadata)."""
    from safetensors import SafetensorError, safe_open

    config = read_config(directory)
    try:
        cfg = ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise SafetensorsFormatError(f"{os.path.join(directory, CONFIG_FILE)}: bad model config ({e})") from e
    path = os.path.join(os.fspath(directory), config.get("tensors_file", TENSORS_FILE))
    if not os.path.isfile(path):
        raise SafetensorsFormatError(f"{path}: no such file")
    try:
        with safe_open(path, framework="numpy") as f:
            # Shapes first (header only), so a mismatch is reported before any tensor is read.
            check_tensors(cfg, {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}, path)
            flat = {n: f.get_tensor(n) for n in f.keys()}
    except SafetensorError as e:
        raise SafetensorsFormatError(f"{path}: not a readable safetensors file ({e})") from e
    metadata = config.get("metadata", {})
    if not isinstance(metadata, dict):  # a checkpoint's metadata is an object (checkpoint_meta reads it so)
        raise SafetensorsFormatError(f"{os.path.join(directory, CONFIG_FILE)}: metadata is {metadata!r:.60}, "
                                     "not an object")
    return cfg, unflatten_params(cfg, flat, path), metadata
