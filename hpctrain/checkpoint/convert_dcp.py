"""Streaming read/write of megatron-core ``torch_dist`` checkpoints, one tensor chunk at a time.

megatron-core's torch_dist format is a PyTorch Distributed Checkpoint (``.metadata`` +
``__<rank>_<k>.distcp``) whose keys are the ShardedTensor keys (layers of one name stacked on a
leading axis, one chunk per layer), plus ``metadata.json`` and ``common.pt``. Its loader
(``dist_checkpointing.load``) reads any chunking back at any TP/PP, so a converter may write
whatever chunks it likes as long as they tile each global tensor.

``write_dcp`` saves a list of ``LazyChunk``/``LazyBytes`` with torch.distributed.checkpoint
(no process group: ``no_dist=True``) through a SavePlanner whose ``resolve_data`` produces each
chunk only when the writer asks for it; one file per chunk, so the writer never holds more than
one chunk. ``DcpReader`` reads any box of a stored tensor, touching only the chunks it overlaps.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata,
                                                   MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (LoadPlan, LoadPlanner, SavePlan, TensorWriteData,
                                                  WriteItem, WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from hpctrain.checkpoint import safe_pickle
from hpctrain.errors import user_error_in

MCORE_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                  "common_backend": "torch", "common_backend_version": 1}


@dataclass
class LazyChunk:
    """Chunk ``offsets``/``sizes`` of global tensor ``key`` (``shape``, ``dtype``); ``load()`` makes it."""

    key: str
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]


@dataclass
class LazyBytes:
    key: str
    load: Callable[[], io.BytesIO]


def sharded_object_key(key: str, offset: Sequence[int], shape: Sequence[int]) -> str:
    """megatron-core's DCP key of a ShardedObject (``key/shard_<offset>_<shape>``)."""
    return f"{key}/shard_{'.'.join(map(str, offset))}_{'.'.join(map(str, shape))}"


def none_bytes() -> io.BytesIO:
    """An empty ``_extra_state`` object as megatron-core stores it (a pickled ``[None]``)."""
    b = io.BytesIO()
    torch.save([None], b)
    b.seek(0)
    return b


class _LazySavePlanner(DefaultSavePlanner):
    def __init__(self, items: Sequence[LazyChunk | LazyBytes], on_item: Callable | None = None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._by_index: dict[MetadataIndex, LazyChunk | LazyBytes] = {}
        self._write_items: list[WriteItem] = []
        self._on_item = on_item
        for it in items:
            if isinstance(it, LazyBytes):
                idx = MetadataIndex(it.key)
                wi = WriteItem(index=idx, type=WriteItemType.BYTE_IO)
            else:
                idx = MetadataIndex(it.key, torch.Size(it.offsets))
                wi = WriteItem(index=idx, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(torch.Size(it.offsets), torch.Size(it.sizes)),
                    properties=TensorProperties(dtype=it.dtype), size=torch.Size(it.shape)))
            if idx in self._by_index:
                raise ValueError(f"duplicate checkpoint chunk {it.key} at {idx.offset}")
            self._by_index[idx] = it
            self._write_items.append(wi)

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        self.state_dict = {}
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self._write_items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        it = self._by_index[write_item.index]
        data = it.load()
        if isinstance(it, LazyChunk):
            if tuple(data.shape) != tuple(it.sizes) or data.dtype != it.dtype:
                raise ValueError(f"{it.key}: produced {tuple(data.shape)} {data.dtype}, expected "
                                 f"{tuple(it.sizes)} {it.dtype}")
            data = data.contiguous()
        if self._on_item is not None:
            self._on_item(it)
        return data


def write_dcp(path: str | os.PathLike, items: Sequence[LazyChunk | LazyBytes],
              common: dict | None = None, on_item: Callable | None = None) -> None:
    """Write a megatron-core torch_dist checkpoint directory from lazy chunks (single process)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    writer = dcp.FileSystemWriter(str(path), single_file_per_rank=False, thread_count=1)
    try:
        dcp.save({}, storage_writer=writer, planner=_LazySavePlanner(items, on_item), no_dist=True)
    except CheckpointException as e:
        user = user_error_in(e)  # e.g. a refused object on its way from a source checkpoint
        if user is not None:
            raise user from None
        first = next(iter(e.failures.values()), e)
        first = getattr(first, "exception", first)
        raise RuntimeError(f"writing the checkpoint {path} failed: {first!r} (the checkpoint is "
                           "incomplete and has no tracker file)") from e
    torch.save(common or {}, path / "common.pt")
    (path / "metadata.json").write_text(json.dumps(MCORE_METADATA))


class _BoxLoadPlanner(LoadPlanner):
    """Copies read chunks into a destination tensor that covers box ``offsets`` of one key."""

    def __init__(self, dest: torch.Tensor | None, offsets: Sequence[int]):
        self.dest, self.offsets = dest, tuple(offsets)
        self.bytes: io.BytesIO | None = None

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        pass

    def create_local_plan(self) -> LoadPlan:
        raise NotImplementedError

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        self.bytes = value

    def resolve_tensor(self, read_item) -> torch.Tensor:
        t = self.dest
        for d, (off, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            t = t.narrow(d, off, n)
        return t

    def commit_tensor(self, read_item, tensor) -> None:
        pass


class DcpReader:
    """Random access to the tensors of one torch_dist checkpoint directory. Its pickles (the
    metadata, byte objects) are read through safe_pickle: a crafted file is refused, never run."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / ".metadata").is_file():
            raise FileNotFoundError(f"{self.path} is not a torch_dist checkpoint (no .metadata file)")
        safe_pickle.install()
        self.reader = dcp.FileSystemReader(str(self.path))
        self.metadata = self.reader.read_metadata()
        self.reader.set_up_storage_reader(self.metadata, True)
        self._check_files()

    def _check_files(self) -> None:
        for info in self.metadata.storage_data.values():
            f = self.path / info.relative_path
            if not f.is_file():
                raise FileNotFoundError(f"{f} is missing: the checkpoint in {self.path} is incomplete")
            if f.stat().st_size < info.offset + info.length:
                raise ValueError(f"{f} is truncated ({f.stat().st_size} bytes, metadata needs "
                                 f"{info.offset + info.length}): the checkpoint is damaged")

    def keys(self) -> list[str]:
        return list(self.metadata.state_dict_metadata)

    def tensor_keys(self) -> list[str]:
        return [k for k, v in self.metadata.state_dict_metadata.items()
                if isinstance(v, TensorStorageMetadata)]

    def _tensor_md(self, key: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise KeyError(f"{self.path}: no tensor {key!r} in the checkpoint")
        return md

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensor_md(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensor_md(key).properties.dtype

    def chunks(self, key: str) -> list[ChunkStorageMetadata]:
        return list(self._tensor_md(key).chunks)

    def read(self, key: str, offsets: Sequence[int] | None = None,
             sizes: Sequence[int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The box [offsets, offsets+sizes) of tensor ``key`` (whole tensor by default)."""
        md = self._tensor_md(key)
        offsets = tuple(offsets) if offsets is not None else (0,) * len(md.size)
        sizes = tuple(sizes) if sizes is not None else tuple(md.size)
        if out is None:
            whole = self._load_whole_file_chunk(key, offsets, sizes)
            if whole is not None:
                return whole
            out = torch.empty(sizes, dtype=md.properties.dtype)
        if self._read_box_mapped(key, offsets, sizes, out):
            return out
        box = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, md, [box])
        planner = _BoxLoadPlanner(out, offsets)
        self.reader.read_data(LoadPlan(items), planner).wait()
        return out

    def _whole_file(self, key: str, chunk_offsets: tuple):
        """The file of the stored chunk at ``chunk_offsets`` when it holds only that chunk (what
        ``write_dcp`` writes), else None."""
        info = self.metadata.storage_data.get(MetadataIndex(key, torch.Size(chunk_offsets)))
        if info is None or getattr(info, "transform_descriptors", None):
            return None
        f = self.path / info.relative_path
        return f if info.offset == 0 and f.stat().st_size == info.length else None

    def _read_box_mapped(self, key: str, offsets: tuple, sizes: tuple, out: torch.Tensor) -> bool:
        """Copy a box that lies inside one whole-file chunk straight from a memory map of that file.
        torch's reader loads the whole chunk for any box of it: reading TP parts of a layer tensor
        then reads the chunk once per TP rank; the map reads only the pages the box touches."""
        for c in self.chunks(key):
            lo, n = tuple(c.offsets), tuple(c.sizes)
            if all(l <= o and o + z <= l + m for l, m, o, z in zip(lo, n, offsets, sizes)):
                break
        else:
            return False
        f = self._whole_file(key, lo)
        if f is None:
            return False
        t = self._load_chunk_file(f, key, n, mmap=True)
        box = t[tuple(slice(o - l, o - l + z) for l, o, z in zip(lo, offsets, sizes))]
        out.copy_(box)
        del t, box  # drop the map: its pages stop counting as ours
        return True

    def _load_chunk_file(self, f: Path, key: str, shape: tuple, mmap: bool) -> torch.Tensor:
        """The tensor a whole-file chunk holds, checked against the metadata's shape and dtype."""
        t = safe_pickle.load_torch(f, mmap=mmap)
        if tuple(t.shape) != tuple(shape) or t.dtype != self.dtype(key):
            raise ValueError(f"{f}: holds {tuple(t.shape)} {t.dtype}, the metadata says {tuple(shape)} "
                             f"{self.dtype(key)} for {key}: the checkpoint is damaged")
        return t

    def _load_whole_file_chunk(self, key: str, offsets: tuple, sizes: tuple) -> torch.Tensor | None:
        """Fast path for a box that is exactly one stored chunk which fills its own file (what
        ``write_dcp`` writes): ``torch.load`` the file and return its tensor. torch's reader loads
        the chunk and then copies it into the destination; skipping that copy halves the peak
        memory and the memcpy traffic of reading a chunk (reshard reads every chunk twice).
        None when the box is anything else (then the general path reads it)."""
        if not any(tuple(c.offsets) == offsets and tuple(c.sizes) == sizes for c in self.chunks(key)):
            return None
        f = self._whole_file(key, offsets)
        if f is None:
            return None
        t = self._load_chunk_file(f, key, sizes, mmap=False)
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger saved storage: keep only the chunk
        return t

    def read_bytes(self, key: str) -> io.BytesIO:
        """The stored bytes of object ``key``, after checking that they unpickle with the
        restricted loader (so a copy never carries a payload on)."""
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, BytesStorageMetadata):
            raise KeyError(f"{self.path}: no object {key!r} in the checkpoint")
        from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

        item = ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex(key),
                        dest_offsets=torch.Size(()), storage_index=MetadataIndex(key),
                        storage_offsets=torch.Size(()), lengths=torch.Size(()))
        planner = _BoxLoadPlanner(None, ())
        self.reader.read_data(LoadPlan([item]), planner).wait()
        info = self.metadata.storage_data[item.storage_index]
        safe_pickle.check_torch_bytes(planner.bytes, f"{self.path / info.relative_path} (object {key})")
        return planner.bytes

    def nbytes(self) -> int:
        return sum(i.length for i in self.metadata.storage_data.values())


def iter_layer_chunks(key: str, shape: tuple[int, ...], dtype: torch.dtype,
                      layers: Iterable[int], make: Callable[[int], torch.Tensor]) -> list[LazyChunk]:
    """One LazyChunk per layer of a layer-stacked tensor (global ``(num_layers, *shape)``)."""
    layers = list(layers)
    full = (len(layers),) + tuple(shape)
    return [LazyChunk(key, full, (i,) + (0,) * len(shape), (1,) + tuple(shape), dtype,
                      (lambda i=i: make(i).unsqueeze(0))) for i in layers]
