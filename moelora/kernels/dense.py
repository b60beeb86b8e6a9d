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
    if indices is None and E == 1:  # plain LoRA, possibly with a per-row weight (MiLoRA's gate)
        # scale and weight the rank-r intermediate, not the (N, out) result: the same products, an
        # r-wide elementwise op instead of an out-wide one, and autograd keeps (N, r) for the weight
        z = F.linear(x, A[0]) * scaling  # (N, r) or (N, k, r)
        if weights is not None:
            z = z * (weights.unsqueeze(-1).to(z.dtype) if x.dim() == 3 else weights.to(z.dtype)[:, :1])
        y = F.linear(z, B[0])  # (N, out) or (N, k, out)
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
    u = z * (sel * scaling).unsqueeze(-1)  # (N, k, E, r): weights and scale on the r-wide side
    if combine:
        return F.linear(u.sum(1).reshape(N, E * r), B_cat)  # (N, out)
    return F.linear(u.reshape(N, k, E * r), B_cat)  # (N, k, out)


def packed_lora(x: torch.Tensor, A: torch.Tensor, B_rows: torch.Tensor, slot: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One LoRA per row from ``P`` packed LoRAs (a multi-tenant batch): ``weight[n] * B[slot[n]] A[slot[n]] x[n]``.

    ``A: (P, r, in)`` and ``B_rows: (P, r, out)`` (``B`` transposed; lower ranks zero-padded, the
    scale folded into ``weight``): the masked dense form, two matmuls over all ``P`` LoRAs whatever
    the number of rows, no loop, no host sync. It does ``P`` times the rows' LoRA FLOPs: with many
    tenants, ``packed_lora_by_slot`` does exactly theirs.
    """
    N, (P, r, d_in) = x.shape[0], A.shape
    z = F.linear(x.to(A.dtype), A.view(P * r, d_in)).view(N, P, r)  # (N, P, r)
    sel = F.one_hot(slot, P).to(z.dtype) * weight.to(z.dtype).unsqueeze(-1)  # (N, P)
    return (z * sel.unsqueeze(-1)).view(N, P * r) @ B_rows.reshape(P * r, -1)


def packed_lora_by_slot(x: torch.Tensor, A: torch.Tensor, B_rows: torch.Tensor, index: torch.Tensor,
                        weight: torch.Tensor) -> torch.Tensor:
    """The same product with each slot's tokens gathered: ``index: (P, m)`` the tokens of each slot
    (padded with any token) and ``weight: (P, m)`` their weights (0 on padding).

    Two batched matmuls of ``P`` small products, ``(m, in) @ (in, r)`` and ``(m, r) @ (r, out)``:
    the adapters' weights are read in place (never gathered: gathering ``A[slot]`` per row copies
    what this only reads) and only the tokens' own FLOPs are done; the gather and scatter copy the
    ``(tokens, in)`` input and ``(tokens, out)`` output. Deterministic: each token gets one slot.
    """
    P, m = index.shape
    xg = x.to(A.dtype)[index.reshape(-1)].view(P, m, -1)  # (P, m, in)
    z = torch.bmm(xg, A.transpose(1, 2)) * weight.to(A.dtype).unsqueeze(-1)  # (P, m, r)
    y = torch.bmm(z, B_rows)  # (P, m, out)
    return y.new_zeros(x.shape[0], y.shape[-1]).index_add_(0, index.reshape(-1), y.view(P * m, -1))
