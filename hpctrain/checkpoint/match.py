"""Before loading: the checkpoint's model tensors and the model's parameters must be the same set.

megatron-core's ``dist_checkpointing.load`` reads what the model asks for: a checkpoint tensor the
model has no place for (a Qwen2 checkpoint's QKV biases under ``--add_qkv_bias false``) is dropped
without a word, and one the model wants but the checkpoint lacks fails deep inside torch DCP. This
check compares names and global shapes of the whole model (every pipeline stage: the ranks' keys
are gathered) with the checkpoint's metadata, and refuses a mismatch with both lists.
"""
from __future__ import annotations

import re

from pathlib import Path

import torch.distributed as tdist

from hpctrain.config.errors import ConfigError

SHOWN = 6  # names listed per kind of mismatch (the count says how many more)


class CheckpointMismatch(ConfigError):
    """The checkpoint does not hold the model that was built (one line, exit 2)."""


def model_tensor_shapes(sharded_state: dict) -> dict[str, tuple[int, ...]]:
    """{key: global shape} of the tensors in a (nested) megatron-core sharded state dict of a
    model. Factories (the SwiGLU fc1 split) are built to see the key and shape they save under;
    objects (``_extra_state``) are not tensors and are left out."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out: dict[str, tuple[int, ...]] = {}

    def visit(v) -> None:
        if isinstance(v, ShardedTensorFactory):  # builds a dict, a list or (GroupedMLP's) one tensor
            visit(v.build())
        elif isinstance(v, ShardedTensor):
            out[v.key] = tuple(v.global_shape)
        elif isinstance(v, dict | list | tuple):
            for x in nested_values(v):
                visit(x)

    visit(sharded_state)
    return out


# Optimizer state: "optimizer.*", or "chained_<i>.optimizer.*" when megatron-core chains one optimizer for
# the dense parameters and one for the experts (a MoE model).
_OPTIMIZER_KEY = re.compile(r"^(chained_\d+\.)?optimizer\.")


def is_optimizer_key(key: str) -> bool:
    """Whether a torch_dist key holds optimizer state (plain or chained)."""
    return _OPTIMIZER_KEY.match(key) is not None


def checkpoint_tensor_shapes(ckpt_dir: Path) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the model tensors stored in a torch_dist checkpoint (optimizer state excluded)."""
    from hpctrain.checkpoint.convert_dcp import DcpReader

    reader = DcpReader(ckpt_dir)
    return {k: tuple(reader.shape(k)) for k in reader.tensor_keys() if not _OPTIMIZER_KEY.match(k)}


def _whole_model(shapes: dict) -> dict:
    """The union over all ranks (each pipeline stage holds only its own layers' keys)."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return shapes
    everyone: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(everyone, shapes)
    merged: dict = {}
    for part in everyone:
        merged.update(part)
    return merged


def _names(keys: list) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def mismatch(model: dict, stored: dict) -> list[str]:
    """The differences between two {key: shape} maps, as phrases (empty when they match)."""
    missing = sorted(set(model) - set(stored))
    unexpected = sorted(set(stored) - set(model))
    shapes = [f"{k} {stored[k]} in the checkpoint vs {model[k]} in the model"
              for k in sorted(set(model) & set(stored)) if model[k] != stored[k]]
    out = []
    if missing:
        out.append(f"{len(missing)} model parameters are not in the checkpoint ({_names(missing)})")
    if unexpected:
        out.append(f"{len(unexpected)} checkpoint tensors have no place in the model ({_names(unexpected)})")
    if shapes:
        out.append(f"{len(shapes)} tensors differ in shape ({_names(shapes)})")
    return out


def check_model_matches(ckpt_dir: str | Path, sharded_state: dict) -> None:
    """Refuse (``CheckpointMismatch``) unless the checkpoint holds exactly the model's tensors.
    Collective when a process group is up: every rank must call it."""
    model = _whole_model(model_tensor_shapes(sharded_state))
    problems = mismatch(model, checkpoint_tensor_shapes(Path(ckpt_dir)))
    if problems:
        raise CheckpointMismatch(
            f"{ckpt_dir}: the checkpoint does not hold the model that was built: {'; '.join(problems)}. "
            "The model comes from config.json and your [model] settings: drop the settings that "
            "contradict the checkpoint (e.g. --add_qkv_bias, --num_layers, --untie_embeddings_and_output_weights)"
            " or load the checkpoint that belongs to this model")
