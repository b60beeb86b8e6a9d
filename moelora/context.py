"""Per-model adapter state shared by every wrapped module of one model (never a module global).

The context says which adapter is active, carries the current forward's padding mask and prompt
span (set by a pre-forward hook on the model), collects router outputs for the router losses, and
caches MiLoRA's per-sequence gates between prefill and decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import AdapterConfig


@dataclass
class RouterRecord:
    """One router call: logits of the tokens (or sequences) that count, and what was selected."""

    layer: int
    logits: torch.Tensor  # (N, E) float32, padding excluded
    selected: torch.Tensor  # (N, E) bool: the experts each row uses


@dataclass
class AdapterContext:
    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    active: str | None = None
    # Set per forward by the model's pre-forward hook.
    attention_mask: torch.Tensor | None = None  # (B, S) 1 = real token; S >= this forward's T
    prompt_lengths: torch.Tensor | None = None  # (B,) non-padding prompt tokens per row
    prompt_width: int | None = None  # during generate(): columns of the original prompt
    generation_step: int | None = None  # forwards done in the current generate() call, else None
    decoding: bool = False  # a KV cache already holds the prompt: reuse cached routing
    records: dict[str, list[RouterRecord]] = field(default_factory=dict)
    # MiLoRA gates cached at prefill: adapter -> layer -> (B, E)
    gates: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    router_calls: int = 0
    base_requires_grad: dict[str, bool] = field(default_factory=dict)  # restored when the last adapter goes  # MiLoRA router invocations (for tests and profiling)

    def begin_forward(self) -> None:
        self.records = {}

    def token_mask(self, batch: int, seq: int, device: torch.device) -> torch.Tensor:
        """``(B, T)`` bool mask of the real (non-padding) tokens of this forward's input."""
        if self.attention_mask is None:
            return torch.ones(batch, seq, dtype=torch.bool, device=device)
        m = self.attention_mask[:, -seq:].to(device=device, dtype=torch.bool)
        if m.shape != (batch, seq):  # e.g. a 4-D mask or a shape we cannot interpret
            return torch.ones(batch, seq, dtype=torch.bool, device=device)
        return m

    def prompt_mask(self, batch: int, seq: int, device: torch.device) -> torch.Tensor:
        """``(B, T)`` bool mask of the prompt tokens (non-padding, within the prompt span)."""
        mask = self.token_mask(batch, seq, device)
        if self.prompt_width is not None:
            mask = mask.clone()
            mask[:, self.prompt_width :] = False
        if self.prompt_lengths is not None:
            lengths = self.prompt_lengths.to(device).view(-1, 1)
            if lengths.shape[0] != batch:
                raise ValueError(f"prompt_lengths has {lengths.shape[0]} rows but the batch has {batch}")
            mask = mask & (mask.long().cumsum(1) <= lengths)
        return mask

    def record(self, adapter: str, rec: RouterRecord) -> None:
        self.records.setdefault(adapter, []).append(rec)

    def milora_gates(self, adapter: str, layer: int) -> torch.Tensor:
        try:
            return self.gates[adapter][layer]
        except KeyError:
            raise RuntimeError(
                f"MiLoRA adapter '{adapter}' has no routing for layer {layer}: the router runs at prefill "
                "(a forward without a filled KV cache) and its decision is reused while decoding"
            ) from None
