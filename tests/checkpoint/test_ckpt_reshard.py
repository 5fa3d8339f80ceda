"""hpctrain reshard (torch_dist -> torch_dist): layout checks, bit-exact verified copy, tracker last."""
import torch

from hpctrain.checkpoint import layout
from hpctrain.checkpoint.convert_dcp import DcpReader
from hpctrain.checkpoint.export import run as export
from hpctrain.checkpoint.reshard import run as reshard


def test_reshard_copy_bit_exact(tiny_models, tmp_path, capsys):
    mc, out = tmp_path / "mc", tmp_path / "tp2pp2"
    assert export(["--model", str(tiny_models("qwen2")), "--to_mcore", "true", "--output_dir", str(mc),
                   "--no_progress"]) == 0
    assert reshard([str(mc), "--tp", "2", "--pp", "2", "--out", str(out), "--no_progress"]) == 0
    a, b = DcpReader(layout.require_latest(mc).path), DcpReader(layout.require_latest(out).path)
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.tensor_keys():
        assert torch.equal(a.read(k), b.read(k)), k
    assert (out / "config.json").is_file()
    # bad layouts / formats
    assert reshard([str(mc), "--tp", "3", "--pp", "1", "--out", str(tmp_path / "x"), "--no_progress"]) == 1
    assert "does not divide num_attention_heads=4" in capsys.readouterr().err
    assert reshard([str(mc), "--tp", "1", "--pp", "3", "--out", str(tmp_path / "y"), "--no_progress"]) == 1
    assert "does not divide num_layers=2" in capsys.readouterr().err
    assert reshard([str(mc), "--tp", "2", "--pp", "1", "--out", str(out), "--no_progress"]) == 1
    assert "--overwrite" in capsys.readouterr().err
