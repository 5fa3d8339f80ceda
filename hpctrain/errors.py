"""User mistakes and environment faults as one line each: the error type and how a failure reads.

``UserError``: something the user gave us is wrong - a file, a key, a flag, a checkpoint - and the
message says which one and what to do instead. ``describe`` turns any exception into the exit code
and the one line ``hpctrain`` prints (the traceback only with ``--debug``):

* a UserError anywhere in the chain (also inside torch's per-rank CheckpointException), or another
  ValueError / missing-file error (ConfigError, DataError, LayoutError, JSON errors): exit 2;
* a full disk or quota (ENOSPC, EDQUOT, EFBIG) anywhere in the chain: exit 1, the file named;
* anything else: exit 1 with its type and first line, and the hint to rerun with --debug.

Lives at the top of the package so that every layer can raise UserError without importing another.
"""
from __future__ import annotations

import errno
import os

EXIT_USAGE = 2
EXIT_FAILURE = 1
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DISK_FULL_TEXT = {errno.ENOSPC: ("No space left on device", "StorageFull"),
                   errno.EDQUOT: ("Disk quota exceeded", "FilesystemQuotaExceeded"),
                   errno.EFBIG: ("File too large", "FileTooLarge")}
_DISK_FULL_FIX = {errno.ENOSPC: "free space or choose another folder",
                  errno.EDQUOT: "free space in your quota or choose another folder",
                  errno.EFBIG: "raise the file size limit (ulimit -f) or choose another folder"}
USAGE_TYPES = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError)


DEBUG_ENV = "HPCTRAIN_DEBUG"  # set by --debug; child processes (torchrun ranks) inherit it


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class UserError(ValueError):
    """A mistake in the user's input; ``str(err)`` is the whole user-facing message (one line).

    A ValueError, so code that already turns ValueErrors into messages keeps working."""


def _chain(exc: BaseException | None):
    """``exc``, its causes/contexts, and the per-rank failures torch's distributed checkpoint wraps
    in a CheckpointException (``failures``: rank -> (exception, frames)), breadth first."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)
        for f in failures.values() if isinstance(failures, dict) else ():
            f = f[0] if isinstance(f, tuple) and f else getattr(f, "exception", f)  # (exc, frames)
            if isinstance(f, BaseException):
                todo.append(f)
        todo += [e.__cause__, e.__context__]


def user_error_in(exc: BaseException | None) -> UserError | None:
    """The UserError behind ``exc``, if any."""
    return next((e for e in _chain(exc) if isinstance(e, UserError)), None)


def disk_full_in(exc: BaseException | None) -> OSError | None:
    """The out-of-space OSError behind ``exc``, if any (a SafetensorError or torch's wrapped
    writer error only carries it in its text: 'No space left on device' / 'StorageFull')."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return e
        text = str(e)
        for code, marks in _DISK_FULL_TEXT.items():
            if any(m in text for m in marks):
                return OSError(code, os.strerror(code), getattr(e, "filename", None))
    return None


def one_line(exc: BaseException) -> str:
    """The message's first line, with the next one when it ends in ':' (a heading such as
    'Validation error for field 'num_hidden_layers':' over the actual reason)."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def describe(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for a failure that reached the command's top level."""
    user = user_error_in(exc)
    if user is not None:
        return EXIT_USAGE, one_line(user)
    full = disk_full_in(exc)
    if full is not None:
        if isinstance(exc, OSError) and exc.strerror:
            top = exc.strerror + (f" writing {exc.filename}" if exc.filename else "")
        else:
            top = one_line(exc)
        cause = os.strerror(full.errno).lower()
        if cause not in top.lower():  # else it is a message that already says so, in context
            top = cause + (f" writing {full.filename}" if full.filename else "")
        top = top[0].lower() + top[1:]
        return EXIT_FAILURE, f"{top}; {_DISK_FULL_FIX[full.errno]}"
    if isinstance(exc, USAGE_TYPES):
        return EXIT_USAGE, one_line(exc)
    return EXIT_FAILURE, f"{type(exc).__name__}: {one_line(exc)} (rerun with --debug for the traceback)"


# --- one report per failed rank, for a launcher that prints one line for all of them -------------
REPORT_DIR_ENV = "HPCTRAIN_ERROR_DIR"


def write_report(directory: str, rank: int, code: int, line: str) -> None:
    """Record this rank's failure in ``directory`` (set by a launcher that prints it for us)."""
    import json
    import time

    path = os.path.join(directory, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"rank": rank, "code": code, "line": line, "time": time.time()}, f)
    os.replace(path + ".tmp", path)


def read_report(directory: str) -> dict | None:
    """The failure to show among the ranks' reports: a user mistake (the lowest rank's) before
    anything else (other failures are often the teardown after a peer failed), else the earliest;
    None if no rank reported."""
    import json
    from pathlib import Path

    reports = []
    for p in Path(directory).glob("rank*.json"):
        try:
            reports.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    usage = [r for r in reports if r["code"] == EXIT_USAGE]
    if usage:
        return min(usage, key=lambda r: r["rank"])  # usually the same mistake seen by every rank
    return min(reports, key=lambda r: r["time"]) if reports else None
