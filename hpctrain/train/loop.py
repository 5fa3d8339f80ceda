"""The training loop: build, (re)load, step, log, evaluate, save, stop on signal.

Data comes from a *batch source*: ``source(consumed_samples, num_microbatches, micro_batch_size)``
returns this DP rank's micro-batches (contract-3 dicts) of the global batch that starts at
``consumed_samples``; its ``num_samples`` attribute (optional) sizes epochs. A resumed run asks for
the batch at the restored ``consumed_samples``, so the data continues where it stopped.
A validation source is ``valid(num_microbatches, micro_batch_size)`` -> micro-batches.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as tdist

from hpctrain.checkpoint import formats, layout
from hpctrain.checkpoint.io import TrainProgress
from hpctrain.checkpoint.lock import SaveLock
from hpctrain.errors import UserError, disk_full_in
from hpctrain.files import copy_atomic, space_problem, tree_bytes
from hpctrain.train import (children, cuda_graph, dist, hf_init, metrics, model_setup, model_source, moe_metrics,
                            optim, step)
from hpctrain.train.logger import TrainLogger
from hpctrain.train.profiling import StepProfiler
from hpctrain.train.signals import REQUEUE_EXIT_CODE, StopRequest
from hpctrain.train.step import NonFiniteError

log = logging.getLogger("hpctrain.train")

HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
            "merges.txt", "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "chat_template.jinja")


@dataclass
class RunResult:
    exit_code: int
    iteration: int
    save_dir: str | None
    losses: list[float]
    last_checkpoint: str | None


def _microbatches_per_step(cfg, dp: int) -> int:
    t = cfg.train
    per = t.micro_batch_size * dp
    if t.global_batch_size % per:
        raise ValueError(f"global_batch_size ({t.global_batch_size}) must be a multiple of micro_batch_size "
                         f"({t.micro_batch_size}) x data-parallel size ({dp}) = {per}")
    return t.global_batch_size // per


def total_iters(cfg, source) -> int:
    """train_iters, or the iterations of max_epochs over the dataset, whichever ends training first."""
    t = cfg.train
    n = getattr(source, "num_samples", None)
    by_epochs = max(1, math.ceil(t.max_epochs * n / t.global_batch_size)) if t.max_epochs and n else None
    if t.train_iters and by_epochs and by_epochs < t.train_iters:
        log.info("max_epochs = %d ends training at iteration %d (%d samples, global batch %d), before "
                 "train_iters = %d; the LR schedule stays that of train_iters", t.max_epochs, by_epochs, n,
                 t.global_batch_size, t.train_iters)
        return by_epochs
    if t.train_iters or by_epochs:
        return t.train_iters or by_epochs
    raise ValueError("set train_iters, or max_epochs with a dataset of known size")


def _broadcast_str(s: str | None) -> str | None:
    obj = [s]
    tdist.broadcast_object_list(obj, src=0)
    return obj[0]


def prepare_save_dir(cfg, hf_files: Path | None = None) -> str | None:
    """<save>/v<N>-<timestamp> (add_version) made by rank 0; args.json + HF config/tokenizer copied in
    (from ``hf_files`` when given: the conversion of --model's weights holds both)."""
    save = cfg.checkpoint.save
    if not save:
        return None
    root = None
    if tdist.get_rank() == 0:
        root = str(layout.new_version_dir(save)) if cfg.checkpoint.add_version else save
        Path(root).mkdir(parents=True, exist_ok=True)
        _write_args(cfg, Path(root))
        _copy_hf_files(cfg, Path(root), hf_files)
    return _broadcast_str(root)


def _write_args(cfg, root: Path) -> None:
    try:
        from hpctrain.config import dump_json
        dump_json(cfg, root / "args.json")
        return
    except (ImportError, TypeError, AttributeError):
        pass
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    layout.write_atomic(root / "args.json", json.dumps(data, indent=2, default=str))


def _copy_hf_files(cfg, root: Path, hf_files: Path | None) -> None:
    src = hf_files or (p.parent if (p := model_source.find_hf_config(cfg)) else None)
    if src is None:
        return
    for name in HF_FILES:
        f = src / name
        if f.is_file() and not (root / name).exists():
            copy_atomic(f, root / name)  # a run killed mid-copy leaves no truncated file to copy on
    if (root / "config.json").is_file():  # the run's weights are in the dtype it trains in
        from hpctrain.model.families import read_config_json, with_dtype

        hf = with_dtype(read_config_json(root / "config.json"), cfg.model.torch_dtype or "float32")
        layout.write_atomic(root / "config.json", json.dumps(hf, indent=2, sort_keys=True))


def setup(cfg, info) -> tuple[list, Any, Any]:
    """Model chunks (DDP-wrapped, on the device), optimizer, TransformerConfig."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    tcfg = model_setup.transformer_config(cfg, info.device.type)
    if tdist.get_backend() == "gloo" and cfg.parallel.pipeline_model_parallel_size == 2 and \
            (cfg.parallel.virtual_pipeline_model_parallel_size or 1) > 1:
        # Interleaved PP=2: the previous and the next stage are the same rank, and in one batched
        # exchange a rank sends it an activation AND a gradient of the same shape. gloo matches a
        # pair's messages in issue order, and the batched order (send_prev before send_next) is
        # not the receiver's: activations and gradients swap silently (measured: wrong losses
        # from the 3rd micro-batch on). The unbatched path orders ops by rank parity to match.
        tcfg.batch_p2p_comm = False
    chunks = model_setup.build_model_chunks(cfg, tcfg)
    if info.device.type == "cuda":
        chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
    if tcfg.fp16 or tcfg.bf16:
        chunks = [Float16Module(tcfg, c) for c in chunks]
    chunks = model_setup.wrap_ddp(cfg, tcfg, chunks)
    for c in chunks:
        c.broadcast_params()  # identical DP replicas whatever each rank initialised
    opt = optim.build_optimizer(cfg, chunks)
    # With CUDA graphs the step runs finalize_model_grads itself, after the replay (cuda_graph.py).
    tcfg.finalize_model_grads_func = None if cuda_graph.enabled(cfg) else finalize_model_grads
    tcfg.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    if cfg.parallel.overlap_param_gather:
        tcfg.param_sync_func = [c.start_param_sync for c in chunks]
    if tcfg.fp16:
        tcfg.grad_scale_func = opt.scale_loss
    return chunks, opt, tcfg


def _row_length(cfg, device) -> int | None:
    """Packed rows on a GPU all get the packing length: every micro-batch then has one shape, so
    flex_attention and the block-mask builder compile once (a new length recompiled them: one
    23 s iteration in the 2026-12-02 lease). Rows are nearly full after packing, so the extra
    padding is small; on the CPU nothing is compiled and rows keep their own length. A CUDA-graph
    replay needs one shape for unpacked rows too (max_length, or the pt window)."""
    if device.type != "cuda" or not (cfg.data.packing or cuda_graph.enabled(cfg)):
        return None
    n = cfg.data.packing_length or cfg.data.max_length
    m = _pad_multiple(cfg)
    return -(-n // m) * m if n else None


def _pad_multiple(cfg) -> int:
    p = cfg.parallel
    m = p.tensor_model_parallel_size if p.sequence_parallel else 1
    return m * (2 * p.context_parallel_size if p.context_parallel_size > 1 else 1)


def run(cfg, source: Callable, valid: Callable | None = None,
        model: model_source.ModelSource | None = None) -> RunResult:
    """Train; returns exit code 0 (done) or REQUEUE_EXIT_CODE (stopped on a signal after saving).
    ``model``: what ``model_source.fill_model_fields(cfg)`` returned, when the caller already ran it.
    The save folder is locked for the run (checkpoint/lock.py): a second run on it refuses."""
    info = dist.init_distributed(cfg)
    children.die_with_parent()  # megatron's checkpoint writers and data workers end with us
    lock = _lock_save_folder(cfg)
    try:
        return _run(cfg, source, valid, info, model)
    finally:
        if lock is not None:
            lock.release()


def _lock_save_folder(cfg) -> SaveLock | None:
    """Rank 0 takes the lock of --save; every rank raises the refusal (so none trains alone)."""
    if not cfg.checkpoint.save:
        return None
    lock, refusal = None, None
    if tdist.get_rank() == 0:
        lock = SaveLock(cfg.checkpoint.save)
        try:
            lock.acquire()
        except UserError as e:
            refusal = str(e)
    refusal = _broadcast_str(refusal)
    if refusal:
        raise UserError(refusal)
    return lock


def _run(cfg, source: Callable, valid: Callable | None, info, model) -> RunResult:
    p = cfg.parallel
    dp = dist.init_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                  p.context_parallel_size, p.virtual_pipeline_model_parallel_size,
                                  seed=cfg.train.seed, timeout=dist.group_timeout(p),
                                  ep=cfg.moe.expert_model_parallel_size, etp=cfg.moe.expert_tensor_parallel_size)
    if cfg.train.deterministic_mode:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    model = model or model_source.fill_model_fields(cfg)
    n_micro = _microbatches_per_step(cfg, dp)
    iters = total_iters(cfg, source)
    # Before the model exists: the CUDA-graph stream must be current when DDP's hooks are made.
    graph = cuda_graph.StepGraph(cfg.train.cuda_graph_warmup_steps, cuda_graph.start(info.device),
                                 cfg.train.cuda_graph_scope) if cuda_graph.enabled(cfg) else None
    chunks, opt, tcfg = setup(cfg, info)
    sched = optim.build_scheduler(cfg, opt, cfg.train.train_iters or iters)
    progress, scratch = _start_weights(cfg, model, chunks, opt, sched)
    if progress.iteration >= iters:  # e.g. requeued after the last iteration's save: nothing to add
        hf_init.cleanup(scratch)
        if info.is_main:
            log.info("nothing to train: the checkpoint is at iteration %d of %d; exiting without saving",
                     progress.iteration, iters)
        return RunResult(0, progress.iteration, None, [], None)
    try:
        save_dir = prepare_save_dir(cfg, scratch)
    finally:
        hf_init.cleanup(scratch)
    logger = TrainLogger(cfg, save_dir, info.world_size, info.is_main, iters)
    try:
        return _loop(cfg, chunks, opt, sched, progress, source, valid, info, n_micro, iters,
                     save_dir, logger, graph)
    finally:
        _close_logs(logger)
        if cfg.train.manual_gc:
            gc.enable()


def _start_weights(cfg, model, chunks, opt, sched) -> tuple[TrainProgress, Path | None]:
    """(progress, scratch dir of an HF conversion or None): load --load, or --model's HF weights;
    then --adapters (a PEFT folder) into the LoRA adapters."""
    progress, scratch = TrainProgress(), None
    if model.weights == "checkpoint":  # either format: checkpoint/formats.py
        progress = formats.load(cfg, cfg.model.load, chunks, opt, sched) or TrainProgress()
    elif model.weights == "hf":
        scratch = hf_init.load_hf_weights(cfg, chunks, opt, sched)
        # Rank 0 alone converted the weights (which draws from torch's RNG): seed again so that every
        # rank starts training from the RNG state it would have after random init or --load.
        dist.set_seed(cfg.train.seed)
    if cfg.tuner.adapters:
        _load_adapters(cfg, chunks, opt)
    return progress, scratch


def _load_adapters(cfg, chunks, opt) -> None:
    from hpctrain.checkpoint.formats import find_input
    from hpctrain.checkpoint.lora_export import lora_meta
    from hpctrain.config import ConfigError
    from hpctrain.train.adapters import load_adapters

    if cfg.model.load and lora_meta(find_input(cfg.model.load)[0]) is not None:
        raise ConfigError(f"--adapters {cfg.tuner.adapters[0]} and --load {cfg.model.load}, which already holds "
                          "LoRA adapters: drop --adapters to continue that run, or --load a base checkpoint")
    load_adapters(cfg, chunks, cfg.tuner.adapters[0])
    if hasattr(opt, "reload_model_params"):
        opt.reload_model_params()  # the optimizer's fp32 main copies follow the loaded adapters


def _close_logs(logger) -> None:
    """Flush TensorBoard, draw the loss curve: a failure here (a full disk) is a warning, never the
    error a user sees instead of the one that stopped the run."""
    try:
        logger.close()
    except Exception as e:  # noqa: BLE001 - the logs are secondary to the run's own outcome
        log.warning("could not finish the training logs: %s", str(e).splitlines()[0] if str(e) else e)


def _loop(cfg, chunks, opt, sched, progress, source, valid, info, n_micro, iters, save_dir, logger, graph=None):
    t, ck = cfg.train, cfg.checkpoint
    same_len = cfg.parallel.pipeline_model_parallel_size > 1
    pad, row_len = _pad_multiple(cfg), _row_length(cfg, info.device)
    stop = StopRequest()
    if t.manual_gc:
        gc.disable()
    eval_every = cfg.eval.eval_interval or ck.save_interval
    losses, last_ckpt, saved_at = [], None, None
    prof = StepProfiler(cfg, save_dir, info.is_main)
    moe_aux = moe_metrics.has_aux_loss(chunks)

    def save():
        nonlocal last_ckpt, saved_at
        if save_dir is None or saved_at == progress.iteration:
            return
        if t.manual_gc:
            gc.collect()
        t0 = time.time()
        last_ckpt = _save(cfg, save_dir, progress, chunks, opt, sched)
        saved_at = progress.iteration
        if ck.save_safetensors:
            _save_safetensors(save_dir, progress.iteration)
        logger.timers(progress.iteration, {"save": time.time() - t0})
        if info.is_main:
            log.info("saved checkpoint %s", last_ckpt)

    try:
        while progress.iteration < iters:
            t_data = time.time()
            mbs = source(progress.consumed_train_samples, n_micro, t.micro_batch_size)
            prof.before(progress.iteration + 1)
            t0 = time.time()
            try:
                res = step.train_step(chunks, opt, sched, mbs, info.device, progress.iteration + 1, pad,
                                      same_len, row_len, graph)
            except NonFiniteError as e:  # say which checkpoint to go back to
                raise NonFiniteError(f"{e} {nonfinite_advice(save_dir, cfg, progress.iteration + 1)}") from None
            step_time = time.time() - t0
            if moe_aux:  # every rank: collectives
                res.load_balancing_loss = moe_metrics.load_balancing_loss(chunks, len(mbs), info.device)
            progress.iteration += 1
            prof.after(progress.iteration)
            progress.consumed_train_samples += t.global_batch_size
            losses.append(res.loss)
            norm = metrics.params_norm(chunks) if cfg.log.log_params_norm else None  # every rank: collective
            logger.step(progress.iteration, res, step_time, mbs[0]["input_ids"].shape[1], t0 - t_data, norm)
            if t.manual_gc and t.manual_gc_interval and progress.iteration % t.manual_gc_interval == 0:
                gc.collect()
            if valid is not None and eval_every and progress.iteration % eval_every == 0:
                _evaluate(cfg, chunks, valid, info, (pad, row_len), same_len, logger, progress.iteration, n_micro)
            if ck.save_interval and progress.iteration % ck.save_interval == 0:
                save()
            if stop.should_stop():
                save()
                log.warning("stop signal received: saved at iteration %d, exiting with %d (requeue)",
                            progress.iteration, REQUEUE_EXIT_CODE)
                return RunResult(REQUEUE_EXIT_CODE, progress.iteration, save_dir, losses, last_ckpt)
        save()
        if valid is not None and eval_every and progress.iteration % eval_every != 0:
            _evaluate(cfg, chunks, valid, info, (pad, row_len), same_len, logger, progress.iteration, n_micro)
        return RunResult(0, progress.iteration, save_dir, losses, last_ckpt)
    finally:
        stop.restore()


def _evaluate(cfg, chunks, valid, info, pads, same_len, logger, it, n_micro):
    """pads: (pad multiple, fixed row length or None), as for the training step."""
    # eval_iters counts global batches, as in Megatron-LM: each is n_micro micro-batches per DP rank.
    n = cfg.eval.eval_iters
    mbs = valid(n * n_micro if n and n > 0 else None, cfg.train.micro_batch_size)
    if not mbs:
        return
    loss, _ = step.eval_step(chunks, mbs, info.device, pads[0], same_len, pads[1])
    logger.eval(it, loss)


def _save_safetensors(save_dir: str, iteration: int) -> None:
    """save_safetensors: <run>/checkpoint-<iter>/ beside the mcore checkpoint just saved, written by
    rank 0 with the export's converter (HF model, or PEFT adapter for LoRA), staged and renamed."""
    from hpctrain.checkpoint.convert_mcore_to_hf import mcore_to_hf

    out = Path(save_dir) / f"checkpoint-{iteration}"
    if tdist.get_rank() == 0:
        ref = layout.find_latest(save_dir)
        mcore_to_hf(save_dir, str(out), overwrite=True, progress=False, ref=ref)
        log.info("saved safetensors %s", out)
    tdist.barrier()


def _save(cfg, save_dir: str, progress, chunks, opt, sched) -> str:
    """The checkpoint in cfg's format (checkpoint/formats.py); a save that ran out of space is one
    OSError saying so and naming the checkpoint that stays the latest (the failure inside is torch's
    per-rank CheckpointException)."""
    try:
        return str(formats.save(cfg, save_dir, progress, chunks, opt, sched))
    except BaseException as e:  # torch's CheckpointException is a BaseException
        full = _out_of_space(e, save_dir)
        if full is None:
            raise
        raise OSError(full.errno, f"saving iteration {progress.iteration} to {save_dir} failed: "
                      f"{full.strerror[0].lower()}{full.strerror[1:]}; {_latest_line(save_dir)}") from e


def _out_of_space(e: BaseException, save_dir: str) -> OSError | None:
    """The full disk (or file-size limit) behind a failed save, if that is what it was. torch's zip
    writer loses the OS error ('unexpected pos 704 vs 598'), so the space left is checked too,
    against what the previous checkpoint of this run takes (64 MiB without one)."""
    full = disk_full_in(e)
    if full is not None:
        return OSError(full.errno, os.strerror(full.errno) + (f" ({full.filename})" if full.filename else ""),
                       full.filename)
    ref = layout.complete_checkpoint(save_dir)
    return space_problem(save_dir, tree_bytes(ref.path) if ref is not None else 64 * 2**20)


def _latest_line(save_dir: str) -> str:
    ref = layout.complete_checkpoint(save_dir)
    if ref is None:
        return f"{save_dir} holds no complete checkpoint yet"
    return f"the latest complete checkpoint is still {ref.path} (iteration {ref.iteration})"


def nonfinite_advice(save_dir: str | None, cfg, bad_iteration: int) -> str:
    """Which checkpoint to resume from after a non-finite loss/grad norm at ``bad_iteration``.

    The value at iteration k comes from the weights after step k-1: a checkpoint saved at k-1
    already holds them (with save_interval 1, always), so resuming from it repeats the failure."""
    ref = layout.complete_checkpoint(save_dir) if save_dir else None
    if ref is None:
        start = f"; the run started from {cfg.model.load}" if cfg.model.load else ""
        return f"No checkpoint of this run was saved before it{start}."
    where = f"{ref.path} (iteration {ref.iteration})"
    if ref.iteration != bad_iteration - 1:
        return (f"The last checkpoint saved before it is {where}: resume from it (--load {ref.root}), "
                "perhaps with a lower --lr.")
    earlier = [d for it, d in layout.iteration_dirs(ref.root) if it < ref.iteration and layout.find_latest(d)]
    alt = (f"resume from an earlier one, e.g. --load {earlier[-1]}" if earlier else
           f"no earlier checkpoint is left in {ref.root}")
    return (f"Warning: the last checkpoint saved before it, {where}, already holds the weights that "
            f"produced this value (updated by iteration {ref.iteration}'s step): resuming from it "
            f"repeats the failure; {alt}, perhaps with a lower --lr.")
