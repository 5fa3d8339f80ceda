"""LoRA on megatron-core's tensor-parallel linears (see docs/lora.md).

settings.py: the [tuner] keys -> which megatron linears get adapters (HF and megatron names);
layers.py: the adapter forward on ColumnParallelLinear / RowParallelLinear (TP, SP, CP, PP, DP);
apply.py: put adapters on a built model, freeze the rest, initialise / load them.
"""
from hpctrain.model.lora.settings import LoraSettings, lora_settings  # noqa: F401
