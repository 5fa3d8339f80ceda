"""Which format a run saves (``ckpt_format``) and how a checkpoint is found and loaded in either one
(``auto_detect_ckpt_format``).

* ``torch_dist``: megatron-core dist_checkpointing, with optimizer and RNG state (io.py).
* ``torch``: Megatron-LM's legacy per-rank files ``iter_*/mp_rank_XX[_YYY]/model_optim_rng.pt`` at
  the run's TP/PP (legacy.py: the same writer as ``hpctrain reshard --format torch``). They hold the
  weights, the iteration, the consumed samples and the LR schedule: a resume continues the schedule but
  starts a new optimizer state (config.validate refuses ``torch`` unless no_save_optim and no_save_rng).
  A save writes the torch_dist files to a staging folder, rank 0 re-lays them into rank files, reads
  them back bit-exactly, removes the staging folder and then writes the tracker.

Loading detects the format of the checkpoint found; with ``auto_detect_ckpt_format = false`` it must be
``ckpt_format``. A legacy checkpoint loads at any TP/PP (its tensors are re-split for this rank).
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import torch.distributed as tdist

from hpctrain.checkpoint import convert_dcp as cd
from hpctrain.checkpoint import io, layout, legacy

log = logging.getLogger(__name__)


def find_input(ckpt: str) -> tuple[layout.CheckpointRef, str]:
    """The newest complete checkpoint under ``ckpt`` and its format (torch_dist | torch)."""
    ref = layout.find_latest(ckpt)
    p = Path(ckpt)
    if ref is None and p.is_dir() and any(p.glob("mp_rank_*")):  # an explicit legacy iter dir
        it = 0 if p.name == layout.RELEASE else int(p.name.split("_")[-1]) if p.name.startswith("iter_") else None
        if it is None:
            raise ValueError(f"{p}: a legacy checkpoint directory must be named iter_XXXXXXX or release")
        ref = layout.CheckpointRef(p.parent, p, it, p.name == layout.RELEASE)
    if ref is None:
        layout.require_latest(ckpt)  # raises with the explanation
    return ref, format_of(ref)


def format_of(ref: layout.CheckpointRef) -> str:
    if (ref.path / ".metadata").is_file():
        return "torch_dist"
    if any(ref.path.glob("mp_rank_*")):
        return "torch"
    raise FileNotFoundError(f"{ref.path}: neither torch_dist files (.metadata) nor legacy mp_rank_* "
                            "directories: the checkpoint is incomplete or not a megatron checkpoint")


def save(cfg, root, progress: io.TrainProgress, chunks, optimizer, scheduler) -> Path:
    """Save iteration ``progress.iteration`` under ``root`` in ``cfg.checkpoint.ckpt_format``."""
    ck = cfg.checkpoint
    if ck.ckpt_format == "torch_dist":
        return io.save_checkpoint(root, progress, chunks, optimizer, scheduler,
                                  save_optim=not ck.no_save_optim, save_rng=not ck.no_save_rng)
    return _save_legacy(cfg, Path(root), progress, chunks, scheduler)


def _save_legacy(cfg, root: Path, progress: io.TrainProgress, chunks, scheduler) -> Path:
    """torch_dist into ``<root>/.staging-iter_N/dist``, re-laid by rank 0 into rank files next to it, read
    back bit-exactly, renamed to ``iter_N`` (a previous ``iter_N`` is moved aside first, so the tracker
    never names a half-written folder), tracker written, staging removed."""
    from megatron.core import parallel_state as ps

    from hpctrain.checkpoint.reshard import verify_legacy

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    out = layout.checkpoint_dir(root, progress.iteration)
    staging = root / f".staging-{out.name}"
    if tdist.get_rank() == 0 and staging.exists():
        shutil.rmtree(staging)  # left over from an interrupted save
    tdist.barrier()
    dist = io.save_checkpoint(staging / "dist", progress, chunks, save_optim=False, save_rng=False)
    if tdist.get_rank() == 0:
        shape = {k: v for k, v in dataclasses.asdict(cfg.model).items() if v is not None}
        meta = legacy.Meta(progress.iteration, False, progress.consumed_train_samples, scheduler.state_dict(), shape)
        src = legacy.DistSource(cd.DcpReader(dist), meta)
        new = staging / out.name
        legacy.write_legacy(src, tp, pp, new)
        verify_legacy(src, new, tp, pp)
        if out.exists():
            out.rename(staging / "previous")
        new.rename(out)
        layout.write_tracker(root, progress.iteration)
        shutil.rmtree(staging)
    tdist.barrier()
    return out


def load(cfg, path, chunks, optimizer, scheduler) -> io.TrainProgress | None:
    """Load the newest complete checkpoint under ``path`` (see io.load_checkpoint for what is restored)."""
    ck, finetune = cfg.checkpoint, cfg.model.finetune
    ref = layout.find_latest(path)
    if ref is None and any(Path(path).glob("mp_rank_*")):  # an explicit legacy iter dir
        ref, _ = find_input(path)
    kind = format_of(ref) if ref is not None else "torch_dist"  # nothing found: io says what was looked for
    if kind != ck.ckpt_format and not ck.auto_detect_ckpt_format:
        from hpctrain.config import ConfigError
        raise ConfigError(f"{ref.path} is a {kind} checkpoint, but ckpt_format = {ck.ckpt_format!r} and "
                          "auto_detect_ckpt_format = false: set auto_detect_ckpt_format = true (either format "
                          f"loads) or ckpt_format = {kind!r}")
    if kind == "torch":
        return _load_legacy(ref, chunks, optimizer, scheduler, finetune)
    return io.load_checkpoint(path, chunks, optimizer, scheduler, finetune=finetune,
                              load_optim=not ck.no_load_optim, load_rng=not ck.no_load_rng,
                              exit_on_missing=ck.exit_on_missing_checkpoint)


def _load_legacy(ref: layout.CheckpointRef, chunks, optimizer, scheduler, finetune: bool) -> io.TrainProgress:
    """This rank's weights re-split from the legacy rank files (any saved TP/PP), plus iteration,
    consumed samples and LR schedule unless finetune. There is no optimizer or RNG state to restore."""
    from megatron.core import parallel_state as ps

    if len(chunks) > 1:
        raise ValueError(f"{ref.path}: a legacy torch checkpoint loads without virtual pipeline stages; "
                         "convert it first: hpctrain reshard CKPT --tp T --pp P --out DIR (torch_dist)")
    src = legacy.LegacySource(ref.path)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    state = legacy.rank_state_dict(src, tp, pp, ps.get_tensor_model_parallel_rank(),
                                   ps.get_pipeline_model_parallel_rank())
    model = io._unwrap(chunks[0])
    want = set(model.state_dict())
    if want != set(state):
        raise ValueError(f"{ref.path} does not fit the model at TP={tp} PP={pp}: missing "
                         f"{sorted(want - set(state))[:4]}, unexpected {sorted(set(state) - want)[:4]}")
    model.load_state_dict(state, strict=True)
    if optimizer is not None and hasattr(optimizer, "reload_model_params"):
        optimizer.reload_model_params()  # copy the loaded weights into the fp32 main params
    m = src.meta
    if src.meta.optimizer:
        log.warning("%s: holds optimizer state (%s), which hpctrain does not read", ref.path, m.optimizer)
    if finetune or m.release:
        return io.TrainProgress(0, 0)
    if scheduler is not None and m.opt_param_scheduler:
        scheduler.load_state_dict(m.opt_param_scheduler)
    log.info("loaded legacy torch checkpoint %s (saved at TP=%d PP=%d, now TP=%d PP=%d): weights, iteration %d, "
             "LR schedule; the format holds no optimizer or RNG state (Adam moments start from zero)",
             ref.path, src.tp, src.pp, tp, pp, m.iteration)
    return io.TrainProgress(m.iteration, m.consumed_train_samples)
