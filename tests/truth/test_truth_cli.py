"""`hpctrain sft --model HF_DIR` (no --load) end to end through the CLI, against transformers; a bf16
checkpoint trains in bf16; and each bad input of issue 14 is one line, exit 2, naming the file or
key and the fix (no traceback).

All command lines run through hpctrain.cli.main in one subprocess (tests/truth/cli_driver.py).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_hf import make_tiny
from truth_refs import data_file, export_mcore, first_batch, hf_reference

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TRAIN = ["--train_iters", "1", "--global_batch_size", "4", "--micro_batch_size", "2", "--max_length", "512",
         "--split_dataset_ratio", "0", "--dataset_num_proc", "1", "--model_name", "Bot", "--model_author", "Me",
         "--log_interval", "1", "--no_save_optim", "true", "--lr", "1e-4"]


def copy_with_config(src: Path, dst: Path, **change) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(change)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    data = data_file(tmp)
    qwen = make_tiny("qwen2", tmp / "qwen2", tokenizer="bytes")
    bf16 = make_tiny("qwen2", tmp / "qwen2-bf16", dtype=torch.bfloat16, tokenizer="bytes", seed=1)
    big_tok = make_tiny("qwen2", tmp / "qwen2-qwen-tokenizer")  # the Qwen2.5 tokenizer: 151665 tokens
    broken = copy_with_config(qwen, tmp / "broken", num_hidden_layers="two")
    mcore = export_mcore(qwen, tmp / "qwen2-mcore")
    sft = lambda model, save, *more: ["sft", "--model", str(model), "--dataset", str(data), *TRAIN,  # noqa: E731
                                      "--save", str(tmp / save), *more]
    runs = {
        "fp32": sft(qwen, "fp32"),
        "bf16": sft(bf16, "bf16"),
        "bf16_as_fp32": sft(bf16, "bf16_as_fp32", "--torch_dtype", "float32"),
        "bad_config": sft(broken, "bad"),
        "tokenizer": sft(big_tok, "tok"),
        "qkv_bias": ["sft", "--load", str(mcore), "--finetune", "true", "--dataset", str(data), *TRAIN,
                     "--save", str(tmp / "bias"), "--add_qkv_bias", "false"],
        "both_starts": sft(qwen, "both", "--load", str(mcore), "--load_safetensors", "true"),
        "export_bad": ["export", "--model", str(broken), "--to_mcore", "true", "--output_dir", str(tmp / "x"),
                       "--no_progress"],
    }
    plan = tmp / "plan.json"
    plan.write_text(json.dumps({"runs": runs, "out": str(tmp / "results.json")}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "NPROC_PER_NODE"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, str(HERE / "cli_driver.py"), str(plan)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    refs = {"fp32": hf_reference(qwen, first_batch(str(qwen), data)),
            "bf16": hf_reference(bf16, first_batch(str(bf16), data))}
    return tmp, json.loads((tmp / "results.json").read_text()), refs, dict(qwen=qwen, bf16=bf16, broken=broken)


def run_dir(tmp: Path, save: str) -> Path:
    (run,) = (tmp / save).glob("v0-*")
    return run


def iteration_1_loss(run: Path) -> float:
    rec = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines() if line.strip()]
    return next(r["loss"] for r in rec if r.get("iteration") == 1)


def test_sft_from_hf_dir_trains_the_hf_model(cli):
    tmp, res, refs, models = cli
    assert res["fp32"]["rc"] == 0, res["fp32"]["output"][-3000:]
    run = run_dir(tmp, "fp32")
    assert abs(iteration_1_loss(run) - refs["fp32"]["loss"]) < 1e-3  # the whole dataset is batch 1
    args = json.loads((run / "args.json").read_text())
    assert args["model"]["rotary_base"] == refs["fp32"]["rope_base"] == 1e6
    assert args["model"]["torch_dtype"] == "float32" and args["model"]["load"] is None
    assert f"weights: loaded from {models['qwen']}" in res["fp32"]["output"]
    assert (run / "config.json").is_file() and (run / "tokenizer.json").is_file()
    assert not list((tmp / "fp32").glob(".hf-init-*")), "the scratch conversion is removed"


def test_bf16_checkpoint_trains_in_bf16(cli):
    from hpctrain.checkpoint import layout
    from hpctrain.checkpoint.convert_dcp import DcpReader

    tmp, res, refs, models = cli
    assert res["bf16"]["rc"] == 0, res["bf16"]["output"][-3000:]
    assert f"precision: bf16 (from {models['bf16'] / 'config.json'} dtype=bfloat16)" in res["bf16"]["output"]
    run = run_dir(tmp, "bf16")
    args = json.loads((run / "args.json").read_text())
    assert args["model"]["torch_dtype"] == "bfloat16" and args["precision"]["bf16"] is True
    reader = DcpReader(layout.require_latest(run).path)
    assert reader.dtype("decoder.layers.self_attention.linear_qkv.weight") == torch.bfloat16
    assert abs(iteration_1_loss(run) - refs["bf16"]["loss"]) < 0.05  # bf16 forward vs the fp32 reference
    assert json.loads((run / "config.json").read_text())["dtype"] == "bfloat16"
    # unless you ask otherwise: then it trains in fp32, and the run's config.json says what it holds
    r = res["bf16_as_fp32"]
    assert r["rc"] == 0 and "precision: fp32 (from --torch_dtype float32)" in r["output"], r["output"][-3000:]
    run = run_dir(tmp, "bf16_as_fp32")
    assert json.loads((run / "args.json").read_text())["precision"]["bf16"] is False
    assert json.loads((run / "config.json").read_text())["dtype"] == "float32"
    assert DcpReader(layout.require_latest(run).path).dtype("output_layer.weight") == torch.float32
    assert abs(iteration_1_loss(run) - refs["bf16"]["loss"]) < 1e-3  # fp32 now: exact again


@pytest.mark.parametrize("case, command, needles", [
    ("bad_config", "sft", ["{broken}/config.json: num_hidden_layers = 'two' is not a positive integer"]),
    ("export_bad", "export", ["{broken}/config.json: num_hidden_layers = 'two' is not a positive integer"]),
    ("tokenizer", "sft", ["has 151665 tokens but the model's embedding has 300 rows", "vocab_size=300",
                          "Use the tokenizer that belongs to the model"]),
    ("qkv_bias", "sft", ["checkpoint tensors have no place in the model",
                         "decoder.layers.self_attention.linear_qkv.bias", "drop the settings"]),
    ("both_starts", "sft", ["drop --load_safetensors"]),
])
def test_bad_input_is_one_line_exit_2(cli, case, command, needles):
    tmp, res, _, models = cli
    r = res[case]
    errors = [line for line in r["output"].splitlines() if line.startswith(f"hpctrain {command}:")]
    assert r["rc"] == 2 and len(errors) == 1, r["output"][-3000:]
    assert "Traceback" not in r["output"], r["output"][-3000:]
    for n in needles:
        assert n.format(broken=models["broken"]) in errors[0], errors[0]
