"""Small files written whole or not at all, and JSON read with the file named when it is damaged.

``write_atomic`` / ``copy_atomic``: tmp file + fsync + rename (+ fsync of the directory), so a
process killed mid-write leaves the old file or none, never a truncated one that a later command
copies on. ``read_json`` / ``check_json_files``: a damaged JSON file (empty, truncated, not JSON) is
a UserError naming the file, instead of a JSONDecodeError deep inside a library that names none.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from hpctrain.errors import UserError


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: some file systems cannot open a dir)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _via_tmp(path: Path):
    """Yield a tmp path next to ``path``; renamed onto ``path`` when the body succeeds, removed if not."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` via tmp file + fsync + rename (+ fsync of the directory)."""
    with _via_tmp(Path(path)) as tmp:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``shutil.copy2(src, dst)`` through a tmp file and a rename."""
    with _via_tmp(Path(dst)) as tmp:
        shutil.copy2(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


def read_json(path: str | os.PathLike):
    """The parsed JSON file; a damaged one is a UserError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        size = path.stat().st_size
        what = "is empty (0 bytes)" if size == 0 else f"is not valid JSON ({e})"
        raise UserError(f"{path} {what}: the file is damaged, e.g. by a copy that was cut short; "
                        "restore it from the model it came from") from None


def check_json_files(folder: str | os.PathLike) -> None:
    """Read every ``*.json`` file directly in ``folder`` (config, tokenizer): UserError on the first
    damaged one. Cheap, and done before handing the folder to a library that would not name it."""
    folder = Path(folder)
    if folder.is_dir():
        for p in sorted(folder.glob("*.json")):
            if p.is_file():
                read_json(p)


def tree_bytes(path: str | os.PathLike) -> int:
    """Bytes in the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def space_problem(folder: str | os.PathLike, need: int) -> OSError | None:
    """Why writing ``need`` bytes into ``folder`` cannot work, as the OSError the write would have
    raised, or None: a file-size limit below it (``ulimit -f``: EFBIG) or less free space (ENOSPC).
    For writers that lose the OS error (torch's zip writer says only 'unexpected pos 704 vs 598')."""
    import errno
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and soft < need:
        return OSError(errno.EFBIG, f"File too large (the file size limit, ulimit -f, is {soft} bytes)",
                       str(folder))
    free = shutil.disk_usage(folder).free
    if free < need:
        return OSError(errno.ENOSPC, f"No space left on device ({free / 2**20:.1f} MiB free, about "
                                     f"{need / 2**20:.1f} MiB needed)", str(folder))
    return None
