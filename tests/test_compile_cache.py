"""The command line's persistent compile cache: where it goes (flag, environment, default), that a
second process running the same command loads its executables from disk instead of compiling,
and that `off` and an unusable folder behave as documented."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from tokensynth_jax import compile_cache
from tokensynth_jax.cli import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def test_resolve_precedence(monkeypatch, tmp_path):
    for var in (compile_cache.ENV_VAR, "JAX_COMPILATION_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve(None) == (str(tmp_path / "xdg" / "tokensynth-jax" / "xla"), "default")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.resolve(None)[0] == str(tmp_path / "home" / ".cache" / "tokensynth-jax" / "xla")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/jax/own")
    assert compile_cache.resolve(None) == ("/jax/own", "JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv(compile_cache.ENV_VAR, "/from/env")
    assert compile_cache.resolve(None) == ("/from/env", compile_cache.ENV_VAR)
    monkeypatch.setenv(compile_cache.ENV_VAR, "OFF")
    assert compile_cache.resolve(None) == (None, compile_cache.ENV_VAR)
    assert compile_cache.resolve("/from/flag") == ("/from/flag", "--compile-cache")
    assert compile_cache.resolve("off") == (None, "--compile-cache")


# Runs `tokensynth [--compile-cache DIR] init` in a fresh process and reports JAX's cache events.
_SCRIPT = """
    import collections, json, sys
    import jax
    events = collections.Counter()
    jax.monitoring.register_event_listener(lambda name, **kw: events.update([name]))
    from tokensynth_jax.cli import main as cli
    code = cli.main(sys.argv[1:])
    print(json.dumps({"code": code, "hits": events["/jax/compilation_cache/cache_hits"],
                      "misses": events["/jax/compilation_cache/cache_misses"],
                      "dir": jax.config.jax_compilation_cache_dir}))
"""


def _env(changes):
    """This process's environment with `changes` (None removes a variable)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    for k, v in (changes or {}).items():
        env.pop(k, None) if v is None else env.__setitem__(k, v)
    return env


def _init(tmp_path, name, *flags, env=None):
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(_SCRIPT), *flags, "init", "--config", TINY,
                           str(tmp_path / name)], capture_output=True, text=True, cwd=ROOT,
                          env=_env(env), timeout=1200)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_loads_compiled_executables(tmp_path):
    cache = tmp_path / "xla"
    first = _init(tmp_path, "a", "--compile-cache", str(cache))
    assert first["code"] == 0 and first["dir"] == str(cache)
    assert first["hits"] == 0 and first["misses"] > 0 and os.listdir(cache)
    second = _init(tmp_path, "b", "--compile-cache", str(cache))
    assert second["code"] == 0 and second["misses"] == 0 and second["hits"] == first["misses"]


@pytest.mark.slow
def test_default_folder_and_off(tmp_path):
    env = {compile_cache.ENV_VAR: None, "JAX_COMPILATION_CACHE_DIR": None, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    default = _init(tmp_path, "a", env=env)
    assert default["dir"] == str(tmp_path / "xdg" / "tokensynth-jax" / "xla") and default["misses"] > 0
    assert os.listdir(default["dir"])
    for off in (["--compile-cache", "off"], []):
        run = _init(tmp_path, "b", *off, env={**env, compile_cache.ENV_VAR: "off"})
        assert run["dir"] is None and run["hits"] == run["misses"] == 0


def test_unusable_folder_is_an_error_naming_the_flag(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli.main(["--compile-cache", str(blocker / "xla"), "init", "--config", TINY, str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "--compile-cache" in err and str(blocker / "xla") in err
    assert not (tmp_path / "m").exists()
