"""No code from checkpoints: a torch_dist checkpoint whose .metadata, byte object (_extra_state) or
common.pt unpickles to ``os.system("touch MARKER")`` is refused by every command that loads it,
with one line naming the file and the global, and the marker never appears.

Before the fix, torch's FileSystemReader.read_metadata (plain pickle.load) and DefaultLoadPlanner
.load_bytes (torch.load weights_only=False) ran the payload under `export --mcore_model`, `reshard`
and `sft --load`, which then exited 0; reshard copied the payload into its "verified" output.
``--trust_pickle`` (reshard's documented escape hatch) shows that the crafted files do run code
when loaded unrestricted, so these tests would catch a loader that stops refusing them.
"""
import io
import pickle

import pytest
import torch

from faultkit import error_line, hpctrain, sft_args
from crafted import KINDS, Payload, craft
from hpctrain.checkpoint import layout, safe_pickle
from hpctrain.errors import UserError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def crafted(tiny_mcore, tmp_path_factory):
    """kind -> (crafted checkpoint root, marker path)."""
    tmp = tmp_path_factory.mktemp("crafted")
    out = {}
    for kind in KINDS:
        marker = tmp / f"marker-{kind}"
        craft(tiny_mcore[1], tmp / kind, kind, marker)
        out[kind] = (tmp / kind, marker)
    return out


def refused(proc, command, kind, root) -> None:
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = error_line(proc, command)
    assert "refusing to unpickle posix.system" in line and "nothing was run" in line, line
    name = {"metadata": ".metadata", "object": "__crafted.distcp", "common": "common.pt"}[kind]
    assert str(root) in line and name in line, line


@pytest.mark.parametrize("kind", KINDS)
def test_sft_load_refuses(crafted, tmp_path, kind):
    root, marker = crafted[kind]
    p = hpctrain(*sft_args(root, tmp_path / "save"))
    assert not marker.exists()
    refused(p, "sft", kind, root)
    assert p.returncode == 2


@pytest.mark.parametrize("kind", KINDS)
def test_reshard_refuses_and_writes_nothing(crafted, tmp_path, kind):
    root, marker = crafted[kind]
    out = tmp_path / "out"
    p = hpctrain("reshard", root, "--tp", 1, "--pp", 1, "--out", out, "--no_progress")
    assert not marker.exists()
    refused(p, "reshard", kind, root)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # no "verified" copy of the payload


def test_reshard_trust_pickle_runs_the_payload(crafted, tmp_path):
    """The escape hatch: with --trust_pickle the same file loads unrestricted - and runs its code."""
    root, marker = crafted["metadata"]
    p = hpctrain("reshard", root, "--tp", 1, "--pp", 1, "--out", tmp_path / "out", "--no_progress",
                 "--trust_pickle")
    assert p.returncode == 0, p.stderr[-3000:]
    assert marker.exists()
    marker.unlink()


@pytest.mark.parametrize("kind", KINDS)
def test_export_to_hf_refuses_or_never_reads(crafted, tmp_path, kind):
    """export --to_hf reads the metadata and tensors (refused when the metadata is crafted); the
    precision test loads the model through megatron-core (every kind refused)."""
    root, marker = crafted[kind]
    p = hpctrain("export", "--mcore_model", root, "--to_hf", "true", "--output_dir", tmp_path / "hf",
                 "--no_progress", "--test_convert_precision", "true")
    assert not marker.exists()
    refused(p, "export", kind, root)


def test_load_torch_names_file_and_global(tmp_path):
    f = tmp_path / "x.pt"
    torch.save({"ok": torch.ones(2), "bad": Payload(tmp_path / "m")}, f)
    with pytest.raises(UserError, match=r"x\.pt: refusing to unpickle posix\.system"):
        safe_pickle.load_torch(f)
    assert not (tmp_path / "m").exists()
    torch.save({"ok": torch.ones(2), "ns": __import__("argparse").Namespace(a=1)}, f)
    assert safe_pickle.load_torch(f)["ns"].a == 1  # what megatron's args / objects hold


def test_metadata_unpickler_admits_real_metadata_only(tiny_mcore, tmp_path):
    ref = layout.require_latest(tiny_mcore[1])
    with open(ref.path / ".metadata", "rb") as f:
        md = safe_pickle.load_metadata(f, ref.path / ".metadata")
    assert "embedding.word_embeddings.weight" in md.state_dict_metadata
    evil = pickle.dumps(Payload(tmp_path / "m"))
    with pytest.raises(UserError, match="refusing to unpickle posix.system"):
        safe_pickle.load_metadata(io.BytesIO(evil), "crafted")
    with pytest.raises(UserError, match="not a readable checkpoint metadata file"):
        safe_pickle.load_metadata(io.BytesIO(evil[:10]), "truncated")
    assert not (tmp_path / "m").exists()
