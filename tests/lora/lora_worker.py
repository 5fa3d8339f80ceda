"""Worker for the LoRA tests: ``hpctrain.train.loop.run`` of each run of a plan in one process group
(single process or torchrun). Usage: lora_worker.py PLAN.json

PLAN: {"runs": [{"name", "flags", "batch": micro-batches .pt, "eval": ids .pt (optional),
                 "grads": bool, "resume_from": name, "resume_at": N}], "out": DIR}

* ``grads``: after the first train step (run with clip_grad 0), each trainable parameter's reduced
  gradient (megatron's ``main_grad``, what the optimizer steps with; its shards gathered under the
  distributed optimizer) is copied into the parameter and the model saved as
  a torch_dist checkpoint in OUT/<name>.grads: the test reads whole tensors back with the
  checkpoint reader (TP/PP layout undone by megatron's own sharded state dict).
* ``eval``: the logits of the trained model on these ids after the run (single process only).
* ``resume_from``: rank 0 copies that run's save folder, cuts it back to iteration ``resume_at``
  (tracker rewritten, later iterations removed) and this run --load's the copy.
Data: every DP rank takes micro-batch ``dp_rank`` of the batch file (so DP=2 sees the same global
batch as DP=1 with 2 micro-batches). Results (losses, save dir) go to OUT/results.json.
"""
import json
import shutil
import sys
from pathlib import Path

import torch

COMMON = ["--global_batch_size", "4", "--micro_batch_size", "2", "--log_interval", "1", "--seed", "1234",
          "--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0", "--train_type", "lora",
          "--finetune", "false"]


class Source:
    def __init__(self, batch):
        self.batch = batch
        self.num_samples = 10_000

    def __call__(self, consumed, n_micro, mbs):
        from megatron.core import parallel_state as ps
        dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        assert n_micro * dp == len(self.batch), (n_micro, dp, len(self.batch))
        return [dict(self.batch[r * n_micro + j]) for j in range(n_micro)]


def unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def gather_sharded_grads(chunks):
    """With the distributed optimizer, megatron-core's DDP reduce-scatters each bucket's gradients:
    only this rank's shard of ``grad_data`` holds the reduced values, the rest keep its own local
    ones. All-gather the reduced shards so every ``main_grad`` is the whole reduced gradient."""
    import torch.distributed as tdist

    for c in chunks:
        for bg in list(getattr(c, "bucket_groups", [])) + list(getattr(c, "expert_parallel_bucket_groups", [])):
            if not bg.ddp_config.use_distributed_optimizer:
                continue
            group, size = bg.intra_distributed_optimizer_instance_group, bg.intra_distributed_optimizer_instance_size
            for bucket in bg.buckets:
                shards = list(bucket.grad_data.view(size, -1).unbind(0))
                mine = shards[group.rank()].clone()
                tdist.all_gather(shards, mine, group=group)


def save_grads(chunks, where: Path):
    from hpctrain.checkpoint import io

    gather_sharded_grads(chunks)
    with torch.no_grad():
        for c in chunks:
            for p in unwrap(c).parameters():
                if p.requires_grad:
                    p.copy_(p.main_grad)
    io.save_checkpoint(where, io.TrainProgress(1, 0), chunks, save_optim=False, save_rng=False)


def frozen_report(chunks, opt) -> dict:
    """What megatron-core's DDP and optimizer hold: grad-buffer elements, optimizer parameters, and
    whether any frozen parameter got a main_grad."""
    trainable = frozen_with_grad = 0
    for c in chunks:
        for p in unwrap(c).parameters():
            if p.requires_grad:
                trainable += p.numel()
            elif getattr(p, "main_grad", None) is not None:
                frozen_with_grad += 1
    buffers = sum(b.grad_data.numel() for c in chunks for b in c.buffers)
    inner = getattr(opt, "chained_optimizers", [opt])
    opt_params = sum(p.numel() for o in inner for g in o.optimizer.param_groups for p in g["params"])
    total = sum(p.numel() for c in chunks for p in unwrap(c).parameters())
    return dict(trainable=trainable, total=total, buffers=buffers, optimizer=opt_params,
                frozen_with_grad=frozen_with_grad)


def cut_back(src: Path, dst: Path, iteration: int):
    from hpctrain.checkpoint import layout

    shutil.copytree(src, dst)
    for it, d in layout.iteration_dirs(dst):
        if it > iteration:
            shutil.rmtree(d)
    for c in dst.glob("checkpoint-*"):
        shutil.rmtree(c)
    layout.write_tracker(dst, iteration)


def main():
    plan = json.loads(Path(sys.argv[1]).read_text())
    out = Path(plan["out"])
    import torch.distributed as tdist

    from hpctrain.checkpoint.precision import mcore_logits
    from hpctrain.config import load_config
    from hpctrain.train import dist, loop, step

    seen = {}
    train_step = step.train_step

    def probe(chunks, *a, **k):
        if "memory" not in seen:
            seen["memory"] = frozen_report(chunks, a[0])
        res = train_step(chunks, *a, **k)
        seen["chunks"], seen["device"] = chunks, a[3]
        if seen.pop("want_grads", False):
            save_grads(chunks, seen["grads_dir"])
        return res

    step.train_step = probe
    results = {}
    for run in plan["runs"]:
        name = run["name"]
        flags = COMMON + run["flags"] + ["--save", str(out / name)]
        if run.get("grads"):
            flags += ["--clip_grad", "0"]  # clipping scales main_grad in place, before it is read
        if run.get("resume_from"):
            copy = out / f"{name}.start"  # an earlier run initialised the process group
            if tdist.get_rank() == 0:
                cut_back(Path(results[run["resume_from"]]["save_dir"]), copy, run["resume_at"])
            tdist.barrier()
            flags += ["--load", str(copy)]
        seen.update(want_grads=bool(run.get("grads")), grads_dir=out / f"{name}.grads")
        res = loop.run(load_config(None, flags, mode="sft", environ={}),
                       Source(torch.load(run["batch"], weights_only=True)))
        results[name] = dict(losses=res.losses, save_dir=res.save_dir, last=res.last_checkpoint,
                             memory=seen.pop("memory", None))
        if run.get("eval"):
            ids = torch.load(run["eval"], weights_only=True)
            torch.save(mcore_logits(unwrap(seen["chunks"][0]), ids, seen["device"]), out / f"{name}.logits.pt")
    if tdist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.destroy()


if __name__ == "__main__":
    main()
