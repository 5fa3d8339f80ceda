"""Read the pickles inside checkpoints without running code from them.

A pickle can name any importable callable and call it while loading (``__reduce__`` ->
``os.system``): a crafted checkpoint would run its payload the moment we read it. torch_dist
checkpoints hold three kinds of pickles, and torch / megatron-core read two of them unrestricted:

* ``.metadata`` - torch's ``FileSystemReader.read_metadata`` calls plain ``pickle.load``;
* byte objects (``_extra_state``, RNG state, distributed-optimizer bucket sizes) - torch's
  ``DefaultLoadPlanner.load_bytes`` calls ``torch.load(weights_only=False)``;
* ``common.pt`` and legacy rank files - ``torch.load`` whose default is ``weights_only=False``
  before torch 2.6.

Here every one of them goes through an allow-list of the classes torch and megatron-core write:
``load_metadata`` (the DCP metadata classes, ``torch.Size``, dtypes, layouts), ``load_torch``
(torch's own ``weights_only`` unpickler plus the few numpy/argparse globals megatron's objects
hold). Anything else is refused with ``UnsafePickleError`` naming the file and the global.
``install()`` routes torch's and megatron-core's loaders through these (idempotent; the loaders
of this package call it before they read a checkpoint); ``check_checkpoint_dir`` reads a directory's
metadata and common.pt with them up front, so a refusal is the error the user sees. ``trusted()`` is the escape hatch behind
``hpctrain reshard --trust_pickle``: inside it the files load unrestricted (they may run code).
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import io
import logging
import os
import pickle
import re
import sys
from pathlib import Path

import torch

from hpctrain.errors import UserError

log = logging.getLogger(__name__)

_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "pathlib._local": {"PosixPath", "PurePosixPath"},  # where Python >= 3.13 defines them
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
}
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")

_trust = contextvars.ContextVar("hpctrain_trust_pickle", default=False)


class UnsafePickleError(UserError):
    """A checkpoint file names a global outside the allow-list: refused, nothing was run."""

    def __init__(self, where, name: str):
        self.where, self.name = str(where), name
        super().__init__(f"{where}: refusing to unpickle {name}: torch and megatron-core checkpoints "
                         "never hold it, so the file may be crafted to run code when loaded; nothing "
                         "was run. Load only checkpoints you trust (hpctrain reshard --trust_pickle "
                         "reads such files unrestricted)")

    def __reduce__(self):  # torch's distributed checkpoint copies per-rank exceptions
        return UnsafePickleError, (self.where, self.name)


@contextlib.contextmanager
def trusted(enabled: bool = True):
    """Inside: checkpoint pickles load unrestricted (``--trust_pickle``; the files may run code)."""
    token = _trust.set(bool(enabled))
    try:
        yield
    finally:
        _trust.reset(token)


def is_trusted() -> bool:
    return _trust.get()


def _allowed(module: str, name: str) -> bool:
    if name in _DCP_CLASSES.get(module, ()):
        return True
    return module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS)


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, where):
        super().__init__(f)
        self.where = where

    def find_class(self, module, name):
        if _trust.get() or _allowed(module, name):
            return super().find_class(module, name)
        raise UnsafePickleError(self.where, f"{module}.{name}")


def load_metadata(f, where) -> object:
    """A torch DCP ``.metadata`` pickle from the open binary file ``f`` (``where`` names it)."""
    try:
        return _MetadataUnpickler(f, where).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as e:
        raise UserError(f"{where}: not a readable checkpoint metadata file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'truncated'}); the checkpoint is "
                        "damaged or not a torch_dist checkpoint") from None


def _extra_globals() -> list:
    """Globals that megatron-core's objects hold besides torch's own: the numpy RNG state (an
    ndarray), argparse args. (megatron-core registers the same with torch when it is imported.)"""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    extra = [argparse.Namespace, io.BytesIO, np.ndarray, np.dtype, _reconstruct]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        extra += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return extra


def load_torch(f, where=None, **kwargs):
    """``torch.load(f, weights_only=True)`` with megatron-core's few extra globals; a refused
    global is an UnsafePickleError naming ``where`` (default: ``f``) and the global."""
    where = where if where is not None else f
    kwargs.setdefault("map_location", "cpu")
    if _trust.get():
        log.warning("%s: loading with weights_only=False (--trust_pickle): it may run code", where)
        return torch.load(f, weights_only=False, **kwargs)
    try:
        with torch.serialization.safe_globals(_extra_globals()):
            return torch.load(f, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        m = _GLOBAL_RE.search(str(e))
        if m:
            raise UnsafePickleError(where, m.group(1)) from None
        raise UserError(f"{where}: cannot be read safely ({str(e).splitlines()[0]}); the file is "
                        "damaged or was not written by torch") from None


def check_torch_bytes(value: io.BytesIO, where) -> None:
    """Refuse a byte object (a ``torch.save`` payload) that a restricted load would refuse
    (nothing to check inside ``trusted()``)."""
    if _trust.get():
        return
    pos = value.tell()
    load_torch(value, where)
    value.seek(pos)


def check_checkpoint_dir(path) -> None:
    """Read a torch_dist directory's ``.metadata`` and ``common.pt`` with the restricted loaders
    before megatron-core loads it: torch's loader catches a refusal of the metadata, logs it with a
    traceback and fails later with an AssertionError that only quotes it."""
    path = Path(path)
    if (path / ".metadata").is_file():
        with open(path / ".metadata", "rb") as f:
            load_metadata(f, path / ".metadata")
    if (path / "common.pt").is_file():
        load_torch(path / "common.pt")


# --- routing torch's and megatron-core's loaders through the above -------------------------
_installed: set = set()


def install() -> None:
    """Make torch DCP's metadata and byte-object reads, and megatron-core's ``common.pt`` read
    once megatron-core is imported, restricted in this process (idempotent)."""
    if "torch" not in _installed:
        _install_torch()
        _installed.add("torch")
    if "megatron" not in _installed and "megatron.core" in sys.modules:
        _install_megatron()
        _installed.add("megatron")


def _install_torch() -> None:
    from torch.distributed.checkpoint import filesystem
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    filesystem.FileSystemReader.read_metadata = _read_metadata
    original_read_data = filesystem.FileSystemReader.read_data
    original_load_bytes = DefaultLoadPlanner.load_bytes

    def read_data(self, plan, planner):
        token = _reading.set(self)  # so load_bytes can name the file an object came from
        try:
            return original_read_data(self, plan, planner)
        finally:
            _reading.reset(token)

    def load_bytes(self, read_item, value):
        check_torch_bytes(value, _object_file(read_item))
        return original_load_bytes(self, read_item, value)

    filesystem.FileSystemReader.read_data = read_data
    DefaultLoadPlanner.load_bytes = load_bytes


_reading: contextvars.ContextVar = contextvars.ContextVar("hpctrain_dcp_reader", default=None)


def _object_file(read_item) -> str:
    reader, key = _reading.get(), read_item.storage_index.fqn
    info = getattr(reader, "storage_data", {}).get(read_item.storage_index) if reader is not None else None
    if info is None:
        return f"checkpoint object {key}"
    return f"{Path(str(reader.path)) / info.relative_path} (object {key})"


def _read_metadata(self, *args, **kwargs):
    """torch's FileSystemReader.read_metadata with the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    rank = kwargs.get("rank")
    get_path = getattr(self, "_get_metadata_path", None)
    path = get_path(rank) if get_path is not None else Path(str(self.path)) / ".metadata"
    with self.fs.create_stream(path, "rb") as f:
        metadata = load_metadata(f, path)
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = getattr(self, "load_id", None)
    return metadata


def _install_megatron() -> None:
    """megatron-core's ``common.pt`` loader: ``torch.load`` with torch's default weights_only."""
    from megatron.core.dist_checkpointing.strategies import common

    original = common.TorchCommonLoadStrategy.load_common

    def load_common(self, checkpoint_dir):
        path = os.path.join(checkpoint_dir, common.COMMON_STATE_FNAME)
        if not os.path.isfile(path):
            return original(self, checkpoint_dir)  # megatron's own error (and object stores)
        return load_torch(path)

    common.TorchCommonLoadStrategy.load_common = load_common
