"""`tokensynth`: the command line, a thin face over the package's jobs.

Every subcommand lives in a module of this package, grouped by job, as one `add_<name>_parser(sub)`
function that builds its parser and names its run function; `SUBCOMMANDS` below registers them.
A run function checks its flags and paths first (checks.py), then loads what it needs, then
writes its results atomically (atomic.py). A `UserError` (errors.py) becomes one line on stderr
and exit status 2, argparse's own usage errors too; any other exception is a bug and keeps its
traceback.
"""
from __future__ import annotations

import argparse
import errno
import logging
import sys

from tokensynth_jax import compile_cache, host_malloc
from tokensynth_jax.cli import demo, evaluation, model_commands, prep, synthesis, training
from tokensynth_jax.cli.checks import UsageError
from tokensynth_jax.errors import UserError

SUBCOMMANDS = (
    prep.add_prep_parser,
    prep.add_prep_verify_parser,
    training.add_train_parser,
    training.add_compile_step_parser,
    model_commands.add_init_parser,
    model_commands.add_convert_parser,
    model_commands.add_convert_clap_parser,
    model_commands.add_inference_checkpoint_parser,
    model_commands.add_export_parser,
    model_commands.add_checkpoint_parser,
    synthesis.add_synthesize_parser,
    evaluation.add_eval_parser,
    training.add_sweep_parser,
    demo.add_demo_parser,
)


class _ParseError(UsageError):
    """argparse's complaint about the command line of one (sub)parser."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (prog: error: ...) and exit status 2.

    Subparsers inherit the class, so `tokensynth init --seed x` says "tokensynth init: error:
    argument --seed: ..." and returns 2 from `main`, without the usage block.
    """

    def error(self, message: str):
        raise _ParseError(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    from tokensynth_jax import __version__

    parser = Parser(prog="tokensynth", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tokensynth-jax {__version__}")
    parser.add_argument("--compile-cache", metavar="DIR|off",
                        help="persistent XLA compilation cache folder, or 'off' (default: $TOKENSYNTH_COMPILE_CACHE, "
                             "else ~/.cache/tokensynth-jax/xla; see docs/compile_cache.md)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _split_config_overrides(argv):
    """`--config.a.b=value` arguments (the config_flags style) -> ({"a.b": value}, other args)."""
    overrides, rest = {}, []
    for arg in argv:
        if arg.startswith("--config.") and "=" in arg:
            key, value = arg[len("--config."):].split("=", 1)
            overrides[key] = value
        else:
            rest.append(arg)
    return overrides, rest


def _one_line(error: Exception) -> str:
    """An error's message on one line: a list of problems ("...:\\n  a\\n  b") becomes "...: a; b"."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return lines[0] + " " + "; ".join(lines[1:])
    return "; ".join(lines)


class _ConsoleHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record (tests and notebooks replace it)."""

    def emit(self, record):
        self.stream = sys.stderr
        super().emit(record)


def configure_logging() -> None:
    """The command line's log output: warnings of every library, and the package's own INFO lines
    ("resumed from step K", the device count, the memory plan) on stderr.

    Importing Orbax or grain puts a handler on the root logger, so `logging.basicConfig` without
    `force` does nothing; the command line owns the process, so it replaces it. Library code never
    configures logging.
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=[_ConsoleHandler()], force=True)
    logging.getLogger("tokensynth").setLevel(logging.INFO)


_USER_FS_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def main(argv=None) -> int:
    overrides, argv = _split_config_overrides(sys.argv[1:] if argv is None else list(argv))
    if argv[:2] == ["prep", "verify"]:  # `prep` takes Beam's options after it, so verify is its own parser
        argv = ["prep-verify", *argv[2:]]
    prog = "tokensynth"
    try:
        try:
            args = build_parser().parse_args(argv)
        except _ParseError as e:
            prog = e.prog
            raise
        prog = args.prog
        if overrides and not getattr(args, "takes_config", False):
            raise UsageError(f"--config.{next(iter(overrides))}: `{prog}` takes no --config")
        args.config_overrides = overrides
        host_malloc.choice()  # a bad $TOKENSYNTH_HOST_MALLOC is named here (console.py acted on a good one)
        configure_logging()
        compile_cache.enable(*compile_cache.resolve(args.compile_cache))  # before anything compiles
        return args.run(args)
    except UserError as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the outputs' temporaries are already gone (atomic.Outputs)
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        # The file system refused a path the user chose (read-only, full, not a folder, no
        # permission): theirs to fix, so one line. Any other OSError is ours and keeps its traceback.
        if e.errno not in _USER_FS_ERRNOS or not e.filename:
            raise
        print(f"{prog}: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
