"""Output folders of ``export`` and ``reshard``: never the input, built aside, renamed into place.

``staged_output(out, overwrite, inputs, flags)`` refuses an ``out`` that is, holds or lies inside one
of the ``inputs`` (``--overwrite`` would delete the input; a write would corrupt it), refuses an
``out`` that already holds files unless ``overwrite``, and yields a fresh sibling folder
``.<name>.partial-<pid>`` to write into. Only when the body finished is the result renamed to
``out`` (an existing ``out`` is moved aside first and deleted after): a run that is killed or fails
never leaves a half-written folder under the output's name, and the previous output stays intact
until the new one is complete. Partial folders of dead processes are removed on the next run.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from hpctrain.checkpoint import layout
from hpctrain.checkpoint.lock import pid_alive
from hpctrain.errors import UserError
from hpctrain.files import fsync_dir


@dataclass(frozen=True)
class Flags:
    """How the command calls its output and overwrite options (for the messages)."""

    out: str = "--output_dir"
    overwrite: str = "--overwrite true"


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_not_input(out: Path, inputs: Sequence[Path], flags: Flags) -> None:
    """Refuse an output folder that is, holds or lies inside a file or folder the command reads."""
    o = Path(os.path.realpath(out))
    for p in inputs:
        i = Path(os.path.realpath(p))
        if _contains(o, i):
            raise UserError(f"{flags.out} {out} is or holds the input {p}: writing there (or {flags.overwrite}) "
                            f"would destroy the input; choose a {flags.out} outside it")
        if i.is_dir() and _contains(i, o):
            raise UserError(f"{flags.out} {out} lies inside the input {p}: writing there would change the "
                            f"input; choose a {flags.out} outside it")


def _holds_files(out: Path) -> bool:
    return out.is_dir() and any(out.iterdir())


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _clean_stale_partials(out: Path) -> None:
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:partial|old)-(\d+)$")
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m and not pid_alive(int(m.group(1))):
            _remove(p)


def _commit(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first, deleted after."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, overwrite: bool, inputs: Sequence[Path] = (),
                  flags: Flags = Flags()) -> Iterator[Path]:
    """Yield the folder to write ``out``'s content into; see the module docstring."""
    out = Path(os.path.abspath(out))
    check_not_input(out, inputs, flags)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flags.out} {out} is a file, not a folder; choose a folder")
    if (_holds_files(out) or layout.holds_checkpoint(out)) and not overwrite:
        raise UserError(f"{flags.out} {out} already holds files (a checkpoint?); pass {flags.overwrite} to "
                        f"replace it or choose another {flags.out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit(tmp, out)
