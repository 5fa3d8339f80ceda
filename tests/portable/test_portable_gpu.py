"""On a CUDA machine: the CUDA kernels of the portable attention (compiled flex_attention for packed
samples, SDPA + causal_lower_right for unpacked context parallel) equal the explicit-mask SDPA path,
forward and gradients, in bf16 (tools/bench/check_attention.py; tolerance 3e-2 relative)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_attention_paths_match_explicit_mask():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench", "check_attention.py")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(lines[-1])
    assert result["ok"], result
