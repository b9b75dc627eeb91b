"""Model checkpoints: an Orbax directory of parameters plus a small JSON of the model config.

Layout of a checkpoint directory:
    DIR/tokensynth.json   format name + version, the ModelConfig, free-form metadata
    DIR/params/           Orbax PyTree checkpoint of the parameters (a nested dict of arrays)

This is the only module that imports Orbax. Restores go into an abstract, sharded target, so a
checkpoint lands sharded on whatever mesh the reader has, whatever mesh wrote it.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from tokensynth_jax import sharding
from tokensynth_jax.checkpoint_meta import (  # noqa: F401  (the checkpoint API: re-exported)
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    PARAMS_DIR,
    CheckpointError,
    read_metadata,
)
from tokensynth_jax.config import ModelConfig
from tokensynth_jax.model.transformer import TokenSynth


def _sharded_target(abstract_state: nnx.State, shardings: nnx.State) -> dict:
    """The restore target: a pure dict of shapes and dtypes carrying where each array lands."""
    return jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        nnx.to_pure_dict(abstract_state),
        nnx.to_pure_dict(shardings),
    )


def _shapes_by_name(tree) -> dict[str, tuple[int, ...]]:
    """Leaf name ('blocks.0.attn.key.bias') -> shape, for a target, a state or Orbax metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {
        ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(getattr(v, "shape", ()))
        for path, v in leaves if v is not None
    }


def _check_keys(where: str, saved_tree, target) -> None:
    """Strict loading: every saved leaf must be expected and every expected leaf saved, same shape.

    Orbax stops at the first mismatch (and a partial restore would silently skip extra keys);
    this lists all of them, so a wrong config or a truncated checkpoint is one readable error.
    """
    saved, expected = _shapes_by_name(saved_tree), _shapes_by_name(target)
    problems = [f"unexpected key {k} {s}" for k, s in saved.items() if k not in expected]
    problems += [f"missing key {k} {s}" for k, s in expected.items() if k not in saved]
    problems += [f"shape mismatch {k}: saved {saved[k]}, expected {s}"
                 for k, s in expected.items() if k in saved and saved[k] != s]
    if problems:
        raise CheckpointError(f"{where}:\n  " + "\n  ".join(problems))


def _abstract_model(cfg: ModelConfig, mesh: Mesh):
    """(graphdef, abstract param state, sharded restore target) of a model for `cfg` on `mesh`."""
    abstract = nnx.eval_shape(lambda: TokenSynth(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    return graphdef, abstract_state, _sharded_target(abstract_state, sharding.state_shardings(abstract_state, mesh))


def save_model(directory: str | os.PathLike, cfg: ModelConfig, params: Any, metadata: dict | None = None):
    """Writes `params` (an nnx.State or a nested dict of arrays) and the config to `directory`."""
    directory = os.path.abspath(os.fspath(directory))
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    os.makedirs(directory, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, PARAMS_DIR), params, force=True)
    checkpointer.wait_until_finished()
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "model": cfg.to_dict(), "metadata": metadata or {}}
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)



def load_model(
    directory: str | os.PathLike, mesh: Mesh | None = None, *, override: dict | None = None
) -> tuple[TokenSynth, dict]:
    """Restores a model, sharded on `mesh` (default: all local devices on the data axis).

    Args:
      directory: a checkpoint written by `save_model`.
      mesh: where the parameters land.
      override: config fields to change that do not change parameter shapes (e.g. dtype).
    Returns:
      (model, metadata dict of the checkpoint).
    """
    meta = read_metadata(directory)
    cfg = ModelConfig.from_dict({**meta["model"], **(override or {})})
    mesh = mesh or sharding.make_mesh({"data": -1})
    graphdef, abstract_state, target = _abstract_model(cfg, mesh)
    path = os.path.join(os.path.abspath(os.fspath(directory)), PARAMS_DIR)
    if not os.path.isdir(path):
        raise CheckpointError(f"{directory}: no parameters ({PARAMS_DIR}/ is missing)")
    checkpointer = ocp.StandardCheckpointer()
    try:
        _check_keys(f"{directory}: parameters do not match the config in {META_FILE}",
                    checkpointer.metadata(path).item_metadata.tree, target)
        restored = checkpointer.restore(path, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{directory}: parameters do not match the config in {META_FILE}: {e}") from e
    nnx.replace_by_pure_dict(abstract_state, restored)
    return nnx.merge(graphdef, abstract_state), meta


def params_to_numpy(model: TokenSynth) -> dict:
    """The parameters as a nested dict of host numpy arrays (for converters and exports)."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


class TrainCheckpointer:
    """Train state and grain iterator saved together, so a resume replays the exact data order.

    Async saves; keeps the last `max_to_keep` plus every step divisible by `keep_period`.
    Restores land sharded: the target is an abstract state carrying the shardings.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, keep_period: int | None = None,
                 async_save: bool = True):
        import grain  # only the trainer needs grain; inference checkpoints do not

        self._grain = grain
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, keep_period=keep_period, enable_async_checkpointing=async_save, create=True,
        )
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.fspath(directory)), options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: nnx.State, data_iterator, *, force: bool = False) -> bool:
        """Starts an async save of (state, iterator) at `step`; returns whether one was started."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
                data=self._grain.checkpoint.CheckpointSave(data_iterator),
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state: nnx.State, shardings: nnx.State, data_iterator) -> nnx.State:
        """Restores `step` into a sharded copy of `abstract_state`; sets `data_iterator`'s position."""
        target = _sharded_target(abstract_state, shardings)
        _check_keys(f"{self.manager.directory}/{step}: train state does not match the run's model and optimizer",
                    self._saved_state_tree(step), target)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                data=self._grain.checkpoint.CheckpointRestore(data_iterator),
            ),
        )
        state = jax.tree.map(lambda x: x, abstract_state)
        nnx.replace_by_pure_dict(state, restored["state"])
        return state

    def _reader(self) -> ocp.CheckpointManager:
        """A second manager on the same directory whose "state" handler takes metadata reads and
        partial restores (the writer's handler is fixed to full StandardRestores on first use)."""
        return ocp.CheckpointManager(self.manager.directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()})

    def _saved_state_tree(self, step: int) -> dict:
        """The saved train state's tree of array metadata (names and shapes, no values)."""
        reader = self._reader()
        try:
            return reader.item_metadata(step)["state"].tree
        finally:
            reader.close()

    def restore_params(self, step: int | None, cfg: ModelConfig, mesh: Mesh | None = None) -> tuple[TokenSynth, int]:
        """The model of a saved train state, sharded on `mesh`, without reading the optimizer state.

        Args:
          step: the step to read (None: the newest).
          cfg: the run's model config (a train checkpoint stores the state, not the config).
          mesh: where the parameters land (default: all local devices on the data axis).
        Returns:
          (model, step).
        """
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise CheckpointError(f"{self.manager.directory}: no train checkpoint at step {step} "
                                  f"(have {sorted(self.manager.all_steps())})")
        graphdef, abstract_state, target = _abstract_model(cfg, mesh or sharding.make_mesh({"data": -1}))
        # The train state is the pure dict of nnx.state((model, optimizer)): the model is entry 0.
        _check_keys(f"{self.manager.directory}/{step}: parameters do not match the model config",
                    self._saved_state_tree(step).get("0"), target)
        reader = self._reader()
        try:
            restored = reader.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item={0: target}, restore_args=ocp.checkpoint_utils.construct_restore_args({0: target}),
                partial_restore=True,
            )))
        finally:
            reader.close()
        nnx.replace_by_pure_dict(abstract_state, restored["state"][0])
        return nnx.merge(graphdef, abstract_state), step

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()
