"""Portable (Transformer-Engine-free) megatron-core building blocks: attention through PyTorch's
fused kernels with packed sequences and context parallel, a sequence-parallel norm, the layer/block
specs, and a chunked vocab-parallel cross entropy."""
from hpctrain.model.portable.attention import PortableAttention, portable_attention
from hpctrain.model.portable.context_parallel import (
    cp_token_index,
    pad_segments_for_cp,
    split_batch_for_cp,
)
from hpctrain.model.portable.cross_entropy import (
    chunked_vocab_parallel_cross_entropy,
    enable_chunked_cross_entropy,
)
from hpctrain.model.portable.norm import PortableNorm, PortableRMSNorm
from hpctrain.model.portable.packing import packed_seq_params, to_thd
from hpctrain.model.portable.spec import get_portable_block_spec, get_portable_layer_spec

__all__ = [
    "PortableAttention", "portable_attention", "PortableNorm", "PortableRMSNorm",
    "get_portable_block_spec", "get_portable_layer_spec", "cp_token_index", "split_batch_for_cp",
    "pad_segments_for_cp", "chunked_vocab_parallel_cross_entropy", "enable_chunked_cross_entropy",
    "packed_seq_params", "to_thd",
]
