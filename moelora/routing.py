"""Routers and their load-balance losses, as small pure pieces (METHODS.md sections 1 and 2).

Selection functions take router logits and return ``(weights, indices, selected)``:
``weights, indices: (N, k)`` feed the grouped LoRA op, ``selected: (N, E)`` (bool) feeds the
losses. The losses are pure functions of collected logits and selections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "float32_linear",
    "top_k_routing",
    "top_p_routing",
    "mixlora_aux_loss",
    "milora_lb_loss",
    "RationalActivation",
    "PromptPooler",
    "PromptRouter",
]


def float32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x W^T`` in float32 even under ``torch.autocast``, which would otherwise run it in bf16/fp16:
    router logits are float32 (METHODS.md), whatever precision the rest of the model trains in."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), weight.float())


def top_k_routing(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixtral/MixLoRA top-k: softmax in float32, keep the k largest, renormalise them to sum to 1.

    Args:
        logits: ``(N, E)``.
    Returns:
        weights ``(N, k)`` float32, indices ``(N, k)``, selected ``(N, E)`` bool.
    """
    probs = logits.float().softmax(-1)  # (N, E)
    weights, indices = probs.topk(k, dim=-1)  # (N, k)
    weights = weights / weights.sum(-1, keepdim=True)
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, indices, True)
    return weights, indices, selected


def top_p_routing(
    logits: torch.Tensor, top_p: float, temperature: float = 0.0, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dynamic routing (MoE-PEFT ``mixlora-dynamic``): experts in order of probability until their
    cumulative probability exceeds ``top_p``, the crossing one included, at least one.

    Weight normalisation: with ``renormalize`` (the default) the selected probabilities are
    renormalised to sum to 1, as top-k does, so a fresh adapter reproduces the base model. With
    ``renormalize=False`` each selected expert's weight is its raw router probability (divided by
    ``temperature`` when ``temperature > 0``), exactly as MoE-PEFT's ``mixlora-dynamic``; imported
    MoE-PEFT dynamic checkpoints use that. Unselected slots get weight 0. All ``E`` slots are
    returned, so ``k = E``.

    Returns:
        weights ``(N, E)``, indices ``(N, E)`` (experts by decreasing probability), selected ``(N, E)``.
    """
    probs = logits.float().softmax(-1)  # (N, E)
    if temperature > 0:
        probs = probs / temperature
    sorted_p, order = probs.sort(-1, descending=True)  # (N, E)
    cum = sorted_p.cumsum(-1)
    past = cum > top_p  # slots strictly after the threshold crossing, plus the crossing one
    crossing = F.one_hot(past.long().argmax(-1), probs.shape[-1]).bool()
    drop = past & ~crossing  # (N, E)
    weights = sorted_p.masked_fill(drop, 0.0)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    selected = torch.zeros_like(drop).scatter_(1, order, ~drop)
    return weights, order, selected


def mixlora_aux_loss(logits: torch.Tensor, selected: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Mixtral load-balance loss over all MixLoRA layers' non-padding tokens stacked together.

    ``L_aux = E * sum_e f_e * P_e`` with ``f_e`` the fraction of (token, slot) assignments to expert
    ``e`` summed over the k slots (``= sum_k mean_N one_hot(topk)[k, e]``) and ``P_e`` the mean router
    probability. Uniform routing gives ``k``.

    Args:
        logits: ``(N, E)`` stacked router logits.
        selected: ``(N, E)`` bool, the experts each token used.
        keep: ``(N,)`` bool, the tokens that count (default all). A mask, not an index: the means
            are taken over the kept rows without a data-dependent shape (no host sync per step).
    """
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    E = logits.shape[-1]
    probs = logits.float().softmax(-1)  # (N, E)
    if keep is None:
        return E * (selected.float().mean(0) * probs.mean(0)).sum()
    kept = keep.unsqueeze(1)
    n = keep.sum().clamp(min=1).float()
    f = (selected & kept).float().sum(0) / n  # (E,)
    p = probs.masked_fill(~kept, 0.0).sum(0) / n
    return E * (f * p).sum()


def milora_lb_loss(logits: torch.Tensor) -> torch.Tensor:
    """MiLoRA load-balance loss of one layer over the batch's sequences.

    ``L_lb = E * sum_e f_e * p_e``: ``f_e`` the fraction of sequences whose top-1 expert is ``e``,
    ``p_e`` the mean router probability of ``e``.

    Args:
        logits: ``(B, E)``, or ``(L, B, E)`` for ``L`` layers at once (then one loss per layer, ``(L,)``).
    """
    E = logits.shape[-1]
    probs = logits.float().softmax(-1)  # (..., B, E)
    f = F.one_hot(probs.argmax(-1), E).float().mean(-2)  # (..., E)
    return E * (f * probs.mean(-2)).sum(-1)


# Least-squares fit of GeLU (exact, erf) on [-5, 5] by P(x) / (1 + |Q(x)|), max error 0.0043 there.
# Numerator a_0..a_5, denominator b_1..b_4 (Q has no constant term: the "safe" Padé form).
_GELU_NUMERATOR = (
    -0.0020433079595626805, 0.4998624852825324, 0.36745096266676774,
    0.0787511443897264, 0.0020022297048517914, -0.0006242994338872766,
)
_GELU_DENOMINATOR = (-0.09347219768071882, 0.2333258115587778, -0.02023304179640319, 0.000523078918526988)


class RationalActivation(nn.Module):
    """Learnable Padé activation ``P(x) / (1 + |Q(x)|)``, degrees 5 and 4, initialised to GeLU.

    ``numerator: (6,)`` holds ``a_0..a_5``; ``denominator: (4,)`` holds ``b_1..b_4``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.numerator = nn.Parameter(torch.tensor(_GELU_NUMERATOR, dtype=torch.float32))
        self.denominator = nn.Parameter(torch.tensor(_GELU_DENOMINATOR, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the powers x^0..x^5 once, then both polynomials as products with the coefficients: a few
        # ops per router (a Horner loop was ~40 small kernels a layer, forward and backward alike)
        x = x.float()
        powers = x.unsqueeze(-1).pow(torch.arange(6, device=x.device, dtype=x.dtype))  # (..., 6)
        p = powers @ self.numerator.float()  # a_0 + a_1 x + ... + a_5 x^5
        q = powers[..., 1:5] @ self.denominator.float()  # b_1 x + ... + b_4 x^4
        return p / (1 + q.abs())


def make_activation(name: str) -> nn.Module:
    if name == "rational":
        return RationalActivation()
    if name == "gelu":
        return nn.GELU(approximate="none")  # exact (erf) GeLU
    if name == "relu":
        return nn.ReLU()
    if name == "identity":
        return nn.Identity()
    raise ValueError(f"unknown activation {name!r}")


class PromptPooler(nn.Module):
    """Pools the prompt tokens' hidden states into one vector per sequence.

    ``attention``: ``a_t = softmax_t(h_t . u / sqrt(d))`` over prompt tokens, ``sum_t a_t h_t``, with
    a learnable query ``u`` (init N(0, 0.02)); ``last``: the last prompt token; ``mean``; ``max``.
    """

    def __init__(self, kind: str, hidden_size: int, init_range: float = 0.02) -> None:
        super().__init__()
        self.kind = kind
        if kind == "attention":
            self.query = nn.Parameter(torch.randn(hidden_size) * init_range)
        elif kind not in ("last", "mean", "max"):
            raise ValueError(f"unknown pooler {kind!r}")

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h: ``(B, T, d)``; mask: ``(B, T)`` bool prompt tokens (each row has at least one)."""
        h = h.float()
        if self.kind == "attention":
            scores = (h @ self.query.float()) / math.sqrt(h.shape[-1])  # (B, T)
            alpha = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # (B, T)
            return (alpha.unsqueeze(-1) * h).sum(1)  # (B, d)
        if self.kind == "mean":
            m = mask.unsqueeze(-1).float()
            return (h * m).sum(1) / m.sum(1)
        if self.kind == "max":
            return h.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
        T = mask.shape[1]  # last: the highest-index prompt token of each row
        last = (mask.long() * torch.arange(1, T + 1, device=mask.device)).argmax(1)  # (B,)
        return h[torch.arange(h.shape[0], device=h.device), last]


class PromptRouter(nn.Module):
    """MiLoRA's per-layer router: pool the prompt, activate, project to experts, keep the top-k.

    ``logits = g(pool(h)) W_r^T`` (``W_r: (E, d)``, no bias, float32); selected expert ``e`` gets
    ``w_e = p_e / sum_{j in S} p_j``, the others 0.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, pooler: str, activation: str, init_range: float):
        super().__init__()
        self.top_k = top_k
        self.pooler = PromptPooler(pooler, hidden_size, init_range)
        self.activation = make_activation(activation)
        self.weight = nn.Parameter(torch.randn(num_experts, hidden_size) * init_range)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h: ``(B, T, d)``, mask: ``(B, T)`` prompt tokens. Returns logits and dense gates, ``(B, E)``."""
        mask = mask | ~mask.any(1, keepdim=True)  # a row without prompt tokens pools over all its positions
        with torch.autocast(h.device.type, enabled=False):  # float32 throughout, also under bf16 autocast
            pooled = self.activation(self.pooler(h, mask))  # (B, d)
            logits = F.linear(pooled, self.weight.float())  # (B, E)
        weights, indices, _ = top_k_routing(logits, self.top_k)
        gates = torch.zeros_like(logits).scatter(1, indices, weights)  # (B, E)
        return logits, gates
