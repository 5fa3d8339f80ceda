"""Where rows come from: dataset specs, row sources with random access, and #N sampling.

A spec is ``path[:subset][#N]``. ``path`` is a local ``.jsonl`` / ``.jsonl.gz`` / ``.json``
(array) / ``.parquet`` / ``.arrow`` / ``.csv`` file, a glob of such files, a directory saved by HF
``datasets`` (``save_to_disk``; ``:subset`` picks the split), a hub snapshot folder of data files
(``:subset`` picks the split; see layouts.py), one of the bundled aliases (the seed's hub names
resolve to copies in ``hpctrain/assets/data``), or a hub name loaded with ``datasets.load_dataset``. Every source gives random access to rows by number
and names a row's location (``file:line`` or ``file row N``) for error messages, so the pipeline
keeps only row numbers in memory and reads rows when it tokenizes them.
"""
from __future__ import annotations

import glob as globlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import layouts
from .errors import DataError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "data"
# The seed's hub names -> bundled copies, so its quickstart flags run offline.
ALIASES = {
    "AI-ModelScope/alpaca-gpt4-data-zh": "alpaca_gpt4_zh.jsonl",
    "AI-ModelScope/alpaca-gpt4-data-en": "alpaca_gpt4_en.jsonl",
    "swift/self-cognition": "self_cognition.jsonl",
}
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".arrow", ".csv")


@dataclass(frozen=True)
class DatasetSpec:
    raw: str
    path: str
    subset: str | None = None
    count: int | None = None


def parse_spec(raw: str) -> DatasetSpec:
    """Split 'path[:subset][#N]'. A string that exists as a local path is never split."""
    text = raw.strip()
    if not text:
        raise DataError("empty dataset spec: pass 'path[:subset][#N]'", "spec")
    count = None
    if "#" in text and not os.path.exists(text):
        head, _, tail = text.rpartition("#")
        if not tail.isdigit() or int(tail) < 1:
            raise DataError(f"dataset spec {raw!r}: '#{tail}' is not a positive row count "
                            f"(write e.g. '{head}#500')", "spec")
        text, count = head, int(tail)
    subset = None
    if ":" in text and not os.path.exists(text):
        head, _, tail = text.rpartition(":")
        if tail and "/" not in tail and os.sep not in tail:
            text, subset = head, tail
    return DatasetSpec(raw=raw, path=text, subset=subset, count=count)


class JsonlSource:
    """A .jsonl file indexed by byte offsets of its non-blank lines; rows are read on demand."""

    def __init__(self, path: str):
        self.path = self.label = path  # label: the name errors show (layouts.py's .gz copies name the .gz)
        offsets, lengths, lines = [], [], []
        try:
            with open(path, "rb") as f:
                pos = 0
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        offsets.append(pos)
                        lengths.append(len(line))
                        lines.append(lineno)
                    pos += len(line)
        except OSError as e:
            raise DataError(f"cannot read dataset file {path}: {e.strerror or e}", "unreadable") from e
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.lines = np.asarray(lines, dtype=np.int64)
        self._fh = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.offsets)

    def where(self, i: int) -> str:
        return f"{self.label}:{int(self.lines[i])}"

    def _file(self):
        if self._fh is None or self._pid != os.getpid():  # one handle per process (after fork)
            self._fh = open(self.path, "rb")
            self._pid = os.getpid()
        return self._fh

    def get(self, i: int) -> dict:
        f = self._file()
        f.seek(int(self.offsets[i]))
        raw = f.read(int(self.lengths[i]))
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            msg = getattr(e, "msg", str(e))
            col = getattr(e, "colno", None)
            at = f" (column {col})" if col else ""
            raise DataError(f"{self.where(i)}: malformed JSON: {msg}{at}", "malformed JSON") from None
        if not isinstance(row, dict):
            raise DataError(f"{self.where(i)}: expected a JSON object per line, got {type(row).__name__}",
                            "not an object")
        return row

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fh"] = None
        return d


class ListSource:
    """Rows held as a list of dicts (a .json array) or any sequence-like table (HF / Arrow)."""

    def __init__(self, path: str, rows, label: str = "row"):
        self.path = path
        self.rows = rows
        self.label = label

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, i: int) -> str:
        return f"{self.path} {self.label} {int(i) + 1}"

    def get(self, i: int) -> dict:
        row = self.rows[int(i)]
        if not isinstance(row, dict):
            raise DataError(f"{self.where(i)}: expected an object, got {type(row).__name__}", "not an object")
        return row


class ArrowSource(ListSource):
    """A pyarrow Table (parquet / csv): rows converted to dicts one at a time."""

    def get(self, i: int) -> dict:
        return self.rows.slice(int(i), 1).to_pylist()[0]


def _load_json_array(path: str) -> ListSource:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise DataError(f"cannot read dataset file {path}: {e.strerror or e}", "unreadable") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})",
                        "malformed JSON") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json dataset must hold an array of objects "
                        f"(got {type(data).__name__}); use .jsonl for one object per line", "format")
    return ListSource(path, data)


def _load_csv(path: str) -> ArrowSource:
    import pyarrow.csv as pcsv
    try:
        table = pcsv.read_csv(path)
    except OSError as e:
        raise DataError(f"cannot read dataset file {path}: {e}", "unreadable") from e
    except Exception as e:  # pyarrow raises ArrowInvalid for corrupt files
        raise DataError(f"cannot parse csv file {path}: {e}", "unreadable") from e
    return ArrowSource(path, table)


def _is_saved_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_dir(path: str, subset: str | None):
    """A save_to_disk directory, else a hub snapshot folder of data files."""
    if _is_saved_dir(Path(path)):
        return _load_saved_dir(path, subset)
    splits = layouts.snapshot_splits(Path(path), FILE_SUFFIXES)
    if not splits:
        raise DataError(f"{path}: not a directory saved by datasets.save_to_disk, and holds no data files "
                        f"({', '.join(FILE_SUFFIXES)}) of a hub snapshot", "unreadable")
    files = layouts.pick_split(Path(path), splits, subset)
    return layouts.ConcatSource(path, [open_file(f, path) for f in files])


def _load_saved_dir(path: str, subset: str | None) -> ListSource:
    import datasets
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise DataError(f"{path}: not a directory saved by datasets.save_to_disk ({e})", "unreadable") from e
    if isinstance(ds, datasets.DatasetDict):
        split = subset or ("train" if "train" in ds else next(iter(ds)))
        if split not in ds:
            raise DataError(f"{path}: split {split!r} not found; it has {sorted(ds)}", "spec")
        ds = ds[split]
    return ListSource(path, ds)


def _load_hub(name: str, subset: str | None) -> ListSource:
    import datasets
    offline = os.environ.get("HF_DATASETS_OFFLINE", "") in ("1", "true", "TRUE") or \
        os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "TRUE")
    hint = f"cannot reach the hub for {name!r}; download it and pass a local path"
    if offline:
        raise DataError(f"{hint} (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set)", "unreadable")
    try:
        ds = datasets.load_dataset(name, subset, split="train")
    except (ConnectionError, OSError) as e:
        raise DataError(f"{hint} ({type(e).__name__}: {e})", "unreadable") from e
    except Exception as e:  # the hub client raises many kinds; all mean 'not loadable here'
        raise DataError(f"{hint}, or check the name ({type(e).__name__}: {e})", "unreadable") from e
    return ListSource(f"hub:{name}", ds)


def open_file(path: str, spec: str):
    """One local data file by its suffix."""
    name = path.lower()
    if not os.path.exists(path):
        raise DataError(f"dataset file {path} does not exist (spec {spec!r})", "unreadable")
    if name.endswith(".jsonl"):
        return JsonlSource(path)
    if name.endswith(".jsonl.gz"):
        return layouts.gzip_jsonl_source(path)
    if name.endswith(".json"):
        return _load_json_array(path)
    if name.endswith(".parquet"):
        return layouts.parquet_source(path)
    if name.endswith(".arrow"):
        return layouts.MappedArrowSource(path)
    if name.endswith(".csv"):
        return _load_csv(path)
    raise DataError(f"{path}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)}, a glob of them, "
                    "a directory saved by datasets.save_to_disk or a hub snapshot folder", "format")


def local_path(spec: DatasetSpec) -> str:
    """The path a spec names on this machine (a bundled alias resolved)."""
    if spec.path in ALIASES and not os.path.exists(spec.path):
        return str(ASSETS / ALIASES[spec.path])
    return spec.path


def open_source(spec: DatasetSpec):
    """Open the rows a spec names (no sampling)."""
    path = local_path(spec)
    if path != spec.path:
        log.info("dataset %s -> bundled copy %s (offline alias)", spec.path, path)
    p = Path(path)
    if p.is_dir():
        return _load_dir(path, spec.subset)
    if not p.exists() and layouts.GLOB_CHARS.search(path):
        return layouts.ConcatSource(path, [open_file(f, spec.raw) for f in layouts.expand_glob(path)])
    if p.exists() or path.lower().endswith(FILE_SUFFIXES):
        return open_file(path, spec.raw)
    return _load_hub(path, spec.subset)


def resolves_locally(raw: str) -> tuple[bool, str]:
    """(found, what) for `hpctrain doctor`: does the spec name local data (else a hub download)?"""
    try:
        spec = parse_spec(raw)
    except DataError as e:
        return False, str(e)
    path = local_path(spec)
    if os.path.exists(path):
        return True, path
    if layouts.GLOB_CHARS.search(path):
        n = len(globlib.glob(path, recursive=True))
        return n > 0, f"{n} files match {path}" if n else f"no file matches {path}"
    if path.lower().endswith(FILE_SUFFIXES):
        return False, f"{path}: no such file"
    return True, f"{path}: a hub name, downloaded when the hub is reachable"


def sample_rows(n_rows: int, count: int | None, rng: np.random.Generator) -> np.ndarray:
    """Row numbers for '#N': N <= rows -> N distinct rows (seeded); N > rows -> whole copies plus
    a seeded remainder; no N -> every row in order."""
    if count is None:
        return np.arange(n_rows, dtype=np.int64)
    if n_rows == 0:
        raise DataError(f"cannot sample {count} rows from an empty dataset", "spec")
    copies, rest = divmod(int(count), n_rows)
    parts = [np.arange(n_rows, dtype=np.int64)] * copies
    parts.append(np.sort(rng.choice(n_rows, size=rest, replace=False)).astype(np.int64))
    out = np.concatenate(parts)
    rng.shuffle(out)
    return out
