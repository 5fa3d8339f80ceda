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
    coef = 0.37  # the schedule's scale (1 / tokens, / micro-batches): one weight for every counted token
    loss = chunked_vocab_parallel_cross_entropy(hidden, weight, labels, chunk_tokens=chunk, loss_mask=mask)
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


def test_per_token_weights_are_refused_and_no_grad_makes_none(mcore):
    """The gradients are made in the forward for a mean over the counted tokens: a loss that weighs
    them differently fails in the backward instead of getting wrong gradients."""
    from hpctrain.model.portable.cross_entropy import chunked_vocab_parallel_cross_entropy
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 2, 16, generator=g, requires_grad=True)
    weight = torch.randn(VOCAB, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 6), generator=g)
    loss = chunked_vocab_parallel_cross_entropy(hidden, weight, labels, chunk_tokens=4)
    with pytest.raises(RuntimeError, match="weighs counted tokens differently"):
        (loss * torch.rand(2, 6, generator=g)).sum().backward()
    with torch.no_grad():  # evaluation: the loss only
        again = chunked_vocab_parallel_cross_entropy(hidden, weight, labels, chunk_tokens=4)
    torch.testing.assert_close(again, loss.detach())


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_chunked_loss_and_grads_in_bf16_on_cuda_equal_fp32_torch():
    """The CUDA path (compiled elementwise passes, weight gradient summed in fp32 by addmm's
    out_dtype over 4 chunks, 20% of the tokens not counted) against torch's cross entropy on fp32
    copies of the same bf16 tensors."""
    from hpctrain.model.portable.cross_entropy import chunked_vocab_parallel_cross_entropy
    g = torch.Generator().manual_seed(0)
    s, b, h, v = 256, 2, 512, 32000
    hidden = (torch.randn(s, b, h, generator=g) * 0.5).to("cuda", torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.05).to("cuda", torch.bfloat16).requires_grad_()
    labels = torch.randint(0, v, (b, s), generator=g).cuda()
    mask = torch.rand(b, s, generator=g).cuda() > 0.2
    coef = mask / mask.sum()  # the trainer's loss: a mean over the counted tokens
    loss = chunked_vocab_parallel_cross_entropy(hidden, weight, labels, chunk_tokens=128, loss_mask=mask)
    got = torch.autograd.grad((loss * coef).sum(), (hidden, weight))
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = torch.nn.functional.cross_entropy((h32 @ w32.t()).transpose(0, 1).reshape(-1, v), labels.reshape(-1),
                                            reduction="none").view(b, s)
    want = torch.autograd.grad((ref * coef).sum(), (h32, w32))
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=1e-2)
    for a, w in zip(got, want):
        err = float((a.float() - w).abs().max() / w.abs().max())
        assert err < 2e-2, err


def test_pointwise_logit_gradient_equals_torch_softmax():
    """The formula compiled on CUDA, run eagerly here: (softmax - onehot) * grad against torch's own
    softmax and one_hot (the rows whose target is on another TP rank get no one-hot)."""
    from hpctrain.model.portable.cross_entropy import _grad_logits, _grad_logits_pointwise
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(7, 50, generator=g)
    idx = torch.randint(0, 50, (7,), generator=g)
    local = torch.tensor([True, True, False, True, True, False, True])
    grad = torch.rand(7, generator=g)
    want = (torch.softmax(logits, -1) - torch.nn.functional.one_hot(idx, 50) * local[:, None]) * grad[:, None]
    lse = torch.logsumexp(logits, -1)
    for fn in (_grad_logits, _grad_logits_pointwise):
        torch.testing.assert_close(fn(logits, lse, idx, local, grad), want, atol=1e-6, rtol=1e-5)
