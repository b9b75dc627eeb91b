"""The persistent XLA compilation cache of the command line (docs/compile_cache.md).

Every `tokensynth` command compiles its jitted functions (the decode loop, the train step)
again in each new process: seconds on a CPU, 6-17 s for the decode loop on an H100. JAX can
keep compiled executables on disk, keyed by the computation, its shapes, the backend and the
jax/jaxlib versions, and load them instead of compiling. The command line turns that on by
default in a per-user cache folder; a second `tokensynth synthesize` with the same shapes then
skips compilation.

Where the cache lives, first that applies:
  1. `tokensynth --compile-cache DIR ...` (`--compile-cache off` disables it);
  2. the environment variable TOKENSYNTH_COMPILE_CACHE (a folder, or `off`);
  3. JAX's own JAX_COMPILATION_CACHE_DIR, if set;
  4. $XDG_CACHE_HOME/tokensynth-jax/xla, else ~/.cache/tokensynth-jax/xla.
Every compile is written, however short (JAX's default writes only those over 1 s, which leaves
most CPU compiles out). The folder is trimmed to MAX_BYTES, least recently used entries first.
"""
from __future__ import annotations

import os
import sys

from tokensynth_jax.errors import UserError

ENV_VAR = "TOKENSYNTH_COMPILE_CACHE"
OFF_VALUES = ("off", "none", "0", "false", "no")
MAX_BYTES = 4 * 1024**3  # LRU bound on the folder; the full-size decode loop takes ~1-10 MB an entry


class CompileCacheError(UserError):
    """A compile-cache folder that cannot be used; the message names the flag or variable."""


def default_dir() -> str:
    """$XDG_CACHE_HOME/tokensynth-jax/xla, else ~/.cache/tokensynth-jax/xla."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tokensynth-jax", "xla")


def resolve(flag: str | None) -> tuple[str | None, str]:
    """(folder or None when off, where the choice came from) by the precedence in the module doc."""
    if flag is not None:
        if not flag.strip():  # JAX would take "" as the current directory
            raise CompileCacheError("--compile-cache '': give a folder, or 'off'")
        return (None if flag.strip().lower() in OFF_VALUES else flag), "--compile-cache"
    env = os.environ.get(ENV_VAR)
    if env is not None:
        return (None if env.strip().lower() in OFF_VALUES + ("",) else env), ENV_VAR
    jax_env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if jax_env:
        return jax_env, "JAX_COMPILATION_CACHE_DIR"
    return default_dir(), "default"


def enable(path: str | None, source: str = "default") -> str | None:
    """Points JAX's persistent cache at `path` (None: no cache); returns the folder in use.

    Call it before the process compiles anything: JAX decides once per process whether it uses
    a cache. A folder that was asked for explicitly and cannot be created is an error; the
    default folder failing (a read-only home) only prints a warning and runs without a cache.

    Raises:
      CompileCacheError naming `source`.
    """
    import jax

    if path is None:
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as e:
        if source == "default":
            print(f"tokensynth: warning: no compile cache ({e}); set {ENV_VAR} to a writable folder or 'off'",
                  file=sys.stderr)
            return None
        raise CompileCacheError(f"{source} {path}: cannot use it as the compile cache ({e})") from e
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size floor, no overrides
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
