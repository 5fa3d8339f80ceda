"""The GPU pieces of issue 21 run here on the CPU, so the lead's single GPU run finds them working:
tools/bench/check_moe.py (grouped vs sequential experts vs transformers; fp32, tolerance 1e-4) and
tools/bench/bench_moe.py --tiny (every variant of the benchmark, tiny shapes)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HPCTRAIN_DEVICE="cpu")


@pytest.mark.slow
def test_check_moe_on_the_cpu():
    p = subprocess.run([sys.executable, "tools/bench/check_moe.py", "--device", "cpu"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    assert p.returncode == 0 and lines, p.stdout[-2000:] + p.stderr[-3000:]
    r = json.loads(lines[-1])
    assert r["ok"] and r["grad_keys"] >= 20 and r["hf_experts_implementation"] == "eager", r


@pytest.mark.slow
def test_bench_moe_tiny_runs_every_variant(tmp_path):
    out = tmp_path / "bench.jsonl"
    p = subprocess.run([sys.executable, "tools/bench/bench_moe.py", "--tiny", "--out", str(out)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    runs = [r for r in recs if "variant" in r and not r["status"].startswith("skipped")]
    assert {(r["shape"], r["variant"]) for r in runs} == {("moe", "ours"), ("moe", "hf-eager"), ("moe", "hf"),
                                                         ("moe", "ours-sequential"), ("dense", "ours"), ("dense", "hf")}
    skipped = [r for r in recs if "variant" in r and r["status"].startswith("skipped")]
    assert [(r["variant"], r["status"]) for r in skipped] == [("ours+graph", "skipped (CUDA graphs need CUDA)")]
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in runs), runs
    assert [r["summary"] for r in recs if "summary" in r] == ["ours/hf-eager tokens/s", "ours/hf tokens/s",
                                                             "ours/hf tokens/s"]
