"""Shared by the trainer tests: run a plan of jobs through tests/train/trainer_worker.py (one
process, or torchrun with ``nproc`` processes) and read the weights of a saved checkpoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WORKER = HERE / "trainer_worker.py"
ROOT = HERE.parents[1]


def run_plan(tmp: Path, name: str, jobs: list, nproc: int = 1, env=None, timeout=600) -> dict:
    """The worker's results for ``jobs`` (see trainer_worker.py); fails the test on a non-zero exit."""
    plan, out = tmp / f"{name}.json", tmp / f"{name}.out.json"
    plan.write_text(json.dumps({"jobs": jobs, "out": str(out)}))
    cmd = [sys.executable, str(WORKER), str(plan)] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
        str(WORKER), str(plan)]
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):  # a fresh launch, not ours
        e.pop(k, None)
    p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{name} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return json.loads(out.read_text())


def weights(ckpt_dir: str) -> dict:
    """Model tensors of a torch_dist checkpoint directory (extra state dropped)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = Path(ckpt_dir).parent / (Path(ckpt_dir).name + ".pt")
    dcp_to_torch_save(ckpt_dir, out)
    sd = torch.load(out, weights_only=False)
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and "_extra_state" not in k}
