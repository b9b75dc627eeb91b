"""host_malloc: the `tokensynth` command re-executes itself under glibc's huge-page tunable, so the
large temporaries XLA:CPU allocates at every call fault in as 2 MB pages, not 4 KB ones."""
import json
import os
import subprocess
import sys

import pytest

from tokensynth_jax import host_malloc
from tokensynth_jax.cli import console
from tokensynth_jax.cli import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A jitted program with a 136 MB temporary (a train step's is 4 GB), called four times; the page
# faults of each call.
FAULTS = """
import json, resource
import jax, jax.numpy as jnp
x = jnp.ones((1 << 25,), jnp.float32)
f = jax.jit(lambda x: jnp.cumsum(x * 2.0)[::-1] + 1.0).lower(x).compile()
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"temp_pages": f.memory_analysis().temp_size_in_bytes // resource.getpagesize(), "faults": faults}))
"""
# On the path of a test's subprocess: every interpreter start says its pid and tunables.
SITECUSTOMIZE = """
import os, sys
print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"), file=sys.stderr, flush=True)
"""


@pytest.fixture
def plain_env():
    """This process's environment without either variable."""
    return {k: v for k, v in os.environ.items() if k not in (host_malloc.ENV, host_malloc.TUNABLES)}


def _needs_huge_pages(env):
    if host_malloc.environment(env) is None:
        pytest.skip("glibc < 2.35, not glibc, or transparent huge pages 'never': the tunable does nothing here")


def _python(code, env):
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    return done.stdout


def test_huge_pages_cut_the_page_faults_of_a_large_temporary(plain_env):
    _needs_huge_pages(plain_env)
    system = json.loads(_python(FAULTS, plain_env).splitlines()[-1])
    huge = json.loads(_python(FAULTS, host_malloc.environment(plain_env)).splitlines()[-1])
    pages = system["temp_pages"]
    assert pages > (64 << 20) // 4096
    # glibc maps the temporary afresh at each call and every 4 KB page faults in again.
    assert min(system["faults"][1:]) > pages, system
    # On 2 MB pages: about 1.3k faults a call here. The bound leaves room for the small pages a
    # kernel short of free huge pages hands out instead.
    assert max(huge["faults"][1:]) < pages // 2, huge


def _starts(argv, env, tmp_path):
    """The (pid, GLIBC_TUNABLES) of each interpreter start of `python argv`, and its stdout."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), ROOT, env.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=True)
    starts = [line.split()[1:] for line in done.stderr.splitlines() if line.startswith("start ")]
    return starts, done.stdout


def test_the_command_reexecs_itself_once_in_the_same_process(plain_env, tmp_path):
    _needs_huge_pages(plain_env)
    starts, out = _starts(["-m", "tokensynth_jax.cli", "--help"], plain_env, tmp_path)
    assert starts == [[starts[0][0], "None"], [starts[0][0], host_malloc.HUGE_PAGES]], starts
    assert out.count("usage: tokensynth") == 1


def test_no_reexec_under_system_or_outside_the_command_line(plain_env, tmp_path):
    _needs_huge_pages(plain_env)
    starts, _ = _starts(["-m", "tokensynth_jax.cli", "--help"], {**plain_env, host_malloc.ENV: "system"}, tmp_path)
    assert len(starts) == 1, starts
    # A program of the user's that runs the command line in its own process (as a notebook would).
    code = "import sys; sys.argv = ['mine', '--help']; from tokensynth_jax.cli import console; console.main()"
    starts, out = _starts(["-c", code], plain_env, tmp_path)
    assert len(starts) == 1 and "usage: tokensynth" in out, starts


def test_a_chosen_tunable_is_kept(plain_env):
    _needs_huge_pages(plain_env)
    for setting in ("glibc.malloc.hugetlb=0", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2"):
        assert host_malloc.environment({**plain_env, host_malloc.TUNABLES: setting}) is None
    assert host_malloc.environment({**plain_env, host_malloc.ENV: "system"}) is None
    added = host_malloc.environment({**plain_env, host_malloc.TUNABLES: "glibc.malloc.arena_max=2"})
    assert added[host_malloc.TUNABLES] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_the_console_script_reexecs_before_the_command_line_runs(monkeypatch):
    calls = []
    monkeypatch.setattr(host_malloc, "reexec", lambda: calls.append("reexec"))
    monkeypatch.setattr(cli, "main", lambda: calls.append("main") or 0)
    assert console.main() == 0 and calls == ["reexec", "main"]


def test_a_bad_setting_exits_2_naming_the_variable(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(host_malloc.ENV, "jemalloc")
    assert host_malloc.environment(os.environ) is None  # nothing to act on: the command line names it
    out = tmp_path / "ckpt"
    assert cli.main(["init", "--config", "tiny", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "$TOKENSYNTH_HOST_MALLOC='jemalloc'" in err, err
    assert "hugepages, system" in err and not out.exists()
