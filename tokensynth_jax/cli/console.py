"""The `tokensynth` console script (and `python -m tokensynth_jax.cli`): re-executes itself once
under glibc's huge-page tunable (`host_malloc.reexec`), then runs the command line. It imports
nothing heavy before that, so the first start costs tens of milliseconds."""
from tokensynth_jax import host_malloc


def main() -> int:
    host_malloc.reexec()
    from tokensynth_jax.cli.main import main as run

    return run()
