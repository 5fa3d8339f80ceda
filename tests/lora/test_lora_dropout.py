"""The LoRA adapter's lean dropout (hpctrain/model/lora/dropout.py) against dropout's definition,
``F.linear(x * m / (1 - p), A)`` with ``m ~ Bernoulli(1 - p)``, computed by autograd on the explicit
formula with the mask drawn from the same generator state; and what its backward keeps."""
import torch
import torch.nn.functional as F

from hpctrain.model.lora.dropout import dropout_linear

P = 0.25


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, 40, generator=g)
    a = torch.randn(8, 40, generator=g)
    return x, a


def test_forward_and_gradients_are_dropouts():
    x, a = _inputs()
    x1, a1 = x.clone().requires_grad_(), a.clone().requires_grad_()
    torch.manual_seed(7)
    state = torch.get_rng_state()
    y = dropout_linear(x1, a1, P)
    torch.randn(1000)  # the default generator moves on before the backward: the mask must not
    g = torch.randn_like(y)
    y.backward(g)

    torch.set_rng_state(state)
    mask = torch.empty_like(x).bernoulli_(1 - P)
    x2, a2 = x.clone().requires_grad_(), a.clone().requires_grad_()
    ref = F.linear(x2 * mask / (1 - P), a2)
    ref.backward(g)

    assert torch.allclose(y, ref, atol=1e-6, rtol=1e-6)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-6, rtol=1e-6)
    assert torch.allclose(a1.grad, a2.grad, atol=1e-5, rtol=1e-6)
    dropped = (x1.grad == 0).float().mean().item()  # x's gradient is zero exactly where x was dropped
    assert abs(dropped - P) < 0.05, dropped


def test_it_advances_the_generator_like_one_draw():
    x, a = _inputs()
    torch.manual_seed(3)
    dropout_linear(x, a, P)
    after_ours = torch.rand(5)
    torch.manual_seed(3)
    torch.empty_like(x).bernoulli_(1 - P)
    assert torch.equal(after_ours, torch.rand(5))  # the next layer's draws are not the same as ours


def test_backward_keeps_only_the_input_and_the_weight():
    x, a = _inputs()
    x, a = x.requires_grad_(), a.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dropout_linear(x, a, P)
    assert {t.data_ptr() for t in saved} == {x.data_ptr(), a.data_ptr()}

    plain = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: plain.append(t) or t, lambda t: t):
        F.linear(F.dropout(x, P, True), a)
    extra = sum(t.numel() * t.element_size() for t in plain if t.data_ptr() not in (x.data_ptr(), a.data_ptr()))
    assert extra >= x.numel() * x.element_size()  # what the plain composition keeps besides x and A
