"""Conversion refuses bad input with errors that name the file / key and the fix."""
import json
import shutil

import pytest

from hpctrain.checkpoint import layout
from hpctrain.checkpoint import convert_hf_to_mcore as h2m
from hpctrain.checkpoint.export import run as export
from hpctrain.model.build import model_args_from_hf
from hpctrain.model.mcore_config import check_tp


def to_mcore(src, out, *extra):
    return export(["--model", str(src), "--to_mcore", "true", "--output_dir", str(out),
                   "--no_progress", *extra])


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_shard(tiny_models, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(tiny_models("qwen2")))
    d = tmp_path / "sharded"
    m.save_pretrained(str(d), max_shard_size="100KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    assert to_mcore(d, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert shards[1].name in err and "missing" in err
    assert not layout.is_complete(tmp_path / "out")


def test_truncated_safetensors(tiny_models, tmp_path, capsys):
    d = copy_model(tiny_models("qwen2"), tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert to_mcore(d, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "truncated" in err and "model.safetensors" in err


def test_wrong_architecture(tiny_models, tmp_path, capsys):
    d = copy_model(tiny_models("qwen2"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    assert to_mcore(d, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "unsupported architecture" in err and "LlamaForCausalLM" in err and "Qwen2ForCausalLM" in err


def test_unsupported_rope_scaling(tiny_models, tmp_path, capsys):
    d = copy_model(tiny_models("llama3"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (d / "config.json").write_text(json.dumps(cfg))
    assert to_mcore(d, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "rope_scaling.rope_type = 'yarn' is not supported" in err and str(d / "config.json") in err


def test_tp_must_divide_heads(tiny_models):
    cfg = json.loads((tiny_models("qwen2") / "config.json").read_text())
    args = model_args_from_hf(cfg)
    check_tp(args, 2)
    with pytest.raises(ValueError, match=r"tensor_model_parallel_size=3 does not divide num_attention_heads=4"):
        check_tp(args, 3)


def test_existing_output_needs_overwrite(tiny_models, tmp_path, capsys):
    src, out = tiny_models("qwen2_tied"), tmp_path / "out"
    assert to_mcore(src, out) == 0
    assert to_mcore(src, out) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert to_mcore(src, out, "--overwrite", "true") == 0
    assert layout.is_complete(out)


def test_interrupted_conversion_never_complete(tiny_models, tmp_path, monkeypatch):
    """A conversion that dies mid-write leaves nothing under the output's name: never picked up."""
    real = h2m.plan_items

    def failing(*a, **k):
        items = real(*a, **k)
        def boom():
            raise RuntimeError("disk full (simulated)")
        items[len(items) // 2].load = boom
        return items

    monkeypatch.setattr(h2m, "plan_items", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated"):
        h2m.hf_to_mcore(str(tiny_models("qwen2")), str(out), progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # built aside, removed on failure
    assert layout.find_latest(out) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        layout.require_latest(out)
