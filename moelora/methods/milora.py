"""MiLoRA (Zhang et al., EMNLP 2024 Findings): each LoRA module of a layer is an expert.

Not the other "MiLoRA" (minor singular components, arXiv 2406.09044).

Per decoder layer ``l`` (METHODS.md section 2): expert ``e`` is the LoRA on the e-th name of
``target_modules``. A router before the layer reads the layer's input hidden states (the residual
stream, before the first norm) of the prompt tokens only, pools them to one vector per sequence,
applies ``g`` (rational by default), takes ``logits = g(pooled) W_r^T`` and keeps the top-k with
gates ``w_e = p_e / sum_{j in S} p_j`` (0 for the others). Every token of the sequence then
computes each targeted projection as ``W_e x + w_e * dW_e(x)``.

Routing once: the router runs at prefill (any forward without a filled KV cache, and the first
forward of ``generate``); its gates are cached in the model's context and reused at every
decoding step. Beams are expanded before prefill, so each beam routes on its own copy of the
prompt and gets its source's gates. The prompt span is ``prompt_lengths`` non-padding tokens
when given (training), else every non-padding token (or, inside ``generate``, the original
prompt's columns). A row with no prompt token pools over all its non-padding positions. Packed
rows (``moelora.data.collate_packed``, ``train.packing``) route each example on its own prompt, and
its tokens take its gates (``ctx.segments``; a ``(B*T, E)`` gate table instead of ``(B, E)``).

Load-balance loss (per layer over the batch's sequences, averaged over layers):
``L_lb = E sum_e f_e p_e``, added as ``lb_loss_coef * L_lb``.

The rational activation's paper recipe trains its coefficients bi-level on a dev split at lr
1e-6; here they train with the rest at ``activation_lr_scale`` times the learning rate
(``moelora.param_groups``), a documented simplification.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import MiLoraConfig
from ..context import AdapterContext, RouterRecord
from ..lora import AdaptedLinear, LinearAdapter, base_linear
from ..routing import PromptRouter, milora_lb_loss

PREFIX = "milora.layers"


def _layer_pre_hook(layer: nn.Module, args: tuple, kwargs: dict) -> None:
    ctx: AdapterContext = layer._moelora_ctx
    h = args[0] if args else kwargs["hidden_states"]  # (B, T, d)
    if ctx.groups is None:
        _route(layer, ctx, ctx.current, h)
        return
    for name, rows in ctx.groups:  # a mixed batch: each MiLoRA adapter routes its own rows
        if name in layer.moelora_routers:
            with ctx.scope(rows, name):
                _route(layer, ctx, name, h[rows])


def _route(layer: nn.Module, ctx: AdapterContext, name: str | None, h: torch.Tensor) -> None:
    """Route ``h``'s sequences (prefill) into ``ctx.gates``, or check the cached gates (decoding)."""
    routers = layer.moelora_routers
    if name is None or name not in routers:
        return
    li = layer._moelora_index
    if ctx.decoding:
        ctx.milora_gates(name, li)  # raises a clear error if prefill never routed
        return
    B, T, _ = h.shape
    if ctx.segments is not None:  # packed rows: every example routes on its own prompt
        if ctx.groups is not None:
            raise ValueError("MiLoRA cannot route packed rows of a batch mixing adapters: pack one adapter's rows")
        index, seg_mask, token_segment = ctx.segments
        logits, seg_gates = routers[name](h.reshape(B * T, -1)[index], seg_mask)  # (S, E) each
        gates = torch.cat([seg_gates, seg_gates.new_zeros(1, seg_gates.shape[1])])[token_segment]  # (B*T, E)
        selected = seg_gates > 0
    else:
        mask = ctx.prompt_mask(B, T, h.device)  # (B, T)
        # a row without prompt tokens (a `text` example) pools over its tokens, padding left out
        mask = torch.where(mask.any(1, keepdim=True), mask, ctx.token_mask(B, T, h.device))
        logits, gates = routers[name](h, mask)  # (B, E) each
        selected = gates > 0
    ctx.router_calls += 1
    ctx.gates.setdefault(name, {})[li] = gates
    used = ctx.gate_any.setdefault(name, {})
    if torch.is_grad_enabled():
        used.pop(li, None)  # training: no skipping (and no host sync per layer)
    else:  # one host sync per layer at prefill; decoding then skips the modules no row selected
        used[li] = (gates > 0).any(0).tolist()
    if ctx.recording(layer.training):
        ctx.record(name, RouterRecord(li, logits, selected))


def attach(model: nn.Module, cfg: MiLoraConfig, name: str, ctx: AdapterContext) -> None:
    from ..inject import decoder_layers, get_architecture, new_lora, wrap_linear

    arch = get_architecture(model)
    hidden = model.config.hidden_size
    E = len(cfg.target_modules)
    for li, layer in enumerate(decoder_layers(model)):
        for e, proj in enumerate(cfg.target_modules):
            parent = layer.self_attn if proj in arch.attention else layer.mlp
            parent = getattr(parent, "base_mlp", parent)  # under a MixLoRA FFN wrapper
            wrapper = wrap_linear(parent, proj, ctx)
            lora = new_lora(base_linear(wrapper), cfg.r, cfg.scaling(), cfg.lora_dropout)
            wrapper.adapters[name] = LinearAdapter(lora, gate=(li, e))
        if not hasattr(layer, "moelora_routers"):
            layer.moelora_routers = nn.ModuleDict()
            layer._moelora_ctx = ctx
            layer._moelora_index = li
            layer._moelora_hook = layer.register_forward_pre_hook(_layer_pre_hook, with_kwargs=True)
        router = PromptRouter(hidden, E, cfg.top_k, cfg.pooler, cfg.activation, cfg.router_init_range)
        layer.moelora_routers[name] = router.to(next(layer.parameters()).device)


def remove_layer_hooks(model: nn.Module) -> None:
    for layer in model.modules():
        if hasattr(layer, "_moelora_hook"):
            layer._moelora_hook.remove()
            del layer._moelora_hook, layer._moelora_ctx, layer._moelora_index, layer.moelora_routers


def _projection_parent(layer: nn.Module, proj: str) -> tuple[str, nn.Module]:
    mlp = getattr(layer.mlp, "base_mlp", layer.mlp)
    if isinstance(getattr(layer.self_attn, proj, None), AdaptedLinear):
        return "self_attn", layer.self_attn
    return "mlp", mlp


def checkpoint_entries(model: nn.Module, cfg: MiLoraConfig, name: str) -> list[tuple[str, nn.Parameter, int | None]]:
    from ..inject import decoder_layers

    entries = []
    for li, layer in enumerate(decoder_layers(model)):
        for proj in cfg.target_modules:
            where, parent = _projection_parent(layer, proj)
            lora = getattr(parent, proj).adapters[name].lora
            entries.append((f"{PREFIX}.{li}.{where}.{proj}.lora_A.weight", lora.lora_A, 0))
            entries.append((f"{PREFIX}.{li}.{where}.{proj}.lora_B.weight", lora.lora_B, 0))
        router: PromptRouter = layer.moelora_routers[name]
        entries.append((f"{PREFIX}.{li}.router.weight", router.weight, None))
        if cfg.pooler == "attention":
            entries.append((f"{PREFIX}.{li}.pooler.query", router.pooler.query, None))
        if cfg.activation == "rational":
            entries.append((f"{PREFIX}.{li}.activation.numerator", router.activation.numerator, None))
            entries.append((f"{PREFIX}.{li}.activation.denominator", router.activation.denominator, None))
    return entries


def router_loss(cfg: MiLoraConfig, records: list[RouterRecord]) -> torch.Tensor | None:
    """``lb_loss_coef`` times the per-layer load-balance loss averaged over layers."""
    logits = [r.logits for r in records]
    if len({t.shape for t in logits}) == 1:  # every layer at once (a few ops, not a few per layer)
        return cfg.lb_loss_coef * milora_lb_loss(torch.stack(logits)).mean()
    return cfg.lb_loss_coef * torch.stack([milora_lb_loss(t) for t in logits]).mean()
