"""Conversion precision test: HF vs megatron-core logits on the same templated conversation.

Both models run in fp32 (CPU, or the GPU when one is present); the report gives the mean and max
absolute logit difference over the real vocabulary (padding columns dropped) and the argmax
agreement. ``ok`` requires max abs diff < ``MAX_ABS_TOL`` and identical argmax everywhere.

The reference is always the model exactly as transformers loads the user's input: an HF directory,
or a GGUF file dequantised by transformers in fp32. It is never our own mcore -> HF export of the
checkpoint under test: comparing against that would only check the converter against itself.

Runs in one process (``hpctrain export ... --test_convert_precision true``) or under torchrun at
any TP/PP: ``torchrun --nproc_per_node 2 -m hpctrain.checkpoint.precision --hf H --mcore M --tp 2``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as tdist

MAX_ABS_TOL = 1e-3
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Who are you? Answer in one sentence, please."},
    {"role": "assistant", "content": "I am a language model trained to help with questions."},
]


@dataclass
class PrecisionReport:
    tokens: int
    mean_abs_diff: float
    max_abs_diff: float
    argmax_agreement: float
    tp: int
    pp: int
    ok: bool
    reference: str = ""
    ep: int = 1

    def line(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        ep = f" EP={self.ep}" if self.ep > 1 else ""
        return (f"precision {verdict}: {self.tokens} tokens, TP={self.tp} PP={self.pp}{ep}, mean abs diff "
                f"{self.mean_abs_diff:.3e}, max abs diff {self.max_abs_diff:.3e} (tol {MAX_ABS_TOL:g}), "
                f"argmax agreement {self.argmax_agreement:.2%}, reference {self.reference}")


@dataclass
class Reference:
    """Where transformers loads the reference model from: ``path`` (a dir), plus ``gguf_file``
    (a file name inside it) for GGUF input."""

    path: str
    gguf_file: str | None = None

    @classmethod
    def of(cls, model: str) -> "Reference":
        from hpctrain.checkpoint.hf_io import find_gguf

        gguf = find_gguf(model)
        if gguf is not None:
            return cls(str(gguf.parent), gguf.name)
        if not (Path(model) / "config.json").is_file():
            raise FileNotFoundError(f"{model}: no config.json and no .gguf file; the precision "
                                    "reference must be an HF model directory or a GGUF file")
        return cls(str(model))

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def describe(self) -> str:
        if self.gguf_file:
            return f"GGUF {Path(self.path) / self.gguf_file} (dequantised by transformers, fp32)"
        return f"HF {self.path} (transformers, fp32)"


def conversation_ids(ref: Reference, vocab_size: int) -> torch.Tensor:
    """Token ids [1, s] of the chat-templated conversation (ids folded into the model's vocab)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(ref.path, **ref.kwargs())
    except Exception as e:  # no usable tokenizer: a fixed pseudo-random sequence still compares
        print(f"precision: no tokenizer in {ref.describe()} ({type(e).__name__}); using fixed ids")
        return torch.randint(0, vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(CONVERSATION, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tok(" ".join(m["content"] for m in CONVERSATION))["input_ids"]
    return torch.tensor([list(ids)], dtype=torch.long) % vocab_size


def load_reference_model(ref: Reference, device: torch.device):
    """The user's input as transformers loads it (GGUF: dequantised), fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch.float32, **ref.kwargs())
    return model.to(device).eval()


def reference_logits(model_or_gguf: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, fp32 logits) of the reference model on the templated conversation."""
    ref = Reference.of(model_or_gguf)
    model = load_reference_model(ref, device)
    ids = conversation_ids(ref, int(model.config.vocab_size))
    with torch.no_grad():
        logits = model(ids.to(device)).logits.float().cpu()
    del model
    return ids, logits


def load_mcore_model(mcore_dir: str, device: torch.device):
    """GPTModel for this rank's TP/PP slice with the checkpoint's weights (fp32)."""
    from megatron.core import dist_checkpointing

    from hpctrain.checkpoint import layout, safe_pickle
    from hpctrain.checkpoint.locate import model_args_from_checkpoint
    from hpctrain.checkpoint.match import check_model_matches
    from hpctrain.model.build import build_gpt_model

    safe_pickle.install()  # a crafted checkpoint is refused, never run
    ref = layout.require_latest(mcore_dir)
    args = model_args_from_checkpoint(ref.root)
    model = build_gpt_model(args, params_dtype=torch.float32)
    safe_pickle.check_checkpoint_dir(ref.path)
    check_model_matches(ref.path, model.sharded_state_dict())
    state = dist_checkpointing.load(model.sharded_state_dict(), str(ref.path))
    model.load_state_dict(state, strict=False)
    return model.to(device).eval(), args


def mcore_logits(model, ids: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """Full-vocab logits [1, s, V_padded] on the last pipeline stage's TP rank 0, else None."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    ids = ids.to(device)
    pos = torch.arange(ids.shape[1], device=device).unsqueeze(0)
    h = model.config.hidden_size
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            buf = torch.empty(ids.shape[1], 1, h, dtype=torch.float32, device=device)
            tdist.recv(buf, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(buf)
        out = model(ids, pos, attention_mask=None)
        if not ps.is_pipeline_last_stage():
            tdist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        full = gather_from_tensor_model_parallel_region(out)
    return full.float().cpu() if ps.get_tensor_model_parallel_rank() == 0 else None


def compare(hf: torch.Tensor, mc: torch.Tensor, tp: int, pp: int, reference: str = "",
            ep: int = 1) -> PrecisionReport:
    mc = mc[..., : hf.shape[-1]]
    diff = (hf - mc).abs()
    agree = (hf.argmax(-1) == mc.argmax(-1)).float().mean().item()
    mx = diff.max().item()
    return PrecisionReport(tokens=hf.shape[1], mean_abs_diff=diff.mean().item(), max_abs_diff=mx,
                           argmax_agreement=agree, tp=tp, pp=pp, ok=mx < MAX_ABS_TOL and agree == 1.0,
                           reference=reference, ep=ep)


def check_precision(reference: str, mcore_dir: str, tp: int = 1, pp: int = 1) -> PrecisionReport | None:
    """Run both models and compare; ``reference`` is the HF dir or GGUF file (or dir holding one)
    the checkpoint was converted from. The report is returned on the rank that computed the
    megatron-core logits (last PP stage, TP rank 0) and None elsewhere."""
    return check_many([(reference, mcore_dir)], [(tp, pp)])[0]


def check_many(pairs: list[tuple[str, str]], layouts: list[tuple[int, ...]]) -> list:
    """Reports for every (reference, mcore dir) pair at every (TP, PP[, EP]) layout, in one process group.
    A reference is an HF model dir or a GGUF file / dir holding one (see ``Reference``).

    All HF models run first, before the process group is set up, so each HF model is freed
    before the megatron-core copies are built. (An older compat layer replaced torch's factories
    process-wide and then broke transformers' loading; it is scoped to megatron-core now, and
    tests/train/test_train_compat.py guards that.)
    """
    from hpctrain.train import dist

    device = dist.pick_device("auto", int(os.environ.get("LOCAL_RANK", "0")))
    refs = []
    for model, _ in pairs:
        refs.append(reference_logits(model, device) + (Reference.of(model).describe(),))
    info = dist.init_distributed({"device": device.type})
    out = []
    for tp, pp, *rest in layouts:
        ep = rest[0] if rest else 1
        dist.init_model_parallel(tp=tp, pp=pp, ep=ep, seed=1234)
        for (_, mcore_dir), (ids, ref, what) in zip(pairs, refs):
            model, _ = load_mcore_model(mcore_dir, info.device)
            mc = mcore_logits(model, ids, info.device)
            out.append(None if mc is None else compare(ref, mc, tp, pp, what, ep))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpctrain.checkpoint.precision",
                                description="compare HF and megatron-core logits (fp32)")
    p.add_argument("--hf", action="append", required=True,
                   help="reference: HF model dir or GGUF file the checkpoint came from (repeatable)")
    p.add_argument("--mcore", action="append", required=True,
                   help="megatron-core checkpoint dir, one per --hf")
    p.add_argument("--layout", action="append", default=None,
                   help="TPxPP or TPxPPxEP to load the mcore checkpoint at (repeatable; default 1x1)")
    p.add_argument("--json", default=None, help="write the reports here (reporting rank)")
    a = p.parse_args(argv)
    if len(a.hf) != len(a.mcore):
        p.error("pass one --mcore per --hf")
    layouts = [tuple(int(x) for x in l.lower().split("x")) for l in (a.layout or ["1x1"])]
    reps = [r for r in check_many(list(zip(a.hf, a.mcore)), layouts) if r is not None]
    for r in reps:
        print(r.line(), flush=True)
    ok = torch.tensor([1 if all(r.ok for r in reps) else 0])
    if reps and a.json:
        with open(a.json, "w") as f:
            json.dump([asdict(r) for r in reps], f)
    tdist.all_reduce(ok, op=tdist.ReduceOp.MIN)
    from hpctrain.train import dist

    dist.destroy()
    return 0 if ok.item() == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
