"""One module per method. Each provides:

- ``attach(model, cfg, name, ctx)``: wrap the targeted modules and add the adapter's parameters;
- ``checkpoint_entries(model, cfg, name)``: ``(key, parameter, expert)`` triples that map the
  adapter's parameters to its checkpoint layout (``expert`` indexes a stacked tensor, or ``None``);
- ``router_loss(cfg, records)``: the weighted router loss of one forward, or ``None``.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ..config import AdapterConfig
from ..context import RouterRecord
from . import lora, milora, mixlora

METHODS: dict[str, ModuleType] = {"lora": lora, "mixlora": mixlora, "milora": milora}


def router_loss(cfg: AdapterConfig, records: list[RouterRecord]) -> torch.Tensor | None:
    return METHODS[cfg.method].router_loss(cfg, records)


def checkpoint_entries(model: torch.nn.Module, cfg: AdapterConfig, name: str) -> list[tuple[str, torch.nn.Parameter, int | None]]:
    return METHODS[cfg.method].checkpoint_entries(model, cfg, name)
