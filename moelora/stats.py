"""Small introspection helpers: parameter counts, expert load of the last forward, optimizer groups."""

from __future__ import annotations

import torch
from torch import nn

from .config import MiLoraConfig, MixLoraConfig
from .inject import adapter_of, get_context


def count_parameters(model: nn.Module, adapter_name: str | None = None) -> dict[str, int]:
    """Trainable and activated adapter parameters (per token for MixLoRA, per sequence for MiLoRA).

    ``activated`` counts the parameters one token uses: attention LoRAs, the router, and ``top_k``
    of the ``E`` experts (MixLoRA); ``top_k`` of the ``E`` LoRA modules plus the router (MiLoRA).
    """
    ctx = get_context(model)
    name = adapter_name or ctx.active
    cfg = ctx.configs[name]
    total = expert = 0
    for n, p in model.named_parameters():
        if adapter_of(n) != name:
            continue
        total += p.numel()
        if isinstance(cfg, MixLoraConfig) and ".experts." in n:
            expert += p.numel()
        if isinstance(cfg, MiLoraConfig) and ".moelora_routers." not in n:
            expert += p.numel()
    activated = total
    if isinstance(cfg, MixLoraConfig):
        k = cfg.top_k if cfg.routing == "top_k" else cfg.num_experts
        activated = total - expert + expert * k // cfg.num_experts
    elif isinstance(cfg, MiLoraConfig):
        E = len(cfg.target_modules)
        activated = total - expert + expert * cfg.top_k // E
    return {"trainable": total, "activated": activated}


def expert_load(model: nn.Module, adapter_name: str | None = None) -> dict[int, torch.Tensor]:
    """Per layer, the fraction of the last forward's (non-padding) tokens or sequences per expert.

    MixLoRA counts token assignments (each token counts ``k`` times, normalised to sum to 1);
    MiLoRA counts selected experts per sequence.
    """
    ctx = get_context(model)
    name = adapter_name or ctx.active
    out: dict[int, torch.Tensor] = {}
    for rec in ctx.records.get(name, []):
        counts = rec.selected.float().sum(0)
        out[rec.layer] = (counts / counts.sum().clamp_min(1)).detach().cpu()
    return out


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, adapter_name: str | None = None,
                 loraplus_lr_ratio: float = 0.0) -> list[dict]:
    """Optimizer groups for the trainable parameters (of one adapter, when named): MiLoRA's rational
    activation coefficients get ``lr * activation_lr_scale`` (the paper's separate, smaller learning
    rate); with ``loraplus_lr_ratio`` (LoRA+) every ``lora_B`` gets ``lr * loraplus_lr_ratio``; the
    rest ``lr``."""
    ctx = get_context(model)
    scales = {n: c.activation_lr_scale for n, c in ctx.configs.items() if isinstance(c, MiLoraConfig)}
    main, fast, slow = [], [], {}
    for n, p in model.named_parameters():
        if not p.requires_grad or (adapter_name is not None and adapter_of(n) != adapter_name):
            continue
        adapter = next((a for a in scales if f".moelora_routers.{a}.activation." in n), None)
        if adapter:
            slow.setdefault(adapter, []).append(p)
        elif loraplus_lr_ratio and n.endswith("lora_B"):
            fast.append(p)
        else:
            main.append(p)
    groups = [{"params": main, "lr": lr, "weight_decay": weight_decay}]
    if fast:
        groups.append({"params": fast, "lr": lr * loraplus_lr_ratio, "weight_decay": weight_decay})
    groups += [{"params": ps, "lr": lr * scales[a], "weight_decay": 0.0} for a, ps in slow.items()]
    return groups
