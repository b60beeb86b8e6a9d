"""Pictures users look at first: expert load per layer (per task) and training curves.

Needs ``matplotlib`` (``pip install matplotlib``); drawn with the non-interactive Agg backend.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["routing_load", "plot_routing", "plot_loss"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@torch.no_grad()
def routing_load(model, tokenizer, items: Sequence[dict], *, batch_size: int = 8) -> torch.Tensor:
    """Mean expert load ``(layers, experts)`` of the active adapter over the items' prompts.

    Weighted by assignments: MixLoRA counts every (non-padding) token's k experts, MiLoRA every
    sequence's selected experts; each layer's row sums to 1.
    """
    from .evaluate import llm_adapters_prompt
    from .inject import get_context

    ctx = get_context(model)
    name = ctx.active
    if name is None:
        raise ValueError("no active adapter: the routing plot needs a MixLoRA or MiLoRA adapter")
    if ctx.configs[name].method not in ("mixlora", "milora"):
        raise ValueError(f"adapter {name!r} is {ctx.configs[name].method}: it has no router to plot")
    counts: dict[int, torch.Tensor] = {}
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        prompts = [llm_adapters_prompt(it.get("instruction", ""), it.get("input", "")) for it in chunk]
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        model(**enc)
        for rec in ctx.records.get(name, []):
            c = rec.selected.float().sum(0).cpu()
            counts[rec.layer] = counts.get(rec.layer, 0) + c
    layers = sorted(counts)
    load = torch.stack([counts[layer] for layer in layers])  # (L, E)
    return load / load.sum(1, keepdim=True).clamp_min(1)


def plot_routing(model, tokenizer, paths: Sequence[str | Path], out: str | Path, *, limit: int | None = 64,
                 batch_size: int = 8) -> dict[str, torch.Tensor]:
    """One heatmap (layers x experts) per data file, side by side, saved to ``out``."""
    from .evaluate import load_items, task_name

    plt = _pyplot()
    loads = {}
    for p in paths:
        items = load_items(p)[: limit or None]
        loads[task_name(p)] = routing_load(model, tokenizer, items, batch_size=batch_size)
    n = len(loads)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, 4.5), squeeze=False)
    vmax = max(float(v.max()) for v in loads.values())
    for ax, (task, load) in zip(axes[0], loads.items()):
        im = ax.imshow(load.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(task)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_xticks(range(load.shape[1]))
    fig.colorbar(im, ax=axes[0].tolist(), label="fraction of assignments")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return loads


def plot_loss(run_dir: str | Path, out: str | Path) -> None:
    """Training loss (with the validation loss when the run had validation data), router loss and
    learning rate from ``run_dir/metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir} (is it a `moelora train` output_dir?)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} is empty")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("loss", "router_loss", "lr"), ("LM loss", "router loss (weighted)", "learning rate")):
        curves = [(key, "train")] + ([("val_loss", "validation")] if key == "loss" else [])
        for k, label in curves:
            points = [(r["step"], r[k]) for r in rows if k in r]  # validation rows carry no training keys
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if k == "val_loss" else None)
        if key == "loss" and any("val_loss" in r for r in rows):
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
