"""A command's results, written whole or not at all: under temporary sibling names, renamed into place at the end.

A command claims its outputs before it loads anything (`Outputs.dir`, `Outputs.file`), which checks
them: a path that exists needs --overwrite; a file where a directory belongs, or the reverse, is an
error; and a non-empty directory is replaced only when it holds a previous result of the same kind
(its marker file), so `--overwrite` never deletes a folder of something else. Each claim returns
the temporary path to write to. The command writes inside `with outputs:`; leaving the block
normally renames every temporary into place, an exception deletes them all (and any parent folder
the block created). A rename within one folder is atomic on POSIX filesystems, so a reader finds
the old result or the new one, never part of one.
"""
from __future__ import annotations

import os
import shutil
import uuid

from tokensynth_jax.cli.checks import UsageError, writable_location


class Outputs:
    """The results of one command (see the module docstring)."""

    def __init__(self, overwrite: bool):
        self.overwrite = overwrite
        self._claims: list[tuple[str, str]] = []  # (temporary, final)
        self._made: list[str] = []  # parent folders created for the outputs, removed on failure
        self._token = uuid.uuid4().hex[:8]

    def dir(self, path: str, flag: str, *, marker: str) -> str:
        """Claims the directory `path`; returns the temporary directory to write it as (not created)."""
        final = _resolved(path)
        if os.path.exists(final) and not os.path.isdir(final):
            raise UsageError(f"{flag} {path}: is a file; this command writes a directory")
        if os.path.isdir(final) and os.listdir(final):
            if not self.overwrite:
                raise UsageError(f"{flag} {path}: exists; pass --overwrite to replace it")
            if not os.path.exists(os.path.join(final, marker)):
                raise UsageError(f"{flag} {path}: a folder of other files (no {marker}); not replacing it")
        return self._claim(final, flag, f".{os.path.basename(final)}.tmp-{self._token}")

    def file(self, path: str, flag: str) -> str:
        """Claims the file `path`; returns the temporary file to write it as, with the same extension."""
        final = _resolved(path)
        if os.path.isdir(final):
            raise UsageError(f"{flag} {path}: is a directory; this command writes a file")
        if os.path.exists(final) and not os.path.isfile(final):  # renaming over /dev/null would replace the device
            raise UsageError(f"{flag} {path}: not a regular file (a device, pipe or socket); this command writes a file")
        if os.path.exists(final) and not self.overwrite:
            raise UsageError(f"{flag} {path}: exists; pass --overwrite to replace it")
        stem, ext = os.path.splitext(os.path.basename(final))  # writers pick the format by extension
        return self._claim(final, flag, f".{stem}.tmp-{self._token}{ext}")

    def _claim(self, final: str, flag: str, temp_name: str) -> str:
        for _, other in self._claims:
            if other == final:
                raise UsageError(f"{flag} {final}: the command would write it twice")
        writable_location(final, flag)
        temp = os.path.join(os.path.dirname(final), temp_name)
        self._claims.append((temp, final))
        return temp

    def __enter__(self) -> "Outputs":
        for _, final in self._claims:
            parent = os.path.dirname(final)
            top = parent
            while not os.path.exists(os.path.dirname(top)) and os.path.dirname(top) != top:
                top = os.path.dirname(top)
            if not os.path.exists(parent):
                os.makedirs(parent)
                self._made.append(top)
        return self

    def __exit__(self, kind, value, traceback) -> bool:
        if kind is None:
            self._commit()
        else:
            self._discard()
        return False

    def _commit(self) -> None:
        missing = [temp for temp, _ in self._claims if not os.path.exists(temp)]
        if missing:  # a command that claims an output must write it
            self._discard()
            raise RuntimeError(f"outputs claimed but not written: {missing}")
        for temp, final in self._claims:
            if os.path.isdir(temp) and os.path.isdir(final):  # rename() cannot replace a full folder
                old = f"{temp}.old"
                os.rename(final, old)
                os.rename(temp, final)
                shutil.rmtree(old)
            else:
                os.replace(temp, final)

    def _discard(self) -> None:
        for temp, _ in self._claims:
            if os.path.isdir(temp):
                shutil.rmtree(temp, ignore_errors=True)
            elif os.path.exists(temp):
                os.remove(temp)
        for folder in reversed(self._made):
            shutil.rmtree(folder, ignore_errors=True)


def _resolved(path: str) -> str:
    """The absolute path a result goes to: through symbolic links, so that the rename replaces what
    a link points to (as writing through it would), not the link itself."""
    return os.path.realpath(path)
