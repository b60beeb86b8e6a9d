"""Grouped "weighted LoRA deltas": the one operation every method is built on.

Every method is a weighted choice of LoRA deltas. Given inputs ``x``, stacked expert weights
``A: (E, r, in)`` and ``B: (E, out, r)``, and per-row assignments ``indices: (N, k)`` with
``weights: (N, k)``, the op computes ``w_j * s * B[i_j] @ A[i_j] @ x_j`` for each assignment ``j``
and, with ``combine=True``, sums them per row. Plain LoRA is ``E = 1, k = 1, w = 1``; MiLoRA is
``E = 1`` with a per-row gate as weight; MixLoRA's FFN uses ``E`` experts and ``k`` per token.

Backends, chosen by name (the reference is the oracle of every other one):

- ``"reference"``: a Python loop over experts with index selection; obviously correct, slow, and
  it synchronises with the device once per expert.
- ``"torch"``: masked dense form. All experts' ``A`` products in one matmul ``(N, E*r)``, the
  unselected blocks zeroed (or weighted), then one matmul with all ``B``. No loop, no host sync
  (CUDA graphs and ``torch.compile`` friendly); it spends ``E/k`` to ``E`` times the LoRA FLOPs.
  The default on GPUs.
- ``"grouped"``: assignments sorted by expert, one pair of matmuls per expert: exactly the
  selected experts' FLOPs, one host sync per call. The default on the CPU.
- ``"triton"``: fused Triton kernels (Punica/S-LoRA "SGMV" style), forward and backward:
  assignments sorted by expert on the device (no host sync), a shrink with exactly the selected
  experts' FLOPs, an expand that sums a token's slots in registers. Registered only when ``triton``
  imports (``TRITON_IMPORT_ERROR`` says why not otherwise); CPU tensors run through Triton's
  interpreter (slow: for tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .dense import weighted_lora_dense
from .grouped import weighted_lora_grouped
from .reference import weighted_lora_reference

__all__ = ["weighted_lora", "BACKENDS", "DEFAULT_BACKEND"]

BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": weighted_lora_reference,
    "torch": weighted_lora_dense,
    "grouped": weighted_lora_grouped,
}
TRITON_IMPORT_ERROR: str | None = None  # why the "triton" backend is not registered, if it is not
try:
    from .triton_kernel import weighted_lora_triton
except Exception as err:  # ImportError without Triton; a broken install can raise anything
    TRITON_IMPORT_ERROR = f"{type(err).__name__}: {err}"
else:
    BACKENDS["triton"] = weighted_lora_triton
DEFAULT_BACKEND = "torch"
CPU_BACKEND = "grouped"


def default_backend(device: torch.device) -> str:
    """``grouped`` on the CPU (no device to synchronise with), ``torch`` elsewhere."""
    return CPU_BACKEND if device.type == "cpu" else DEFAULT_BACKEND


def weighted_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    indices: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    *,
    combine: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Weighted, grouped LoRA deltas.

    Args:
        x: ``(N, in)`` shared by a row's assignments, or ``(N, k, in)`` one input per assignment.
        A: ``(E, r, in)`` stacked LoRA A matrices.
        B: ``(E, out, r)`` stacked LoRA B matrices.
        scaling: the LoRA scale ``s``.
        indices: ``(N, k)`` expert of each assignment; ``None`` means expert 0, ``k = 1``.
        weights: ``(N, k)`` weight of each assignment; ``None`` means 1.
        combine: sum the weighted assignments per row (``(N, out)``) or keep them (``(N, k, out)``).
        backend: a name from ``BACKENDS`` (default: ``default_backend(x.device)``).

    Returns:
        ``(N, out)`` if ``combine`` else ``(N, k, out)``.
    """
    name = backend or default_backend(x.device)
    if name == "grouped" and torch.compiler.is_compiling():
        name = "torch"  # `grouped` syncs with the host (per-expert counts); the masked dense form traces
    try:
        fn = BACKENDS[name]
    except KeyError:
        if name == "triton":
            raise RuntimeError(
                f"LoRA kernel backend 'triton' is unavailable: the triton package failed to import "
                f"({TRITON_IMPORT_ERROR}); install triton or pick one of {sorted(BACKENDS)}"
            ) from None
        raise ValueError(f"unknown LoRA kernel backend {name!r}; available: {sorted(BACKENDS)}") from None
    return fn(x, A, B, scaling, indices, weights, combine)
