"""tests/truth/truth_worker.py for MoE layouts: expert parallel makes data-parallel ranks (EP=2 on 2
processes is DP=2), so each DP rank takes its share of the case's micro-batches (rank r: r, r + dp, ...)
instead of all of them. Usage: moe_truth_worker.py PLAN.json (truth_worker's plan)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "truth"))
import truth_worker  # noqa: E402


class DPShareSource(truth_worker.FixedSource):
    def __call__(self, consumed, n_micro, mbs):
        from megatron.core import parallel_state as ps

        dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mine = [dict(b) for b in self.batch[r::dp]]
        assert len(mine) == n_micro, (len(mine), n_micro, dp)
        return mine


def padded_logits(original):
    """Sequence parallel splits the sequence over TP: pad the eval ids to a multiple of 8 at the end
    (causal attention: the earlier positions' logits do not change) and cut the logits back."""
    def logits(model, ids, device):
        import torch

        n = ids.shape[1]
        pad = (-n) % 8
        out = original(model, torch.cat([ids, ids.new_zeros(ids.shape[0], pad)], dim=1), device)
        return None if out is None else out[:, :n]
    return logits


truth_worker.FixedSource = DPShareSource
import hpctrain.checkpoint.precision as _precision  # noqa: E402

_precision.mcore_logits = padded_logits(_precision.mcore_logits)

if __name__ == "__main__":
    truth_worker.main()
