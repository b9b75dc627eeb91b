"""Large host blocks on transparent huge pages, for the command line's processes.

Why: XLA:CPU allocates a compiled program's temporaries at every call and frees them after: 3.98
GB for a reference-size train step. glibc maps every block over 32 MB afresh and unmaps it when it
is freed, so the kernel faults in and zeroes each 4 KB page again at every step. Measured on 2
cores of an AMD EPYC (2026-11-27, the train step of `benchmarks/train.py`): 1.02-1.12M page faults
and 1.5-1.7 s of system time a step, 5.45-5.64 s a step. With glibc's tunable
`glibc.malloc.hugetlb=1` (glibc >= 2.35), glibc marks the memory it maps for transparent huge pages
(madvise), so those faults are 2 MB pages: 0.12M faults, 0.4 s, 4.69-4.78 s a step, the same peak
RSS, and freed memory still goes back to the system.

Tried and not taken: keeping freed blocks mapped with `mallopt` (one arena, no mmap, no trimming)
was as fast, but one heap shared with every small allocation fragments: a loop of calls of one
jitted program with a 264 MB temporary grew to 3x its RSS under glibc's defaults.

glibc reads its tunables when a process starts, so the `tokensynth` command re-executes itself
once with the tunable set (`reexec`: same pid, same arguments), before it imports anything heavy.
Nothing happens off glibc, on a glibc older than 2.35 or where the kernel's transparent huge pages
are "never". `TOKENSYNTH_HOST_MALLOC=system` keeps glibc's defaults.
"""
from __future__ import annotations

import os
import platform
import sys

from tokensynth_jax.errors import UserError

ENV = "TOKENSYNTH_HOST_MALLOC"
CHOICES = ("hugepages", "system")
TUNABLES = "GLIBC_TUNABLES"
HUGE_PAGES = "glibc.malloc.hugetlb=1"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _setting(env) -> str:
    """`env`'s $TOKENSYNTH_HOST_MALLOC, normalised; unset or empty is the default, "hugepages"."""
    return env.get(ENV, "").strip().lower() or CHOICES[0]


def choice() -> str:
    """`$TOKENSYNTH_HOST_MALLOC`: "hugepages" (the default) or "system"; anything else is a UserError."""
    value = _setting(os.environ)
    if value not in CHOICES:
        raise UserError(f"${ENV}={os.environ[ENV]!r}: one of {', '.join(CHOICES)}")
    return value


def _glibc_takes_huge_pages() -> bool:
    name, version = platform.libc_ver()
    if not sys.platform.startswith("linux") or name != "glibc":
        return False
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)


def _kernel_gives_huge_pages() -> bool:
    try:
        with open(_THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def environment(env) -> dict | None:
    """`env` with glibc's huge-page tunable added, or None when it should stay as it is: already
    set (by the user, or by `reexec` before), `$TOKENSYNTH_HOST_MALLOC` other than "hugepages", or
    a system where the tunable does nothing."""
    env = dict(env)
    tunables = env.get(TUNABLES, "")
    if "glibc.malloc.hugetlb=" in tunables or _setting(env) != "hugepages":
        return None  # "system", or a bad value the command line will name (`choice`)
    if not (_glibc_takes_huge_pages() and _kernel_gives_huge_pages()):
        return None
    env[TUNABLES] = f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES
    return env


def _runs_the_command_line() -> bool:
    """Whether this process was started as the command line: the `tokensynth` script or
    `python -m tokensynth_jax.cli`, not a notebook, a REPL or a program of the user's that calls it
    (whose state, or a script read from stdin, a second start would lose)."""
    argv0 = sys.argv[0] if sys.argv else ""
    module_main = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cli", "__main__.py")
    return os.path.basename(argv0) == "tokensynth" or (bool(argv0) and os.path.abspath(argv0) == module_main)


def reexec() -> None:
    """Replaces this process with itself (`sys.orig_argv`: the same interpreter, flags and
    arguments; the same pid) under `environment`, when that changes anything and the process is
    the command line's own; else returns."""
    if not _runs_the_command_line() or not sys.executable or not getattr(sys, "orig_argv", None):
        return
    env = environment(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
