"""Small helpers shared by the benchmarks: memory, CPU contention, machine facts, markdown output."""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
import types

MB = 1024 * 1024
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_HEADER = "# Benchmarks\n\nMeasured numbers; each section says how to reproduce it.\n"
# setup.py's package_dir: the repository folders that install under another name.
INSTALLED_AS = {"tokensynth_jax.configs": "configs", "tokensynth_prep": "data_prep"}


def map_checkout_packages() -> None:
    """Lets the benchmarks run from a bare checkout, as on a lent accelerator where nothing of ours
    is installed: each folder of INSTALLED_AS that no installed package provides is imported under
    its installed name (`--config reference` and the configs' own `from tokensynth_jax.configs
    import reference` need `tokensynth_jax.configs`). On 2026-11-28 an H200's run lost its train
    and decode sections to `No module named 'tokensynth_jax.configs'`."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    for name, folder in INSTALLED_AS.items():
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        path = os.path.join(REPO, folder)
        spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"),
                                                      submodule_search_locations=[path])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)


map_checkout_packages()


def install_bare_package(name: str) -> bool:
    """Registers the installed package `name` in sys.modules as a bare module whose __init__ never
    runs, so its submodules import alone (the reference's and descript's __init__ import packages we
    do not install). False if `name` is not installed."""
    if name in sys.modules:
        return True
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        return False
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules[name] = package
    return True


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Current resident set size of this process."""
    import psutil  # imported where used: benchmarks/accelerator.py runs where psutil may be missing

    return psutil.Process().memory_info().rss / MB


class CpuWatch:
    """CPU used by other processes while a block runs, in cores (0 = the machine was ours alone).

    System-wide busy time minus this process's own CPU time, over the wall time of the block.
    """

    def __enter__(self):
        self._sys0, self._own0, self._t0 = self._busy(), self._own(), time.perf_counter()
        self.load_before = os.getloadavg()[0]
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._t0
        self.wall = wall
        self.own_cores = (self._own() - self._own0) / wall
        self.other_cores = max(0.0, (self._busy() - self._sys0) - (self._own() - self._own0)) / wall
        self.load_after = os.getloadavg()[0]
        return False

    @staticmethod
    def _busy() -> float:
        import psutil

        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    @staticmethod
    def _own() -> float:
        import psutil

        t = psutil.Process().cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def to_dict(self) -> dict:
        return {"wall_s": self.wall, "own_cores": self.own_cores, "other_cores": self.other_cores,
                "load1_before": self.load_before, "load1_after": self.load_after}


def busy_cores(seconds: float = 10.0) -> float:
    """CPU cores in use machine-wide, averaged over `seconds` (call it from an idle process)."""
    b0, t0 = CpuWatch._busy(), time.perf_counter()
    time.sleep(seconds)
    return (CpuWatch._busy() - b0) / (time.perf_counter() - t0)


def wait_for_idle(max_load: float = 1.5, max_busy: float = 0.25, max_wait_s: float = 900.0,
                  poll_s: float = 60.0) -> dict:
    """Waits until the 1-minute load average is <= `max_load` and other processes use less than
    `max_busy` cores over a 10 s sample, polling every `poll_s` s, for at most `max_wait_s` s.

    Returns {"load1", "busy_cores", "waited_s", "idle"} as found when it stopped waiting.
    """
    t0 = time.perf_counter()
    while True:
        busy = busy_cores()
        load = os.getloadavg()[0]
        waited = time.perf_counter() - t0
        idle = load <= max_load and busy < max_busy
        if idle or waited >= max_wait_s:
            return {"load1": load, "busy_cores": busy, "waited_s": waited, "idle": idle}
        print(f"machine busy (load average {load:.2f}, {busy:.2f} cores in use): waiting {poll_s:.0f} s "
              f"({waited:.0f} s waited so far)", flush=True)
        time.sleep(poll_s)


def machine_info() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _host_malloc():
    """tokensynth_jax.host_malloc, from this checkout."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from tokensynth_jax import host_malloc

    return host_malloc


def cli_environment(env: dict) -> dict:
    """`env` as the `tokensynth` command runs under it (`host_malloc`: glibc's huge-page tunable, where
    it does something), for a part that stands for the command line."""
    return _host_malloc().environment(env) or dict(env)


def malloc_note(glibc_tunables: str) -> str:
    """How a part's process allocated host memory, for the docs (its $GLIBC_TUNABLES)."""
    host_malloc = _host_malloc()
    if host_malloc.HUGE_PAGES in glibc_tunables:
        return ("as the `tokensynth` command does, with large host blocks on transparent huge pages "
                f"(`{host_malloc.TUNABLES}={host_malloc.HUGE_PAGES}`, tokensynth_jax/host_malloc.py)")
    return "with glibc's default malloc (no huge-page tunable)"


def run_part(name: str, cmd: list, out_json: str, env: dict | None = None) -> dict:
    """Runs one part of a benchmark in its own process (so its peak RSS is its own), logging the
    command and its wall time, and returns the JSON the part wrote to `out_json`."""
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {shlex.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    with open(out_json) as f:
        return json.load(f)


def replace_section(path: str, name: str, body: str, file_header: str = DOC_HEADER) -> None:
    """Writes `body` between `<!-- name:begin -->` and `<!-- name:end -->` in `path`, keeping the rest.

    Creates the file with `file_header` if it does not exist; appends the section if absent.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = open(path).read() if os.path.exists(path) else file_header.rstrip() + "\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
