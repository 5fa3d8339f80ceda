"""A small real distributed workload for the Slurm tests (stands in for `hpctrain sft`).

Every rank joins a torch.distributed gloo group from the launcher's environment, then runs
deterministic "training" on a 4-parameter quadratic: per-rank data, all-reduced gradients, SGD.
It saves to ``[checkpoint] save`` (tracker file written last, atomically), resumes from
``[model] load``, and on SIGUSR1 finishes the step, agrees on stopping with all ranks, saves and
exits with the requeue exit code -- the trainer's protocol (rank 0 also writes its exit code to
$HPCTRAIN_STATUS_FILE, as hpctrain.train.entry does). Rank 0 writes final.json at the end.

    python tests/slurm/counter_train.py config.toml [--key value ...]
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hpctrain.config import config_from_argv
from hpctrain.launch.env import derive_dist_env
from hpctrain.launch.task import requeue_exit_code

STOP = {"flag": False}
TRACKER = "latest_checkpointed_iteration.txt"


def on_signal(signum, frame):
    STOP["flag"] = True


def save(root: Path, it: int, w: torch.Tensor, rank: int) -> None:
    d = root / f"iter_{it:07d}"
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"w": w, "iteration": it}, d / f"rank_{rank}.pt")
    dist.barrier()
    if rank == 0:
        tmp = root / (TRACKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(it))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / TRACKER)
    dist.barrier()


def load(root: Path | None, rank: int) -> tuple[int, torch.Tensor | None]:
    if root is None or not (root / TRACKER).is_file():
        return 0, None
    it = int((root / TRACKER).read_text())
    state = torch.load(root / f"iter_{it:07d}" / f"rank_{rank}.pt", weights_only=True)
    return it, state["w"]


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGUSR1, on_signal)
    cfg = config_from_argv(argv, mode="sft")
    env = derive_dist_env(os.environ)
    rank, world = env["rank"], env["world_size"]
    dist.init_process_group("gloo", init_method=f"tcp://{env['master_addr']}:{env['master_port']}",
                            rank=rank, world_size=world)
    save_dir = Path(cfg.checkpoint.save)
    start, w = load(Path(cfg.model.load) if cfg.model.load else None, rank)
    if w is None:
        w = torch.zeros(4, dtype=torch.float64)
    step_s = float(os.environ.get("COUNTER_STEP_S", "0.3"))
    print(f"rank {rank}/{world} on {os.uname().nodename} master {env['master_addr']}:{env['master_port']} "
          f"start at {start}", flush=True)
    loss = torch.zeros(1, dtype=torch.float64)
    for it in range(start + 1, cfg.train.train_iters + 1):
        x = torch.arange(4, dtype=torch.float64) * (rank + 1) + it % 3
        grad = 2 * (w - x) / 4
        dist.all_reduce(grad)
        loss = ((w - x) ** 2).mean().reshape(1)
        dist.all_reduce(loss)
        loss /= world
        w = w - cfg.train.lr * grad / world
        if rank == 0:
            print(f"iter {it} loss {loss.item():.12f}", flush=True)
        time.sleep(step_s)
        stop = torch.tensor([1.0 if STOP["flag"] else 0.0])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item() and it < cfg.train.train_iters:
            save(save_dir, it, w, rank)
            print(f"rank {rank}: saved at iteration {it} on signal; exiting for requeue", flush=True)
            dist.destroy_process_group()
            return write_status(rank, requeue_exit_code())
        if it % cfg.checkpoint.save_interval == 0 or it == cfg.train.train_iters:
            save(save_dir, it, w, rank)
    if rank == 0:
        (save_dir / "final.json").write_text(json.dumps({
            "iteration": cfg.train.train_iters, "loss": loss.item(), "world_size": world,
            "requeues": int(os.environ.get("HPCTRAIN_REQUEUES", "0")), "resumed_from": start}))
    dist.destroy_process_group()
    return write_status(rank, 0)


def write_status(rank: int, code: int) -> int:
    """Like the trainer: rank 0 records its exit code in $HPCTRAIN_STATUS_FILE when set."""
    path = os.environ.get("HPCTRAIN_STATUS_FILE")
    if path and rank == 0:
        Path(path).write_text(str(code))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
