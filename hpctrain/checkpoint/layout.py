"""Where checkpoints live on disk, and when one counts as complete.

Layout (megatron-compatible)::

    <save>/v<N>-<YYYYmmdd-HHMMSS>/          one run's version dir (``add_version``)
        latest_checkpointed_iteration.txt   tracker: "100" or "release"; written LAST, atomically
        iter_0000100/                       megatron-core torch_dist files (metadata.json, common.pt,
                                            .metadata, __<rank>_<k>.distcp)
        release/                            converted HF weights (``hpctrain export --to_mcore``)
        config.json, tokenizer files        HF config + tokenizer (converted checkpoints)
        args.json                           the resolved job config

A checkpoint root is "complete" only when its tracker file exists and names a directory that
exists: an interrupted save or conversion leaves no tracker and is never picked up. HF -> mcore
conversion writes ``release/`` with tracker ``release`` (Megatron-LM's convention for converted
weights; it loads as iteration 0).
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from hpctrain.files import write_atomic  # noqa: F401 - the tracker's writer, also used by others

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
_VERSION_RE = re.compile(r"^v(\d+)-(\d{8}-\d{6})$")
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


@dataclass(frozen=True)
class CheckpointRef:
    """One complete checkpoint: ``root`` holds the tracker, ``path`` the torch_dist files."""

    root: Path
    path: Path
    iteration: int
    release: bool

    @property
    def name(self) -> str:
        return self.path.name


def iter_dir_name(iteration: int | str) -> str:
    """``iter_0000100`` for 100; ``release`` for "release"."""
    if iteration == RELEASE:
        return RELEASE
    it = int(iteration)
    if it < 0:
        raise ValueError(f"iteration must be >= 0, got {it}")
    return f"iter_{it:07d}"


def checkpoint_dir(root: str | os.PathLike, iteration: int | str) -> Path:
    """``root/iter_XXXXXXX`` (or ``root/release``)."""
    return Path(root) / iter_dir_name(iteration)


def tracker_path(root: str | os.PathLike) -> Path:
    return Path(root) / TRACKER


def write_tracker(root: str | os.PathLike, iteration: int | str) -> Path:
    """Mark ``root/iter_<iteration>`` (or release) complete. Call after every file is on disk."""
    d = checkpoint_dir(root, iteration)
    if not d.is_dir():
        raise FileNotFoundError(f"cannot write tracker: checkpoint directory {d} does not exist")
    text = RELEASE if iteration == RELEASE else str(int(iteration))
    write_atomic(tracker_path(root), text)
    return tracker_path(root)


def read_tracker(root: str | os.PathLike) -> tuple[int, bool] | None:
    """(iteration, release) from the tracker file, or None when there is none.

    A tracker that is neither an integer nor "release" is an error naming the file.
    """
    p = tracker_path(root)
    if not p.is_file():
        return None
    text = p.read_text().strip()
    if text == RELEASE:
        return 0, True
    try:
        it = int(text)
    except ValueError:
        raise ValueError(f"{p}: tracker must hold an iteration number or 'release', got {text!r}; "
                         "the checkpoint is corrupt (delete the tracker to ignore it)") from None
    return it, False


def replacement_dirs(path: Path) -> tuple[Path, Path]:
    """(``<iter>.next``, ``<iter>.prev``): where a save that replaces the tracker's own checkpoint
    ``path`` writes the new one, and where the old one waits while the new one is renamed in."""
    return path.with_name(path.name + ".next"), path.with_name(path.name + ".prev")


def complete_checkpoint(root: str | os.PathLike) -> CheckpointRef | None:
    """The checkpoint ``root``'s tracker points at, if the tracker and that directory exist.

    A replacement cut short between its two renames (hpctrain.checkpoint.io) left the tracker's
    directory under ``<iter>.prev``: that one is complete and is returned."""
    t = read_tracker(root)
    if t is None:
        return None
    it, release = t
    path = checkpoint_dir(root, RELEASE if release else it)
    if not path.is_dir():
        path = replacement_dirs(path)[1]
        if not path.is_dir():
            return None
    return CheckpointRef(Path(root), path, it, release)


def recover(root: str | os.PathLike) -> None:
    """Undo what an interrupted save left in ``root``: put a ``.prev`` checkpoint back under its
    name, drop ``.next`` / ``.prev`` folders that are no longer needed. Rank 0, before a save."""
    root = Path(root)
    ref = complete_checkpoint(root)
    if ref is not None and ref.path.name.endswith(".prev"):
        os.rename(ref.path, ref.path.with_name(ref.path.name[: -len(".prev")]))
    for pattern in ("iter_*.next", "iter_*.prev", "release.next", "release.prev"):
        for d in root.glob(pattern):
            shutil.rmtree(d)


def is_complete(root: str | os.PathLike) -> bool:
    return complete_checkpoint(root) is not None


def holds_checkpoint(root: str | os.PathLike) -> bool:
    """True when ``root`` has a tracker, an iter_*/release dir, or version dirs (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return False
    for child in root.iterdir():
        if child.name == TRACKER or child.name == RELEASE or _ITER_RE.match(child.name):
            return True
        if _VERSION_RE.match(child.name) and child.is_dir():
            return True
    return False


def version_dirs(save: str | os.PathLike) -> list[Path]:
    """``v<N>-<timestamp>`` dirs under ``save``, oldest (lowest N) first."""
    save = Path(save)
    if not save.is_dir():
        return []
    found = [(int(m.group(1)), c) for c in save.iterdir()
             if c.is_dir() and (m := _VERSION_RE.match(c.name))]
    return [c for _, c in sorted(found)]


def new_version_dir(save: str | os.PathLike, now: datetime.datetime | None = None,
                    create: bool = True) -> Path:
    """``save/v<N>-<YYYYmmdd-HHMMSS>`` with N one above the highest existing version (from 0)."""
    existing = version_dirs(save)
    n = int(_VERSION_RE.match(existing[-1].name).group(1)) + 1 if existing else 0
    now = now or datetime.datetime.now()
    path = Path(save) / f"v{n}-{now.strftime('%Y%m%d-%H%M%S')}"
    if create:
        path.mkdir(parents=True, exist_ok=False)
    return path


def find_latest(path: str | os.PathLike) -> CheckpointRef | None:
    """The newest complete checkpoint reachable from ``path``.

    ``path`` may be a checkpoint root (holds the tracker), a ``save`` dir holding ``v<N>-*``
    version dirs (the highest N that is complete wins), or an ``iter_*``/``release`` dir itself.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    if path.name == RELEASE or _ITER_RE.match(path.name):
        ref = complete_checkpoint(path.parent)
        if ref is not None and ref.path == path:
            return ref
        it = 0 if path.name == RELEASE else int(_ITER_RE.match(path.name).group(1))
        # An explicit iter dir is accepted when it holds the torch_dist metadata file.
        if (path / "metadata.json").is_file() and (path / ".metadata").is_file():
            return CheckpointRef(path.parent, path, it, path.name == RELEASE)
        return None
    ref = complete_checkpoint(path)
    if ref is not None:
        return ref
    for v in reversed(version_dirs(path)):
        ref = complete_checkpoint(v)
        if ref is not None:
            return ref
    return None


def require_latest(path: str | os.PathLike) -> CheckpointRef:
    """Like ``find_latest`` but raises a FileNotFoundError that says what was looked for."""
    ref = find_latest(path)
    if ref is None:
        raise FileNotFoundError(
            f"no complete checkpoint under {path}: expected {TRACKER} next to an iter_XXXXXXX/ or "
            f"release/ dir, or v<N>-<timestamp>/ version dirs holding one (a checkpoint without a "
            f"tracker file is an interrupted save and is ignored)")
    return ref


def iteration_dirs(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """All ``iter_*`` dirs under a checkpoint root, by iteration (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), c) for c in root.iterdir() if c.is_dir() and (m := _ITER_RE.match(c.name))]
    return sorted(out)
