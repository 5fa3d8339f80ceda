"""Chunked output-layer + cross entropy against megatron's vocab_parallel_cross_entropy (TP=1)."""
import pytest
import torch

from portable_tiny import VOCAB, tiny_config, tiny_gpt


@pytest.mark.parametrize("chunk", [3, 64])
def test_chunked_loss_and_grads_equal_megatron(mcore, chunk):
    from megatron.core import tensor_parallel
    from hpctrain.model.portable.cross_entropy import chunked_vocab_parallel_cross_entropy
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 2, 16, generator=g, requires_grad=True)  # [s, b, h]
    weight = torch.randn(VOCAB, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 10), generator=g)
    labels[0, :4] = -100
    mask = labels != -100
    coef = torch.rand(2, 10, generator=g)
    loss = chunked_vocab_parallel_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
    got = torch.autograd.grad((loss * mask * coef).sum(), (hidden, weight))
    logits = hidden @ weight.t()
    ref = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.t().contiguous()).t()
    want = torch.autograd.grad((ref * mask * coef).sum(), (hidden, weight))
    torch.testing.assert_close(loss[mask], ref[mask], atol=1e-5, rtol=1e-5)
    # Cross-check the reference against torch's own cross entropy (fp64).
    # (megatron's function works in place on its logits argument: recompute them)
    fresh = (hidden @ weight.t()).detach().double()
    f64 = torch.nn.functional.cross_entropy(fresh.transpose(0, 1).reshape(-1, VOCAB),
                                            labels.reshape(-1), reduction="none").view(2, 10)
    torch.testing.assert_close(loss[mask].double(), f64[mask], atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_gpt_model_with_chunked_loss_matches_default_loss(mcore):
    from hpctrain.model.portable.cross_entropy import enable_chunked_cross_entropy
    cfg = tiny_config()
    base, fused = tiny_gpt(cfg), tiny_gpt(cfg)
    fused.load_state_dict(base.state_dict())
    enable_chunked_cross_entropy(fused, chunk_tokens=5)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    labels = torch.randint(0, VOCAB, (2, 12), generator=g)
    pos = torch.arange(12).expand(2, 12)
    results = []
    for model in (base, fused):
        loss = model(ids, pos, attention_mask=None, labels=labels)
        loss.sum().backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # Without labels the model still returns logits through megatron's own path.
    with torch.no_grad():
        assert fused(ids, pos, attention_mask=None).shape == (2, 12, VOCAB)
