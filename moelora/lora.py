"""The LoRA primitive: stacked expert weights and the adapted-linear wrapper that applies them.

``LoraWeights`` holds ``E`` LoRAs of one shape stacked (``E = 1`` for a plain LoRA). Its delta is
``s * B @ A @ dropout(x)`` (METHODS.md notation), computed by the grouped op in
``moelora.kernels``. Init: ``A`` Kaiming-uniform (a = sqrt(5)), ``B = 0``, so a fresh adapter
reproduces the base model exactly.

``AdaptedLinear`` wraps a frozen linear layer (PEFT's "wrap, don't replace"): it keeps
``base_layer`` and holds one entry per adapter name in ``adapters``; the model's shared context
says which adapter is active, or (mixed batches) which rows use which adapter: the frozen layer then
runs once for the whole batch and each adapter's delta is added to its own rows. An entry is a ``LinearAdapter``: plain LoRA, DoRA (a variant object
that only changes how the delta is combined), or a MiLoRA expert (a LoRA whose weight is the
sequence's router gate).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import weighted_lora

if TYPE_CHECKING:
    from .context import AdapterContext

__all__ = ["LoraWeights", "LinearAdapter", "DoraVariant", "AdaptedLinear", "base_linear"]


def base_linear(module: nn.Module) -> nn.Linear:
    """The frozen ``nn.Linear`` under any number of ``AdaptedLinear`` wrappers."""
    while isinstance(module, AdaptedLinear):
        module = module.base_layer
    return module


class LoraWeights(nn.Module):
    """``E`` stacked LoRAs: ``lora_A: (E, r, in)``, ``lora_B: (E, out, r)``, scale, dropout."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        scaling: float,
        dropout: float,
        num_experts: int = 1,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.r, self.scaling, self.num_experts = r, float(scaling), num_experts
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, r, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.backend: str | None = None  # kernel backend name; None = the default
        for e in range(num_experts):  # same init as nn.Linear / PEFT, per expert
            nn.init.kaiming_uniform_(self.lora_A.data[e], a=math.sqrt(5))

    def delta(
        self,
        x: torch.Tensor,
        indices: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        combine: bool = True,
        *,
        dropout: bool = True,
    ) -> torch.Tensor:
        """``sum_j w_j * s * B[i_j] A[i_j] dropout(x_j)`` over ``x: (N, in)`` or ``(N, k, in)``."""
        xin = self.dropout(x) if dropout else x
        return weighted_lora(
            xin.to(self.lora_A.dtype), self.lora_A, self.lora_B, self.scaling, indices, weights,
            combine=combine, backend=self.backend,
        )

    def merged_weight(self, expert: int = 0) -> torch.Tensor:
        """``s * B A`` of one expert, ``(out, in)``."""
        return self.scaling * self.lora_B[expert] @ self.lora_A[expert]

    def extra_repr(self) -> str:
        E, r, d_in = self.lora_A.shape
        return f"experts={E}, r={r}, in={d_in}, out={self.lora_B.shape[1]}, scaling={self.scaling:g}"


class DoraVariant(nn.Module):
    """DoRA's weight decomposition (Liu et al. 2024), as PEFT computes it.

    ``y = W x + b + (m / n - 1) * W x_d + (m / n) * s B A x_d`` with ``n = ||W + s B A||`` per output
    row (detached, as the paper's section 4.3 suggests) and ``x_d`` the dropped-out input. Without
    dropout (or in eval) ``W x_d`` is the base output. ``m`` starts at ``n`` so a fresh DoRA is the base.
    """

    def __init__(self, base: nn.Linear, lora: LoraWeights) -> None:
        super().__init__()
        with torch.no_grad():
            norm = self._weight_norm(base.weight, lora)
        self.magnitude = nn.Parameter(norm.to(lora.lora_A.dtype))

    @staticmethod
    def _weight_norm(weight: torch.Tensor, lora: LoraWeights) -> torch.Tensor:
        w = weight.to(lora.lora_A.dtype) + lora.merged_weight().detach()
        return torch.linalg.vector_norm(w, dim=1)  # (out,)

    def combine(self, base: nn.Linear, lora: LoraWeights, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        scale = self.magnitude / self._weight_norm(base.weight, lora).detach()  # (out,)
        if self.training and not isinstance(lora.dropout, nn.Identity):
            x_d = lora.dropout(x)
            w_xd = F.linear(x_d, base.weight)
        else:
            x_d = x
            w_xd = base_out if base.bias is None else base_out - base.bias
        lora_out = lora.delta(x_d.reshape(-1, x_d.shape[-1]), dropout=False).reshape(*x_d.shape[:-1], -1)
        return base_out + ((scale - 1) * w_xd.to(scale.dtype) + scale * lora_out).to(base_out.dtype)


class LinearAdapter(nn.Module):
    """One adapter's entry on one linear layer: a LoRA, an optional variant, an optional gate.

    ``gate`` is set for MiLoRA experts: a ``(context, layer, expert)`` lookup of the sequence's
    router weight, so the delta becomes ``w_e[row] * s * B A dropout(x)``.
    """

    def __init__(self, lora: LoraWeights, variant: DoraVariant | None = None, gate: tuple[int, int] | None = None):
        super().__init__()
        self.lora = lora
        self.variant = variant
        self.gate = gate  # (layer index, expert index) for MiLoRA; None otherwise

    def forward(self, base: nn.Linear, x: torch.Tensor, base_out: torch.Tensor, ctx: AdapterContext, name: str) -> torch.Tensor:
        if self.variant is not None:
            return self.variant.combine(base, self.lora, x, base_out)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        weights = None
        if self.gate is not None:
            layer, expert = self.gate
            g = ctx.milora_gates(name, layer)[:, expert]  # (B,)
            T = x2.shape[0] // g.shape[0]
            weights = g.repeat_interleave(T).unsqueeze(1)  # (N, 1)
        delta = self.lora.delta(x2, None, weights)  # (N, out)
        return base_out + delta.reshape(*lead, -1).to(base_out.dtype)


class AdaptedLinear(nn.Module):
    """A frozen linear layer plus named adapters; applies the context's active adapter, if it has one."""

    def __init__(self, base_layer: nn.Linear, ctx: AdapterContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self._ctx = ctx

    @property
    def weight(self) -> torch.Tensor:  # some model code reads `.weight` of projections (dtype checks)
        return base_linear(self).weight

    @property
    def bias(self) -> torch.Tensor | None:
        return base_linear(self).bias

    @property
    def in_features(self) -> int:
        return base_linear(self).in_features

    @property
    def out_features(self) -> int:
        return base_linear(self).out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        ctx = self._ctx
        if ctx.groups is not None and ctx.rows is None:
            return self._forward_mixed(x, out)
        name = ctx.active
        if name is None or name not in self.adapters:
            return out
        return self.adapters[name](base_linear(self), x, out, ctx, name)

    def _forward_mixed(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """A batch whose rows use different adapters: the base once, each group's delta on its rows."""
        ctx, base = self._ctx, base_linear(self)
        for name, rows in ctx.groups:
            if name is None or name not in self.adapters:
                continue
            with ctx.scope(rows, name):
                y = self.adapters[name](base, x[rows], out[rows], ctx, name)
            out = out.index_copy(0, rows, y)
        return out
