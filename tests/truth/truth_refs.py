"""The reference side of the ground-truth tests: real rows, the data pipeline's first global batch
of them, and what transformers computes on it (logits, per-token loss, RoPE base, dtype)."""
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
ROWS = [json.loads(r) for r in (ROOT / "hpctrain/assets/data/self_cognition.jsonl").read_text().splitlines()
        if '"en"' in r][:4]  # 4 real rows = the first global batch (global_batch_size 4)


def data_file(tmp: Path) -> Path:
    path = tmp / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    return path


def first_batch(tokenizer_source: str, data: Path) -> list:
    """The data pipeline's first global batch of the rows (2 micro-batches of 2), unshuffled."""
    from hpctrain.config import load_config
    from hpctrain.data import MicroBatchLoader, build_train_valid, load_tokenizer

    cfg = load_config(None, ["--model", tokenizer_source, "--dataset", str(data), "--max_length", "512",
                             "--split_dataset_ratio", "0", "--dataset_num_proc", "1", "--model_name", "Bot",
                             "--model_author", "Me"], mode="sft", environ={})
    train, _ = build_train_valid(cfg, load_tokenizer(tokenizer_source), "sft", tokenizer_source)
    assert len(train) == len(ROWS)
    it = iter(MicroBatchLoader(train, 2, shuffle=False))
    return [next(it), next(it)]


@torch.no_grad()
def hf_reference(path: Path, batch: list) -> dict:
    """The HF model as transformers loads it (a GGUF dequantised) in fp32: logits on the first row,
    the per-token loss over the batch; and, as transformers reads config.json, the RoPE base and
    the checkpoint's dtype (a GGUF is dequantised to fp32)."""
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    where = str(path.parent if kw else path)
    dtype = AutoConfig.from_pretrained(where, **kw).dtype or torch.float32
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw).eval()
    total, count = 0.0, 0
    for b in batch:
        logits = model(b["input_ids"], position_ids=b["position_ids"]).logits.double()
        mask = b["labels"] != -100
        total += float(F.cross_entropy(logits[mask], b["labels"][mask], reduction="sum"))
        count += int(mask.sum())
    eval_ids = batch[0]["input_ids"][:1]
    return dict(logits=model(eval_ids).logits[0].float(), loss=total / count, eval_ids=eval_ids,
                rope_base=float(model.config.rope_parameters["rope_theta"]),
                dtype=str(dtype).replace("torch.", ""))


def export_mcore(src: Path, out: Path) -> Path:
    from hpctrain.checkpoint.export import run as export

    assert export(["--model", str(src), "--to_mcore", "true", "--output_dir", str(out), "--no_progress"]) == 0
    return out


