"""hpctrain.native: the hot loops, in C++ (hpctrain._C), each with a pure-Python twin.

Every public function takes impl="native" (default) or impl="python" (the twin in twins.py,
the readable specification; tests hold the two equal).
"""
from hpctrain.native.batch_index import packed_batch_index
from hpctrain.native.packing import fill_ratio, pack_sequences
from hpctrain.native.pt_index import pt_sample_index
from hpctrain.native.relayout import (
    as_array,
    concat_dim,
    copy_blocks,
    default_threads,
    gated_mlp_from_mcore,
    gated_mlp_to_mcore,
    qkv_from_mcore,
    qkv_to_mcore,
    shard_dim,
    split_dim,
    unshard_dim,
)
from hpctrain.native.safetensors_mmap import mmap_safetensors

__all__ = [
    "as_array", "concat_dim", "copy_blocks", "default_threads", "fill_ratio",
    "gated_mlp_from_mcore", "gated_mlp_to_mcore", "mmap_safetensors", "pack_sequences", "packed_batch_index",
    "pt_sample_index", "qkv_from_mcore", "qkv_to_mcore", "shard_dim", "split_dim", "unshard_dim",
]
