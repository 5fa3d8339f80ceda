"""Worker for the reshard tests (torchrun, gloo): build megatron-core's GPTModel at this rank's TP/PP
slice, load a torch_dist checkpoint with dist_checkpointing, and dump ``model.state_dict()`` (what
megatron-core itself holds on this rank) to ``OUT/tp{t:02d}_pp{p:03d}.pt``.

Usage: torchrun --nproc_per_node TP*PP reshard_worker.py TP PP CKPT OUT [CKPT OUT ...]
"""
import sys
from pathlib import Path

import torch


def main() -> int:
    tp, pp, pairs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from hpctrain.checkpoint import layout
    from hpctrain.checkpoint.locate import model_args_from_checkpoint
    from hpctrain.model.build import build_gpt_model
    from hpctrain.train import dist

    dist.init_distributed({"device": "cpu"})
    dist.init_model_parallel(tp, pp, seed=1)
    for ckpt, out in zip(pairs[::2], pairs[1::2]):
        ref = layout.require_latest(ckpt)
        model = build_gpt_model(model_args_from_checkpoint(ref.root), params_dtype=torch.float32)
        state = dist_checkpointing.load(model.sharded_state_dict(), str(ref.path))
        model.load_state_dict(state, strict=True)
        if ps.get_data_parallel_rank() == 0:
            name = f"tp{ps.get_tensor_model_parallel_rank():02d}_pp{ps.get_pipeline_model_parallel_rank():03d}.pt"
            Path(out).mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), Path(out) / name)
    dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
