"""Sorted grouped LoRA: assignments sorted by expert, one pair of matmuls per expert segment.

Exactly ``k`` experts' LoRA FLOPs per token (the dense form spends ``E/k`` to ``E`` times that), at the
price of one host-device synchronisation per call (the segment sizes) and a short Python loop over
experts. On the CPU there is no device to synchronise with, so this is the CPU default.
"""

from __future__ import annotations

import torch

from .dense import weighted_lora_dense


def weighted_lora_grouped(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    indices: torch.Tensor | None,
    weights: torch.Tensor | None,
    combine: bool,
) -> torch.Tensor:
    E, _, d_in = A.shape
    if indices is None or E == 1:  # one expert: nothing to group
        return weighted_lora_dense(x, A, B, scaling, indices, weights, combine)
    N, k = indices.shape
    xk = (x.unsqueeze(1).expand(N, k, d_in) if x.dim() == 2 else x).reshape(N * k, d_in)  # (N*k, in)
    flat = indices.reshape(-1)  # (N*k,)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()  # the one host sync
    # the routing weight and the scale go on the rank-r intermediate (r-wide, not out-wide)
    scale = (weights.reshape(-1)[order].to(x.dtype) * scaling).unsqueeze(1) if weights is not None else None
    parts, start = [], 0
    for e, seg in enumerate(torch.split(xk[order], counts)):
        if seg.shape[0]:
            z = seg @ A[e].t()  # (n_e, r)
            z = z * (scale[start : start + seg.shape[0]] if scale is not None else scaling)
            parts.append(z @ B[e].t())  # (n_e, out)
        start += seg.shape[0]
    ys = torch.cat(parts)  # (N*k, out), sorted by expert
    y = torch.empty_like(ys).index_copy(0, order, ys).view(N, k, -1)  # back to (token, slot) order
    return y.sum(1) if combine else y
