"""Where the trainer's model comes from (train/model_source.py, checkpoint/locate.py): config.json
through the one mapping, explicit fields win, dtype from the checkpoint, --load on a save root,
the start-up refusals. Fast: no process group, no model built."""
import json
import logging
from pathlib import Path

import pytest
from tiny_hf import make_tiny, old_style

from hpctrain.checkpoint import layout
from hpctrain.checkpoint.locate import model_config_path
from hpctrain.config import ConfigError, load_config
from hpctrain.train.entry import tokenizer_source
from hpctrain.train.model_source import check_tokenizer, fill_model_fields, weights_origin


def cfg_of(*flags):
    return load_config(None, list(flags), mode="sft", environ={})


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    import torch
    return {"v5": make_tiny("qwen2", root / "v5", tokenizer="bytes"),
            "bf16": make_tiny("qwen2", root / "bf16", dtype=torch.bfloat16, tokenizer="bytes")}


def test_fields_come_from_config_json_and_yours_win(hf, caplog):
    caplog.set_level(logging.INFO, "hpctrain.train")
    cfg = cfg_of("--model", str(hf["v5"]), "--rotary_base", "5e5")
    src = fill_model_fields(cfg)
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_query_groups, m.kv_channels) == (2, 64, 2, 16)
    assert m.add_qkv_bias and m.untie_embeddings_and_output_weights and m.model_type == "qwen2"
    assert m.padded_vocab_size == 300 and src.vocab_size == 300 and src.weights == "hf"
    assert m.rotary_base == 5e5
    assert f"rotary_base = 500000.0 (set by you; {hf['v5'] / 'config.json'} says 1000000.0)" in caplog.text


def test_precision_follows_the_checkpoint_unless_you_say(hf, tmp_path, caplog):
    caplog.set_level(logging.INFO, "hpctrain.train")
    cfg = cfg_of("--model", str(hf["bf16"]))
    assert fill_model_fields(cfg).precision == f"bf16 (from {hf['bf16'] / 'config.json'} dtype=bfloat16)"
    assert cfg.model.torch_dtype == "bfloat16" and cfg.precision.bf16 and not cfg.precision.fp16
    assert "precision: bf16 (from" in caplog.text
    old = tmp_path / "old"
    old.mkdir()
    for f in hf["bf16"].iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    old_style(old / "config.json")
    cfg = cfg_of("--model", str(old))
    assert fill_model_fields(cfg).precision.endswith("torch_dtype=bfloat16)") and cfg.precision.bf16
    for flags, want in ((["--torch_dtype", "float32"], "fp32 (from --torch_dtype float32)"),
                        (["--fp16", "true"], "fp16 (from --fp16)"),
                        (["--bf16", "false", "--fp16", "false"], "fp32 (from --bf16 false --fp16 false)")):
        cfg = cfg_of("--model", str(hf["bf16"]), *flags)
        assert fill_model_fields(cfg).precision == want
        assert cfg.precision.bf16 is False and bool(cfg.precision.fp16) == want.startswith("fp16")


def test_weights_origin():
    assert weights_origin(cfg_of("--model", "/m")) == "hf"
    assert weights_origin(cfg_of("--model", "/m", "--load_safetensors", "false")) == "random"
    assert weights_origin(cfg_of("--model", "/m", "--load", "/c")) == "checkpoint"
    assert weights_origin(cfg_of("--num_layers", "2")) == "random"
    with pytest.raises(ConfigError, match="drop --load_safetensors"):
        weights_origin(cfg_of("--model", "/m", "--load", "/c", "--load_safetensors", "true"))


def test_contradicting_family_and_missing_shape_are_refused(hf):
    # The family always comes from config.json: --model_type itself is refused (issue 15), so it
    # cannot name another family than the checkpoint's.
    with pytest.raises(ConfigError, match="model_type is not supported yet: hpctrain takes the model family"):
        fill_model_fields(cfg_of("--model", str(hf["v5"]), "--model_type", "llama"))
    with pytest.raises(ConfigError, match="model shape unknown: num_layers, hidden_size"):
        fill_model_fields(cfg_of("--lr", "1e-4"))


def test_tokenizer_larger_than_the_vocabulary_is_refused(hf):
    from hpctrain.data import load_tokenizer

    cfg = cfg_of("--model", str(hf["v5"]))
    src = fill_model_fields(cfg)
    check_tokenizer(load_tokenizer(str(hf["v5"])), str(hf["v5"]), src, cfg)  # 259 tokens <= 300
    big = Path(__file__).resolve().parents[1] / "fixtures" / "qwen2.5-tokenizer"
    with pytest.raises(ConfigError) as e:
        check_tokenizer(load_tokenizer(str(big)), str(big), src, cfg)
    assert (f"tokenizer {big} has 151665 tokens but the model's embedding has 300 rows "
            f"({hf['v5'] / 'config.json'} vocab_size=300)") in str(e.value)


def _run(save: Path, name: str, complete: bool) -> Path:
    run = save / name
    (run / "iter_0000002").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"name": name}))
    (run / "tokenizer.json").write_text("{}")
    if complete:
        layout.write_tracker(run, 2)
    return run


def test_load_on_a_save_root_means_its_newest_complete_run(tmp_path):
    save = tmp_path / "save"
    _run(save, "v0-20260101-000000", True)
    newest = _run(save, "v1-20260102-000000", True)
    _run(save, "v2-20260103-000000", False)  # interrupted: no tracker
    assert model_config_path(None, str(save)) == newest / "config.json"
    assert tokenizer_source(cfg_of("--load", str(save))) == str(newest)
    assert model_config_path(None, str(newest / "iter_0000002")) == newest / "config.json"
    with pytest.raises(ConfigError, match="holds no config.json"):
        tokenizer_source(cfg_of("--load", str(tmp_path / "empty")))


def test_hf_start_on_several_nodes_needs_a_shared_save():
    from hpctrain.train.hf_init import scratch_parent

    assert scratch_parent(cfg_of("--model", "/m/Qwen", "--save", "/shared/out"), 16, 8) == Path("/shared/out")
    cfg = cfg_of("--model", "/m/Qwen")
    cfg.checkpoint.save = None
    assert scratch_parent(cfg, 8, 8) is None  # one node: a local temporary folder
    with pytest.raises(ConfigError) as e:
        scratch_parent(cfg, 16, 8)
    assert ("hpctrain export --model /m/Qwen --to_mcore true --output_dir /m/Qwen-mcore, then train with "
            "--load /m/Qwen-mcore") in str(e.value)
