"""The package as a cluster admin gets it: build the sdist from the tracked files, build a wheel
from that sdist (CMake builds hpctrain._C from the sdist's csrc/), install the wheel into a fresh
venv outside the source tree, and run `hpctrain doctor`, `hpctrain templates`, and a tiny
export -> sft -> export -> infer from there.

Kept cheap for CI: the sdist and the wheel are built without build isolation (setuptools,
pybind11 and cmake come from this environment, as tools/setup_env.sh installs them), and the
fresh venv (``--without-pip``) sees this environment's already-installed dependencies (torch,
megatron-core, transformers, ...) through a ``.pth`` file naming its site-packages. hpctrain
itself comes only from the wheel: a .pth names a folder but does not run the .pth files inside it,
so this environment's editable install of hpctrain is not seen; the commands run with PYTHONPATH
unset, from a folder outside the tree, and the test checks where `hpctrain` is imported from.
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer"
pytestmark = pytest.mark.slow


def _run(cmd, cwd, env=None, timeout=900):
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def _tracked_tree(dst: Path) -> Path:
    """A copy of the tracked files, as a fresh clone has them (no build outputs, no local files)."""
    files = _run(["git", "ls-files", "-z"], ROOT).stdout.split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    return dst


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """(sdist, wheel): the wheel built from the sdist alone."""
    tmp = tmp_path_factory.mktemp("dist")
    src = _tracked_tree(tmp / "src")
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", tmp / "sdist", src], tmp)
    sdist = next((tmp / "sdist").glob("hpctrain-*.tar.gz"))
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
          "-w", tmp / "wheel", sdist], tmp, env=env, timeout=1500)
    return sdist, next((tmp / "wheel").glob("hpctrain-*.whl"))


def test_sdist_holds_what_the_build_needs(dist):
    with tarfile.open(dist[0]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for need in ("CMakeLists.txt", "csrc/module.cpp", "csrc/common.h", "setup.py", "pyproject.toml",
                 "slurm/train.sbatch", "slurm/profiles/example-h100.toml", "docs/config.md",
                 "tools/constraints-ci.txt", "hpctrain/assets/data/self_cognition.jsonl"):
        assert need in names, need
    assert not any(n.endswith(".so") for n in names)


def test_wheel_holds_the_extension_assets_and_honest_metadata(dist):
    with zipfile.ZipFile(dist[1]) as whl:
        names = set(whl.namelist())
        meta = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.startswith("hpctrain/_C.") and n.endswith(".so") for n in names)
    for need in ("hpctrain/assets/slurm/train.sbatch", "hpctrain/assets/slurm/prep.sbatch",
                 "hpctrain/assets/slurm/profiles/example-h100.toml", "hpctrain/assets/docs/config.md",
                 "hpctrain/assets/data/self_cognition.jsonl", "hpctrain/assets/configs/qwen2.5-0.5b-instruct.config.json"):
        assert need in names, need
    assert "hpctrain/assets/slurm/profiles/local-test.toml" not in names  # the test cluster's, not a user's
    requires = [line.split(": ", 1)[1] for line in meta.splitlines() if line.startswith("Requires-Dist: ")]
    assert "Requires-Python: >=3.11" in meta
    assert not any("==" in r.split(";")[0] for r in requires), requires  # exact pins: tools/constraints-ci.txt
    for need in ("torch<3,>=2.6", "megatron-core<0.20,>=0.16.1", "submitit<1.6,>=1.5"):
        assert need in requires, requires
    assert not any(r.startswith("matplotlib") and "extra" not in r for r in requires)  # optional: [plot]
    for extra in ("plot", "te", "gguf", "dev"):
        assert f"Provides-Extra: {extra}" in meta


def _venv_with(wheel: Path, where: Path) -> Path:
    _run([sys.executable, "-m", "venv", "--without-pip", where], where.parent)
    py = where / "bin" / "python"
    purelib = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], where).stdout.strip()
    # the dependencies already installed here, AFTER the venv's own site-packages on sys.path
    (Path(purelib) / "hpctrain-test-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", wheel], where)
    return where / "bin"


def test_installed_wheel_runs_doctor_templates_export_sft_infer(dist, tmp_path):
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    bin_ = _venv_with(dist[1], tmp_path / "venv")
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")

    def hpctrain(*args, timeout=900):
        return _run([bin_ / "hpctrain", *args], work, env=env, timeout=timeout)

    where = _run([bin_ / "python", "-c", "import hpctrain, hpctrain._C as C; print(hpctrain.__file__, C.__file__)"],
                 work, env=env).stdout
    assert where.startswith(str(tmp_path / "venv")) and str(ROOT) not in where, where

    doctor = hpctrain("doctor").stdout
    assert "all required components present" in doctor and str(tmp_path / "venv") in doctor

    hpctrain("templates", "tpl")
    assert (work / "tpl" / "train.sbatch").read_text() == (ROOT / "slurm" / "train.sbatch").read_text()
    assert (work / "tpl" / "profiles" / "example-h100.toml").is_file()
    assert (work / "tpl" / "config.md").read_text() == (ROOT / "docs" / "config.md").read_text()

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 max_position_embeddings=256)).save_pretrained(work / "hf")
    tok.save_pretrained(work / "hf")
    hpctrain("export", "--model", "hf", "--to_mcore", "true", "--output_dir", "mcore")
    # the bundled self-cognition set comes from the wheel's assets (the seed's hub name is an alias)
    hpctrain("sft", "--load", "mcore", "--finetune", "true", "--dataset", "swift/self-cognition#8",
             "--model_name", "小黄", "Bot", "--model_author", "魔搭", "Acme", "--train_iters", "2",
             "--global_batch_size", "4", "--micro_batch_size", "2", "--max_length", "128", "--save", "out")
    assert list((work / "out").glob("v0-*/iter_0000002")), list((work / "out").rglob("*"))
    hpctrain("export", "--mcore_model", "out", "--to_hf", "true", "--output_dir", "hf2")
    answer = hpctrain("infer", "--model", "hf2", "--query", "who are you?", "--max_new_tokens", "4").stdout
    assert len(answer.splitlines()) == 1
