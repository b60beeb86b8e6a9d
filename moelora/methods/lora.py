"""Plain LoRA and DoRA on any linear modules named in ``target_modules`` (PEFT-compatible).

``y = W x + s * B A dropout(x)``; with ``use_dora`` the ``DoraVariant`` recombines it as
``m * (W + s B A) x / ||W + s B A||_row``. Checkpoint keys follow PEFT:
``base_model.model.{module path}.lora_{A,B}.weight`` and ``...lora_magnitude_vector``.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import pissa
from ..config import ConfigError, LoraConfig
from ..context import AdapterContext, RouterRecord
from ..lora import AdaptedLinear, DoraVariant, LinearAdapter, base_linear

PEFT_PREFIX = "base_model.model."


def canonical_name(name: str) -> str:
    """A module path without moelora's wrapper segments (what the unwrapped model calls it)."""
    return ".".join(p for p in name.split(".") if p not in ("base_layer", "base_mlp"))


def _targets(model: nn.Module, cfg: LoraConfig) -> list[tuple[nn.Module, str, str]]:
    """(parent, attribute, canonical path) of every module whose last name is a target (in the decoder
    layers ``cfg.layers_to_transform`` names, when it does)."""
    inside = None
    if cfg.layers_to_transform is not None:
        from ..inject import decoder_layers

        layers = decoder_layers(model)
        if max(cfg.layers_to_transform) >= len(layers):
            raise ConfigError(f"layers_to_transform {cfg.layers_to_transform} names layers beyond the model's "
                              f"{len(layers)}")
        inside = {id(m) for i in cfg.layers_to_transform for m in layers[i].modules()}
    found = []
    for parent_name, parent in model.named_modules():
        if isinstance(parent, AdaptedLinear) or (inside is not None and id(parent) not in inside):
            continue
        for attr, child in parent.named_children():
            if attr in cfg.target_modules and isinstance(child, (nn.Linear, AdaptedLinear)):
                path = canonical_name(f"{parent_name}.{attr}" if parent_name else attr)
                found.append((parent, attr, path))
    return found


def attach(model: nn.Module, cfg: LoraConfig, name: str, ctx: AdapterContext) -> None:
    from ..inject import new_lora, wrap_linear

    found = _targets(model, cfg)
    missing = set(cfg.target_modules) - {attr for _, attr, _ in found}
    if missing:
        raise ValueError(f"target modules {sorted(missing)} are not linear layers of {type(model).__name__}")
    for parent, attr, path in found:
        wrapper = wrap_linear(parent, attr, ctx)
        base = base_linear(wrapper)
        r, alpha = cfg.module_rank_alpha(path)  # rank_pattern / alpha_pattern (PEFT's)
        lora = new_lora(base, r, cfg.scaling(r, alpha), cfg.lora_dropout)
        if cfg.init_lora_weights == "gaussian":  # PEFT's
            nn.init.normal_(lora.lora_A.data[0], std=1 / cfg.r)
        elif cfg.is_pissa:  # the base weight becomes the residual (moelora.pissa)
            pissa.initialise(base, lora, cfg.init_lora_weights)
        wrapper.adapters[name] = LinearAdapter(lora, DoraVariant(base, lora) if cfg.use_dora else None)


def checkpoint_entries(model: nn.Module, cfg: LoraConfig, name: str) -> list[tuple[str, nn.Parameter, int | None]]:
    entries = []
    for module_name, module in model.named_modules():
        if isinstance(module, AdaptedLinear) and name in module.adapters:
            key = PEFT_PREFIX + canonical_name(module_name)
            ad: LinearAdapter = module.adapters[name]
            entries.append((f"{key}.lora_A.weight", ad.lora.lora_A, 0))
            entries.append((f"{key}.lora_B.weight", ad.lora.lora_B, 0))
            if ad.variant is not None:
                entries.append((f"{key}.lora_magnitude_vector", ad.variant.magnitude, None))
    return entries


def pissa_initial(model: nn.Module, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A PiSSA adapter's initial ``(A0, B0)`` per module, by checkpoint key prefix (``moelora.pissa``)."""
    return {PEFT_PREFIX + canonical_name(module_name): (module.adapters[name].lora.init_A.detach().cpu(),
                                                        module.adapters[name].lora.init_B.detach().cpu())
            for module_name, module in model.named_modules()
            if isinstance(module, AdaptedLinear) and name in module.adapters}


def router_loss(cfg: LoraConfig, records: list[RouterRecord]) -> torch.Tensor | None:
    return None
