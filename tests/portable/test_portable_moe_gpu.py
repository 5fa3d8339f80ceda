"""On a CUDA machine: Qwen3-MoE's expert paths in bf16 - the grouped GEMM (PortableGroupedMLP on torch
grouped_mm) against the per-expert loop (SequentialMLP) on the same checkpoint (logits, loss, every
gradient) and against transformers' Qwen3MoeForCausalLM (logits, loss): tools/bench/check_moe.py,
tolerances 3e-2 (6e-2 for gradients) relative, argmax agreement >= 98%. The same script runs on the
CPU in fp32 at 1e-4 in CI (tests/moe/test_moe_scripts.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_and_sequential_experts_and_hf_agree_in_bf16():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench", "check_moe.py"), "--device", "cuda"],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(lines[-1])
    print(result)
    assert result["ok"], result
