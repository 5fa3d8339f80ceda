"""Worker for the trainer tests: runs one or more training jobs in this process (single process or
under torchrun) and writes each job's losses to JSON. Usage: trainer_worker.py PLAN.json

PLAN: {"jobs": [{"name": ..., "flags": [...], "init_only": bool, "pack": bool}], "out": DIR}
Data: a synthetic, deterministic dataset (sample i depends only on i), DP-sharded by rank.
"""
import json
import sys
from pathlib import Path

import torch

TINY = ["--num_layers", "4", "--hidden_size", "64", "--ffn_hidden_size", "128", "--num_attention_heads", "4",
        "--num_query_groups", "2", "--padded_vocab_size", "128", "--max_position_embeddings", "64",
        "--micro_batch_size", "2", "--global_batch_size", "8", "--lr", "1e-3", "--lr_warmup_iters", "1",
        "--min_lr", "1e-4", "--log_interval", "1", "--seed", "1234", "--no_save_rng", "false"]
VOCAB, SEQ = 128, 32


def sample(i: int):
    g = torch.Generator().manual_seed(1000 + i)
    n = int(torch.randint(8, SEQ + 1, (1,), generator=g))
    toks = torch.randint(0, VOCAB, (n + 1,), generator=g)
    labels = toks[1:].clone()
    labels[: int(torch.randint(1, n // 2, (1,), generator=g))] = -100  # prompt: no loss
    return toks[:-1], labels


def row(samples, length=None):
    ids = torch.cat([s[0] for s in samples])
    lab = torch.cat([s[1] for s in samples])
    pos = torch.cat([torch.arange(len(s[0])) for s in samples])
    L = length or len(ids)
    pad = L - len(ids)
    return (torch.cat([ids, torch.zeros(pad, dtype=torch.long)]),
            torch.cat([lab, torch.full((pad,), -100, dtype=torch.long)]),
            torch.cat([pos, torch.arange(pad)]))


class Source:
    """Global batch at `consumed`: samples consumed..consumed+gbs-1; this DP rank's share."""

    def __init__(self, pack: bool):
        self.pack = pack
        self.num_samples = 10_000

    def __call__(self, consumed, n_micro, mbs):
        from megatron.core import parallel_state as ps
        dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        out = []
        for j in range(n_micro):
            first = consumed + (j * dp + r) * mbs
            rows = []
            for k in range(mbs):
                i = first + k
                if self.pack:  # two samples per row, each trimmed so the pair fits
                    a, b = sample(2 * i), sample(2 * i + 1)
                    a = (a[0][:16], a[1][:16])
                    b = (b[0][:16], b[1][:16])
                    rows.append(row([a, b], SEQ))
                else:
                    rows.append(row([sample(i)]))
            L = max(len(x[0]) for x in rows)
            rows = [row([(x[0], x[1])], L) if len(x[0]) < L else x for x in rows]
            ids, lab, pos = (torch.stack([x[t] for x in rows]) for t in range(3))
            mb = dict(input_ids=ids, labels=lab, position_ids=pos, num_loss_tokens=int((lab != -100).sum()))
            if self.pack:
                starts = (pos.flatten() == 0).nonzero().flatten().to(torch.int32)
                mb["cu_seqlens"] = torch.cat([starts, torch.tensor([pos.numel()], dtype=torch.int32)])
            out.append(mb)
        return out


def init_only(cfg, out_root: str):
    from hpctrain.checkpoint.io import TrainProgress, save_checkpoint
    from hpctrain.train import dist, loop, model_setup
    info = dist.init_distributed(cfg)
    dist.init_model_parallel(1, 1, seed=cfg.train.seed)
    model_setup.fill_model_fields(cfg)
    chunks, opt, _ = loop.setup(cfg, info)
    save_checkpoint(out_root, TrainProgress(0, 0), chunks, save_optim=False, save_rng=False)


def main():
    plan = json.loads(Path(sys.argv[1]).read_text())
    from hpctrain.config import load_config
    from hpctrain.train import loop
    import torch.distributed as tdist
    results = {}
    for job in plan["jobs"]:
        cfg = load_config(None, TINY + job["flags"], mode="sft")
        if job.get("init_only"):
            init_only(cfg, cfg.checkpoint.save)
            continue
        res = loop.run(cfg, Source(job.get("pack", False)))
        results[job["name"]] = dict(losses=res.losses, exit_code=res.exit_code, iteration=res.iteration,
                                    save_dir=res.save_dir, last_checkpoint=res.last_checkpoint)
    if tdist.get_rank() == 0:
        Path(plan["out"]).write_text(json.dumps(results, indent=1))
    from hpctrain.train import dist
    dist.destroy()
    codes = [r["exit_code"] for r in results.values()]
    sys.exit(max(codes) if codes else 0)


if __name__ == "__main__":
    main()
