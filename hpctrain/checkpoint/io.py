"""Sharded save/load of a training run with megatron-core dist_checkpointing (torch_dist).

Saved under ``<root>/iter_XXXXXXX/`` (hpctrain.checkpoint.layout): the model (key "model", or
"model0", "model1", ... for virtual pipeline chunks), the optimizer (distributed optimizer state in
the DP-reshardable form, so a run can resume at another DP size), the LR scheduler, the RNG state
(one object per (PP, TP) rank, DP ranks are replicas) and the training progress (iteration,
consumed samples). The tracker file is written by rank 0 after every rank has finished writing
(barrier), atomically; a save that dies half-way leaves the previous tracker, so the previous
checkpoint stays the latest, and a directory without tracker entry is never loaded. A save never
writes into the tracker's own checkpoint: one of the same iteration is written to ``<iter>.next``
and swapped in afterwards (``_replace``). Loading reads every pickle through safe_pickle.
"""
from __future__ import annotations

import logging
import os
import queue
import random
import time
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from hpctrain.checkpoint import layout, safe_pickle
from hpctrain.checkpoint.match import check_model_matches
from hpctrain.files import fsync_dir

log = logging.getLogger(__name__)

OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
FORMAT_VERSION = 2  # 2: the RNG state per DP rank (_rng_object)


@dataclass
class TrainProgress:
    iteration: int = 0
    consumed_train_samples: int = 0
    extra: dict = field(default_factory=dict)


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _model_sharded(chunks) -> dict:
    return {_model_key(i, len(chunks)): _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _unwrap(c):
    """The GPTModel inside the DDP / Float16Module wrappers."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(c)


LORA_SUFFIXES = (".lora_A", ".lora_B")


def _has_lora(chunks) -> bool:
    return any(n.endswith(LORA_SUFFIXES) for c in chunks for n, _ in _unwrap(c).named_parameters())


def _lora_meta(chunks) -> dict | None:
    """The LoRA settings (model/lora/settings.py) the adapters were trained with, for the export."""
    s = getattr(_unwrap(chunks[0]), "lora_settings", None)
    if s is None:
        return None
    return dict(rank=s.rank, alpha=s.alpha, dropout=s.dropout, use_rslora=s.use_rslora, bias=s.bias,
                modules_to_save=list(s.modules_to_save))


def _without_lora(state: dict) -> dict:
    """The model's sharded state without its adapters (a base checkpoint has none to load)."""
    return {k: ({n: t for n, t in v.items() if not n.endswith(LORA_SUFFIXES)} if k.startswith("model") else v)
            for k, v in state.items()}


def _lora_fit(ref_path, content: dict, chunks, finetune: bool) -> bool:
    """Whether the adapters come from the checkpoint. A LoRA run may start from a base checkpoint (its
    adapters keep their fresh init); a LoRA checkpoint never loads into a run without adapters."""
    mine, saved = _has_lora(chunks), bool(content.get("lora"))
    if saved and not mine:
        raise ValueError(f"{ref_path} holds LoRA adapters (a train_type lora run): continue it with "
                         "--train_type lora (same targets), or write the merged model first: hpctrain export "
                         "--mcore_model ... --to_hf true --merge_lora true")
    if mine and not saved and not finetune:
        log.info("%s holds no adapters: the LoRA adapters start fresh (iteration and schedule still load)",
                 ref_path)
    return mine and saved


def _layout() -> dict:
    from megatron.core import parallel_state as ps
    return dict(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                dp=ps.get_data_parallel_world_size(), cp=ps.get_context_parallel_world_size(),
                ep=ps.get_expert_model_parallel_world_size(), etp=ps.get_expert_tensor_parallel_world_size())


def _rng_object(state=None, per_dp: bool = True):
    """The RNG state as a sharded object. One per (PP, TP, DP) rank (``rng_state_dp``, FORMAT_VERSION
    2): DP ranks draw different amounts (dropout over micro-batches of different shapes), so DP rank
    0's state does not fit the others. ``per_dp=False``: the version-1 layout, one per (PP, TP) rank
    with the DP ranks as replicas (Megatron-LM's, without data_parallel_random_init)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    ranks = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    if per_dp:
        dp = ps.get_data_parallel_world_size(with_context_parallel=True)
        return ShardedObject("rng_state_dp", state, (pp, tp, dp), ranks + (dp_rank,), replica_id=0)
    return ShardedObject("rng_state", state, (pp, tp), ranks, replica_id=dp_rank)


def get_rng_state() -> dict:
    from megatron.core import tensor_parallel
    st = {"random": random.getstate(), "np": np.random.get_state(), "torch": torch.get_rng_state(),
          "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    from megatron.core import tensor_parallel
    random.setstate(st["random"])
    np.random.set_state(st["np"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(st["tracker"])


def _ensure_optimizer_state(optimizer) -> None:
    """Give a not-yet-stepped Adam its (zero) state incl. ``step``: megatron-core's distributed
    optimizer builds the loading state dict from the current state and needs ``step`` in it."""
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(o, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p.data)
                    st["exp_avg_sq"] = torch.zeros_like(p.data)
                    st["step"] = torch.tensor(0.0)


def _find_step(sd):
    """Adam's step count from a (nested) optimizer state dict's param_groups, or None."""
    if isinstance(sd, dict):
        for g in sd.get("param_groups", []) if isinstance(sd.get("param_groups"), list) else []:
            if isinstance(g, dict) and "step" in g:
                return float(g["step"])
        for v in sd.values():
            found = _find_step(v)
            if found is not None:
                return found
    elif isinstance(sd, list):
        for v in sd:
            found = _find_step(v)
            if found is not None:
                return found
    return None


def _restore_adam_steps(optimizer, step) -> None:
    """Without apex/TE, megatron-core 0.16.1's distributed optimizer restores Adam's ``step`` as one
    tensor shared by every param (and then loses it to the param-state load): give each param
    its own tensor with the saved count, as torch's Adam keeps it."""
    if step is None:
        return
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(o, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for st in inner.state.values():
            if "step" in st or "exp_avg" in st:
                st["step"] = torch.tensor(step, dtype=torch.float32)


def _in_process_results_queue() -> None:
    """megatron-core collects the file writers' results through a queue it creates on first use as
    a spawn-context multiprocessing Manager: one more Python process per rank, which re-imports the
    launcher's main module (7-20 s for the first save on a busy 2-core host). Our saves are
    synchronous - the writer runs in this process and only its forked workers need a process queue
    (megatron makes that one itself) - so a plain in-process queue carries the results."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = queue.Queue()


def save_checkpoint(root, progress: TrainProgress, chunks, optimizer=None, scheduler=None,
                    save_optim: bool = True, save_rng: bool = True) -> Path:
    """Save iteration ``progress.iteration`` under ``root``; returns the iter directory.

    Never writes into the checkpoint the tracker names: a save of that same iteration goes to
    ``<iter>.next`` and is swapped in after every rank finished (``_replace``)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    root = Path(root)
    final = layout.checkpoint_dir(root, progress.iteration)
    target = _broadcast_path(_prepare_target(root, final) if tdist.get_rank() == 0 else None)
    state = _model_sharded(chunks)
    content = {"model": True, "optimizer": False, "rng": False, "lora": _has_lora(chunks)}
    if save_optim and optimizer is not None:
        model_sd = _model_sharded(chunks)
        _ensure_optimizer_state(optimizer)  # fp16 with every step skipped so far has no Adam state yet
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=OPTIM_METADATA)
        content["optimizer"] = True
    if scheduler is not None:  # small, and needed to continue the LR schedule even without optimizer state
        state["opt_param_scheduler"] = scheduler.state_dict()
    if save_rng:
        state["rng_state"] = _rng_object(get_rng_state())
        content["rng"] = True
    state.update(iteration=progress.iteration, consumed_train_samples=progress.consumed_train_samples,
                 hpctrain=dict(format=FORMAT_VERSION, content=content, layout=_layout(),
                               num_model_chunks=len(chunks), extra=progress.extra, lora=_lora_meta(chunks)))
    _in_process_results_queue()
    strategy = get_default_save_sharded_strategy("torch_dist")
    if hasattr(strategy, "thread_count"):
        strategy.thread_count = 1
    dist_checkpointing.save(state, str(target), sharded_strategy=strategy,
                            content_metadata=OPTIM_METADATA)
    tdist.barrier()  # every rank's files are written before the checkpoint is declared complete
    _fault_pause("BEFORE_TRACKER")  # a window in which the save is incomplete
    if tdist.get_rank() == 0:
        if target != final:
            _replace(final, target)
        layout.write_tracker(root, progress.iteration)
    tdist.barrier()
    return final


def _prepare_target(root: Path, final: Path) -> Path:
    """Rank 0: the empty directory this save writes into (``final``, or ``<final>.next`` when
    ``final`` is the tracker's checkpoint), after undoing what an interrupted save left."""
    layout.recover(root)
    latest = layout.complete_checkpoint(root)
    target = layout.replacement_dirs(final)[0] if latest is not None and latest.path == final else final
    if target.exists():
        shutil.rmtree(target)  # left over from an interrupted save: never counted as complete
    target.mkdir(parents=True)
    return target


def _replace(final: Path, new: Path) -> None:
    """Swap the complete ``new`` in for ``final`` (the tracker's checkpoint) by two renames. Killed
    between them, the tracker's checkpoint is ``<final>.prev`` (layout.complete_checkpoint finds
    it there, layout.recover puts it back); after them, the new one."""
    prev = layout.replacement_dirs(final)[1]
    os.rename(final, prev)
    _fault_pause("IN_REPLACE")
    os.rename(new, final)
    fsync_dir(final.parent)
    shutil.rmtree(prev)


def _fault_pause(stage: str) -> None:
    """Fault-injection hook for the crash tests: sleep $HPCTRAIN_FAULT_PAUSE_<stage> seconds."""
    pause = float(os.environ.get(f"HPCTRAIN_FAULT_PAUSE_{stage}", "0") or 0)
    if pause:
        time.sleep(pause)


def _broadcast_path(path: Path | None) -> Path:
    obj = [None if path is None else str(path)]
    tdist.broadcast_object_list(obj, src=0)
    return Path(obj[0])


def _is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in inner)


def load_checkpoint(path, chunks, optimizer=None, scheduler=None, finetune: bool = False,
                    load_optim: bool = True, load_rng: bool = True, exit_on_missing: bool = True
                    ) -> TrainProgress | None:
    """Load the newest complete checkpoint reachable from ``path`` into ``chunks`` (and, unless
    finetune, the optimizer, scheduler, RNG and progress). Returns None when there is none and
    ``exit_on_missing`` is False. Its pickles go through safe_pickle: a crafted file is refused."""
    from megatron.core import dist_checkpointing

    safe_pickle.install()
    ref = layout.find_latest(path)
    if ref is None:
        if exit_on_missing:
            layout.require_latest(path)  # raises with the explanation
        log.warning("no complete checkpoint under %s: starting from scratch", path)
        return None
    safe_pickle.check_checkpoint_dir(ref.path)
    common = dist_checkpointing.load_common_state_dict(str(ref.path))
    meta = common.get("hpctrain", {}) if isinstance(common, dict) else {}
    content = meta.get("content", {"model": True})
    state = _model_sharded(chunks)
    with_lora = _lora_fit(ref.path, content, chunks, finetune)
    if _has_lora(chunks) and not with_lora:
        state = _without_lora(state)
    # optimizer state of a full-training checkpoint belongs to other parameters than a LoRA run's
    want_optim = (not finetune and load_optim and optimizer is not None and content.get("optimizer")
                  and with_lora == _has_lora(chunks))
    saved_layout = meta.get("layout", {})
    now = _layout()
    # Checkpoints from before EP was recorded were written at EP = ETP... = 1 / TP (the defaults).
    same_layout = all(saved_layout.get(k, {"ep": 1, "etp": saved_layout.get("tp")}.get(k)) == now[k]
                      for k in ("tp", "pp", "ep", "etp"))
    if want_optim and not same_layout and _is_distributed_optimizer(optimizer):
        # megatron-core 0.16.1's dp_reshardable buffers follow the TP/PP/EP layout (a DP change is fine);
        # loading them at another layout dies deep inside with KeyError 'optimizer.distributed...'.
        def where(d):
            return f"TP={d.get('tp')} PP={d.get('pp')} EP={d.get('ep', 1)} ETP={d.get('etp', d.get('tp'))}"
        raise ValueError(f"{ref.path}: the distributed optimizer state was saved at {where(saved_layout)} and "
                         f"cannot be loaded at {where(now)}; resume at the saved layout, or pass "
                         "--no_load_optim true (weights, iteration and schedule are kept; Adam moments restart)")
    if want_optim:
        _ensure_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(_model_sharded(chunks), is_loading=True,
                                                          metadata=OPTIM_METADATA)
    per_dp = meta.get("format", 1) >= 2
    now = _layout()
    fits = same_layout and (not per_dp or (saved_layout.get("dp"), saved_layout.get("cp", 1)) == (now["dp"], now["cp"]))
    want_rng = not finetune and load_rng and content.get("rng") and fits
    if not finetune and load_rng and content.get("rng") and not fits:
        log.warning("checkpoint was saved at %s, now %s: RNG state not restored", meta.get("layout"), _layout())
    if want_rng:
        state["rng_state"] = _rng_object(per_dp=per_dp)
    check_model_matches(ref.path, {k: v for k, v in state.items() if k.startswith("model")})
    loaded = dist_checkpointing.load(state, str(ref.path))
    for i, c in enumerate(chunks):
        # the bare model: megatron-core's Float16Module.load_state_dict returns nothing
        missing, unexpected = _unwrap(c).load_state_dict(loaded[_model_key(i, len(chunks))], strict=False)
        missing = [k for k in missing if not (k.endswith(LORA_SUFFIXES) and not with_lora)]
        if missing or unexpected:
            raise RuntimeError(f"{ref.path}: loading the model state failed: missing {missing[:4]}, "
                               f"unexpected {unexpected[:4]}")
    if want_optim:
        with torch.no_grad():  # the optimizer load copies into leaf params
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer, _find_step(loaded["optimizer"]))
    elif optimizer is not None and hasattr(optimizer, "reload_model_params"):
        optimizer.reload_model_params()  # copy loaded weights into fp32 main params
    if want_rng:
        set_rng_state(loaded["rng_state"])
    if finetune:
        return TrainProgress(0, 0)
    if scheduler is not None and "opt_param_scheduler" in common:
        scheduler.load_state_dict(common["opt_param_scheduler"])
    return TrainProgress(int(common.get("iteration", ref.iteration)),
                         int(common.get("consumed_train_samples", 0)), meta.get("extra", {}))
