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
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import weighted_lora
from .kernels.dense import packed_lora, packed_lora_by_slot

if TYPE_CHECKING:
    from .context import AdapterContext

__all__ = ["LoraWeights", "LinearAdapter", "DoraVariant", "AdaptedLinear", "base_linear", "compute_dtype", "weights_key"]


def weights_key(tensors) -> tuple:
    """Identifies the current contents of ``tensors`` (storage and in-place version counters): the key
    of every cache derived from weights (DoRA norms, packed multi-tenant LoRAs, pooled experts), so an
    optimizer step, a load or any in-place edit invalidates it."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


def weights_cache(owner: nn.Module, attr: str, key, ctx: AdapterContext, build):
    """A few recent values derived from adapter weights, kept on ``owner`` (not as buffers: never
    saved) under ``key``: ``build()`` returns ``(tensors, value)`` and runs again when one of those
    tensors changed (in place or replaced) or adapters were attached or removed since
    (``ctx.adapter_epoch``).

    Checking the tensors costs a Python pass over all of them (64 per projection for 32 tenants,
    ~14 us per projection), so a decoding step trusts a value already checked since the last forward that was
    not a decoding step (``ctx.weights_serial``: a prefill, a training or scoring forward): weights
    edited while requests decode are seen from the next prefill. While compiling, a cached value is
    trusted too: storage pointers cannot be traced, and the eager prefill built or checked it."""
    cache = owner.__dict__.setdefault(attr, OrderedDict())
    hit = cache.get(key)
    if hit is not None and torch.compiler.is_compiling():
        return hit[2]
    epoch, serial = ctx.adapter_epoch, ctx.weights_serial
    if hit is not None and ctx.decoding and hit[0] == epoch and hit[4] == serial:
        cache.move_to_end(key)
        return hit[2]
    if hit is None or hit[0] != epoch or hit[1] != weights_key(hit[3]):
        tensors, value = build()
        hit = (epoch, weights_key(tensors), value, tensors)
    cache[key] = hit[:4] + (serial,)  # checked now
    cache.move_to_end(key)
    while len(cache) > 4:  # a decoding batch keeps its set until a request joins or leaves
        cache.popitem(last=False)
    return hit[2]


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the LoRA products take their input in: the adapter weights' (float32 by default, as
    PEFT), or under ``torch.autocast`` autocast's own, since the products run in it anyway: casting
    a bf16 input up first would only add a float32 copy of it (``k`` copies of the FFN's hidden
    activations for MixLoRA's down projection)."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype


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
        drop = self.dropout  # identity in eval: not called then (a module call per projection and step)
        xin = drop(x) if dropout and drop.training and not isinstance(drop, nn.Identity) else x
        return weighted_lora(
            xin.to(compute_dtype(xin, self.lora_A)), self.lora_A, self.lora_B, self.scaling, indices, weights,
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
        if not base.weight.dtype.is_floating_point:
            raise ValueError(
                f"DoRA needs the base weight's row norms, but this base layer is quantized "
                f"({type(base.weight).__name__}, {base.weight.dtype}); use LoRA, MixLoRA or MiLoRA on a quantized base"
            )
        with torch.no_grad():
            norm = self._weight_norm(base.weight, lora)
        self.magnitude = nn.Parameter(norm.to(lora.lora_A.dtype))

    @staticmethod
    def _weight_norm(weight: torch.Tensor, lora: LoraWeights) -> torch.Tensor:
        w = weight.to(lora.lora_A.dtype) + lora.merged_weight().detach()
        return torch.linalg.vector_norm(w, dim=1)  # (out,)

    def _norm(self, base: nn.Linear, lora: LoraWeights, ctx: AdapterContext | None = None) -> torch.Tensor:
        """``||W + s B A||`` per row (detached), recomputed only when ``W``, ``A`` or ``B`` changed:
        it costs a full ``(out, in)`` matrix, which would otherwise be rebuilt at every decoding step.
        Like ``weights_cache``, a decoding step trusts a norm checked since the last other forward."""
        cached = self.__dict__.get("_norm_cache")
        if torch.compiler.is_compiling():  # storage pointers cannot be traced: trust the eager calls'
            if cached is not None:  # check (a compiled decoding step follows an eager prefill)
                return cached[1]
            with torch.no_grad():
                return self._weight_norm(base.weight, lora)
        serial = ctx.weights_serial if ctx is not None else None
        if cached is not None and serial is not None and ctx.decoding and cached[2] == serial:
            return cached[1]
        key = weights_key((base.weight, lora.lora_A, lora.lora_B))
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, self._weight_norm(base.weight, lora))
        self.__dict__["_norm_cache"] = (*cached[:2], serial)  # not a buffer: never saved
        return cached[1]

    def combine(self, base: nn.Linear, lora: LoraWeights, x: torch.Tensor, base_out: torch.Tensor,
                ctx: AdapterContext | None = None) -> torch.Tensor:
        scale = self.magnitude / self._norm(base, lora, ctx)  # (out,)
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
            return self.variant.combine(base, self.lora, x, base_out, ctx)
        lora = self.lora
        if self.gate is None and lora.num_experts == 1 and lora.backend is None and not (
            self.training and isinstance(lora.dropout, nn.Dropout)
        ):  # plain LoRA without dropout (decoding): the two products directly, fewest host-side steps
            A, B = lora.lora_A[0], lora.lora_B[0]
            dt = compute_dtype(x, A)
            d = F.linear(F.linear(x if x.dtype == dt else x.to(dt), A) * lora.scaling, B)
            return base_out + d.to(base_out.dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        weights = None
        if self.gate is not None:
            layer, expert = self.gate
            # (not while compiling: which modules a prompt selected would become a guard, and each new
            # selection pattern a recompilation; the compiled step computes every module, gated)
            if not torch.is_grad_enabled() and not torch.compiler.is_compiling() and ctx.milora_unused(name, layer, expert):
                return base_out  # gate 0 for every row: MiLoRA's decoding costs only the selected modules
            weights = ctx.milora_token_gates(name, layer, x2.shape[0])[:, expert : expert + 1]  # (N, 1)
        delta = self.lora.delta(x2, None, weights)  # (N, out)
        return base_out + delta.reshape(*lead, -1).to(base_out.dtype)


class _MixedPlan:
    """One forward's mixed batch as seen by wrappers holding the same adapters (``_plan``): the
    groups they serve, which are DoRA or MiLoRA, and the packed op's row tables (built on first use:
    tensor writes only, no host round trip, so a compiled decoding step traces them)."""

    def __init__(self, groups: list[tuple[str, torch.Tensor]], entries: dict, T: int) -> None:
        self.groups, self.T = groups, T
        self.names = tuple(n for n, _ in groups)
        self.dora = [(n, rows) for n, rows in groups if entries[n].variant is not None]
        self.gated = [(n, rows) for n, rows in groups if entries[n].gate is not None]
        sizes = [rows.numel() for _, rows in groups]  # host-side metadata: no sync
        self.m = (max(sizes) if sizes else 0) * T  # tokens of the largest slot
        self.by_slot = len(groups) * self.m <= 2 * sum(sizes) * T
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def tables(self, batch: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """By slot: each slot's tokens ``(P, m)`` and their weights (1; 0 on padding); otherwise each of
        the ``batch`` rows' slot and weight (0 for rows without an adapter here). The LoRA scales are
        in the packed ``B`` (``AdaptedLinear._pack``): they may differ from module to module."""
        if self._tables is None:
            P, T = len(self.groups), self.T
            shape = (P, self.m) if self.by_slot else (batch,)
            where = torch.zeros(shape, dtype=torch.long, device=device)
            scale = torch.zeros(shape, dtype=dtype, device=device)
            steps = torch.arange(T, device=device)
            for p, (_, idx) in enumerate(self.groups):
                idx = idx.to(device)
                if self.by_slot:
                    L = idx.numel() * T
                    where[p, :L] = (idx.unsqueeze(1) * T + steps).reshape(-1)
                    scale[p, :L] = 1
                else:
                    where[idx] = p
                    scale[idx] = 1
            self._tables = (where, scale)
        return self._tables


class AdaptedLinear(nn.Module):
    """A frozen linear layer plus named adapters; applies the context's current adapter, if it has one,
    or each row's own adapter in a mixed batch."""

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
        name = ctx.current
        entry = self.adapters._modules.get(name) if name is not None else None
        if entry is None:
            return out
        return entry.forward(base_linear(self), x, out, ctx, name)  # no hooks on entries: skip __call__

    def _forward_mixed(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """A batch whose rows use different adapters: the base once, each group's delta on its rows.

        At inference, the groups share one packed op (the batch's adapters' weights stacked, one
        slot per row; DoRA rows then get their magnitude scaling); while training, each group goes
        through its own entry on its rows.
        """
        ctx, base = self._ctx, base_linear(self)
        plan = self._plan(ctx, x.shape[1] if x.dim() == 3 else 1)
        if len(plan.groups) > 1 and not torch.is_grad_enabled() and x.dim() == 3:
            delta = self._packed_delta(x, plan)  # (B, T, out), float32
            if not plan.dora:
                return out + delta.to(out.dtype)
            # DoRA rows: y = W x + b + (m/n - 1) W x + (m/n) s B A x; other rows: y = W x + b + s B A x
            mult = torch.ones(x.shape[0], 1, out.shape[-1], dtype=delta.dtype, device=out.device)
            for n, rows in plan.dora:
                entry = self.adapters[n]
                mult[rows] = (entry.variant.magnitude / entry.variant._norm(base, entry.lora, ctx)).to(mult.dtype)
            w_x = out if base.bias is None else out - base.bias
            return out + ((mult - 1) * w_x.to(mult.dtype) + mult * delta).to(out.dtype)
        for name, rows in plan.groups:
            with ctx.scope(rows, name):
                y = self.adapters[name](base, x[rows], out[rows], ctx, name)
            out = out.index_copy(0, rows, y)
        return out

    def _plan(self, ctx: AdapterContext, T: int) -> _MixedPlan:
        """What a mixed batch means for a wrapper holding these adapters: built once per forward and
        shared by every wrapper with the same adapters (a decoding step visits hundreds of them,
        and a Python pass over 32 tenants each time was most of the multi-tenant overhead)."""
        entries = self.adapters._modules
        key = ("plan", tuple(entries), T)
        plan = ctx.row_cache.get(key)
        if plan is None:
            groups = [(n, rows) for n, rows in ctx.groups if n is not None and n in entries]
            plan = ctx.row_cache[key] = _MixedPlan(groups, entries, T)
        return plan

    def _pack(self, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
        """The LoRAs of ``names`` (this batch's adapters) stacked, one slot each: ``A (P, r, in)`` and
        ``B`` transposed and scaled by this module's LoRA scale, ``(P, r, out)`` (``weights_cache``: a
        few recent sets kept). Only the batch's adapters cost work in the packed op."""

        def build():
            entries = [self.adapters[n].lora for n in names]
            r = max(w.r for w in entries)
            A = entries[0].lora_A.new_zeros(len(entries), r, entries[0].lora_A.shape[2])
            B = entries[0].lora_B.new_zeros(len(entries), r, entries[0].lora_B.shape[1])
            for p, w in enumerate(entries):
                A[p, : w.r] = w.lora_A[0].detach()
                B[p, : w.r] = w.lora_B[0].detach().t() * w.scaling  # per module: rank_pattern / alpha_pattern
            tensors = [t for w in entries for t in (w.lora_A, w.lora_B)]
            return tensors, (A, B, {n: p for p, n in enumerate(names)})

        return weights_cache(self, "_packs", names, self._ctx, build)

    def _packed_delta(self, x: torch.Tensor, plan: _MixedPlan) -> torch.Tensor:
        """Each row's own adapter delta, ``(B, T, out)`` float32, for a batch of several adapters.

        Few tokens per adapter (the multi-tenant case: each request its own adapter): each slot's
        tokens gathered and two batched products (``packed_lora_by_slot``, the tokens' own FLOPs).
        Many tokens on a few adapters: the masked dense form (``packed_lora``), which would otherwise
        pad every slot to the largest. Either way no host sync: the sizes are the groups' lengths."""
        ctx, (Bsz, T) = self._ctx, x.shape[:2]
        A, B, slots = self._pack(plan.names)
        where, weight = plan.tables(Bsz, x.device, A.dtype)
        if plan.gated:  # MiLoRA: the row's gate for this projection's expert
            weight = weight.clone()
            for n, idx in plan.gated:
                layer, expert = self.adapters[n].gate
                with ctx.scope(idx, n):
                    g = ctx.milora_gates(n, layer)[:, expert].to(weight.dtype)  # (rows,)
                if plan.by_slot:
                    L = idx.numel() * T
                    weight[slots[n], :L] = weight[slots[n], :L] * g.repeat_interleave(T)
                else:
                    weight[idx] = weight[idx] * g
        tokens = x.reshape(Bsz * T, -1)
        if plan.by_slot:
            return packed_lora_by_slot(tokens, A, B, where, weight).view(Bsz, T, -1)
        return packed_lora(tokens, A, B, where.repeat_interleave(T), weight.repeat_interleave(T)).view(Bsz, T, -1)
