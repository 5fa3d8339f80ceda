"""Tiny megatron-core GPT models for the portable-spec tests (imported by tests and the torchrun worker)."""
from __future__ import annotations

import os
import socket

import torch
import torch.nn.functional as F

VOCAB = 64


def init_single_process() -> bool:
    """One-rank gloo group + megatron parallel state (TP=PP=CP=1). Returns True if it created them."""
    from hpctrain.train import compat
    compat.apply("cpu")
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    created = False
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        created = True
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    model_parallel_cuda_manual_seed(1234)
    return created


def tiny_config(cp: int = 1, tp: int = 1, sp: bool = False, layers: int = 2):
    from megatron.core.transformer.transformer_config import TransformerConfig
    return TransformerConfig(
        num_layers=layers, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=48, kv_channels=8, normalization="RMSNorm", layernorm_epsilon=1e-6,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=True,
        hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
        use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        tensor_model_parallel_size=tp, context_parallel_size=cp, sequence_parallel=sp,
        cross_entropy_loss_fusion=False)


def tiny_gpt(config, spec: str = "portable", pg_collection=None, seed: int = 1234):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from hpctrain.model.portable import get_portable_block_spec
    torch.manual_seed(seed)
    layer_spec = (get_portable_block_spec(config) if spec == "portable"
                  else get_gpt_layer_local_spec(normalization="RMSNorm"))
    return GPTModel(config=config, transformer_layer_spec=layer_spec, vocab_size=VOCAB,
                    max_sequence_length=256, position_embedding_type="rope", rotary_base=10000,
                    share_embeddings_and_output_weights=False, pg_collection=pg_collection)
