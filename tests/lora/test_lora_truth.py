"""Ground truth for LoRA: hpctrain's adapters on megatron-core against PEFT on the HF model.

A tiny random Qwen2 (GQA, QKV bias, untied embeddings; saved by transformers) and a PEFT LoRA adapter
made by peft itself (rank 4, alpha 8, all seven linears, random A and B, q/k/v and gate/up sharing
their A as megatron's fused linears do), saved with ``save_pretrained``. The trainer starts from the
HF weights (``--model``) and that adapter (``--adapters``) and takes one step on the data pipeline's
first global batch of real rows; PEFT computes the same loss on the same batch. Checked (fp32, CPU):

* the iteration-1 loss equals PEFT's (abs diff < 1e-5);
* every LoRA gradient equals PEFT's: B's rows per q/k/v, gate/up part; A's gradient is the sum of
  PEFT's A gradients of the fused parts (one shared A); |diff| <= 1e-6 + 1e-4 |PEFT| - single process,
  TP=2, TP=2 + sequence parallel (also with the layernorm + mlp_act recompute), PP=2, DP=2 and CP=2,
  each of the last two with and without the distributed optimizer (gloo); with --lora_bias all --modules_to_save
  embed_tokens lm_head also the biases' and embeddings' gradients;
* after 3 steps every base weight is bitwise the HF model's (tensor by tensor), the adapters moved;
* the PEFT-format export (``export --to_hf``) loads with ``peft.PeftModel.from_pretrained`` and gives
  our trained model's logits (< 1e-4); ``save_safetensors`` wrote the same adapter beside the checkpoint;
* the merged export (``--merge_lora true``) gives the logits of PEFT's ``merge_and_unload()`` (< 1e-5);
* a LoRA run cut back to iteration 2 and resumed (DP=2, distributed optimizer, dropout 0.1) ends with
  the same losses and bitwise the same checkpoint as the uninterrupted run.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from plan_worker import run_plan
from tiny_hf import make_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "truth"))
from truth_refs import data_file, first_batch  # noqa: E402

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
GRAD_LAYOUTS = {"single": [], "tp2": ["--tensor_model_parallel_size", "2"],
                "tp2sp": ["--tensor_model_parallel_size", "2", "--sequence_parallel", "true"],
                "pp2": ["--pipeline_model_parallel_size", "2"],
                "dp2": ["--use_distributed_optimizer", "false"],
                "dp2_distopt": ["--use_distributed_optimizer", "true"],
                "cp2": ["--context_parallel_size", "2", "--use_distributed_optimizer", "false"],
                "cp2_distopt": ["--context_parallel_size", "2", "--use_distributed_optimizer", "true"],
                # megatron-core's layernorm recompute + ours of the SwiGLU output: the adapters' inputs
                # are freed and refilled in place; layer 0's norm input is the frozen embedding's output;
                # and the chunked vocab-parallel cross entropy under sequence parallel
                "tp2sp_recompute": ["--tensor_model_parallel_size", "2", "--sequence_parallel", "true",
                                    "--recompute_granularity", "selective", "--recompute_modules", "core_attn",
                                    "mlp_act", "layernorm", "--cross_entropy_loss_fusion", "true"]}


def peft_adapter(hf: Path, out: Path):
    """A PEFT adapter with random A and B (fused parts share A), saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                                      init_lora_weights=False))
    with torch.no_grad():
        for layer in model.base_model.model.model.layers:
            for mod, parts in ((layer.self_attn, FUSED[0]), (layer.mlp, FUSED[1])):
                a = getattr(mod, parts[0]).lora_A["default"].weight
                for p in parts[1:]:
                    getattr(mod, p).lora_A["default"].weight.copy_(a)
    model.save_pretrained(str(out))
    return out


# (with the chunked output layer + cross entropy: its lm_head and input gradients against PEFT's)
EXTRAS = ["--lora_bias", "all", "--modules_to_save", "embed_tokens", "lm_head", "--cross_entropy_loss_fusion", "true"]


def peft_reference(hf: Path, adapter: Path, batch: list, extras: bool = False) -> dict:
    """PEFT's loss (summed token CE / trained tokens of the global batch) and LoRA grads, keyed as in
    the adapter file. ``extras``: the biases and embed_tokens / lm_head train too (PEFT's bias="all" and
    modules_to_save train exactly those tensors, starting from the base's values)."""
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
    if extras:
        for n, p in model.named_parameters():
            if n.endswith(".bias") or "embed_tokens" in n or "lm_head" in n:
                p.requires_grad = True
    count = sum(int((b["labels"] != -100).sum()) for b in batch)
    total = 0.0
    for b in batch:
        logits = model(b["input_ids"], position_ids=b["position_ids"]).logits
        mask = b["labels"] != -100
        loss = F.cross_entropy(logits[mask].float(), b["labels"][mask], reduction="sum") / count
        loss.backward()
        total += float(loss)
    grads = {n.replace(".default", ""): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return dict(loss=total, grads=grads)


def run_worker(tmp: Path, tag: str, runs: list, nproc: int) -> dict:
    return run_plan(HERE / "lora_worker.py", tmp, tag, runs, nproc)


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    hf = make_tiny("qwen2", tmp / "hf", tokenizer="bytes")
    batch = first_batch(str(hf), data_file(tmp))
    torch.save(batch, tmp / "batch.pt")
    torch.save(batch[0]["input_ids"][:1], tmp / "eval.pt")
    adapter = peft_adapter(hf, tmp / "adapter")
    ref = peft_reference(hf, adapter, batch)
    ref_extras = peft_reference(hf, adapter, batch, extras=True)
    start = ["--model", str(hf), "--adapters", str(adapter)]
    b = str(tmp / "batch.pt")
    single = [dict(name="grads.single", flags=start + ["--train_iters", "1", "--lr", "1e-3"], batch=b, grads=True),
              dict(name="train", flags=start + ["--train_iters", "3", "--lr", "2e-2", "--save_interval", "3",
                                                "--save_safetensors", "true"], batch=b, eval=str(tmp / "eval.pt")),
              dict(name="grads.extras", flags=start + EXTRAS + ["--train_iters", "1", "--lr", "1e-3"], batch=b,
                   grads=True),
              dict(name="extras", flags=start + EXTRAS + ["--train_iters", "2", "--lr", "2e-2", "--save_safetensors",
                                                          "true"], batch=b, eval=str(tmp / "eval.pt")),
              dict(name="bf16", flags=start + ["--train_iters", "2", "--lr", "2e-2", "--torch_dtype", "bfloat16",
                                               "--save_safetensors", "true"], batch=b)]
    multi = [dict(name=f"grads.{lay}", flags=start + ["--train_iters", "1", "--lr", "1e-3"] + f, batch=b, grads=True)
             for lay, f in GRAD_LAYOUTS.items() if lay != "single"]
    resume = ["--train_iters", "4", "--lr", "2e-2", "--save_interval", "2", "--lora_dropout", "0.1"]
    multi += [dict(name="resume.full", flags=start + resume, batch=b),
              dict(name="resume.half", flags=["--model", str(hf)] + resume, batch=b, resume_from="resume.full",
                   resume_at=2)]
    results = {**run_worker(tmp, "single", single, 1), **run_worker(tmp, "multi", multi, 2)}
    return dict(tmp=tmp, hf=hf, adapter=adapter, ref=ref, ref_extras=ref_extras, results=results)


def _ours_as_peft(ckpt: Path) -> dict:
    """Whole adapter tensors of a checkpoint, in PEFT's names (the export's own mapping)."""
    from hpctrain.checkpoint import layout
    from hpctrain.checkpoint.convert_dcp import DcpReader
    from hpctrain.checkpoint.convert_hf_to_mcore import geometry
    from hpctrain.checkpoint.locate import model_args_from_checkpoint
    from hpctrain.checkpoint.lora_export import adapter_tensors, lora_meta
    from hpctrain.model.lora.peft_map import to_peft

    ref = layout.find_latest(ckpt)
    args = model_args_from_checkpoint(ckpt) if (ckpt / "config.json").is_file() else None
    reader = DcpReader(ref.path)
    tensors, adapted = adapter_tensors(reader, lora_meta(ref), 2)
    return to_peft(tensors, "qwen2", geometry(args), adapted)


def _grads_checkpoint(lora, layout_name: str) -> Path:
    """The worker's grads checkpoint, with the run's config.json beside it for the geometry."""
    import shutil
    d = lora["tmp"] / ("single" if layout_name in ("single", "extras") else "multi") / f"grads.{layout_name}.grads"
    if not (d / "config.json").is_file():
        shutil.copy2(lora["hf"] / "config.json", d / "config.json")
    return d


@pytest.mark.parametrize("layout_name", list(GRAD_LAYOUTS) + ["extras"])
def test_lora_gradients_equal_peft(lora, layout_name):
    """``extras``: --lora_bias all --modules_to_save embed_tokens lm_head (single process): the biases'
    and both embeddings' gradients too."""
    ours = _ours_as_peft(_grads_checkpoint(lora, layout_name))
    ref = lora["ref_extras" if layout_name == "extras" else "ref"]["grads"]
    assert {k for k in ours} == {k for k in ref}, sorted(set(ours) ^ set(ref))[:4]
    worst = 0.0
    for key, want in ref.items():
        if ".lora_A." in key:
            mod, rest = key.split(".lora_A.")
            part = mod.rsplit(".", 1)[1]
            group = next((g for g in FUSED if part in g), (part,))
            want = sum(ref[f"{mod.rsplit('.', 1)[0]}.{p}.lora_A.{rest}"] for p in group)
        diff = (ours[key] - want).abs()
        assert bool((diff <= 1e-6 + 1e-4 * want.abs()).all()), f"{layout_name} {key}: max diff {diff.max():.2e}"
        assert float(want.abs().max()) > 1e-4, f"{key}: a zero reference gradient proves nothing"
        worst = max(worst, float(diff.max()))
    print(f"{layout_name}: {len(ref)} LoRA gradients, max abs diff {worst:.2e}")


def test_first_loss_equals_peft(lora):
    got = lora["results"]["grads.single"]["losses"][0]
    assert abs(got - lora["ref"]["loss"]) < 1e-5, (got, lora["ref"]["loss"])
    for lay in list(GRAD_LAYOUTS) + ["extras"]:
        assert abs(lora["results"][f"grads.{lay}"]["losses"][0] - got) < 1e-5, lay


def test_base_weights_unchanged_and_adapters_trained(lora):
    from safetensors.torch import load_file

    from hpctrain.checkpoint import layout
    from hpctrain.checkpoint.convert_dcp import DcpReader
    from hpctrain.checkpoint.convert_mcore_to_hf import iter_hf_from_mcore
    from hpctrain.checkpoint.locate import model_args_from_checkpoint

    root = Path(lora["results"]["train"]["save_dir"])
    ref = layout.find_latest(root)
    assert ref.iteration == 3
    original = load_file(str(lora["hf"] / "model.safetensors"))
    seen = 0
    for name, t in iter_hf_from_mcore(DcpReader(ref.path), model_args_from_checkpoint(root)):
        assert torch.equal(t, original[name]), f"base weight {name} changed"
        seen += 1
    assert seen == len(original)
    start = load_file(str(lora["adapter"] / "adapter_model.safetensors"))
    trained = _ours_as_peft(root)
    assert all(not torch.equal(trained[k], start[k]) for k in start if "lora_B" in k)


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[0].float()


def _peft_vs_ours(lora, adapter: Path, run: str) -> float:
    """Max abs difference between peft's logits (the HF base + ``adapter``) and our trained run's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(lora["hf"]), dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = torch.load(lora["tmp"] / "eval.pt", weights_only=True)
    ours = torch.load(lora["tmp"] / "single" / f"{run}.logits.pt", weights_only=True)[0, :, :300]
    return (_hf_logits(model, ids) - ours).abs().max().item()


def test_peft_export_loads_in_peft_with_our_logits(lora, tmp_path):
    from safetensors.torch import load_file

    from hpctrain.checkpoint.export import run as export

    root = Path(lora["results"]["train"]["save_dir"])
    out = tmp_path / "adapter"
    assert export(["--mcore_model", str(root), "--to_hf", "true", "--output_dir", str(out), "--no_progress"]) == 0
    assert sorted(p.name for p in out.glob("adapter_*")) == ["adapter_config.json", "adapter_model.safetensors"]
    diff = _peft_vs_ours(lora, out, "train")
    print(f"PEFT-format export: max abs logit diff {diff:.2e}")
    assert diff < 1e-4
    beside = load_file(str(root / "checkpoint-3" / "adapter_model.safetensors"))  # save_safetensors
    exported = load_file(str(out / "adapter_model.safetensors"))
    assert beside.keys() == exported.keys() and all(torch.equal(beside[k], exported[k]) for k in beside)


def test_merged_export_equals_peft_merge_and_unload(lora, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hpctrain.checkpoint.export import run as export

    root = Path(lora["results"]["train"]["save_dir"])
    merged, adapter = tmp_path / "merged", root / "checkpoint-3"
    assert export(["--mcore_model", str(root), "--to_hf", "true", "--merge_lora", "true", "--output_dir",
                   str(merged), "--no_progress"]) == 0
    base = AutoModelForCausalLM.from_pretrained(str(lora["hf"]), dtype=torch.float32)
    want = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()
    got = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    ids = torch.load(lora["tmp"] / "eval.pt", weights_only=True)
    diff = (_hf_logits(got, ids) - _hf_logits(want, ids)).abs().max().item()
    print(f"merged export vs merge_and_unload: max abs logit diff {diff:.2e}")
    assert diff < 1e-5


def checkpoint_tensors(ckpt: Path) -> dict:
    """Every model tensor of a torch_dist iteration folder (optimizer state left out)."""
    from hpctrain.checkpoint.convert_dcp import DcpReader

    r = DcpReader(ckpt)
    return {k: r.read(k) for k in r.tensor_keys() if not k.startswith("optimizer")}


def test_lora_resume_is_bitwise(lora):
    full, half = lora["results"]["resume.full"], lora["results"]["resume.half"]
    assert half["losses"] == full["losses"][2:], (half["losses"], full["losses"])
    a, b = checkpoint_tensors(Path(full["last"])), checkpoint_tensors(Path(half["last"]))
    assert a.keys() == b.keys() and any(".lora_B" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_infer_adapter_gives_peft_logits_and_answers(lora, capsys):
    """infer --adapters merges the PEFT folder into the HF weights: PEFT's own logits; the CLI answers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hpctrain.infer.adapters import apply_adapter
    from hpctrain.infer.command import run as infer

    adapter = Path(lora["results"]["train"]["save_dir"]) / "checkpoint-3"
    ids = torch.load(lora["tmp"] / "eval.pt", weights_only=True)
    base = AutoModelForCausalLM.from_pretrained(str(lora["hf"]), dtype=torch.float32).eval()
    want = _hf_logits(PeftModel.from_pretrained(base, str(adapter)).eval(), ids)
    mine = AutoModelForCausalLM.from_pretrained(str(lora["hf"]), dtype=torch.float32).eval()
    assert apply_adapter(mine, str(adapter)) == 2 * 7
    assert (_hf_logits(mine, ids) - want).abs().max().item() < 1e-5
    capsys.readouterr()
    assert infer(["--model", str(lora["hf"]), "--adapters", str(adapter), "--query", "hi",
                  "--max_new_tokens", "3", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "14 linears merged" in captured.err and captured.out.strip()


def test_bf16_run_trains_and_its_adapter_loads_in_peft(lora):
    """bf16 (what GPUs run): Float16Module around the adapters, fp32 main params; the loss follows fp32's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    got = lora["results"]["bf16"]["losses"]
    assert abs(got[0] - lora["ref"]["loss"]) < 0.05, (got, lora["ref"]["loss"])
    adapter = Path(lora["results"]["bf16"]["save_dir"]) / "checkpoint-2"
    base = AutoModelForCausalLM.from_pretrained(str(lora["hf"]), dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, str(adapter))
    from safetensors.torch import load_file
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}  # the run's dtype (peft upcasts on load)
    b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    assert float(b.abs().sum()) > 0


@pytest.mark.parametrize("run", ["grads.single", "grads.tp2", "resume.full"])
def test_frozen_base_has_no_grad_buffers_or_optimizer_state(lora, run):
    """megatron-core's DDP and optimizer see only the adapters (rank 0's share; buffers are padded)."""
    m = lora["results"][run]["memory"]
    assert m["frozen_with_grad"] == 0
    assert m["trainable"] < m["total"] / 10  # rank 4 on a hidden size of 64: 5.5%
    assert m["trainable"] <= m["buffers"] <= m["trainable"] + 4096, m
    assert m["optimizer"] <= m["trainable"], m  # the distributed optimizer holds its DP shard


def test_bias_and_modules_to_save_export_loads_in_peft_with_our_logits(lora):
    """The PEFT files of a --lora_bias all --modules_to_save run (save_safetensors) give our logits in peft."""
    adapter = Path(lora["results"]["extras"]["save_dir"]) / "checkpoint-2"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["bias"] == "all" and cfg["modules_to_save"] == ["embed_tokens", "lm_head"]
    diff = _peft_vs_ours(lora, adapter, "extras")
    print(f"bias + modules_to_save export: max abs logit diff {diff:.2e}")
    assert diff < 1e-4
