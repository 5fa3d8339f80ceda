"""The load-balancing loss megatron-core adds in training equals transformers' router aux loss.

The mapping (stated in docs/moe.md): transformers' ``load_balancing_loss_func`` is
E * sum_e (n_e / T) * P_e over the router logits of ALL MoE layers pooled (n_e: top-k assignments to
expert e over T tokens, P_e: mean router probability), and the model adds router_aux_loss_coef times
it to the loss only when ``output_router_logits`` is true. megatron-core's is E * sum_e (n_e / (T k)) * P_e
PER LAYER, each layer's times ``moe_aux_loss_coeff`` added to the gradients (not the reported loss). So
per layer HF = k x megatron, exactly; for a model with one MoE layer that is HF's whole aux loss;
with several layers HF pools the statistics before multiplying, megatron sums the per-layer products
(Megatron-SWIFT's behaviour, which hpctrain keeps; router_aux_loss_coef -> moe_aux_loss_coeff).

Models: tiny Qwen3-MoE saved by transformers (``qwen3_moe_mixed``: one MoE layer; ``qwen3_moe``: two),
converted with ``hpctrain export``; the same random batch through both (fp32, CPU). Tolerance 1e-5.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_hf import make_tiny

from hpctrain.checkpoint.export import run as export

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def aux(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aux")
    kinds = ("qwen3_moe_mixed", "qwen3_moe")
    argv = []
    for kind in kinds:
        hf = make_tiny(kind, tmp / kind)
        assert export(["--model", str(hf), "--to_mcore", "true", "--output_dir", str(tmp / f"{kind}-mc"),
                       "--no_progress"]) == 0
        argv += [str(hf), str(tmp / f"{kind}-mc"), str(tmp / f"{kind}.json")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, str(HERE / "aux_loss_worker.py"), *argv], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return {kind: json.loads((tmp / f"{kind}.json").read_text()) for kind in kinds}


def test_one_moe_layer_model_aux_loss_equals_hf(aux):
    a = aux["qwen3_moe_mixed"]
    moe_layers = [v for v in a["mcore_per_layer"] if v != 0.0]
    assert a["mcore_per_layer"][0] == 0.0 and len(moe_layers) == 1  # layer 0 is dense
    assert a["topk"] * moe_layers[0] == pytest.approx(a["aux_loss"], rel=1e-5)


def test_each_layer_aux_loss_equals_hf_on_that_layers_router_logits(aux):
    a = aux["qwen3_moe"]
    assert len(a["per_layer"]) == len(a["mcore_per_layer"]) == 2
    for hf, mc in zip(a["per_layer"], a["mcore_per_layer"]):
        assert a["topk"] * mc == pytest.approx(hf, rel=1e-5)
