"""`sft`/`pt --model HF_DIR` without --load: start from the HF weights (as ms-swift 3.8+ does).

Rank 0 converts the HF safetensors (or GGUF) with the streaming converter (one layer's tensor at a
time, hpctrain.checkpoint.convert_hf_to_mcore) into a torch_dist checkpoint in a scratch folder
under --save (shared by the nodes, like the checkpoints), in the run's dtype and with the vocabulary
padded for its TP; every rank then loads it into its own TP/PP slice through the trainer's
checkpoint loader (megatron-core re-lays it out on load; the tensors-vs-parameters check runs
there too). The scratch folder also gives the run its config.json and tokenizer, and is removed
once the run folder has them.
"""
from __future__ import annotations

import datetime
import logging
import os
import shlex
import shutil
import tempfile
from pathlib import Path

import torch.distributed as tdist

from hpctrain.checkpoint.match import CheckpointMismatch
from hpctrain.config.errors import ConfigError

log = logging.getLogger("hpctrain.train")

SCRATCH_PREFIX = ".hf-init-"


def export_hint(model: str) -> str:
    """The commands that do the same by hand (user strings quoted for the shell)."""
    out = f"{Path(model).with_suffix('')}-mcore"
    return (f"hpctrain export --model {shlex.quote(str(model))} --to_mcore true --output_dir "
            f"{shlex.quote(out)}, then train with --load {shlex.quote(out)}")


def scratch_parent(cfg, world: int, local_world: int) -> Path | None:
    """Where the conversion goes: under --save (None: a local temporary folder, single node only)."""
    if cfg.checkpoint.save:
        return Path(cfg.checkpoint.save)
    if world > local_world:
        raise ConfigError("starting from the HF weights of --model on several nodes needs a --save folder "
                          "that every node sees (the weights are converted there once); set --save, or "
                          f"convert first: {export_hint(cfg.model.model)}")
    return None


def _scratch_dir(parent: Path | None) -> Path:
    if parent is None:
        return Path(tempfile.mkdtemp(prefix="hpctrain-hf-init-")) / "mcore"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return parent / f"{SCRATCH_PREFIX}{stamp}-{os.getpid()}"


def _broadcast(obj):
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def _convert(cfg, scratch: Path) -> str | None:
    """Rank 0's conversion; returns an error message instead of raising (the other ranks wait)."""
    from hpctrain.checkpoint.convert_hf_to_mcore import hf_to_mcore

    m = cfg.model
    log.info("weights: converting %s into %s (streaming, %s, vocabulary rows for TP=%d) to start from it",
             m.model, scratch, m.torch_dtype, cfg.parallel.tensor_model_parallel_size)
    try:
        hf_to_mcore(m.model, str(scratch), m.torch_dtype, overwrite=False, progress=False,
                    tp=cfg.parallel.tensor_model_parallel_size)
    except (OSError, ValueError, KeyError) as e:  # bad / partial input: say what is wrong
        return f"{e}"
    except Exception as e:  # anything else still reaches the other ranks (they wait in a broadcast)
        log.exception("weights: converting %s failed", m.model)
        return f"{type(e).__name__}: {e}; or convert it yourself: {export_hint(m.model)}"
    return None


def load_hf_weights(cfg, chunks, optimizer, scheduler) -> Path:
    """Load --model's HF weights into ``chunks`` (and the optimizer's main params); returns the
    scratch checkpoint root (config.json + tokenizer) for ``cleanup`` once the run folder is made."""
    from hpctrain.checkpoint.io import load_checkpoint

    world = tdist.get_world_size()
    parent = scratch_parent(cfg, world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))  # every rank
    scratch = _broadcast(str(_scratch_dir(parent)) if tdist.get_rank() == 0 else None)
    error = _broadcast(_convert(cfg, Path(scratch)) if tdist.get_rank() == 0 else None)
    if error is not None:
        _remove(scratch)
        raise ConfigError(f"cannot start from the HF weights of --model {cfg.model.model}: {error}")
    try:
        load_checkpoint(scratch, chunks, optimizer, scheduler, finetune=True, load_optim=False, load_rng=False)
    except CheckpointMismatch as e:  # name what the user gave, not the scratch folder
        _remove(scratch)
        raise CheckpointMismatch(str(e).replace(f"{scratch}/release", f"--model {cfg.model.model}")) from None
    except BaseException:
        _remove(scratch)
        raise
    log.info("weights: loaded from %s", cfg.model.model)
    return Path(scratch)


def cleanup(scratch) -> None:
    """Remove the scratch conversion (rank 0, after every rank has finished reading it)."""
    if scratch is None:
        return
    tdist.barrier()
    _remove(scratch)


def _remove(scratch) -> None:
    if tdist.get_rank() == 0:
        shutil.rmtree(scratch, ignore_errors=True)
        parent = Path(scratch).parent
        if parent.name.startswith("hpctrain-hf-init-"):
            shutil.rmtree(parent, ignore_errors=True)
