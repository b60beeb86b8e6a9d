"""How ``moelora train`` spreads one run over processes beyond plain DDP: FSDP2 and DeepSpeed ZeRO.

- **FSDP2** (``train.fsdp: true``, or ``accelerate launch`` with an FSDP config): moelora's own
  ``fully_shard`` of the base and the adapters, one unit per decoder layer (:func:`shard_model`).
- **DeepSpeed ZeRO** (``train.deepspeed``, or ``accelerate launch`` with a DeepSpeed config): accelerate
  wraps the model in a DeepSpeed engine. :func:`deepspeed_config` builds the config it gets. moelora
  still owns the recipe: the batch size, accumulation and clipping come from the ``train`` block
  (a config's ``"auto"`` is filled in, a different number is refused), and the optimizer is torch's
  AdamW over the adapter's parameter groups with moelora's schedule. A config's ``optimizer`` or
  ``scheduler`` section is refused rather than silently ignored.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError

__all__ = ["shard_model", "deepspeed_config", "deepspeed_source", "accelerate_fsdp"]

logger = logging.getLogger(__name__)

ZERO_SHORTHANDS = {"zero1": 1, "zero2": 2, "zero3": 3}


def _truthy(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def accelerate_fsdp() -> bool:
    """True when ``accelerate launch`` was given an FSDP config. moelora then shards with its own
    FSDP2 (``train.fsdp``), which saves and resumes adapters correctly. accelerate is told nothing
    (its FSDP plugin would wrap the model itself)."""
    if not _truthy("ACCELERATE_USE_FSDP"):
        return False
    os.environ.pop("ACCELERATE_USE_FSDP")
    logger.warning("accelerate's FSDP config: moelora shards with its own FSDP2 (train.fsdp: true, one unit per "
                   "decoder layer); the config's other FSDP options (wrap policy, offloading, ...) are not applied")
    return True


def deepspeed_source(configured: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """What to build the DeepSpeed config from: ``train.deepspeed``, else the DeepSpeed config of
    ``accelerate launch`` (its config file, or its ZeRO stage and offload devices), else ``None``."""
    if configured is not None or not _truthy("ACCELERATE_USE_DEEPSPEED"):
        return configured
    file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if file != "none":
        return file
    zero: dict[str, Any] = {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))}
    for part in ("optimizer", "param"):
        device = os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{part.upper()}_DEVICE", "none")
        if device != "none":
            zero[f"offload_{part}"] = {"device": device}
    for name in ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "ACCELERATE_GRADIENT_CLIPPING"):
        if os.environ.get(name, "auto") != "auto":
            logger.warning("%s from the accelerate config is not used: moelora takes the gradient accumulation and "
                           "clipping from train.gradient_accumulation and train.max_grad_norm", name)
    return {"zero_optimization": zero}


def deepspeed_config(source: str | dict[str, Any], *, batch_size: int, gradient_accumulation: int,
                     max_grad_norm: float, world: int) -> dict[str, Any]:
    """The DeepSpeed config of a run: ``source`` is ``zero1``/``zero2``/``zero3``, the path of a
    DeepSpeed JSON config, or the config itself. Raises :class:`ConfigError` naming the problem."""
    where = "train.deepspeed"
    if isinstance(source, str):
        if source in ZERO_SHORTHANDS:
            cfg: Any = {"zero_optimization": {"stage": ZERO_SHORTHANDS[source]}}
        else:
            path = Path(source)
            if not path.is_file():
                raise ConfigError(f"{where}: {source!r} is neither zero1/zero2/zero3 nor an existing DeepSpeed JSON "
                                  "config file")
            where = str(path)
            try:
                cfg = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}: not a valid DeepSpeed JSON config: {e}") from None
    elif isinstance(source, dict):
        cfg = copy.deepcopy(source)
    else:
        raise ConfigError(f"{where} must be zero1/zero2/zero3, a JSON file or a mapping, got {source!r}")
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: a DeepSpeed config is a JSON object, got {type(cfg).__name__}")
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ConfigError(f"{where}: remove its {key!r} section. moelora creates the AdamW optimizer and the "
                              "learning-rate schedule itself, from train.lr, train.weight_decay, train.lr_scheduler "
                              "and train.warmup_steps")
    zero = cfg.get("zero_optimization")
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ConfigError(f"{where}: needs zero_optimization.stage 0, 1, 2 or 3, got {stage!r}")
    ours = {
        "train_micro_batch_size_per_gpu": (batch_size, "train.batch_size"),
        "gradient_accumulation_steps": (gradient_accumulation, "train.gradient_accumulation"),
        "train_batch_size": (batch_size * world * gradient_accumulation,
                             f"train.batch_size x {world} processes x train.gradient_accumulation"),
        "gradient_clipping": (max_grad_norm, "train.max_grad_norm"),
    }
    for key, (value, what) in ours.items():
        given = cfg.get(key, "auto")
        if given != "auto" and given != value:
            raise ConfigError(f"{where}: {key} is {given!r} but {what} is {value}: set it in the train block, or "
                              'write "auto"')
        cfg[key] = value
    cfg["zero_allow_untested_optimizer"] = True  # torch's AdamW over the adapter's parameter groups
    return cfg


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``): one unit per decoder layer, then the rest.

    Every parameter, the frozen base and the adapters alike, is split over the processes and
    gathered one layer at a time in the forward and backward; gradients are reduce-scattered and
    averaged, as DDP averages them. Works over gloo on CPUs and NCCL on GPUs."""
    from torch.distributed.fsdp import fully_shard

    from .inject import decoder_layers

    try:
        layers = list(decoder_layers(model))
    except ValueError:  # an architecture without a layer table: one unit for the whole model
        layers = []
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
