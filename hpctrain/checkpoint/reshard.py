"""``hpctrain reshard CKPT --tp T --pp P --out D [--format torch_dist]``: offline, CPU only.

Scope today: torch_dist -> torch_dist. megatron-core's torch_dist files hold GLOBAL tensors (each
rank wrote its chunk of the global shape), so a torch_dist checkpoint already loads at any TP/PP;
what a login node needs before a job starts is (1) the check that the new layout fits the model
(TP divides heads, query groups, ffn and padded vocab; PP divides layers) and (2) a verified,
complete copy in a new place. This command does both, streaming chunk by chunk (bounded memory,
tqdm progress), copies every tensor and object (weights and any optimizer state) bit-exactly,
reads every chunk back to compare, and writes the tracker last.

Not yet: megatron's legacy per-rank ``torch`` format (mp_rank_XX[_YYY]/model_optim_rng.pt), in
either direction: ``--format torch`` and legacy inputs are refused with that message.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from hpctrain.checkpoint import convert_dcp as cd
from hpctrain.checkpoint import layout
from hpctrain.checkpoint.convert_hf_to_mcore import _progress, prepare_output
from hpctrain.model.mcore_config import check_pp, check_tp

LEGACY = "legacy per-rank 'torch' format (mp_rank_XX/model_optim_rng.pt) is not supported yet"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpctrain reshard", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="checkpoint root (or save dir with v<N>-* versions)")
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--pp", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=("torch_dist", "torch"), default="torch_dist")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no_progress", action="store_true")
    return p


def reshard(ckpt: str, tp: int, pp: int, out: str, overwrite: bool = False,
            progress: bool = True) -> layout.CheckpointRef:
    src = layout.find_latest(ckpt)
    if src is None:
        if any(Path(ckpt).rglob("mp_rank_*")):
            raise ValueError(f"{ckpt}: {LEGACY}")
        layout.require_latest(ckpt)
    if (src.root / "config.json").is_file():
        from hpctrain.model.build import model_args_from_checkpoint

        args = model_args_from_checkpoint(src.root)
        check_tp(args, tp)
        check_pp(args, pp)
    reader = cd.DcpReader(src.path)
    dst_root = Path(out)
    prepare_output(dst_root, overwrite)
    items = _copy_items(reader)
    bar = _progress(len(items), "reshard", progress)
    dst = dst_root / src.path.name
    cd.write_dcp(dst, items, common=None, on_item=lambda it: bar.update(1))
    bar.close()
    shutil.copy2(src.path / "common.pt", dst / "common.pt")  # not {}: keep the trainer's state
    for f in src.root.iterdir():
        if f.is_file() and f.name != layout.TRACKER:
            shutil.copy2(f, dst_root / f.name)
    verify(reader, cd.DcpReader(dst))
    layout.write_tracker(dst_root, layout.RELEASE if src.release else src.iteration)
    return layout.require_latest(dst_root)


def _copy_items(reader: cd.DcpReader) -> list:
    items: list = []
    for key, md in reader.metadata.state_dict_metadata.items():
        if key in reader.tensor_keys():
            for c in md.chunks:
                off, size = tuple(c.offsets), tuple(c.sizes)
                items.append(cd.LazyChunk(key, tuple(md.size), off, size, md.properties.dtype,
                                          lambda k=key, o=off, s=size: reader.read(k, o, s)))
        else:
            items.append(cd.LazyBytes(key, lambda k=key: reader.read_bytes(k)))
    return items


def verify(a: cd.DcpReader, b: cd.DcpReader) -> None:
    """Every tensor chunk and object of ``a`` is bit-identical in ``b``."""
    if sorted(a.keys()) != sorted(b.keys()):
        raise RuntimeError(f"verify: {b.path} has different keys than {a.path}")
    for key in a.tensor_keys():
        for c in a.chunks(key):
            off, size = tuple(c.offsets), tuple(c.sizes)
            if not torch.equal(a.read(key, off, size), b.read(key, off, size)):
                raise RuntimeError(f"verify: {key} at {off} differs in {b.path}")
    for key in set(a.keys()) - set(a.tensor_keys()):
        if a.read_bytes(key).getvalue() != b.read_bytes(key).getvalue():
            raise RuntimeError(f"verify: object {key} differs in {b.path}")


def run(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    if a.format == "torch":
        print(f"hpctrain reshard: --format torch: {LEGACY}", file=sys.stderr)
        return 2
    try:
        ref = reshard(a.ckpt, a.tp, a.pp, a.out, a.overwrite, not a.no_progress)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"hpctrain reshard: {e}", file=sys.stderr)
        return 1
    print(f"wrote {ref.path} (verified; loads at TP={a.tp} PP={a.pp})")
    return 0
