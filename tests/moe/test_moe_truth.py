"""Ground truth for Qwen3-MoE: the trainer's model at iteration 0 gives transformers' logits and loss.

Models: random tiny Qwen3-MoE saved by transformers: ``qwen3_moe`` (2 MoE layers, 4 experts, top-2,
norm_topk_prob = true, config.json as transformers 5 writes it) and ``qwen3_moe_mixed`` (layer 0 dense
through mlp_only_layers, norm_topk_prob = false, config.json rewritten as 4.x writes it: num_experts,
top-level rope_theta, torch_dtype). Through the trainer's own start-up (tests/truth/truth_worker.py)
from the ``hpctrain export --to_mcore`` checkpoint (``--load``) and from the HF dir (``--model``):

* logits on a real token sequence: max abs diff < 1e-3 (fp32, CPU), same argmax;
* the iteration-1 loss the loop reports (the LM loss: megatron-core adds the aux loss to the
  gradients, not to the reported loss) = the HF model's per-token loss on that batch (< 1e-3);

single process with the per-expert loop, with the grouped GEMM and with the allgather dispatcher, and
under torchrun (gloo, 2 processes) at EP=2 (alltoall), TP=2 + SP (experts split by ETP = TP) and PP=2.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from plan_worker import run_plan
from tiny_hf import make_tiny

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests" / "truth"))
from truth_refs import data_file, export_mcore, first_batch, hf_reference  # noqa: E402

pytestmark = pytest.mark.slow
TOL = 1e-3
MODELS = {"moe": ("qwen3_moe", "v5"), "mixed": ("qwen3_moe_mixed", "old")}
SINGLE = {"seq": ["--moe_grouped_gemm", "false"], "grouped": ["--moe_grouped_gemm", "true"],
          "allgather": ["--moe_token_dispatcher_type", "allgather"],
          # the routers run again in the backward: the logged aux loss must not count them twice
          "recompute": ["--recompute_granularity", "full", "--recompute_method", "uniform",
                        "--recompute_num_layers", "1"]}
MULTI = {"ep2": ["--expert_model_parallel_size", "2"],
         "tp2": ["--tensor_model_parallel_size", "2", "--sequence_parallel", "true"],
         "pp2": ["--pipeline_model_parallel_size", "2"]}


def run_worker(tmp: Path, tag: str, runs: list, nproc: int) -> dict:
    return run_plan(HERE / "moe_truth_worker.py", tmp, tag, runs, nproc, logits=True)


@torch.no_grad()
def hf_load_balancing(hf: Path, batch: list) -> float:
    """What the trainer logs as load_balancing_loss, from transformers' router: per MoE layer and
    micro-batch, ``load_balancing_loss_func`` on that layer's router logits divided by top-k (docs/moe.md:
    HF = k x megatron per layer), averaged over the micro-batches and then over the layers."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    c = model.config
    per_mb = []
    for b in batch:
        logits = model(b["input_ids"], position_ids=b["position_ids"], output_router_logits=True).router_logits
        per_mb.append([float(load_balancing_loss_func((lg,), c.num_experts, c.num_experts_per_tok))
                       / c.num_experts_per_tok for lg in logits])
    per_layer = torch.tensor(per_mb, dtype=torch.float64).mean(0)
    return float(per_layer.mean())


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe_truth")
    data = data_file(tmp)
    cases, refs = [], {}
    for name, (kind, style) in MODELS.items():
        hf = make_tiny(kind, tmp / name, style=style, tokenizer="bytes")
        batch = first_batch(str(hf), data)
        refs[name] = dict(hf_reference(hf, batch), load_balancing_loss=hf_load_balancing(hf, batch))
        torch.save(batch, tmp / f"{name}.batch.pt")
        torch.save(refs[name]["eval_ids"], tmp / f"{name}.eval.pt")
        mc = export_mcore(hf, tmp / f"{name}-mcore")
        for how, flags in (("load", ["--load", str(mc), "--finetune", "true"]), ("model", ["--model", str(hf)])):
            cases.append(dict(name=f"{name}-{how}", flags=flags, batch=str(tmp / f"{name}.batch.pt"),
                              eval=str(tmp / f"{name}.eval.pt")))
    single = [dict(c, layout=lay, layout_flags=f) for lay, f in SINGLE.items() for c in cases]
    multi = [dict(c, layout=lay, layout_flags=f) for lay, f in MULTI.items() for c in cases
             if c["name"].endswith("-load") or lay == "ep2"]
    results = {**run_worker(tmp, "single", single, 1), **run_worker(tmp, "multi", multi, 2)}
    return refs, results


RUNS = ([f"{m}-{h}.{lay}" for m in MODELS for h in ("load", "model") for lay in SINGLE]
        + [f"{m}-{h}.{lay}" for m in MODELS for lay in MULTI for h in ("load", "model")
           if h == "load" or lay == "ep2"])


@pytest.mark.parametrize("run", RUNS)
def test_trainer_moe_gives_the_hf_logits_and_loss(truth, run):
    refs, results = truth
    ref, got = refs[run.split("-")[0]], results[run]
    hf = ref["logits"]
    mc = got["logits"][0, :, : hf.shape[-1]] if got["logits"].dim() == 3 else got["logits"][:, : hf.shape[-1]]
    diff = (hf - mc).abs().max().item()
    print(f"{run}: max abs logit diff {diff:.2e}, loss {got['loss']:.6f} vs HF {ref['loss']:.6f}")
    assert diff < TOL, f"{run}: max abs logit diff {diff:.2e}"
    assert torch.equal(hf.argmax(-1), mc.argmax(-1)), f"{run}: argmax differs"
    assert abs(got["loss"] - ref["loss"]) < TOL, f"{run}: iteration-1 loss {got['loss']} vs HF {ref['loss']}"


@pytest.mark.parametrize("run", RUNS)
def test_logged_load_balancing_loss_equals_hf_router_loss(truth, run):
    """logging.jsonl's load_balancing_loss at iteration 1 against transformers' router on the same
    micro-batches (fp64 sums of fp32 values: 1e-5 relative), at every layout."""
    refs, results = truth
    want, got = refs[run.split("-")[0]]["load_balancing_loss"], results[run]["load_balancing_loss"]
    assert got is not None, f"{run}: no load_balancing_loss in logging.jsonl"
    print(f"{run}: load_balancing_loss {got:.8f} vs HF {want:.8f}")
    assert got == pytest.approx(want, rel=1e-5), f"{run}: logged {got} vs HF {want}"


def test_args_json_records_the_moe_shape_of_config_json(truth):
    _, results = truth
    moe = results["mixed-model.seq"]["moe"]
    assert moe["num_experts"] == 4 and moe["moe_router_topk"] == 2 and moe["moe_ffn_hidden_size"] == 32
    assert moe["moe_router_pre_softmax"] is True  # norm_topk_prob = false
    assert json.loads(moe["moe_layer_freq"]) == [0, 1]  # mlp_only_layers = [0]
    assert moe["moe_aux_loss_coeff"] == 0.01
    assert results["moe-model.seq"]["moe"]["moe_router_pre_softmax"] is False
    assert results["moe-model.seq"]["moe"]["moe_layer_freq"] == "1"
