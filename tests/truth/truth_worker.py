"""Worker for the ground-truth tests: the trainer's own start-up on each case, at each layout, in
one process group (single process or torchrun). Usage: truth_worker.py PLAN.json

PLAN: {"runs": [{"name", "flags", "batch": micro-batches .pt, "eval": ids .pt, "layout",
                 "layout_flags"}], "out": DIR}

Each run (a case at a layout) is one ``hpctrain.train.loop.run`` of one iteration with the case's flags
(``--load MCORE`` or ``--model HF_DIR``): the trainer builds the model (model_source, model_setup,
loop.setup) and loads the weights its own way. Instrumentation: just before the first train step
the model's logits on the eval ids are taken (the weights as loaded); the loss the loop reports
for iteration 1 is recorded; args.json is read back. Checkpoint writing is skipped (it is not under
test here and SmolLM2's would be 0.5 GB per run). Writes OUT/results.json and OUT/<case>.<layout>.pt.
"""
import json
import sys
from pathlib import Path

import torch

COMMON = ["--train_iters", "1", "--global_batch_size", "4", "--micro_batch_size", "2", "--lr", "1e-4",
          "--log_interval", "1", "--no_save_optim", "true", "--seed", "1234"]


class FixedSource:
    """The case's micro-batches (the DP size is 1 in every layout here)."""

    def __init__(self, batch):
        self.batch = batch
        self.num_samples = sum(b["input_ids"].shape[0] for b in batch)

    def __call__(self, consumed, n_micro, mbs):
        assert n_micro == len(self.batch), (n_micro, len(self.batch))
        return [dict(b) for b in self.batch]


def unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def main():
    plan = json.loads(Path(sys.argv[1]).read_text())
    out = Path(plan["out"])
    import torch.distributed as tdist

    from hpctrain.checkpoint.precision import mcore_logits
    from hpctrain.config import load_config
    from hpctrain.train import dist, loop, step

    captured = {}
    train_step = step.train_step

    def probe(chunks, *a, **k):  # the logits of the model exactly as the trainer built and loaded it
        if "logits" not in captured:
            captured["logits"] = mcore_logits(unwrap(chunks[0]), captured["eval"], a[3])
        return train_step(chunks, *a, **k)

    step.train_step = probe
    loop.save_checkpoint = lambda root, progress, *a, **k: Path(root) / "not-saved"
    results = {}
    for run in plan["runs"]:
        name = f"{run['name']}.{run['layout']}"
        captured.clear()
        captured["eval"] = torch.load(run["eval"], weights_only=True)
        batch = torch.load(run["batch"], weights_only=True)
        flags = COMMON + run["flags"] + run["layout_flags"] + ["--save", str(out / name)]
        res = loop.run(load_config(None, flags, mode="sft", environ={}), FixedSource(batch))
        if captured["logits"] is not None:
            torch.save(captured["logits"], out / f"{name}.pt")
        args = json.loads((Path(res.save_dir) / "args.json").read_text())
        first = json.loads((Path(res.save_dir) / "logging.jsonl").read_text().splitlines()[0]) \
            if tdist.get_rank() == 0 else {}
        results[name] = dict(loss=res.losses[0], model=args["model"], precision=args["precision"],
                             moe=args.get("moe"), load_balancing_loss=first.get("load_balancing_loss"))
    if tdist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.destroy()


if __name__ == "__main__":
    main()
