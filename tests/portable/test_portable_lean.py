"""The portable spec's lean pieces against their references: HF's RMSNorm expression, the plain
SwiGLU, megatron-core's own MLP, and what the backward keeps (tools/bench/act_memory.py's counting)."""
import pytest
import torch
import torch.nn.functional as F

from portable_tiny import VOCAB, tiny_config, tiny_gpt


def _hf_rms_norm(x, w, eps):
    """transformers' Qwen2RMSNorm / LlamaRMSNorm forward, verbatim in meaning."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_rms_norm_equals_hf_forward_and_grads(dtype, tol):
    from hpctrain.model.portable.norm import rms_norm
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 3, 40, generator=g) * 3).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(40, generator=g)).to(dtype).requires_grad_()
    up = torch.randn(6, 3, 40, generator=g).to(dtype)
    outs = []
    for fn in (_hf_rms_norm, rms_norm):
        y = fn(x, w, 1e-6)
        (y.float() * up.float()).sum().backward()
        outs.append((y.detach(), x.grad.clone(), w.grad.clone()))
        x.grad = w.grad = None
    for ours, ref in zip(outs[1], outs[0]):
        torch.testing.assert_close(ours.float(), ref.float(), atol=tol, rtol=tol)


def test_swiglu_equals_autograd_of_the_plain_expression():
    from hpctrain.model.portable.mlp import swiglu
    x = torch.randn(5, 2, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: swiglu(t, fused=False), (x,))
    gate, up = x.detach().chunk(2, -1)
    torch.testing.assert_close(swiglu(x, fused=False), F.silu(gate) * up)


def _loss_and_grads(model, ids, pos):
    logits = model(ids, pos, attention_mask=None)
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return logits.detach(), grads


def test_portable_mlp_equals_megatron_mlp_with_and_without_act_recompute(mcore):
    """The local spec (megatron-core's MLP, unfused SwiGLU) is the reference; the portable spec
    with the SwiGLU recomputed in the backward gives the same logits and gradients."""
    from megatron.core.models.gpt import GPTModel
    from hpctrain.model.portable import get_portable_layer_spec
    cfg = tiny_config()
    cfg.recompute_granularity, cfg.recompute_modules = "selective", ["core_attn"]
    local = tiny_gpt(cfg, "local")
    torch.manual_seed(1234)
    lean = GPTModel(config=cfg, transformer_layer_spec=get_portable_layer_spec(recompute_act=True),
                    vocab_size=VOCAB, max_sequence_length=256, position_embedding_type="rope",
                    rotary_base=10000, share_embeddings_and_output_weights=False)
    lean.load_state_dict(local.state_dict(), strict=True)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(16).expand(2, 16)
    ref_logits, ref_grads = _loss_and_grads(local, ids, pos)
    logits, grads = _loss_and_grads(lean, ids, pos)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_core_attention_recompute_follows_the_device(mcore):
    """On the CPU (math kernel, keeps the scores) the asked-for core_attn recompute runs."""
    from hpctrain.model.portable.self_attention import PortableSelfAttention
    cfg = tiny_config()
    cfg.recompute_granularity, cfg.recompute_modules = "selective", ["core_attn"]
    model = tiny_gpt(cfg, "portable")
    attn = [m for m in model.modules() if isinstance(m, PortableSelfAttention)]
    assert attn and all(a._asked_core_attn_recompute for a in attn)
    ids = torch.randint(0, VOCAB, (1, 8))
    model(ids, torch.arange(8)[None], attention_mask=None).sum().backward()
    assert all(a.checkpoint_core_attention for a in attn)


def test_act_memory_counts_what_the_lean_layer_keeps():
    """tools/bench/act_memory.py on a small real shape: mlp_act drops exactly the SwiGLU output
    (ffn/h units of s*b*h bytes) and the norms keep their bf16 input only."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    out = {}
    for mods in (["core_attn"], ["core_attn", "mlp_act"]):
        p = subprocess.run([sys.executable, str(root / "tools/bench/act_memory.py"), "--model", "0.5b",
                            "--seq", "64", "--recompute_modules", *mods], cwd=root, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        line = next(ln for ln in p.stdout.splitlines() if ln.startswith("saved by layer 2"))
        out[len(mods)] = float(line.split("=")[1].split()[0])
        assert "  2.00  input_layernorm" in p.stdout, p.stdout
    # Qwen2.5-0.5B: the bf16 SwiGLU output is 2 * 4864 bytes per token = 10.86 units of hidden 896.
    assert out[1] - out[2] == pytest.approx(2 * 4864 / 896, abs=0.02)
    assert out[2] < 36, out
