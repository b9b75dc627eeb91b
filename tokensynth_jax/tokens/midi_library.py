"""pretty_midi and pyfluidsynth, imported without the line pyfluidsynth prints.

pretty_midi imports pyfluidsynth when it is installed, and pyfluidsynth prints where it found
libfluidsynth to stdout whenever $CI is set (its `debug_print` defaults to `os.getenv("CI")`).
That line would corrupt the stdout of `tokensynth ... --json` on a CI runner, so the package
imports both from here.
"""
from __future__ import annotations

import contextlib
import io

with contextlib.redirect_stdout(io.StringIO()):
    import pretty_midi

__all__ = ["import_fluidsynth", "pretty_midi"]


def import_fluidsynth():
    """The pyfluidsynth module; raises its ImportError or OSError when libfluidsynth is missing."""
    with contextlib.redirect_stdout(io.StringIO()):
        import fluidsynth
    return fluidsynth
