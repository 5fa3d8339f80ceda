"""Put LoRA adapters on a built megatron-core GPTModel chunk and freeze everything else.

Called on the bare chunks, before Float16Module and DDP: megatron-core's DDP gives grad buffers
only to parameters with ``requires_grad`` and its optimizer only sees those, so the frozen base
weights get neither gradient memory nor optimizer state.

Initialisation is PEFT's (A: Kaiming-uniform with a = sqrt(5) over the full input width, B: zero),
drawn from a generator seeded by (seed, global module name) over the whole A and then sliced for this
rank: the adapters start the same at any TP/PP layout.
"""
from __future__ import annotations

import math
import re
import zlib

import torch

from hpctrain.config.errors import ConfigError
from hpctrain.model.lora.layers import as_lora, is_lora
from hpctrain.model.lora.settings import MCORE_TO_HF, SAVE_MODULES, LoraSettings

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def global_names(chunk) -> dict[str, str]:
    """Local module name -> name with the global layer number (PP stages number layers from 0)."""
    out = {}
    for name, _ in chunk.named_modules():
        m = _LAYER.match(name)
        if m:
            layer = chunk.decoder.layers[int(m.group(1))]
            name_g = f"decoder.layers.{layer.layer_number - 1}.{m.group(2)}"
        else:
            name_g = name
        out[name] = name_g
    return out


def check_uniform(settings: LoraSettings, num_layers: int) -> None:
    """Checkpoints stack each linear over the layers (one tensor per name): an adapter on some
    layers' linear_qkv but not others' cannot be saved. Refuse a target_regex that does that."""
    if settings.target_regex is None:
        return
    subs = {"linear_qkv": "self_attention", "linear_proj": "self_attention", "linear_fc1": "mlp",
            "linear_fc2": "mlp"}
    chosen = []
    for lin, sub in subs.items():
        hits = [settings.wants(f"decoder.layers.{i}.{sub}.{lin}") for i in range(num_layers)]
        if any(hits) and not all(hits):
            raise ConfigError(f"tuner.target_regex = {settings.target_regex!r} selects {lin} in some layers "
                              "only: adapters on a subset of layers are not built (checkpoints stack a linear "
                              "over all layers); select it in every layer or in none")
        if all(hits):
            chosen.append(lin)
    if not chosen:
        raise ConfigError(f"tuner.target_regex = {settings.target_regex!r} selects no linear: it is matched "
                          "against megatron names such as decoder.layers.0.self_attention.linear_qkv")


def _targets(chunk, settings: LoraSettings):
    names = global_names(chunk)
    for local, module in chunk.named_modules():
        g = names[local]
        if _LAYER.match(g) and g.rsplit(".", 1)[-1] in MCORE_TO_HF and settings.wants(g):
            yield g, module


def _init_a(module, name: str, rank: int, seed: int) -> None:
    """PEFT's kaiming_uniform_(A, a=sqrt(5)) over the full A, then this rank's columns."""
    from megatron.core.tensor_parallel.layers import RowParallelLinear

    full_in = module.input_size
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    bound = 1.0 / math.sqrt(full_in)
    a = (torch.rand(rank, full_in, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    if isinstance(module, RowParallelLinear):
        n = module.lora_A.shape[1]
        r = module.tp_group.rank()
        a = a[:, r * n:(r + 1) * n]
    with torch.no_grad():
        module.lora_A.copy_(a.to(module.lora_A.dtype))


def apply_lora(chunk, settings: LoraSettings, seed: int, gated: bool) -> list[str]:
    """Adapters on the chosen linears of ``chunk``, every other parameter frozen (except the
    biases with lora_bias = all and the modules_to_save). Returns the adapted global names."""
    done = []
    for name, module in list(_targets(chunk, settings)):
        as_lora(module, settings.rank, settings.scaling, settings.dropout,
                gated=gated and name.endswith("linear_fc1"))
        _init_a(module, name, settings.rank, seed)
        done.append(name)
    chunk.lora_settings = settings  # saved with the checkpoints (the export writes adapter_config.json from it)
    keep = {SAVE_MODULES[m][1] for m in settings.modules_to_save}
    for pname, p in chunk.named_parameters():
        p.requires_grad = (pname.endswith((".lora_A", ".lora_B")) or pname in keep
                           or (settings.bias == "all" and pname.endswith(".bias")))
    return done


def lora_modules(chunk):
    """(global name, module) of the adapted linears of ``chunk``."""
    names = global_names(chunk)
    return [(names[n], m) for n, m in chunk.named_modules() if is_lora(m)]
