"""torchrun worker: context parallel (CP = world size) against CP=1, loss and grads.

Every rank builds the same tiny GPT twice: a CP=1 reference (its own one-rank CP group) that sees the
whole batch, and a CP=N model (same weights) that sees only this rank's tokens. The CP losses and
grads summed over the CP group (what megatron's DDP does over the dp_cp group) must equal the
reference's. Cases: unpacked [b, s] (sbhd) and packed samples (thd), with GQA.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from portable_tiny import VOCAB, tiny_config, tiny_gpt  # noqa: E402

TOL = dict(atol=2e-5, rtol=2e-4)


def setup():
    from hpctrain.train import compat
    compat.apply("cpu")
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    world = dist.get_world_size()
    ps.initialize_model_parallel(1, 1, context_parallel_size=world)
    model_parallel_cuda_manual_seed(1234)
    singles = [dist.new_group([r]) for r in range(world)]
    ref_pgs = ProcessGroupCollection.use_mpu_process_groups()
    ref_pgs.cp = singles[dist.get_rank()]
    return world, ps.get_context_parallel_group(), ref_pgs


def loss_and_grads(model, batch, psp=None):
    model.zero_grad(set_to_none=True)
    loss = model(batch["input_ids"], batch["position_ids"], attention_mask=None,
                 labels=batch["labels"], packed_seq_params=psp)
    total = (loss * (batch["labels"] != -100)).sum()
    total.backward()
    return total.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def check(name, ref, cp, group):
    ref_loss, ref_grads = ref
    loss, grads = cp
    dist.all_reduce(loss, group=group)
    torch.testing.assert_close(loss, ref_loss, **TOL, msg=f"{name}: loss")
    worst = 0.0
    for key, g in grads.items():
        dist.all_reduce(g, group=group)
        torch.testing.assert_close(g, ref_grads[key], **TOL, msg=f"{name}: grad {key}")
        worst = max(worst, (g - ref_grads[key]).abs().max().item())
    if dist.get_rank() == 0:
        print(f"OK {name} cp={group.size()} loss={loss.item():.6f} ref={ref_loss.item():.6f} "
              f"max|dgrad|={worst:.2e}", flush=True)


def main():
    from hpctrain.model.portable import pad_segments_for_cp, split_batch_for_cp
    from hpctrain.model.portable.packing import packed_seq_params
    world, cp_group, ref_pgs = setup()
    rank = cp_group.rank()
    ref_model = tiny_gpt(tiny_config(cp=1), "portable", pg_collection=ref_pgs)
    cp_model = tiny_gpt(tiny_config(cp=world), "portable")
    cp_model.load_state_dict(ref_model.state_dict())
    g = torch.Generator().manual_seed(7)

    # Unpacked: b=2 rows of s=8*world tokens (a multiple of 2*CP).
    s = 8 * world
    labels = torch.randint(0, VOCAB, (2, s), generator=g)
    labels[:, :3] = -100
    batch = {"input_ids": torch.randint(0, VOCAB, (2, s), generator=g), "labels": labels,
             "position_ids": torch.arange(s).expand(2, s).contiguous()}
    check("unpacked", loss_and_grads(ref_model, batch),
          loss_and_grads(cp_model, split_batch_for_cp(batch, world, rank)), cp_group)

    # Packed (thd): three samples of uneven lengths, each padded to a multiple of 2*CP.
    lens = [7, 13, 4]
    ids = torch.randint(0, VOCAB, (1, sum(lens)), generator=g)
    labels = torch.randint(0, VOCAB, (1, sum(lens)), generator=g)
    labels[0, 0] = -100
    cu = torch.tensor([0, 7, 20, 24], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    packed = pad_segments_for_cp({"input_ids": ids, "labels": labels, "position_ids": pos,
                                  "cu_seqlens": cu}, world)
    ref = loss_and_grads(ref_model, packed, packed_seq_params(packed["cu_seqlens"]))
    local = split_batch_for_cp(packed, world, rank)
    check("packed", ref, loss_and_grads(cp_model, local, packed_seq_params(local["cu_seqlens"])),
          cp_group)
    check_tp_cross_entropy(world)
    dist.barrier()
    dist.destroy_process_group()


def check_tp_cross_entropy(world):
    """Chunked CE with the vocab split over TP=world (and sequence parallel) vs full-vocab fp64."""
    from megatron.core import parallel_state as ps
    from hpctrain.model.portable.cross_entropy import chunked_vocab_parallel_cross_entropy
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(world, 1)
    tp_group, rank = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(11)
    s, b, h = 2 * world, 3, 16
    hidden = torch.randn(s, b, h, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, h, generator=g, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    mask = torch.rand(b, s, generator=g) > 0.25
    coef = mask.double() / mask.sum()  # the trainer's loss: a mean over the counted tokens
    ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = (ref_h @ ref_w.t()).transpose(0, 1).reshape(-1, VOCAB)
    ref = torch.nn.functional.cross_entropy(logits, labels.reshape(-1), reduction="none").view(b, s)
    (ref * coef).sum().backward()
    vs, ss = VOCAB // world, s // world
    w_local = weight[rank * vs:(rank + 1) * vs].float().requires_grad_()
    h_local = hidden[rank * ss:(rank + 1) * ss].float().requires_grad_()
    loss = chunked_vocab_parallel_cross_entropy(h_local, w_local, labels, tp_group=tp_group,
                                                sequence_parallel=True, chunk_tokens=4, loss_mask=mask)
    (loss * coef.float()).sum().backward()
    torch.testing.assert_close(loss.double(), ref.detach(), **TOL)
    torch.testing.assert_close(h_local.grad.double(), ref_h.grad[rank * ss:(rank + 1) * ss], **TOL)
    torch.testing.assert_close(w_local.grad.double(), ref_w.grad[rank * vs:(rank + 1) * vs], **TOL)
    if dist.get_rank() == 0:
        print(f"OK cross_entropy tp={world} sequence_parallel", flush=True)


if __name__ == "__main__":
    main()
