"""Worker for the trainer tests: runs one or more training jobs in this process (single process or
under torchrun) and writes each job's losses to JSON. Usage: trainer_worker.py PLAN.json

PLAN: {"jobs": [{"name": ..., "flags": [...], "init_only": bool, "pack": bool}], "out": DIR}
Data: a synthetic, deterministic dataset (sample i depends only on i), DP-sharded by rank.

Optional job keys (tests/train/test_trainer_args.py): "repeat": train on the first global batch
every iteration; "valid": pass a validation source (fixed samples) and record each evaluation
next to a by-hand forward pass over the same micro-batches; "capture_steps": N, save params and
main grads around the first N optimizer steps to <out>.<name>.steps.pt; "poison_grad_at": [k],
make one main grad inf before the k-th optimizer step; "gc_trace": record gc callbacks with the
number of optimizer steps done. What was recorded goes into the job's result ("probe").
tests/train/test_trainer_settings.py: "num_samples": the synthetic source's size (epochs); "loader":
{"n": N, "log": PATH}: train from hpctrain's own loader (train/entry.LoaderSource, so data.num_workers
and train.dataloader_type apply) over N synthetic samples whose reads are logged as "pid index" lines;
"expect_error": the job must stop with a ConfigError/ValueError holding this text (recorded, not raised);
"timeouts": record the timeout of every process group after the run.
"""
import gc
import json
import os
import sys
from pathlib import Path

import numpy as np

import torch

TINY = ["--num_layers", "4", "--hidden_size", "64", "--ffn_hidden_size", "128", "--num_attention_heads", "4",
        "--num_query_groups", "2", "--padded_vocab_size", "128", "--max_position_embeddings", "64",
        "--micro_batch_size", "2", "--global_batch_size", "8", "--lr", "1e-3", "--lr_warmup_iters", "1",
        "--min_lr", "1e-4", "--log_interval", "1", "--seed", "1234", "--no_save_rng", "false",
        # Adam's step lr*g/(|g|+eps) has slope ~lr/(4 eps) where |g| ~ eps: with the default eps 1e-8,
        # float32 summation noise (~1e-10) in such a grad moves a weight by ~2e-6, so a few of 65k
        # elements broke the layouts' 1e-6 weight tolerance once iteration 1 trained with a non-zero
        # warmup LR. eps 1e-5 keeps that effect below ~1e-7 (1e-6 still left one embedding element of TP=2 at 3e-6).
        "--adam_eps", "1e-5"]
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
    """Global batch at `consumed`: samples consumed..consumed+gbs-1; this DP rank's share.

    pack=True: two samples per row (trimmed to 16 tokens each), position ids restarting per sample.
    pack="split": the same samples, each in its own (padded) row - what packing must be equal to.
    """

    def __init__(self, pack, repeat: bool = False, offset: int = 0, num_samples: int = 10_000):
        self.pack, self.repeat, self.offset = pack, repeat, offset  # repeat: always the first global batch
        self.num_samples = num_samples

    def __call__(self, consumed, n_micro, mbs):
        from megatron.core import parallel_state as ps
        consumed = self.offset + (0 if self.repeat else consumed)
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
                    rows.extend([row([a], 16), row([b], 16)] if self.pack == "split" else [row([a, b], SEQ)])
                else:
                    rows.append(row([sample(i)]))
            L = max(len(x[0]) for x in rows)
            rows = [row([(x[0], x[1])], L) if len(x[0]) < L else x for x in rows]
            ids, lab, pos = (torch.stack([x[t] for x in rows]) for t in range(3))
            mb = dict(input_ids=ids, labels=lab, position_ids=pos, num_loss_tokens=int((lab != -100).sum()))
            if self.pack is True:
                starts = (pos.flatten() == 0).nonzero().flatten().to(torch.int32)
                mb["cu_seqlens"] = torch.cat([starts, torch.tensor([pos.numel()], dtype=torch.int32)])
            out.append(mb)
        return out


class LoggedDataset:
    """Samples for hpctrain's own loader ((ids, loss mask) numpy pairs); each read appends "pid index"
    to ``log``, so a test sees which process read which sample in which order."""

    pad_id = 0

    def __init__(self, n: int, log: str):
        self.n, self.log = n, log

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {i}\n")
        ids, labels = sample(int(i))  # labels[t] is ids[t + 1]'s target: mask token t + 1 where it has one
        mask = np.concatenate([[0], (labels[:-1] != -100).numpy()]).astype(np.uint8)
        return ids.numpy().astype(np.int64), mask


def loader_source(cfg, spec: dict):
    from hpctrain.train.entry import LoaderSource
    return LoaderSource(LoggedDataset(spec["n"], spec["log"]), cfg, False, 1)


def group_timeouts() -> dict:
    """{group description: timeout in seconds} of every process group of this process."""
    import torch.distributed as tdist
    names = tdist.distributed_c10d._world.pg_names
    return {f"{names.get(pg, '?')} ({pg.group_desc})": pg._get_backend(torch.device("cpu")).options._timeout
            .total_seconds() for pg in list(tdist.distributed_c10d._world.pg_map)}


def run_job(job: dict, cfg, probe):
    from hpctrain.train import loop
    source = loader_source(cfg, job["loader"]) if "loader" in job else \
        Source(job.get("pack", False), job.get("repeat", False), num_samples=job.get("num_samples", 10_000))
    return loop.run(cfg, source, probe.valid if job.get("valid") else None)


def init_only(cfg, out_root: str):
    from hpctrain.checkpoint.io import TrainProgress, save_checkpoint
    from hpctrain.train import dist, loop, model_source
    info = dist.init_distributed(cfg)
    dist.init_model_parallel(1, 1, seed=cfg.train.seed)
    model_source.fill_model_fields(cfg)
    chunks, opt, _ = loop.setup(cfg, info)
    save_checkpoint(out_root, TrainProgress(0, 0), chunks, save_optim=False, save_rng=False)


VALID_OFFSET = 500_000  # validation samples: far from anything a test trains on


class Probe:
    """Instrumentation of one job through hooks on the optimizer, eval_step and gc (see the doc)."""

    def __init__(self, job: dict, out: str):
        self.job, self.out = job, out
        self.steps = 0
        self.captured = []
        self.data = dict(loss_scales=[], optimizer=None, grad_scaler=None, evals=[], valid_calls=[], gc=[])

    # --- optimizer: wraps the instance's step()
    def wrap_optimizer(self, opt):
        inner = _inner_optimizer(opt)
        self.data["optimizer"] = type(inner).__name__
        scaler = getattr(inner, "grad_scaler", None)
        self.data["grad_scaler"] = None if scaler is None else type(scaler).__name__
        original = opt.step

        def step():
            k = self.steps + 1
            if scaler is not None:
                self.data["loss_scales"].append(float(scaler.scale.item()))
            model_params = _model_params(inner)
            if k in self.job.get("poison_grad_at", ()):
                model_params[0].main_grad.view(-1)[0] = float("inf")
            before = None
            if k <= self.job.get("capture_steps", 0):
                before = ([p.detach().clone() for p in model_params],
                          [p.main_grad.detach().clone() for p in model_params])
            result = original()
            self.steps = k
            if before is not None:
                self.captured.append(dict(params=before[0], grads=before[1],
                                          after=[p.detach().clone() for p in model_params],
                                          lr=[g["lr"] for g in opt.param_groups]))
            return result

        opt.step = step
        return opt

    def save_captured(self):
        if self.captured:
            torch.save(self.captured, f"{self.out}.{self.job['name']}.steps.pt")

    # --- evaluation: the by-hand reference next to what the loop computed
    def eval_step(self, original, chunks, microbatches, device, *pads):
        from megatron.core import parallel_state as ps
        loss, tokens = original(chunks, microbatches, device, *pads)
        whole_model = len(chunks) == 1 and ps.get_pipeline_model_parallel_world_size() == 1
        self.data["evals"].append(dict(after_steps=self.steps, loss=loss, tokens=tokens,
                                       by_hand=_forward_loss(chunks[0], microbatches) if whole_model else None))
        return loss, tokens

    def valid(self, n_micro, mbs):
        self.data["valid_calls"].append(n_micro)
        return Source(False, repeat=True, offset=VALID_OFFSET)(0, n_micro or 2, mbs)

    # --- gc
    def gc_callback(self, phase, info):
        if phase == "start":
            self.data["gc"].append((self.steps, info["generation"], gc.isenabled()))


def _inner_optimizer(opt):
    """megatron-core wraps its optimizer in a ChainedOptimizer; the one inside does the work."""
    chained = getattr(opt, "chained_optimizers", None)
    return chained[0] if chained and len(chained) == 1 else opt


def _model_params(opt):
    """The model's parameters (they hold .main_grad, the DP-reduced grads the step uses) in the
    optimizer's order: the distributed optimizer's model groups, fp16/bf16's float16 + fp32 groups,
    or plain fp32's own params."""
    if hasattr(opt, "model_float16_groups"):
        groups = opt.model_float16_groups + opt.model_fp32_groups
    elif hasattr(opt, "float16_groups"):
        groups = opt.float16_groups + opt.fp32_from_fp32_groups
    else:
        groups = [g["params"] for g in opt.param_groups]
    return [p for g in groups for p in g]


@torch.no_grad()
def _forward_loss(model, microbatches) -> float:
    """Per-token mean loss with a plain forward call per micro-batch (no pipeline schedule; one
    stage holding the whole model, unpacked rows)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for b in microbatches:
            mask = b["labels"] != -100
            out = model(b["input_ids"], b["position_ids"], None, labels=b["labels"].masked_fill(~mask, 0))
            total += float((out.float() * mask).sum())
            count += int(mask.sum())
    finally:
        model.train(was_training)
    return total / count


def main():
    plan = json.loads(Path(sys.argv[1]).read_text())
    from hpctrain.config import load_config
    from hpctrain.train import loop, optim, step
    import torch.distributed as tdist
    results = {}
    probe = None
    build_optimizer, eval_step = optim.build_optimizer, step.eval_step
    optim.build_optimizer = lambda *a, **k: probe.wrap_optimizer(build_optimizer(*a, **k))
    step.eval_step = lambda *a, **k: probe.eval_step(eval_step, *a, **k)
    gc.callbacks.append(lambda phase, info: probe is not None and probe.gc_callback(phase, info))
    from hpctrain.config import ConfigError
    for job in plan["jobs"]:
        cfg = load_config(None, TINY + job["flags"], mode="sft")
        probe = Probe(job, plan["out"])
        if job.get("init_only"):
            init_only(cfg, cfg.checkpoint.save)
            continue
        if "expect_error" in job:
            try:
                run_job(job, cfg, probe)
            except (ConfigError, ValueError) as e:
                assert job["expect_error"] in str(e), str(e)
                results[job["name"]] = dict(error=str(e), exit_code=0)
                continue
            raise AssertionError(f"job {job['name']} ran although it should stop with {job['expect_error']!r}")
        res = run_job(job, cfg, probe)
        if job.get("timeouts"):
            probe.data["timeouts"] = group_timeouts()
        if not job.get("gc_trace"):
            probe.data["gc"] = []
        probe.data["gc_enabled_after"] = gc.isenabled()
        probe.save_captured()
        results[job["name"]] = dict(losses=res.losses, exit_code=res.exit_code, iteration=res.iteration,
                                    save_dir=res.save_dir, last_checkpoint=res.last_checkpoint,
                                    probe=probe.data)
    if tdist.get_rank() == 0:
        Path(plan["out"]).write_text(json.dumps(results, indent=1))
    from hpctrain.train import dist
    dist.destroy()
    codes = [r["exit_code"] for r in results.values()]
    sys.exit(max(codes) if codes else 0)


if __name__ == "__main__":
    main()
