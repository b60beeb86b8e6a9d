"""The reference grouped LoRA op: a loop over experts. The test oracle for every other backend."""

from __future__ import annotations

import torch


def weighted_lora_reference(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    indices: torch.Tensor | None,
    weights: torch.Tensor | None,
    combine: bool,
) -> torch.Tensor:
    N = x.shape[0]
    if indices is None:
        indices = torch.zeros(N, 1, dtype=torch.long, device=x.device)
    k = indices.shape[1]
    xk = x.unsqueeze(1).expand(N, k, x.shape[-1]) if x.dim() == 2 else x  # (N, k, in)
    out = x.new_zeros(N, k, B.shape[1])  # (N, k, out)
    for e in range(A.shape[0]):
        rows, slots = torch.where(indices == e)
        if rows.numel() == 0:
            continue
        y = (xk[rows, slots] @ A[e].t()) @ B[e].t() * scaling  # (n_e, out)
        out = out.index_put((rows, slots), y)
    if weights is not None:
        out = out * weights.unsqueeze(-1).to(out.dtype)
    return out.sum(1) if combine else out
