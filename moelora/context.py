"""Per-model adapter state shared by every wrapped module of one model (never a module global).

The context says which adapter is active, carries the current forward's padding mask and prompt
span (set by a pre-forward hook on the model), collects router outputs for the router losses, and
caches MiLoRA's per-sequence gates between prefill and decoding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .config import AdapterConfig


@dataclass
class RouterRecord:
    """One router call: logits of the tokens (or sequences) that count, and what was selected.

    ``keep`` (``(N,)`` bool, optional) marks the rows that count (padding excluded); it is applied
    when ``logits`` / ``selected`` are read, not when recorded, so a forward records without a
    data-dependent shape (``torch.compile``d decoding traces it as one graph)."""

    layer: int
    all_logits: torch.Tensor  # (N, E) float32
    all_selected: torch.Tensor  # (N, E) bool: the experts each row uses
    keep: torch.Tensor | None = None

    @property
    def logits(self) -> torch.Tensor:
        return self.all_logits if self.keep is None else self.all_logits[self.keep]

    @property
    def selected(self) -> torch.Tensor:
        return self.all_selected if self.keep is None else self.all_selected[self.keep]


def in_backward() -> bool:
    """True while autograd runs a backward pass (where gradient checkpointing recomputes layers)."""
    task = getattr(torch._C, "_current_graph_task_id", None)  # private; absent: assume not
    return task is not None and task() != -1


_ACTIVE = object()  # ``forward_name`` unset: the forward uses ``active``


@dataclass
class AdapterContext:
    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    active: str | None = None
    # Set per forward by the model's pre-forward hook.
    attention_mask: torch.Tensor | None = None  # (B, S) 1 = real token; S >= this forward's T
    prompt_lengths: torch.Tensor | None = None  # (B,) non-padding prompt tokens per row
    # packed rows (collate_packed): each example's prompt positions in the flattened (B*T) batch, (S, L)
    # with its (S, L) mask, and each token's example (S for padding): MiLoRA routes every example
    segments: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    prompt_width: int | None = None  # during generate(): columns of the original prompt
    # inside generate(): "prefill" until its first forward is done, then "decode"; None outside. A
    # string, not a step counter: a compiled decoding step guards on it, and a counter would recompile
    generate_phase: str | None = None
    decoding: bool = False  # a KV cache already holds the prompt: reuse cached routing
    # the engine's recomputation of a preempted request's keys and values: a multi-token forward that
    # reuses the MiLoRA gates its prefill chose (``Engine._prefill``), as decoding does
    reuse_routing: bool = False
    # the PiSSA adapter whose residual the base weights hold (moelora.pissa): no base-model forward
    residual_base: str | None = None
    records: dict[str, list[RouterRecord]] = field(default_factory=dict)
    # MiLoRA gates cached at prefill: adapter -> layer -> (B, E)
    gates: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    # At inference, which of a layer's MiLoRA modules any row selected (host-side, from prefill):
    # the others have gate 0 for every row and are skipped while decoding. adapter -> layer -> [bool]
    gate_any: dict[str, dict[int, list[bool]]] = field(default_factory=dict)
    # generate(): the MiLoRA gates are copied at the end of prefill into buffers that keep their
    # address from one call to the next (one per adapter, layer and shape; see ``pin_gates``)
    gate_buffers: dict[tuple, torch.Tensor] = field(default_factory=dict)
    router_calls: int = 0  # MiLoRA router invocations (for tests and profiling)
    base_requires_grad: dict[str, bool] = field(default_factory=dict)  # restored when the last adapter goes
    # Mixed batches (``adapter_names=`` per row): the rows of each adapter, in order of first
    # appearance; ``None`` names base-model rows. Set per forward; ``None`` = one adapter for all.
    groups: list[tuple[str | None, torch.Tensor]] | None = None
    rows: torch.Tensor | None = None  # the group being computed (row indices into the full batch)
    group_rows: dict[tuple, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # set_groups' device row tables
    forward_name: object = _ACTIVE  # this forward's (or group's) adapter when it is not ``active``
    row_cache: dict = field(default_factory=dict)  # per forward: the mixed batch's plans (``AdaptedLinear._plan``)
    adapter_epoch: int = 0  # bumped when adapters are attached or removed: packed-weight caches rebuild
    # bumped by every forward that is not a decoding step (and by generate()'s first forward, even
    # when it continues a cache): weight caches checked since are trusted while decoding
    # (``lora.weights_cache``)
    weights_serial: int = 0
    generate_adapter_names: list[str | None] | None = None  # ``generate(adapter_names=...)``, expanded
    # ``generate(attention_mask=...)``: the 2-D padding mask of the prompt, for a prefill that gets a
    # 4-D mask instead (a static cache makes ``generate`` build one)
    generate_mask: torch.Tensor | None = None
    # Decoder layers that transformers' gradient checkpointing recomputes in the backward of this
    # (training) forward: MixLoRA skips its own inner recompute there
    checkpointed_layers: frozenset[int] = frozenset()

    def begin_forward(self) -> None:
        self.records = {}
        self.row_cache = {}

    @property
    def current(self) -> str | None:
        """The adapter of the forward (or mixed-batch group) being computed."""
        return self.active if self.forward_name is _ACTIVE else self.forward_name

    def set_groups(self, adapter_names: list[str | None] | None, device: torch.device) -> None:
        """Group a mixed batch's rows by adapter (``None`` = no adapter); validates every name.

        A batch whose rows all use one adapter runs as a plain single-adapter forward."""
        self.groups, self.forward_name = None, _ACTIVE
        if adapter_names is None:
            return
        order: dict[str | None, list[int]] = {}
        for row, name in enumerate(adapter_names):
            if name is not None and name not in self.configs:
                raise KeyError(f"adapter_names[{row}] = {name!r} is not attached (attached: {list(self.configs)})")
            order.setdefault(name, []).append(row)
        if len(order) == 1:
            self.forward_name = next(iter(order))
            return
        # one host-to-device copy for all groups (a copy from pageable memory waits for the stream:
        # one per group was 32 per step for 32 tenants), each group's rows a slice of it; kept for the
        # next forward with the same rows (decoding steps): no copy then, and the same tensors, which
        # a compiled step reads as static inputs (a new address would make CUDA graphs record again)
        key = (tuple(tuple(rows) for rows in order.values()), device)
        parts = self.group_rows.get(key)
        if parts is None:
            flat = torch.tensor([r for rows in order.values() for r in rows], dtype=torch.long).to(device)
            parts = flat.split([len(rows) for rows in order.values()])
            if len(self.group_rows) >= 64:
                self.group_rows.clear()
            self.group_rows[key] = parts
        self.groups = list(zip(order, parts))

    @contextmanager
    def scope(self, rows: torch.Tensor, name: str | None) -> Iterator[None]:
        """Compute one group of a mixed batch as a batch of its own: ``name`` is active and the
        masks below describe ``rows`` only."""
        previous = self.rows, self.forward_name
        self.rows, self.forward_name = rows, name
        try:
            yield
        finally:
            self.rows, self.forward_name = previous

    def _select(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rows is None else t[self.rows.to(t.device)]

    def token_mask(self, batch: int, seq: int, device: torch.device) -> torch.Tensor:
        """``(B, T)`` bool mask of the real (non-padding) tokens of this forward's input."""
        if self.attention_mask is None:
            return torch.ones(batch, seq, dtype=torch.bool, device=device)
        m = self._select(self.attention_mask)[:, -seq:].to(device=device, dtype=torch.bool)
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
            lengths = self._select(self.prompt_lengths.to(device)).view(-1, 1)
            if lengths.shape[0] != batch:
                raise ValueError(f"prompt_lengths has {lengths.shape[0]} rows but the batch has {batch}")
            mask = mask & (mask.long().cumsum(1) <= lengths)
        return mask

    @staticmethod
    def recording(training: bool) -> bool:
        """Whether a router call records its :class:`RouterRecord`: not in a compiled inference step
        (a compiled decoding step), which reports no router loss (``inject._post_forward``) and whose
        records would only become extra graph outputs, kept alive in ``records`` until the next step
        (with CUDA graphs, outputs of one replay still alive at the next)."""
        return training or not torch.compiler.is_compiling()

    def record(self, adapter: str, rec: RouterRecord) -> None:
        if not torch.compiler.is_compiling() and in_backward():
            return  # gradient checkpointing recomputing a layer: the forward already recorded it
        self.records.setdefault(adapter, []).append(rec)

    def milora_unused(self, adapter: str, layer: int, expert: int) -> bool:
        """True when no row of the current batch selected this MiLoRA module (known at inference)."""
        used = self.gate_any.get(adapter, {}).get(layer)
        return used is not None and not used[expert]

    def milora_token_gates(self, adapter: str, layer: int, tokens: int) -> torch.Tensor:
        """``(tokens, E)``: each token's row gates (a row's ``T`` tokens consecutive), expanded once per
        layer and forward and shared by the layer's modules (not once per module)."""
        g = self.milora_gates(adapter, layer)  # (B, E)
        if tokens == g.shape[0]:
            return g
        key = ("token_gates", adapter, layer, tokens)
        hit = self.row_cache.get(key)
        if hit is None or hit[0] is not g:  # new gates (a recomputed layer routes again): expand again
            hit = self.row_cache[key] = (g, g.repeat_interleave(tokens // g.shape[0], 0))
        return hit[1]

    def pin_gates(self) -> None:
        """Move the inference gates of this prefill into stable buffers (``generate()`` calls it when
        its prefill is done). A compiled decoding step reads ``gates`` as *static* inputs (dynamo
        treats tensors reached from a module's attributes like parameters), and CUDA graph trees
        record the step again whenever a static input's address changes: with a new tensor per
        prefill, every ``generate`` call recorded a new graph and kept it (its memory, and one more
        graph to check at every later step). With one buffer per adapter, layer and shape, a call
        with a batch shape seen before replays the graph recorded for it. Gates that need a gradient
        (training) stay as they are."""
        if torch.compiler.is_compiling():
            return
        for name, layers in self.gates.items():
            for li, g in layers.items():
                if g.requires_grad:
                    continue
                key = (name, li, tuple(g.shape), g.dtype, g.device)
                buf = self.gate_buffers.get(key)
                if buf is None:
                    if len(self.gate_buffers) >= 4096:  # many distinct shapes: start over (tiny tensors)
                        self.gate_buffers.clear()
                    buf = self.gate_buffers[key] = torch.empty_like(g)
                if buf is not g:
                    buf.copy_(g)
                    layers[li] = buf

    def milora_gates(self, adapter: str, layer: int) -> torch.Tensor:
        try:
            return self.gates[adapter][layer]
        except KeyError:
            raise RuntimeError(
                f"MiLoRA adapter '{adapter}' has no routing for layer {layer}: the router runs at prefill "
                "(a forward without a filled KV cache) and its decision is reused while decoding"
            ) from None
