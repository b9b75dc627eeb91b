"""Model checkpoints: an Orbax directory of parameters plus a small JSON of the model config.

Layout of a checkpoint directory:
    DIR/tokensynth.json   format name + version, the ModelConfig, free-form metadata, and the
                          size and sha256 of every file under params/ ("files")
    DIR/params/           Orbax PyTree checkpoint of the parameters (a nested dict of arrays)

A train checkpoint step (`TrainCheckpointer`) holds `tokensynth_files.json`, the same list for its
state and data-iterator files. Both lists are written once the files are complete, so a damaged
file is found, and named, before Orbax or grain reads it; checkpoints written before the lists
existed are checked by reading every array instead (see `verify`).

This is the only module that imports Orbax. Restores go into an abstract, sharded target, so a
checkpoint lands sharded on whatever mesh the reader has, whatever mesh wrote it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from tokensynth_jax import integrity, sharding
from tokensynth_jax.checkpoint_meta import (  # noqa: F401  (the checkpoint API: re-exported)
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    PARAMS_DIR,
    CheckpointError,
    read_metadata,
)
from tokensynth_jax.config import ConfigError, ModelConfig
from tokensynth_jax.model.transformer import TokenSynth, abstract_model

STEP_FILE_LIST = "tokensynth_files.json"  # in each train checkpoint step
# Orbax writes these after the file list (the commit time and marker), so the list leaves them out.
_WRITTEN_AT_COMMIT = ("_CHECKPOINT_METADATA", "commit_success.txt")
DAMAGED_SUFFIX = ".damaged"  # a damaged step moved aside: not a step name, so Orbax ignores it

log = logging.getLogger("tokensynth.checkpoint")


class _MissingMetadataNoise(logging.Filter):
    """Drops Orbax's "Metadata file does not exist" warning (through absl), which it logs when it
    lists the steps of a directory holding a damaged one: the file checks here name that step and
    what is missing in the error or warning that follows, so the line only doubled the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Metadata file does not exist" not in record.getMessage()


logging.getLogger("absl").addFilter(_MissingMetadataNoise())


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
    abstract = abstract_model(cfg)
    graphdef, abstract_state = nnx.split(abstract)
    return graphdef, abstract_state, _sharded_target(abstract_state, sharding.state_shardings(abstract_state, mesh))


def save_model(directory: str | os.PathLike, cfg: ModelConfig, params: Any, metadata: dict | None = None):
    """Writes `params` (an nnx.State or a nested dict of arrays) and the config to `directory`."""
    directory = os.path.abspath(os.fspath(directory))
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    os.makedirs(directory, exist_ok=True)
    # Closing waits for the writer threads even when the save is interrupted (Ctrl-C): a caller's
    # cleanup of a half-written folder must not race threads that still write into it.
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, PARAMS_DIR), params, force=True)
    files = integrity.list_files(os.path.join(directory, PARAMS_DIR))
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "model": cfg.to_dict(), "metadata": metadata or {},
            "files": {f"{PARAMS_DIR}/{rel}": entry for rel, entry in files.items()}}
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
    try:
        cfg = ModelConfig.from_dict({**meta["model"], **(override or {})})
    except ConfigError as e:
        raise CheckpointError(f"{os.path.join(os.fspath(directory), META_FILE)}: {e}") from e
    mesh = mesh or sharding.make_mesh({"data": -1})
    graphdef, abstract_state, target = _abstract_model(cfg, mesh)
    path = os.path.join(os.path.abspath(os.fspath(directory)), PARAMS_DIR)
    if not os.path.isdir(path):
        raise CheckpointError(f"{directory}: no parameters ({PARAMS_DIR}/ is missing)")
    # Sizes and sha256 (~0.5 s for the reference model's 700 MB): a missing, cut or changed file is
    # named here, not deep in Orbax, whose errors for changed bytes come from tensorstore's threads.
    # No "files" at all: written before file lists, loaded as it is; any other value is checked
    # (an explicit null is a damaged list, not an old checkpoint).
    problems = integrity.check_files(directory, meta["files"], checksums=True) if "files" in meta else []
    if problems:
        raise CheckpointError(f"{directory}: damaged checkpoint: {problems[0]}"
                              + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    checkpointer = ocp.StandardCheckpointer()
    try:
        _check_keys(f"{directory}: parameters do not match the config in {META_FILE}",
                    checkpointer.metadata(path).item_metadata.tree, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{directory}: parameters do not match the config in {META_FILE}: {e}") from e
    try:
        with _unreadable_as_checkpoint_error(directory):
            restored = checkpointer.restore(path, target)
    finally:
        checkpointer.close()  # lets the reads still in flight after a failed one finish before exit
    nnx.replace_by_pure_dict(abstract_state, restored)
    return nnx.merge(graphdef, abstract_state), meta


def params_to_numpy(model: TokenSynth) -> dict:
    """The parameters as a nested dict of host numpy arrays (for converters and exports)."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


@contextlib.contextmanager
def _unreadable_as_checkpoint_error(where):
    """Array data that sizes cannot vouch for (same length, other bytes) fails only when Orbax
    reads it, as a bare Exception wrapping tensorstore's error: one line naming the checkpoint."""
    try:
        yield
    except Exception as e:  # Orbax and tensorstore raise many types for damaged data
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise CheckpointError(f"{where}: parameters unreadable ({_first_line(cause)[:300]}); "
                              f"`tokensynth checkpoint verify {where}` checks every file") from e


def _ignore_late_callbacks_to_a_closed_loop() -> None:
    """After a failed Orbax read, tensorstore completes the reads still in flight and hands their
    results to Orbax's event loop, which is closed by then: each raises "Event loop is closed" in
    a tensorstore thread, and Python printed those as tracebacks after our one-line error. The
    failure itself is reported by the read; these add nothing, so the hook drops exactly them."""
    previous = sys.unraisablehook
    if getattr(previous, "ignores_closed_loop", False):
        return

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook.ignores_closed_loop = True
    sys.unraisablehook = hook


def _read_every_array(root: epath.Path, rel: str) -> list[str]:
    """Reads every array of the Orbax PyTree at `root/rel` to host numpy: a truncated or missing
    array file fails the read. The check of checkpoints that carry no file list."""
    path = root / rel
    if not (path / "_METADATA").is_file():
        return [f"{rel}/_METADATA is missing"]
    _ignore_late_callbacks_to_a_closed_loop()
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        tree = checkpointer.metadata(path).item_metadata.tree
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    except Exception as e:  # Orbax and tensorstore raise many types (ValueError, OSError, ...) for damage
        return [f"{rel}: arrays unreadable ({_first_line(e)})"]
    finally:
        checkpointer.close()
    return []


def _check_iterator_files(step_dir: epath.Path) -> list[str]:
    """The grain data-iterator files of a train step: one JSON per writing process, all present."""
    names = [p.name for p in (step_dir / "data").glob("process_*-of-*.json")]
    if not names:
        return ["data/process_*-of-*.json is missing (no data-iterator file)"]
    count = int(re.fullmatch(r"process_\d+-of-(\d+)\.json", names[0])[1])
    problems = [f"data/process_{i}-of-{count}.json is missing" for i in range(count)
                if f"process_{i}-of-{count}.json" not in names]
    for name in names:
        try:
            json.loads((step_dir / "data" / name).read_text())
        except ValueError as e:
            problems.append(f"data/{name} is not readable JSON ({e})")
    return problems


def verify_train_step(step_dir: str | os.PathLike, *, checksums: bool = True) -> list[str]:
    """Problems of one saved train step, one line each naming a file relative to the step.

    With a file list: every listed file is there with its size (and sha256 with `checksums`), and
    so is Orbax's step metadata, which Orbax rewrites at commit. Without one (written by an older
    version): the step metadata and the data-iterator files are there and every array reads.

    Returns:
      The problems; empty when the step is intact.
    """
    step_dir = epath.Path(step_dir)
    if not step_dir.is_dir():
        return [f"{step_dir} is missing"]
    try:
        files = integrity.read_file_list(step_dir, STEP_FILE_LIST)
    except ValueError as e:
        return [str(e)]
    problems = [] if files is None else integrity.check_files(step_dir, files, checksums=checksums)
    if not (step_dir / "_CHECKPOINT_METADATA").is_file():
        problems.append("_CHECKPOINT_METADATA is missing")
    if files is None:
        problems += _check_iterator_files(step_dir)
        problems += [] if problems else _read_every_array(step_dir, "state")
    return problems


def verify_model(directory: str | os.PathLike, *, checksums: bool = True) -> list[str]:
    """Problems of a model checkpoint (`save_model`), one line each naming a file in it.

    Raises:
      CheckpointError: `directory` is not a model checkpoint (no readable tokensynth.json).
    """
    directory = os.fspath(directory)
    meta = read_metadata(directory)
    if "files" not in meta:  # written before file lists: read every array
        return _read_every_array(epath.Path(directory), PARAMS_DIR)
    return integrity.check_files(directory, meta["files"], checksums=checksums)


def train_steps(checkpoint_dir: str | os.PathLike) -> list[int]:
    """The committed steps of a train checkpoint directory, newest first (no Orbax manager: read only)."""
    checkpoint_dir = epath.Path(checkpoint_dir)
    found = checkpoint_dir.iterdir() if checkpoint_dir.is_dir() else []
    return sorted((int(p.name) for p in found if p.name.isdigit() and p.is_dir()), reverse=True)


def verify(path: str | os.PathLike, *, checksums: bool = True) -> list[tuple[str, list[str]]]:
    """Checks a model checkpoint, a training workdir or its checkpoints/ folder, offline.

    Returns:
      (what, problems) per checkpoint: "model" for a model checkpoint, "step N" per train step,
      newest first.

    Raises:
      CheckpointError: `path` is none of these, or holds no checkpoint.
    """
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, META_FILE)):
        return [("model", verify_model(path, checksums=checksums))]
    ckpt_dir = epath.Path(path) / "checkpoints"
    ckpt_dir = ckpt_dir if ckpt_dir.is_dir() else epath.Path(path)
    steps = train_steps(ckpt_dir)
    if not steps:
        raise CheckpointError(f"{path}: neither a model checkpoint ({META_FILE}) nor a training workdir "
                              "with saved steps (checkpoints/N/)")
    return [(f"step {s}", verify_train_step(ckpt_dir / str(s), checksums=checksums)) for s in steps]


class TrainCheckpointer:
    """Train state and grain iterator saved together, so a resume replays the exact data order.

    Async saves; keeps the last `max_to_keep` plus every step divisible by `keep_period`. Each step
    gets a file list (`STEP_FILE_LIST`) written after every process has written its files and
    before Orbax commits the step, so a committed step always has one. `restore_latest` checks
    steps against it and falls back past damaged ones. Restores land sharded: the target is an
    abstract state carrying the shardings.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, keep_period: int | None = None,
                 async_save: bool = True, checksums: bool = True):
        """`checksums`: sha256 of every file in the file lists and checked on resume (else sizes only:
        a stat per file, for checkpoints too large to read back at every save)."""
        import grain  # only the trainer needs grain; inference checkpoints do not

        self._grain = grain
        self.checksums, self._async, self._saving = checksums, async_save, None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, keep_period=keep_period, enable_async_checkpointing=async_save, create=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_file_list) if async_save else None,
        )
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.fspath(directory)), options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _step_dir(self, step: int) -> epath.Path:
        return epath.Path(self.manager.directory) / str(step)

    def _write_file_list(self) -> None:
        """Orbax's post-finalisation callback: on the primary process, once every process has written
        step `_saving`, before the temporary directory is renamed into place (object stores have
        no rename and write in place)."""
        final = self._step_dir(self._saving)
        tmp = final.with_name(final.name + ocp.utils.TMP_DIR_SUFFIX)
        root = tmp if tmp.is_dir() else final
        integrity.write_file_list(root, STEP_FILE_LIST, checksums=self.checksums, exclude=_WRITTEN_AT_COMMIT)

    def save(self, step: int, state: nnx.State, data_iterator, *, force: bool = False) -> bool:
        """Starts an async save of (state, iterator) at `step`; returns whether one was started."""
        # One save at a time (Orbax's save waits here too), so the callback knows which step it ends.
        self.manager.wait_until_finished()
        self._saving = step
        started = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
                data=self._grain.checkpoint.CheckpointSave(data_iterator),
            ),
            force=force,
        )
        if started and not self._async and jax.process_index() == 0:
            self._write_file_list()  # a synchronous save has committed already
        return started

    def restore_latest(self, abstract_state: nnx.State, shardings: nnx.State, data_iterator, *,
                       require_latest: bool = False) -> tuple[nnx.State, int] | None:
        """Restores the newest intact step (see `restore`); None when nothing was saved yet.

        Process 0 checks the steps, newest first (`verify_train_step`), logs one line per damaged
        step naming the step and the file, and moves each one aside (to `N.damaged`, so Orbax
        neither restores nor overwrites it); every process restores the step it chose.

        Args:
          require_latest: refuse to fall back: a damaged newest step is an error.
        Raises:
          CheckpointError: no step is intact, or the newest is damaged and `require_latest` is set.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        chosen, error = -1, None
        if jax.process_index() == 0:
            chosen, error = self._choose(steps, require_latest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            chosen = int(multihost_utils.broadcast_one_to_all(np.int32(chosen)))
        if chosen < 0:
            raise CheckpointError(error or f"{self.manager.directory}: process 0 found no intact checkpoint")
        if chosen != steps[0]:
            self.manager.reload()  # the damaged steps moved away
        return self.restore(chosen, abstract_state, shardings, data_iterator), chosen

    def _choose(self, steps: list[int], require_latest: bool) -> tuple[int, str | None]:
        """(newest intact step or -1, the one-line error when -1); moves damaged steps aside."""
        damaged = []
        for step in steps:
            problems = verify_train_step(self._step_dir(step), checksums=self.checksums)
            if not problems:
                break
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            damaged.append((step, problems[0] + more))
            if require_latest:
                return -1, (f"{self.manager.directory}: the newest checkpoint, step {step}, is damaged: "
                            f"{damaged[0][1]}; train.require_latest_checkpoint forbids falling back")
        else:
            listed = "; ".join(f"step {s}: {p}" for s, p in damaged)
            return -1, f"{self.manager.directory}: no intact checkpoint ({listed})"
        for bad, problem in damaged:
            found = self._step_dir(bad)
            aside, n = found.with_name(found.name + DAMAGED_SUFFIX), 1
            while aside.exists():
                aside, n = found.with_name(f"{found.name}{DAMAGED_SUFFIX}-{n}"), n + 1
            found.rename(aside)
            log.warning("checkpoint step %d is damaged: %s; resuming from step %d instead (moved it to %s)",
                        bad, problem, step, aside)
        return step, None

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
        """A second manager on the same directory whose "state" handler takes partial restores
        (the writer's handler is fixed to full StandardRestores on first use)."""
        return ocp.CheckpointManager(self.manager.directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()})

    def _saved_state_tree(self, step: int) -> dict:
        """The saved train state's tree of array metadata (names and shapes, no values).

        Read by the "state" item's own handler: a manager's `item_metadata` visits every item and
        logs a warning for the data iterator's, which a metadata read has no handler for."""
        return ocp.PyTreeCheckpointHandler().metadata(self._step_dir(step) / "state").tree

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
        # Sizes only (cheap); the data iterator plays no part in the parameters.
        problems = [p for p in verify_train_step(self._step_dir(step), checksums=False) if not p.startswith("data/")]
        if problems:
            raise CheckpointError(f"{self.manager.directory}: step {step} is damaged: {problems[0]}; "
                                  "`tokensynth checkpoint verify` lists the intact steps")
        graphdef, abstract_state, target = _abstract_model(cfg, mesh or sharding.make_mesh({"data": -1}))
        # The train state is the pure dict of nnx.state((model, optimizer)): the model is entry 0.
        _check_keys(f"{self.manager.directory}/{step}: parameters do not match the model config",
                    self._saved_state_tree(step).get("0"), target)
        reader = self._reader()
        try:
            with _unreadable_as_checkpoint_error(f"{self.manager.directory}/{step}"):
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
