"""Dataset layouts users have on disk, beyond one plain file: globs, hub snapshot folders, Arrow
files, parquet read one row group at a time, and gzip-compressed JSON lines.

Every reader gives the same random access by row number as sources.py's (``len``, ``get(i)``,
``where(i)``) with bounded memory:

* ``.arrow`` (what ``datasets`` caches and saves: the Arrow IPC stream or file format) is
  memory-mapped, never read into memory.
* ``.parquet`` is converted once, one row group at a time, into an Arrow file in a scratch folder
  (TMPDIR, removed at exit) that is then memory-mapped: the peak is one decoded row group however
  big the file, and rows are then read in any (shuffled) order without re-decoding row groups.
* ``.jsonl.gz`` is decompressed once, streaming, into the scratch folder and then read like a
  ``.jsonl`` (byte offsets per line); errors still name the .gz file and its line.
* a glob (``data/*.parquet``, ``shards/**/*.jsonl``) is every matching file, in sorted order.
* a hub snapshot folder (what ``huggingface-cli download --repo-type dataset`` or
  ``snapshot_download`` leaves: data files, possibly under ``data/``, named by split such as
  ``train-00000-of-00002.parquet`` or ``train/0000.parquet``) gives the split ``path:SPLIT``
  asks for, else ``train``, else its only split.
"""
from __future__ import annotations

import atexit
import glob as globlib
import gzip
import itertools
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import DataError

GLOB_CHARS = re.compile(r"[*?\[]")
SPLIT_NAMES = ("train", "validation", "valid", "val", "test", "dev", "eval")
_SPLIT_RE = re.compile(rf"^({'|'.join(SPLIT_NAMES)})(?=[-_.]|$)")
_SCRATCH: dict[str, str] = {}
_NAMES = itertools.count()


def scratch_dir() -> Path:
    """This process's scratch folder for converted files (removed at exit by the process that made it)."""
    pid = str(os.getpid())
    if not _SCRATCH.get(pid):
        _SCRATCH[pid] = tempfile.mkdtemp(prefix="hpctrain-data-")
        atexit.register(_remove_scratch, pid)
    return Path(_SCRATCH[pid])


def _remove_scratch(pid: str) -> None:
    if str(os.getpid()) == pid:  # not from a forked worker: the parent still reads these files
        shutil.rmtree(_SCRATCH.get(pid, ""), ignore_errors=True)


class ConcatSource:
    """Several sources read as one (the files of a glob or of a snapshot split), in order."""

    def __init__(self, path: str, sources: list):
        self.path, self.sources = path, sources
        self.ends = np.cumsum([len(s) for s in sources], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _locate(self, i: int) -> tuple[object, int]:
        k = int(np.searchsorted(self.ends, i, side="right"))
        return self.sources[k], int(i) - (int(self.ends[k - 1]) if k else 0)

    def get(self, i: int) -> dict:
        src, j = self._locate(i)
        return src.get(j)

    def where(self, i: int) -> str:
        src, j = self._locate(i)
        return src.where(j)


class MappedArrowSource:
    """An Arrow IPC file (stream or file format), memory-mapped; re-mapped after pickling (workers)."""

    def __init__(self, path: str, label: str | None = None):
        self.path, self.label = path, label or path
        self._table = None
        self.rows = len(self._open())

    def _open(self):
        import pyarrow as pa

        if self._table is None:
            try:
                source = pa.memory_map(self.path)
                try:
                    self._table = pa.ipc.open_file(source).read_all()
                except pa.ArrowInvalid:
                    source.seek(0)
                    self._table = pa.ipc.open_stream(source).read_all()
            except (OSError, pa.ArrowInvalid) as e:
                raise DataError(f"cannot read Arrow file {self.label}: {e}", "unreadable") from e
        return self._table

    def __len__(self) -> int:
        return self.rows

    def where(self, i: int) -> str:
        return f"{self.label} row {int(i) + 1}"

    def get(self, i: int) -> dict:
        return self._open().slice(int(i), 1).to_pylist()[0]

    def __getstate__(self):
        return {**self.__dict__, "_table": None}


def parquet_source(path: str) -> MappedArrowSource:
    """A parquet file as a memory-mapped Arrow file, converted one row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        out = scratch_dir() / f"{next(_NAMES)}-{Path(path).stem}.arrow"
        with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_file(sink, pf.schema_arrow) as writer:
            for k in range(pf.num_row_groups):
                writer.write_table(pf.read_row_group(k))
    except OSError as e:
        raise DataError(f"cannot read dataset file {path}: {e}", "unreadable") from e
    except Exception as e:  # pyarrow raises ArrowInvalid for corrupt files
        raise DataError(f"cannot parse parquet file {path}: {e}", "unreadable") from e
    return MappedArrowSource(str(out), label=path)


def gzip_jsonl_source(path: str):
    """A .jsonl.gz file, decompressed (streaming) into the scratch folder and indexed by line."""
    from .sources import JsonlSource

    out = scratch_dir() / f"{next(_NAMES)}-{Path(path).name[:-3]}"
    try:
        with gzip.open(path, "rb") as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read gzip file {path}: {e}", "unreadable") from e
    source = JsonlSource(str(out))
    source.label = path  # errors name the user's file, not the scratch copy
    return source


def expand_glob(pattern: str) -> list[str]:
    """Files matching ``pattern`` (``**`` recursive), sorted; DataError when there are none."""
    files = sorted(p for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))
    if not files:
        raise DataError(f"dataset pattern {pattern!r} matches no file", "unreadable")
    return files


def split_of(relative: Path) -> str | None:
    """The split a snapshot file belongs to, from its folder or file name (train-0000.parquet, test/x.jsonl)."""
    for part in relative.parts:
        m = _SPLIT_RE.match(part)
        if m:
            return m.group(1)
    return None


def snapshot_splits(folder: Path, suffixes: tuple[str, ...]) -> dict[str, list[str]]:
    """{split: [data files]} of a hub snapshot folder; files without a split name form 'train'."""
    splits: dict[str, list[str]] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue  # .cache/, .git/, .gitattributes
        if not p.name.lower().endswith(suffixes) or p.name.startswith("dataset_info"):
            continue
        splits.setdefault(split_of(rel) or "train", []).append(str(p))
    return splits


def pick_split(folder: Path, splits: dict[str, list[str]], wanted: str | None) -> list[str]:
    if wanted is not None:
        if wanted not in splits:
            raise DataError(f"{folder}: split {wanted!r} not found; its data files give {sorted(splits)}", "spec")
        return splits[wanted]
    if "train" in splits:
        return splits["train"]
    if len(splits) == 1:
        return next(iter(splits.values()))
    raise DataError(f"{folder}: several splits and none is 'train' ({sorted(splits)}): "
                    f"name one as '{folder}:SPLIT'", "spec")
