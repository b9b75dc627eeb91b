"""The `tokensynth` console script (and `python -m tokensynth_jax.cli`): re-executes itself once
under glibc's huge-page tunable (`host_malloc.reexec`), then runs the command line. It imports
nothing heavy before that, so the first start costs tens of milliseconds."""
import signal

from tokensynth_jax import host_malloc


def main() -> int:
    host_malloc.reexec()
    from tokensynth_jax.cli.main import main as run

    code = run()
    # What remains is the interpreter's exit: the atexit handlers of JAX, Orbax and grain, which can
    # take seconds. A Ctrl-C there ends the process at once, not in a traceback from inside them.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    return code
