"""Masked dense grouped LoRA: two matmuls over all experts, unselected blocks zeroed.

No Python loop over experts and no host-device synchronisation, so it suits CUDA graphs and
``torch.compile``. Cost: the LoRA products of all ``E`` experts instead of ``k``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_lora_dense(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    indices: torch.Tensor | None,
    weights: torch.Tensor | None,
    combine: bool,
) -> torch.Tensor:
    E, r, d_in = A.shape
    d_out = B.shape[1]
    if indices is None and E == 1:  # plain LoRA, possibly with a per-row weight
        y = F.linear(F.linear(x, A[0]), B[0]) * scaling  # (N, out) or (N, k, out)
        if weights is not None:
            y = y * (weights.to(y.dtype) if x.dim() == 3 else weights.to(y.dtype)[:, :1])
        if x.dim() == 2:
            return y if combine else y.unsqueeze(1)
        return y.sum(1) if combine else y
    N = x.shape[0]
    if indices is None:
        indices = torch.zeros(N, 1, dtype=torch.long, device=x.device)
    k = indices.shape[1]
    sel = F.one_hot(indices, E).to(x.dtype)  # (N, k, E)
    if weights is not None:
        sel = sel * weights.unsqueeze(-1).to(x.dtype)
    B_cat = B.permute(1, 0, 2).reshape(d_out, E * r)  # (out, E*r)
    z = F.linear(x, A.reshape(E * r, d_in))  # (N, E*r) or (N, k, E*r)
    if x.dim() == 2:
        z = z.view(N, 1, E, r)
    else:
        z = z.view(N, k, E, r)
    u = z * sel.unsqueeze(-1)  # (N, k, E, r)
    if combine:
        return F.linear(u.sum(1).reshape(N, E * r), B_cat) * scaling  # (N, out)
    return F.linear(u.reshape(N, k, E * r), B_cat) * scaling  # (N, k, out)


def packed_lora(x: torch.Tensor, A_cat: torch.Tensor, B_cat: torch.Tensor, r: int, slot: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The masked dense form on weights packed once: one LoRA per row (a multi-tenant batch).

    ``A_cat: (P*r, in)`` and ``B_cat: (out, P*r)`` hold ``P`` LoRAs of rank ``r`` (lower ranks
    zero-padded); row ``n`` of ``x: (N, in)`` gets ``weight[n] * B[slot[n]] A[slot[n]] x[n]`` (the
    scale folded into ``weight``). Two matmuls whatever ``P``, no loop, no host sync.
    """
    P = A_cat.shape[0] // r
    z = F.linear(x.to(A_cat.dtype), A_cat).view(x.shape[0], P, r)  # (N, P, r)
    sel = F.one_hot(slot, P).to(z.dtype) * weight.to(z.dtype).unsqueeze(-1)  # (N, P)
    return F.linear((z * sel.unsqueeze(-1)).view(x.shape[0], P * r), B_cat)
