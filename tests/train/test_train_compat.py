"""compat.apply("cpu") must not leak into code other than megatron-core's.

Regression: compat used to replace torch's factory functions process-wide. torch keys its
meta-device context (``with torch.device("meta")``) on those functions' identity (a cache filled
at its first use), so after compat.apply meta construction silently produced real CPU tensors, and
transformers' ``from_pretrained`` then left the rotary ``inv_freq`` buffer uninitialised (garbage
logits). The reference is computed in a fresh interpreter without compat; the check runs in
another one that applies compat FIRST (as the trainer does), because compat patches the process.
"""
import subprocess
import sys
import textwrap

import pytest
import torch

REFERENCE = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tmp = sys.argv[1]
    small = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**small)).save_pretrained(f"{tmp}/qwen2")
    LlamaForCausalLM(LlamaConfig(**small)).save_pretrained(f"{tmp}/llama")
    ids = torch.arange(3, 19).view(1, 16)
    ref = {}
    for name in ("qwen2", "llama"):
        m = AutoModelForCausalLM.from_pretrained(f"{tmp}/{name}").eval()
        with torch.no_grad():
            ref[name] = (m.model.rotary_emb.inv_freq.clone(), m(ids).logits)
    torch.save(ref, f"{tmp}/ref.pt")
""")

CHECK = textwrap.dedent("""
    import sys, torch
    from hpctrain.train import compat
    compat.apply("cpu")  # before anything else, as in the trainer

    from transformers import AutoModelForCausalLM
    tmp = sys.argv[1]
    ref = torch.load(f"{tmp}/ref.pt", weights_only=True)
    ids = torch.arange(3, 19).view(1, 16)
    for name in ("qwen2", "llama"):
        m = AutoModelForCausalLM.from_pretrained(f"{tmp}/{name}").eval()
        with torch.no_grad():
            inv, logits = m.model.rotary_emb.inv_freq, m(ids).logits
        theta = m.config.rope_parameters["rope_theta"]
        formula = 1.0 / theta ** (torch.arange(0, 16, 2, dtype=torch.float) / 16)
        torch.testing.assert_close(inv, formula, rtol=1e-6, atol=0)
        assert torch.equal(inv, ref[name][0]), (name, inv)
        assert torch.equal(logits, ref[name][1]), name  # same weights, same code: bitwise

    with torch.device("meta"):  # torch's device context still sees its own factories
        assert torch.empty(2).device.type == "meta"
        assert torch.nn.Linear(2, 2).weight.device.type == "meta"
    assert torch.empty is compat.megatron_torch().empty._hpctrain_original

    # megatron-core still gets its CUDA requests on the CPU: an already imported module...
    from megatron.core.transformer.utils import get_default_causal_mask
    assert get_default_causal_mask(4).device.type == "cpu"
    # ...and one imported after apply() (through the import hook)
    assert "megatron.core.energy_monitor" not in sys.modules
    import megatron.core.energy_monitor as em
    assert em.torch is compat.megatron_torch()
    assert em.torch.tensor([1], device="cuda").device.type == "cpu"
    assert em.torch.nn is torch.nn and em.torch.cuda is torch.cuda
    # outside megatron-core a CUDA request is an error again, as it is without compat
    try:
        torch.zeros(1, device="cuda")
    except (AssertionError, RuntimeError):
        pass
    else:
        raise AssertionError("torch.zeros(device='cuda') outside megatron-core went to the CPU")
    print("ok")
""")


def _python(code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU patches on a machine without CUDA")
def test_compat_cpu_leaves_hf_loading_and_meta_device_alone(tmp_path):
    p = _python(REFERENCE, str(tmp_path))
    assert p.returncode == 0, p.stderr[-4000:]
    p = _python(CHECK, str(tmp_path))
    assert p.returncode == 0 and "ok" in p.stdout, p.stdout[-2000:] + p.stderr[-4000:]
