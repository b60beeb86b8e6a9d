"""PiSSA (Meng et al. 2024, "Principal Singular values and Singular vectors Adaptation"): a LoRA
initialised from the base weight's principal singular part, the base keeping the residual.

With ``W = U S V^T`` (``out x in``) and ``s`` the LoRA scale, attaching ``LoraConfig(
init_lora_weights="pissa")`` sets, per targeted linear layer,

    A0 = sqrt(S_r / s) V_r^T  (r x in),   B0 = U_r sqrt(S_r / s)  (out x r),   W_res = W - s B0 A0,

so the model computes ``W_res + s B A = W`` at the start and training moves the principal part
(``"pissa_niter_N"``: ``U_r, S_r, V_r`` from ``torch.svd_lowrank`` with N subspace iterations
instead of an exact SVD, as PEFT). ``A0``/``B0`` stay beside the adapter (``LoraWeights.init_A``
/ ``init_B``, not saved with the model's state).

The base weights are no longer the original ones while such an adapter is attached, so: it is the
only adapter of its model, a forward of the base model (an adapter-free row, ``disable_adapter``)
is refused, and removing it restores ``W = W_res + s B0 A0`` (in float32, then the weight's dtype:
equal to the original up to that rounding). It is **saved as a plain LoRA relative to the original
base** (PEFT's ``path_initial_model_for_weight_conversion``, LLaMA-Factory's ``pissa_convert``):

    W_res + s B A = W + s (B A - B0 A0) = W + s [B  B0] [A; -A0],

a rank-``2r`` LoRA with the same scale (alpha doubled; x sqrt(2) with rsLoRA), which PEFT, the
engine and ``load_adapter`` on any copy of the base read as an ordinary LoRA. The checkpoint's
``moelora.pissa`` block keeps the original config, so resuming training splits it back into ``A``,
``B`` and ``A0``, ``B0`` (checked equal to the ones this attach computed).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .config import LoraConfig, pissa_iterations


def is_pissa(cfg: Any) -> bool:
    return isinstance(cfg, LoraConfig) and cfg.is_pissa


@torch.no_grad()
def initialise(base: nn.Linear, lora: nn.Module, init: str) -> None:
    """Set ``lora``'s ``A``/``B`` to PiSSA's principal part of ``base.weight`` and leave the residual
    in ``base.weight`` (keeping ``A0``/``B0`` as ``lora.init_A`` / ``init_B``)."""
    weight = base.weight
    if not weight.dtype.is_floating_point:
        raise ValueError(f"PiSSA needs a float base weight to decompose, got {weight.dtype} (a quantized base?)")
    w = weight.to(lora.lora_A.dtype)  # float32 (float64 for a float64 base)
    r, s = lora.r, lora.scaling
    niter = pissa_iterations(init)
    if niter == 0:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(w, q=r, niter=niter)
        Vh = V.t()
    root = (S / s).sqrt()
    a0 = root[:, None] * Vh  # (r, in)
    b0 = U * root[None, :]  # (out, r)
    lora.lora_A.data[0].copy_(a0)
    lora.lora_B.data[0].copy_(b0)
    a0, b0 = lora.lora_A.data[0].clone(), lora.lora_B.data[0].clone()  # in the adapter's dtype, as trained
    weight.copy_((w - s * (b0 @ a0)).to(weight.dtype))
    lora.register_buffer("init_A", a0, persistent=False)
    lora.register_buffer("init_B", b0, persistent=False)


@torch.no_grad()
def restore(base: nn.Linear, lora: nn.Module) -> None:
    """Put ``W = W_res + s B0 A0`` back into ``base.weight`` (removing a PiSSA adapter)."""
    a0, b0 = getattr(lora, "init_A", None), getattr(lora, "init_B", None)
    if a0 is None or b0 is None:
        return
    w = base.weight
    w.copy_((w.to(a0.dtype) + lora.scaling * (b0 @ a0)).to(w.dtype))
    del lora.init_A, lora.init_B


def converted_config(cfg: LoraConfig) -> LoraConfig:
    """The plain rank-``2r`` LoRA config a PiSSA adapter is saved as (the same scale ``s`` per module:
    every rank doubled, every alpha x 2, or x sqrt(2) with rsLoRA)."""
    factor = 2**0.5 if cfg.use_rslora else 2

    def scaled(a: float) -> float:
        a = a * factor
        return int(a) if float(a).is_integer() else a

    return dataclasses.replace(cfg, r=2 * cfg.r, lora_alpha=scaled(cfg.lora_alpha), init_lora_weights=True,
                               rank_pattern={k: 2 * v for k, v in cfg.rank_pattern.items()},
                               alpha_pattern={k: scaled(v) for k, v in cfg.alpha_pattern.items()})


def convert(tensors: dict[str, torch.Tensor], init: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{key.lora_A.weight: [A; -A0], key.lora_B.weight: [B, B0]}`` from the trained ``A``/``B`` and each
    module's ``(A0, B0)`` (``init``, by module key)."""
    out = {}
    for key, (a0, b0) in init.items():
        a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        out[f"{key}.lora_A.weight"] = torch.cat([a, -a0.to(a)], 0)
        out[f"{key}.lora_B.weight"] = torch.cat([b, b0.to(b)], 1)
    return out


def split(tensors: dict[str, torch.Tensor], rank_of) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """The inverse of ``convert``: the trained tensors and each module key's ``(A0, B0)``; ``rank_of(key)``:
    the trained rank of the module whose tensors start with ``key``."""
    trained, init = {}, {}
    for k, t in tensors.items():
        if k.endswith(".lora_A.weight"):
            key = k[: -len(".lora_A.weight")]
            r = rank_of(key)
            trained[k] = t[:r]
            init.setdefault(key, [None, None])[0] = -t[r:]
        elif k.endswith(".lora_B.weight"):
            key = k[: -len(".lora_B.weight")]
            r = rank_of(key)
            trained[k] = t[:, :r]
            init.setdefault(key, [None, None])[1] = t[:, r:]
        else:
            trained[k] = t
    return trained, {k: tuple(v) for k, v in init.items()}
