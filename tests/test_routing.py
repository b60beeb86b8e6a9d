"""Routers and router losses against METHODS.md's formulas on hand-computed logits."""

import math

import pytest
import torch
import torch.nn.functional as F

from moelora.routing import (
    PromptPooler,
    PromptRouter,
    RationalActivation,
    milora_lb_loss,
    mixlora_aux_loss,
    top_k_routing,
    top_p_routing,
)


def test_top_k_renormalises_the_kept_probabilities():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    w, idx, sel = top_k_routing(logits, 2)
    p = logits.softmax(-1)[0]
    assert idx.tolist() == [[0, 1]]
    torch.testing.assert_close(w[0], torch.stack([p[0], p[1]]) / (p[0] + p[1]))
    assert sel.tolist() == [[True, True, False, False]]


def test_top_p_takes_experts_until_the_cumulative_probability_crosses():
    p = torch.tensor([[0.5, 0.25, 0.15, 0.1], [0.9, 0.05, 0.03, 0.02]])
    w, order, sel = top_p_routing(p.log(), top_p=0.7)
    assert sel.tolist() == [[True, True, False, False], [True, False, False, False]]
    torch.testing.assert_close(w[0, :2], torch.tensor([0.5, 0.25]) / 0.75)
    assert w[0, 2:].abs().sum() == 0 and w[1, 1:].abs().sum() == 0
    raw, _, _ = top_p_routing(p.log(), top_p=0.7, renormalize=False)  # MoE-PEFT mixlora-dynamic
    torch.testing.assert_close(raw[0, :2], torch.tensor([0.5, 0.25]))


def test_mixlora_aux_loss_matches_the_mixtral_formula():
    torch.manual_seed(0)
    logits = torch.randn(20, 4)
    _, idx, sel = top_k_routing(logits, 2)
    P = logits.softmax(-1)
    M = F.one_hot(idx, 4).float()  # (N, k, E)
    f = M.mean(0)  # (k, E)
    want = 4 * (f * P.mean(0)).sum()
    torch.testing.assert_close(mixlora_aux_loss(logits, sel), want)


def test_mixlora_aux_loss_keep_mask_equals_dropping_the_rows():
    """Padding is masked out (no data-dependent shape) and counts exactly as if its rows were gone,
    even when a padding row's logits are not finite."""
    torch.manual_seed(1)
    logits = torch.randn(12, 4)
    _, _, sel = top_k_routing(logits, 2)
    keep = torch.tensor([True, False, True, True, False, True, True, True, False, True, True, False])
    noisy = logits.clone()
    noisy[~keep] = float("inf")
    got = mixlora_aux_loss(noisy, sel, keep)
    torch.testing.assert_close(got, mixlora_aux_loss(logits[keep], sel[keep]))
    assert mixlora_aux_loss(logits, sel, torch.zeros(12, dtype=torch.bool)).item() == 0.0


def test_uniform_routing_gives_aux_loss_k():
    logits = torch.zeros(8, 4)
    sel = torch.zeros(8, 4, dtype=torch.bool)
    for n in range(8):  # perfectly balanced top-2 assignment
        sel[n, [n % 4, (n + 1) % 4]] = True
    torch.testing.assert_close(mixlora_aux_loss(logits, sel), torch.tensor(2.0))


def test_milora_lb_loss_by_hand():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [3.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    P = logits.softmax(-1)
    f = torch.tensor([3 / 4, 1 / 4, 0.0])  # top-1: 0, 1, 0, 0 (ties go to the first)
    torch.testing.assert_close(milora_lb_loss(logits), 3 * (f * P.mean(0)).sum())


def test_rational_activation_starts_as_gelu():
    x = torch.linspace(-4, 4, 801)
    err = (RationalActivation()(x) - F.gelu(x)).abs().max()
    assert err < 0.01
    assert RationalActivation().numerator.shape == (6,) and RationalActivation().denominator.shape == (4,)


def test_rational_activation_is_p_over_1_plus_abs_q_with_its_gradients():
    """Against the polynomial written out term by term (float64), values and every gradient,
    at x = 0 too (where x^0's derivative must not turn into NaN)."""
    torch.manual_seed(0)
    act = RationalActivation()
    with torch.no_grad():
        act.numerator.add_(torch.randn(6) * 0.1)
        act.denominator.add_(torch.randn(4) * 0.1)
    x = torch.cat([torch.randn(3, 7) * 2, torch.zeros(1, 7)]).requires_grad_(True)
    y = act(x)
    a = act.numerator.detach().double().requires_grad_(True)
    b = act.denominator.detach().double().requires_grad_(True)
    xd = x.detach().double().requires_grad_(True)
    p = sum(a[i] * xd**i for i in range(6))
    q = sum(b[j - 1] * xd**j for j in range(1, 5))
    want = p / (1 + q.abs())
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(want)
    (y.double() * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(act.numerator.grad.double(), a.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(act.denominator.grad.double(), b.grad, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(x.grad).all()


def test_poolers_by_hand():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [False, True, True, True]])
    torch.testing.assert_close(PromptPooler("last", 3)(h, mask), torch.stack([h[0, 1], h[1, 3]]))
    torch.testing.assert_close(PromptPooler("mean", 3)(h, mask), torch.stack([h[0, :2].mean(0), h[1, 1:].mean(0)]))
    torch.testing.assert_close(PromptPooler("max", 3)(h, mask), torch.stack([h[0, 1], h[1, 3]]))
    att = PromptPooler("attention", 3)
    a0 = (h[0, :2] @ att.query / math.sqrt(3)).softmax(0)
    torch.testing.assert_close(att(h, mask)[0], (a0[:, None] * h[0, :2]).sum(0))


def test_prompt_router_gates_are_renormalised_top_k():
    torch.manual_seed(0)
    router = PromptRouter(8, 7, 3, "mean", "identity", 0.5)
    h, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    logits, gates = router(h, mask)
    torch.testing.assert_close(logits, h.mean(1) @ router.weight.T)
    assert ((gates > 0).sum(1) == 3).all()
    torch.testing.assert_close(gates.sum(1), torch.ones(2))
    p = logits.softmax(-1)
    top = p.topk(3).indices
    torch.testing.assert_close(gates.gather(1, top), p.gather(1, top) / p.gather(1, top).sum(1, keepdim=True))


def test_prompt_router_row_without_prompt_tokens_pools_over_all_positions():
    """A row whose mask is all False routes as if every position were prompt; the other rows and
    the caller's mask are untouched."""
    torch.manual_seed(0)
    router = PromptRouter(8, 7, 3, "mean", "identity", 0.5)
    h = torch.randn(2, 5, 8)
    mask = torch.tensor([[True, True, False, False, False], [False] * 5])
    logits, _ = router(h, mask)
    torch.testing.assert_close(logits[0], h[0, :2].mean(0) @ router.weight.T)
    torch.testing.assert_close(logits[1], h[1].mean(0) @ router.weight.T)
    assert not mask[1].any()


@pytest.mark.parametrize("kind", ["attention", "last", "mean", "max"])
def test_padding_does_not_change_pooling(kind):
    torch.manual_seed(0)
    pooler = PromptPooler(kind, 4)
    h = torch.randn(1, 3, 4)
    padded = torch.cat([torch.randn(1, 2, 4) * 100, h], 1)
    mask = torch.tensor([[False, False, True, True, True]])
    torch.testing.assert_close(pooler(padded, mask), pooler(h, torch.ones(1, 3, dtype=torch.bool)))
