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
# Prints its pid at each start; `reexec` runs it again under the tunable, once.
REEXEC = """
import os
from tokensynth_jax import host_malloc
print("start", os.getpid(), flush=True)
host_malloc.reexec()
print("run", os.getpid(), os.environ.get("GLIBC_TUNABLES"), flush=True)
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
    # On 2 MB pages (the kernel may still hand out some small ones).
    assert max(huge["faults"][1:]) < pages // 8, huge


def test_reexec_runs_the_same_command_in_the_same_process_once(plain_env):
    _needs_huge_pages(plain_env)
    lines = _python(REEXEC, plain_env).splitlines()
    starts = [line for line in lines if line.startswith("start")]
    runs = [line.split() for line in lines if line.startswith("run")]
    assert len(starts) == 2 and starts[0] == starts[1], lines  # the same pid, started twice
    assert len(runs) == 1 and runs[0][1] == starts[0].split()[1] and runs[0][2] == host_malloc.HUGE_PAGES, lines


def test_a_chosen_tunable_and_system_are_left_alone(plain_env):
    _needs_huge_pages(plain_env)
    for setting in ("glibc.malloc.hugetlb=0", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2"):
        assert host_malloc.environment({**plain_env, host_malloc.TUNABLES: setting}) is None
    assert host_malloc.environment({**plain_env, host_malloc.ENV: "system"}) is None
    added = host_malloc.environment({**plain_env, host_malloc.TUNABLES: "glibc.malloc.arena_max=2"})
    assert added[host_malloc.TUNABLES] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    lines = _python(REEXEC, {**plain_env, host_malloc.ENV: "system"}).splitlines()
    assert [line.split()[0] for line in lines] == ["start", "run"] and lines[1].endswith("None"), lines


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
