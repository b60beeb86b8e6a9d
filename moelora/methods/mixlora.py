"""MixLoRA (Li et al., arXiv 2404.15159): a sparse top-k mixture of LoRA experts in each frozen FFN.

Per decoder layer (METHODS.md section 1):

- attention projections: an ordinary LoRA each (``LinearAdapter`` on an ``AdaptedLinear``);
- FFN: ``E`` experts, expert ``e`` being the frozen FFN with its own LoRA on each targeted FFN
  projection, ``FFN_e(x) = W'_down,e(act(W'_gate,e x) * (W'_up,e x))``;
- router: ``logits = x W_r^T`` on the FFN input (after the post-attention norm), ``W_r: (E, d)``
  float32, init N(0, 0.02); top-k of ``softmax(logits)``, renormalised (or top-p, see
  ``moelora.routing.top_p_routing``); ``y = sum_j w_j FFN_{i_j}(x)``.

The fast form computes the base gate/up once per token and the frozen down projection once on
the weighted mix, because ``W_down`` is linear:
``y = W_down(sum_j w_j h_j) + sum_j w_j dW_down,j(h_j)``,
``h_j = act(W_gate x + dW_gate,j x) * (W_up x + dW_up,j x)``.
The naive form (``naive = True``, selected by ``set_backend(model, "reference")``) loops over
experts and runs each one's full FFN on its tokens: the oracle for the fast one.

Dropout: the fast form draws one dropout mask per projection input, shared by a token's k experts;
the naive form draws one per expert (as the official code). Both are off in ``eval()``.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

from ..config import MixLoraConfig
from ..context import AdapterContext, RouterRecord
from ..lora import LinearAdapter, LoraWeights, base_linear, weights_cache
from ..routing import float32_linear, mixlora_aux_loss, top_k_routing, top_p_routing

PREFIX = "mixlora.layers"


class MixLoraExperts(nn.Module):
    """One adapter's router and expert LoRAs for one FFN."""

    def __init__(self, cfg: MixLoraConfig, hidden_size: int, experts: dict[str, LoraWeights], layer: int, fused: bool):
        super().__init__()
        self.moe_gate = nn.Parameter(torch.randn(cfg.num_experts, hidden_size) * cfg.router_init_range)
        self.experts = nn.ModuleDict(experts)
        self.layer, self.fused = layer, fused
        self.routing, self.top_k, self.top_p, self.temperature = cfg.routing, cfg.top_k, cfg.top_p, cfg.temperature
        self.top_p_renormalize = cfg.top_p_renormalize
        self.jitter_noise = cfg.jitter_noise
        self.naive = False
        self.recompute = True  # while training: recompute the expert part in the backward (see _fast)
        # The checkpoint's activation (MoE-PEFT applies ACT2FN[act_fn]); None = the FFN's own.
        self.act = ACT2FN[cfg.act_fn] if cfg.act_fn else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: ``(N, d)`` -> logits ``(N, E)``, weights and indices ``(N, k)``, selected ``(N, E)``."""
        r_in = x.float()
        if self.training and self.jitter_noise > 0:
            r_in = r_in * torch.empty_like(r_in).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        logits = float32_linear(r_in, self.moe_gate)  # (N, E)
        if self.routing == "top_p":
            weights, indices, selected = top_p_routing(logits, self.top_p, self.temperature, self.top_p_renormalize)
        else:
            weights, indices, selected = top_k_routing(logits, self.top_k)
        return logits, weights, indices, selected

    def forward(
        self, mlp: nn.Module, x: torch.Tensor, ctx: AdapterContext, name: str, act: nn.Module,
        base_gate_up: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The mixture's FFN output ``(B, T, d)``; given the base gate/up outputs ``(B, T, 2I)``
        (a mixed batch), the pair ``(sum_j w_j h_j, rest)`` for the caller's shared down projection."""
        B, T, d = x.shape
        x2 = x.reshape(B * T, d)  # (N, d)
        logits, weights, indices, selected = self.route(x2)
        if ctx.recording(self.training):
            keep = ctx.token_mask(B, T, x.device).reshape(-1)  # (N,) non-padding tokens
            ctx.record(name, RouterRecord(self.layer, logits, selected, keep))
        if self.naive and base_gate_up is None:
            return self._naive(mlp, x2, weights, indices, act).reshape(B, T, d)
        if base_gate_up is not None:
            base_gate_up = base_gate_up.reshape(B * T, 1, -1)
        # HF gradient checkpointing already recomputes the whole layer: a second, inner recompute
        # would run the expert part three times for nothing
        recompute = self.recompute and self.training and torch.is_grad_enabled() and self.layer not in ctx.checkpointed_layers
        mixed, extra = self._fast(mlp, x2, weights, indices, act, base_gate_up, recompute=recompute)
        if base_gate_up is not None:  # mixed batch: the caller runs the frozen down projection
            return mixed.reshape(B, T, -1), extra.reshape(B, T, d)
        return (mlp.down_proj(mixed) + extra).reshape(B, T, d)  # W_down(sum_j w_j h_j) + b + ...

    def _fast(
        self, mlp: nn.Module, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, act: nn.Module,
        base_gate_up: torch.Tensor | None = None, experts: dict | None = None, recompute: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum_j w_j h_j, the rest of y)``: the FFN output is ``W_down(first) + b + second``.

        ``experts`` (projection -> stacked LoRAs) defaults to this adapter's; a mixed batch passes
        several adapters' experts pooled (``MixLoraFFN._pooled``). The frozen gate/up products run
        here once per token; the expert part after them (``_experts``) works on ``k`` copies of the
        FFN's hidden activations, so while training it is recomputed in the backward pass instead of
        kept (``recompute``: ``self.recompute`` while training, METHODS.md's memory note): it costs
        small LoRA products and elementwise work again, and saves ``~6 k`` activation-sized tensors
        per layer."""
        ex = self.experts if experts is None else experts
        if self.fused:
            base = (mlp.gate_up_proj(x).unsqueeze(1) if base_gate_up is None else base_gate_up,)  # (N, 1, 2I)
        elif base_gate_up is None:
            base = (mlp.gate_proj(x).unsqueeze(1), mlp.up_proj(x).unsqueeze(1))  # (N, 1, I) each
        else:
            base = tuple(base_gate_up.chunk(2, dim=-1))
        fn = functools.partial(self._experts, ex, act, base_linear(mlp.down_proj))
        if recompute:
            return checkpoint(fn, x, w, idx, *base, use_reentrant=False)
        return fn(x, w, idx, *base)

    def _experts(self, ex: dict, act: nn.Module, down: nn.Linear, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor,
                 *base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert deltas on the base gate/up outputs ``base``, the activation, the weighted mix."""
        if self.fused:
            gu = base[0]
            if "gate_up_proj" in ex:
                gu = gu + ex["gate_up_proj"].delta(x, idx, None, combine=False).to(gu.dtype)  # (N, k, 2I)
            gate, up = gu.chunk(2, dim=-1)
        else:
            gate, up = base
            if "gate_proj" in ex:
                gate = gate + ex["gate_proj"].delta(x, idx, None, combine=False).to(gate.dtype)  # (N, k, I)
            if "up_proj" in ex:
                up = up + ex["up_proj"].delta(x, idx, None, combine=False).to(up.dtype)
        h = act(gate) * up  # (N, k or 1, I)
        wk = w.to(h.dtype).unsqueeze(-1)  # (N, k, 1)
        mixed = (wk * h).sum(1)  # (N, I): sum_j w_j h_j
        extra = torch.zeros(x.shape[0], down.out_features, dtype=mixed.dtype, device=x.device)
        if down.bias is not None:  # each expert adds the bias with its weight: (sum_j w_j) b
            extra = extra + (w.sum(-1, keepdim=True).to(extra.dtype) - 1) * down.bias
        if "down_proj" in ex:
            hk = h.expand(-1, idx.shape[1], -1) if h.shape[1] == 1 else h  # (N, k, I)
            extra = extra + ex["down_proj"].delta(hk, idx, w, combine=True).to(extra.dtype)
        return mixed, extra

    def _naive(self, mlp: nn.Module, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, act: nn.Module) -> torch.Tensor:
        """Reference: for each expert, its full FFN on the tokens routed to it."""
        y = torch.zeros_like(x, dtype=torch.float32)

        def proj(name: str, inp: torch.Tensor, e: int) -> torch.Tensor:
            out = getattr(mlp, name)(inp)
            if name in self.experts:
                lora = self.experts[name]
                d = lora.dropout(inp.to(lora.lora_A.dtype)) @ lora.lora_A[e].t() @ lora.lora_B[e].t() * lora.scaling
                out = out + d.to(out.dtype)
            return out

        for e in range(self.moe_gate.shape[0]):
            rows, slots = torch.where(idx == e)
            if rows.numel() == 0:
                continue
            xe = x[rows]
            if self.fused:
                gate, up = proj("gate_up_proj", xe, e).chunk(2, dim=-1)
            else:
                gate, up = proj("gate_proj", xe, e), proj("up_proj", xe, e)
            out = proj("down_proj", act(gate) * up, e)  # FFN_e(x), bias included
            y = y.index_add(0, rows, out.float() * w[rows, slots].unsqueeze(-1))
        return y.to(x.dtype)


class MixLoraFFN(nn.Module):
    """Wraps a decoder layer's FFN; runs the active adapter's mixture, or the base FFN."""

    def __init__(self, base_mlp: nn.Module, ctx: AdapterContext, act_attr: str) -> None:
        super().__init__()
        self.base_mlp = base_mlp
        self.adapters = nn.ModuleDict()
        self._ctx = ctx
        self.act_attr = act_attr

    def _poolable(self, mix: list[tuple[str, torch.Tensor]]) -> bool:
        """Several top-k tenants with the same k, activation and expert projections, at inference."""
        if len(mix) < 2 or torch.is_grad_enabled():
            return False
        moes = [self.adapters[n] for n, _ in mix]
        first = moes[0]
        return all(
            m.routing == "top_k" and m.top_k == first.top_k and not m.naive and type(m.act) is type(first.act)
            and set(m.experts) == set(first.experts) and m.top_k <= m.moe_gate.shape[0]
            for m in moes
        )

    def _pooled(self, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Routers and experts of ``names`` stacked (``weights_cache``: a few recent sets kept)."""

        def build():
            moes = [self.adapters[n] for n in names]
            sizes = torch.tensor([m.moe_gate.shape[0] for m in moes])
            router = torch.cat([m.moe_gate.detach().float() for m in moes])  # (sum E, d)
            experts = {proj: _PooledLora([m.experts[proj] for m in moes]) for proj in moes[0].experts}
            return [p for m in moes for p in m.parameters()], (router, sizes.cumsum(0) - sizes, sizes, experts)

        return weights_cache(self, "_pools", names, self._ctx, build)

    def _pooled_mixture(self, x: torch.Tensor, gate_up: torch.Tensor, mix: list[tuple[str, torch.Tensor]]):
        """Every MixLoRA row of a mixed batch at once: each token routed by its own adapter's router
        (the other adapters' logits masked out), then one grouped op over all adapters' experts."""
        names = tuple(n for n, _ in mix)
        router, offsets, sizes, experts = self._pooled(names)
        G, T, d = x.shape
        group = torch.cat([torch.full((len(r),), i, dtype=torch.long) for i, (_, r) in enumerate(mix)])
        group = group.to(x.device).repeat_interleave(T)  # (N,) adapter of each token
        lo, hi = offsets.to(x.device)[group], (offsets + sizes).to(x.device)[group]
        col = torch.arange(router.shape[0], device=x.device)
        own = (col >= lo[:, None]) & (col < hi[:, None])  # (N, sum E)
        x2 = x.reshape(G * T, d)
        logits = float32_linear(x2, router.to(x.device)).masked_fill(~own, float("-inf"))
        first = self.adapters[names[0]]
        weights, indices, _ = top_k_routing(logits, first.top_k)
        mixed, rest = first._fast(self.base_mlp, x2, weights, indices, self._act(first),
                                  gate_up.reshape(G * T, 1, -1), experts=experts)
        return mixed.reshape(G, T, -1), rest.reshape(G, T, d)

    def _act(self, moe: MixLoraExperts) -> nn.Module:
        return moe.act if moe.act is not None else getattr(self.base_mlp, self.act_attr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self._ctx
        if ctx.groups is not None and ctx.rows is None:
            return self._forward_mixed(x)
        name = ctx.current
        if name is None or name not in self.adapters:
            return self.base_mlp(x)
        moe = self.adapters[name]
        return moe(self.base_mlp, x, ctx, name, self._act(moe))

    def _forward_mixed(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of several adapters: the frozen projections run once for the whole batch.

        Gate/up run on every row (their ``AdaptedLinear`` adds other methods' deltas per row), each
        MixLoRA group mixes its experts' hidden states on its rows, and one down projection runs
        on the mixed hidden states of all rows. The naive oracle form is not used here.
        """
        ctx, mlp = self._ctx, self.base_mlp
        mix = [(name, rows) for name, rows in ctx.groups if name in self.adapters]
        if not mix:
            return mlp(x)
        fused = next(iter(self.adapters.values())).fused
        gate_up = mlp.gate_up_proj(x) if fused else torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], dim=-1)
        gate, up = gate_up.chunk(2, dim=-1)
        h = getattr(mlp, self.act_attr)(gate) * up  # rows without a mixture: the plain FFN's hidden
        extra = torch.zeros_like(x)
        if self._poolable(mix):  # inference, several MixLoRA tenants: one routing and one expert op
            rows = torch.cat([r for _, r in mix])
            mixed, rest = self._pooled_mixture(x[rows], gate_up[rows], mix)
            return mlp.down_proj(h.index_copy(0, rows, mixed.to(h.dtype))) + extra.index_copy(0, rows, rest.to(extra.dtype))
        for name, rows in mix:
            moe = self.adapters[name]
            with ctx.scope(rows, name):
                mixed, rest = moe(mlp, x[rows], ctx, name, self._act(moe), base_gate_up=gate_up[rows])
            h = h.index_copy(0, rows, mixed.to(h.dtype))
            extra = extra.index_copy(0, rows, rest.to(extra.dtype))
        return mlp.down_proj(h) + extra


class _PooledLora:
    """Several adapters' stacked expert LoRAs as one ``LoraWeights``-like object (scales folded into B)."""

    def __init__(self, loras: list[LoraWeights]) -> None:
        r = max(w.r for w in loras)
        first = loras[0]
        E = sum(w.num_experts for w in loras)
        self.lora_A = first.lora_A.new_zeros(E, r, first.lora_A.shape[2])
        self.lora_B = first.lora_B.new_zeros(E, first.lora_B.shape[1], r)
        e = 0
        for w in loras:
            n = w.num_experts
            self.lora_A[e : e + n, : w.r] = w.lora_A.detach()
            self.lora_B[e : e + n, :, : w.r] = w.lora_B.detach() * w.scaling
            e += n

    def delta(self, x, indices=None, weights=None, combine=True, *, dropout=True):
        from ..kernels import weighted_lora

        return weighted_lora(x.to(self.lora_A.dtype), self.lora_A, self.lora_B, 1.0, indices, weights, combine=combine)


def attach(model: nn.Module, cfg: MixLoraConfig, name: str, ctx: AdapterContext) -> None:
    from ..inject import decoder_layers, get_architecture, new_lora, wrap_linear

    arch = get_architecture(model)
    hidden = model.config.hidden_size
    for li, layer in enumerate(decoder_layers(model)):
        for proj in cfg.target_modules:
            if proj in arch.attention:
                wrapper = wrap_linear(layer.self_attn, proj, ctx)
                wrapper.adapters[name] = LinearAdapter(new_lora(base_linear(wrapper), cfg.r, cfg.scaling(), cfg.lora_dropout))
        ffn = layer.mlp
        if not isinstance(ffn, MixLoraFFN):
            ffn = MixLoraFFN(ffn, ctx, arch.act_attr)
            layer.mlp = ffn
        scaling = cfg.scaling(cfg.expert_rank, cfg.expert_alpha)
        experts = {
            proj: new_lora(base_linear(getattr(ffn.base_mlp, proj)), cfg.expert_rank, scaling, cfg.expert_dropout, cfg.num_experts)
            for proj in cfg.target_modules
            if proj in arch.mlp
        }
        moe = MixLoraExperts(cfg, hidden, experts, li, arch.fused_gate_up)
        moe.to(device=base_linear(getattr(ffn.base_mlp, arch.mlp[-1])).weight.device)
        ffn.adapters[name] = moe


def checkpoint_entries(model: nn.Module, cfg: MixLoraConfig, name: str) -> list[tuple[str, nn.Parameter, int | None]]:
    from ..inject import decoder_layers

    entries = []
    for li, layer in enumerate(decoder_layers(model)):
        for proj, child in layer.self_attn.named_children():
            if hasattr(child, "adapters") and name in child.adapters:
                lora = child.adapters[name].lora
                entries.append((f"{PREFIX}.{li}.self_attn.{proj}.lora_A.weight", lora.lora_A, 0))
                entries.append((f"{PREFIX}.{li}.self_attn.{proj}.lora_B.weight", lora.lora_B, 0))
        moe: MixLoraExperts = layer.mlp.adapters[name]
        entries.append((f"{PREFIX}.{li}.mlp.moe_gate.weight", moe.moe_gate, None))
        for proj, lora in moe.experts.items():
            for e in range(lora.num_experts):
                entries.append((f"{PREFIX}.{li}.mlp.{proj}.experts.{e}.lora_A.weight", lora.lora_A, e))
                entries.append((f"{PREFIX}.{li}.mlp.{proj}.experts.{e}.lora_B.weight", lora.lora_B, e))
    return entries


def router_loss(cfg: MixLoraConfig, records: list[RouterRecord]) -> torch.Tensor | None:
    """``router_aux_loss_coef * L_aux`` over all layers' non-padding tokens stacked together."""
    logits = torch.cat([r.all_logits for r in records])  # (N_total, E)
    selected = torch.cat([r.all_selected for r in records])
    keep = None
    if any(r.keep is not None for r in records):  # padding masked, not indexed away (no host sync)
        keep = torch.cat([r.keep if r.keep is not None else r.all_selected.new_ones(r.all_selected.shape[0])
                          for r in records])
    return cfg.router_aux_loss_coef * mixlora_aux_loss(logits, selected, keep)
