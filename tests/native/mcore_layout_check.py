"""Run under torchrun (TP = world size): megatron-core's own SelfAttention and MLP, fed weight
shards built by hpctrain.native, must compute what the HF-layout weights compute.

Checks per TP rank: get_query_key_value_tensors(x) returns exactly the q/k/v projections of the
heads this rank owns; the MLP output (RowParallelLinear all-reduces over TP) equals the full
HF-style gated MLP silu(x @ gate.T) * (x @ up.T) @ down.T.
"""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hpctrain.native import gated_mlp_to_mcore, qkv_to_mcore, shard_dim
from hpctrain.train import compat


def main() -> None:
    compat.apply("cpu")
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp, rank = dist.get_world_size(), dist.get_rank()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    nh, ng, d, hidden, ffn = 6, 2, 4, 16, 12
    hpg = nh // ng
    cfg = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=nh, num_query_groups=ng,
                            kv_channels=d, ffn_hidden_size=ffn, gated_linear_unit=True, activation_func=F.silu,
                            add_bias_linear=False, add_qkv_bias=True, use_cpu_initialization=True,
                            tensor_model_parallel_size=tp, params_dtype=torch.float32)
    spec = get_gpt_layer_local_spec().submodules
    attn = SelfAttention(cfg, spec.self_attention.submodules, layer_number=1, attn_mask_type=AttnMaskType.causal)
    # 0.16: spec.mlp is ModuleSpec(MLP, submodules=...); 0.19: functools.partial(MLP.as_mlp_submodule, submodules=...)
    mlp = MLP(cfg, getattr(spec.mlp, "submodules", None) or spec.mlp.keywords["submodules"])

    g = torch.Generator().manual_seed(1234)  # same HF weights on every rank
    wq, wk, wv = (torch.randn(n * d, hidden, generator=g) for n in (nh, ng, ng))
    bq, bk, bv = (torch.randn(n * d, generator=g) for n in (nh, ng, ng))
    gate, up, down = torch.randn(ffn, hidden, generator=g), torch.randn(ffn, hidden, generator=g), \
        torch.randn(hidden, ffn, generator=g)
    x = torch.randn(5, 2, hidden, generator=g)  # [seq, batch, hidden]

    with torch.no_grad():
        attn.linear_qkv.weight.copy_(torch.from_numpy(qkv_to_mcore(wq, wk, wv, ng, hpg, d, tp, rank)))
        attn.linear_qkv.bias.copy_(torch.from_numpy(qkv_to_mcore(bq, bk, bv, ng, hpg, d, tp, rank)))
        mlp.linear_fc1.weight.copy_(torch.from_numpy(gated_mlp_to_mcore(gate, up, tp, rank)))
        mlp.linear_fc2.weight.copy_(torch.from_numpy(shard_dim(down, 1, tp, rank)))
        query, key, value = attn.get_query_key_value_tensors(x)[:3]
        heads, groups = slice(rank * nh // tp, (rank + 1) * nh // tp), slice(rank * ng // tp, (rank + 1) * ng // tp)
        ref_q = (x @ wq.T + bq).view(5, 2, nh, d)[:, :, heads]
        ref_k = (x @ wk.T + bk).view(5, 2, ng, d)[:, :, groups]
        ref_v = (x @ wv.T + bv).view(5, 2, ng, d)[:, :, groups]
        for name, got, want in (("q", query, ref_q), ("k", key, ref_k), ("v", value, ref_v)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"rank {rank} {name}")
        out, _ = mlp(x)
        ref = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=f"rank {rank} mlp")
    print(f"rank {rank}/{tp}: megatron-core layouts OK", flush=True)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
