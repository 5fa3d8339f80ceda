"""Worker for test_moe_aux_loss.py: megatron-core's per-layer load-balancing loss of a converted tiny
Qwen3-MoE on one batch, next to transformers' router aux loss on the same batch.
Usage: aux_loss_worker.py (HF_DIR MCORE_DIR OUT.json)... (one process; gloo group of 1)."""
import json
import sys

import torch


def hf_side(hf_dir: str, ids: torch.Tensor) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    c = model.config
    per_layer = [float(load_balancing_loss_func((lg,), c.num_experts, c.num_experts_per_tok)) for lg in out.router_logits]
    return dict(aux_loss=float(out.aux_loss), per_layer=per_layer, topk=c.num_experts_per_tok,
                coef=c.router_aux_loss_coef)


def mcore_side(mcore_dir: str, ids: torch.Tensor) -> list:
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    from hpctrain.checkpoint.precision import load_mcore_model

    model, args = load_mcore_model(mcore_dir, torch.device("cpu"))
    model.train()  # the router computes its aux loss only in training, with grad enabled
    clear_aux_losses_tracker()
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    out = model(ids, pos, attention_mask=None, labels=ids)
    out.sum().backward()
    values = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"]
    return [float(v) for v in values]


def main():
    from hpctrain.train import dist

    triples = [sys.argv[i:i + 3] for i in range(1, len(sys.argv), 3)]
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(7))
    hf = [hf_side(h, ids) for h, _, _ in triples]  # before the process group, as the precision test does
    dist.init_distributed({"device": "cpu"})
    for (h, mcore_dir, out), res in zip(triples, hf):
        dist.init_model_parallel(seed=1234)
        res["mcore_per_layer"] = mcore_side(mcore_dir, ids)
        with open(out, "w") as f:
            json.dump(res, f)
    dist.destroy()


if __name__ == "__main__":
    main()
