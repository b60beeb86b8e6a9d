"""Attach and detach adapters by module name; per-architecture defaults in one table.

``attach`` wraps the targeted modules of a ``transformers`` causal LM in place, freezes the base,
and installs two hooks on the model: a pre-forward hook that records the padding mask (or the
``token_mask`` of packed rows, which have no attention mask), the prompt span (``prompt_lengths``)
and whether a KV cache already holds the prompt, and a post-forward hook
that adds the router loss to ``outputs.loss`` in training mode. Architectures are recognised by
``config.model_type`` and handled by module names only; no model class is imported.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import pissa
from .config import AdapterConfig, ConfigError, LoraConfig, MiLoraConfig, MixLoraConfig, did_you_mean
from .context import AdapterContext
from .lora import AdaptedLinear, LoraWeights, base_linear
from .pissa import is_pissa

__all__ = ["Architecture", "ARCHITECTURES", "attach", "detach", "set_adapter", "set_backend", "get_context"]


@dataclass(frozen=True)
class Architecture:
    """Where a decoder layer keeps its projections (names under ``layer.self_attn`` / ``layer.mlp``)."""

    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    act_attr: str = "act_fn"  # the FFN's activation module attribute
    fused_gate_up: bool = False  # Phi-3: one ``gate_up_proj``, chunked into (gate, up)

    @property
    def modules(self) -> tuple[str, ...]:
        return self.attention + self.mlp


_LLAMA = Architecture(("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj"))
_PHI3 = Architecture(("qkv_proj", "o_proj"), ("gate_up_proj", "down_proj"), "activation_fn", True)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "phi3": _PHI3,
}


def get_architecture(model: nn.Module) -> Architecture:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"moelora has no architecture entry for model_type {model_type!r} "
            f"(supported: {', '.join(sorted(ARCHITECTURES))}). MixLoRA and MiLoRA need the names of each "
            "decoder layer's attention and FFN projections; plain LoRA/DoRA work on any model when "
            "target_modules is given explicitly."
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None and hasattr(model, "get_decoder"):
        layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected `model.model.layers`)")
    return layers


def get_context(model: nn.Module) -> AdapterContext:
    ctx = getattr(model, "_moelora_ctx", None)
    if ctx is None:
        raise ValueError("this model has no moelora adapter attached (call moelora.attach first)")
    return ctx


# ---------------------------------------------------------------------------------------------
# Model-level hooks


def _past_length(past: Any) -> int:
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    try:  # legacy tuple cache: ((k, v), ...) with k (B, H, S, D)
        return int(past[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


def _prompt_mask(ctx: AdapterContext, ids: Any) -> torch.Tensor | None:
    """The 2-D padding mask of a ``generate`` prefill whose forward got a 4-D mask (static cache),
    from the mask ``generate`` was called with (rows repeated as ``generate`` expands them)."""
    mask = ctx.generate_mask
    if mask is None or ctx.generate_phase != "prefill" or not torch.is_tensor(ids) or ids.shape[1] != mask.shape[1]:
        return None
    if ids.shape[0] != mask.shape[0]:
        if ids.shape[0] % mask.shape[0]:
            return None
        mask = mask.repeat_interleave(ids.shape[0] // mask.shape[0], dim=0)  # beams / return sequences
    return mask


def _checkpointed_layers(model: nn.Module, ctx: AdapterContext) -> frozenset[int]:
    """The decoder layers transformers' gradient checkpointing recomputes in this training forward.

    Routers need non-reentrant checkpointing: the reentrant kind runs the forward without autograd,
    so a router loss would get no gradient (MixLoRA) or the recompute would reach the router's
    graph outside the layer a second time (MiLoRA); both are refused with the fix named.
    LoRA and DoRA train under either kind."""
    try:
        layers = list(decoder_layers(model))
        table = True
    except ValueError:  # plain LoRA on a model without a layer table (no routers there either):
        # transformers' checkpointed modules still need the input-grads switch below
        layers = [m for m in model.modules() if getattr(m, "_gradient_checkpointing_func", None) is not None]
        table = False
    on = frozenset(i for i, layer in enumerate(layers) if getattr(layer, "gradient_checkpointing", False))
    if not on:
        return on
    names = [ctx.current] if ctx.groups is None else [n for n, _ in ctx.groups]
    routed = sorted({ctx.configs[n].method for n in names if n is not None} & {"mixlora", "milora"})
    fn = getattr(layers[min(on)], "_gradient_checkpointing_func", None)
    reentrant = (getattr(fn, "keywords", None) or {}).get("use_reentrant", True) is not False
    if reentrant and not routed and not hasattr(model, "_require_grads_hook") and hasattr(model, "enable_input_require_grads"):
        # reentrant checkpointing passes gradients only to inputs that require them; the frozen
        # embeddings' output does not (transformers 4 does this for PEFT models only)
        model.enable_input_require_grads()
    if routed and reentrant:
        raise ValueError(
            f"{' and '.join(routed)} cannot train under reentrant gradient checkpointing: its router loss would get "
            "no gradient. Enable it with model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
            "{'use_reentrant': False}) (Trainer: gradient_checkpointing_kwargs={'use_reentrant': False})"
        )
    return on if table else frozenset()


def _pre_forward(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    ctx: AdapterContext = module._moelora_ctx
    ctx.begin_forward()
    prompt_lengths = kwargs.pop("prompt_lengths", None)
    if prompt_lengths is not None and not torch.is_tensor(prompt_lengths):
        prompt_lengths = torch.as_tensor(prompt_lengths)
    ctx.prompt_lengths = prompt_lengths
    adapter_names = kwargs.pop("adapter_names", None)
    if adapter_names is None:
        adapter_names = ctx.generate_adapter_names
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if adapter_names is not None and torch.is_tensor(ids) and len(adapter_names) != ids.shape[0]:
        raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {ids.shape[0]} rows")
    ctx.set_groups(adapter_names, ids.device if torch.is_tensor(ids) else torch.device("cpu"))
    if ctx.residual_base is not None and (ctx.current is None if ctx.groups is None else
                                          any(n is None for n, _ in ctx.groups)):
        raise ValueError(f"adapter {ctx.residual_base!r} is PiSSA: the base weights hold its residual, so the base "
                         "model cannot run while it is attached (save it, a plain LoRA, and load that on the base)")
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    token_mask = kwargs.pop("token_mask", None)  # packed rows (collate_packed): no attention mask, only this
    segment_prompt = kwargs.pop("segment_prompt", None)
    segment_prompt_mask = kwargs.pop("segment_prompt_mask", None)
    segment_ids = kwargs.pop("segment_ids", None)
    ctx.segments = None
    if segment_prompt is not None:
        token_segment = segment_ids.reshape(-1)
        ctx.segments = (segment_prompt, segment_prompt_mask.bool(),
                        torch.where(token_segment < 0, segment_prompt.shape[0], token_segment))
    if token_mask is not None:
        mask = token_mask
    elif not (torch.is_tensor(mask) and mask.dim() == 2):
        mask = _prompt_mask(ctx, ids)
    ctx.attention_mask = mask
    ctx.checkpointed_layers = _checkpointed_layers(module, ctx) if module.training and torch.is_grad_enabled() else frozenset()
    # generate()'s decoding steps are known without reading the cache's length (a host sync, and a
    # graph break in a compiled step); its prefill may itself continue a cache the caller passed
    ctx.decoding = ctx.reuse_routing or ctx.generate_phase == "decode" or _past_length(kwargs.get("past_key_values")) > 0
    if not ctx.decoding or ctx.generate_phase == "prefill" or ctx.reuse_routing:  # weight caches are checked again
        ctx.weights_serial += 1
    return args, kwargs


def _post_forward(module: nn.Module, args: tuple, kwargs: dict, outputs: Any) -> Any:
    ctx: AdapterContext = module._moelora_ctx
    if ctx.generate_phase == "prefill":
        ctx.generate_phase = "decode"
        ctx.pin_gates()  # stable addresses for a compiled (CUDA-graphed) decoding step
    if torch.compiler.is_compiling() and not module.training:
        return outputs  # a compiled decoding step: no router loss to report (data-dependent shapes)
    from .methods import router_loss  # local: methods import this module

    names = [ctx.current] if ctx.groups is None else [n for n, _ in ctx.groups]
    losses = {n: router_loss(ctx.configs[n], ctx.records[n]) for n in names if n is not None and ctx.records.get(n)}
    losses = {n: v for n, v in losses.items() if v is not None}
    if not losses:
        return outputs
    loss = sum(losses.values())  # adapters share no parameter: each gets its own loss's gradient
    if isinstance(outputs, tuple):
        if module.training and torch.is_tensor(outputs[0]) and outputs[0].dim() == 0:
            outputs = (outputs[0] + loss.to(outputs[0].dtype), *outputs[1:])
        return outputs
    outputs.router_loss = loss  # an attribute, not a key: Trainer's logits stay untouched
    if ctx.groups is not None:
        outputs.router_losses = losses  # per adapter, for multi-adapter training
    if module.training and getattr(outputs, "loss", None) is not None:
        outputs["loss"] = outputs.loss + loss.to(outputs.loss.dtype)
    return outputs


def _wrap_generate(model: nn.Module, ctx: AdapterContext) -> None:
    original = model.generate

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        inputs = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        ctx.prompt_width = inputs.shape[1] if torch.is_tensor(inputs) and inputs.dim() >= 2 else None
        ctx.generate_phase = "prefill"
        mask = kwargs.get("attention_mask")
        ctx.generate_mask = mask if torch.is_tensor(mask) and mask.dim() == 2 else None
        names = kwargs.pop("adapter_names", None)
        if names is not None:  # per-row adapters; generate expands rows for beams / return sequences
            cfg = kwargs.get("generation_config") or model.generation_config
            repeat = max(kwargs.get("num_beams") or cfg.num_beams or 1, 1) * max(
                kwargs.get("num_return_sequences") or cfg.num_return_sequences or 1, 1
            )
            ctx.generate_adapter_names = [n for n in names for _ in range(repeat)]
        try:
            return original(*args, **kwargs)
        finally:
            ctx.prompt_width = None
            ctx.generate_phase = None
            ctx.generate_mask = None
            ctx.generate_adapter_names = None

    model.generate = generate


def _ensure_context(model: nn.Module) -> AdapterContext:
    ctx = getattr(model, "_moelora_ctx", None)
    if ctx is None:
        ctx = AdapterContext()
        ctx.base_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        model._moelora_ctx = ctx
        model._moelora_hooks = [
            model.register_forward_pre_hook(_pre_forward, with_kwargs=True),
            model.register_forward_hook(_post_forward, with_kwargs=True),
        ]
        if hasattr(model, "generate"):
            _wrap_generate(model, ctx)
    return ctx


# ---------------------------------------------------------------------------------------------
# Attach / detach


def wrap_linear(parent: nn.Module, attr: str, ctx: AdapterContext) -> AdaptedLinear:
    """Wrap ``parent.attr`` in an ``AdaptedLinear`` (once) and return the wrapper."""
    module = getattr(parent, attr)
    if isinstance(module, AdaptedLinear):
        return module
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"cannot adapt {attr!r}: it is a {type(module).__name__}, not nn.Linear "
            "(quantized bases are not supported on this path yet)"
        )
    wrapper = AdaptedLinear(module, ctx)
    setattr(parent, attr, wrapper)
    return wrapper


def new_lora(base: nn.Linear, r: int, scaling: float, dropout: float, num_experts: int = 1) -> LoraWeights:
    """A LoRA on ``base``'s device, float32 unless the base itself is float64."""
    dtype = torch.float64 if base.weight.dtype == torch.float64 else torch.float32
    return LoraWeights(
        base.in_features, base.out_features, r, scaling, dropout, num_experts, device=base.weight.device, dtype=dtype
    )


def resolve_targets(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """The config's target modules, or the architecture default; unknown names are an error."""
    arch = ARCHITECTURES.get(getattr(model.config, "model_type", None))
    if cfg.target_modules is None:
        if arch is None:
            get_architecture(model)  # raises with the list of supported types
        return list(arch.modules)
    targets = list(cfg.target_modules)
    if isinstance(cfg, LoraConfig) and arch is None:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        valid = linear_names
    else:
        valid = list(get_architecture(model).modules)
    for t in targets:
        if t not in valid:
            other = next((m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == t), None)
            if other is not None:
                raise ConfigError(f"cannot adapt {t!r}: it is a {type(other).__name__}, not nn.Linear")
            hint = did_you_mean(t, valid)
            raise ConfigError(
                f"unknown target module {t!r}{hint} for model_type {model.config.model_type!r}; valid names: {valid}"
            )
    return targets


def _freeze_base(model: nn.Module) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(is_adapter_parameter(n))


def is_adapter_parameter(name: str) -> bool:
    return ".adapters." in name or ".moelora_routers." in name


def adapter_of(name: str) -> str | None:
    """The adapter a parameter belongs to (``...adapters.{adapter}.…``), or ``None`` for the base."""
    for holder in (".adapters.", ".moelora_routers.", "moelora_value_heads."):  # (a reward model's value head)
        if holder in name:
            return name.split(holder, 1)[1].split(".", 1)[0]
    return None


def attach(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> nn.Module:
    """Attach an adapter to ``model`` in place, freeze the base, make the adapter active; return ``model``."""
    from .methods import METHODS

    if not isinstance(config, AdapterConfig) or type(config) is AdapterConfig:
        raise TypeError(f"config must be a LoraConfig, MixLoraConfig or MiLoraConfig, got {type(config).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name or "/" in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without '.' or '/', got {adapter_name!r}")
    existing = getattr(model, "_moelora_ctx", None)
    if existing is not None and adapter_name in existing.configs:
        raise ValueError(f"an adapter named {adapter_name!r} is already attached; detach it first or pick another name")
    if existing is not None and existing.configs and (is_pissa(config) or any(map(is_pissa, existing.configs.values()))):
        raise ValueError("a PiSSA adapter replaces the base weights by its residual, so it is its model's only adapter: "
                         f"{list(existing.configs)} already attached" if is_pissa(config) else
                         f"adapter {next(n for n, c in existing.configs.items() if is_pissa(c))!r} is PiSSA (the base "
                         "weights hold its residual): attach other adapters to another copy of the base model, or save "
                         "it (a plain LoRA) and load that")
    cfg = copy.deepcopy(config)
    cfg.target_modules = resolve_targets(model, cfg)
    if isinstance(cfg, MiLoraConfig) and cfg.top_k > len(cfg.target_modules):
        raise ConfigError(f"top_k ({cfg.top_k}) exceeds the number of MiLoRA experts ({len(cfg.target_modules)})")
    if isinstance(cfg, (MixLoraConfig, MiLoraConfig)):
        get_architecture(model)
    cfg.base_model_name_or_path = cfg.base_model_name_or_path or getattr(model.config, "_name_or_path", None) or None
    ctx = _ensure_context(model)
    try:
        METHODS[cfg.method].attach(model, cfg, adapter_name, ctx)
    except Exception:
        _remove(model, adapter_name)
        if not ctx.configs:
            _teardown(model)
        raise
    ctx.configs[adapter_name] = cfg
    ctx.adapter_epoch += 1
    ctx.active = adapter_name
    ctx.residual_base = adapter_name if is_pissa(cfg) else None
    _freeze_base(model)
    model.train(model.training)  # new adapter modules follow the model's train/eval mode
    return model


def _remove(model: nn.Module, adapter_name: str) -> None:
    """Drop every module entry of ``adapter_name``; unwrap wrappers left without adapters."""
    from .methods.mixlora import MixLoraFFN

    for module in list(model.modules()):  # a PiSSA adapter gives the base its weights back first
        if isinstance(module, AdaptedLinear) and adapter_name in module.adapters:
            pissa.restore(base_linear(module), module.adapters[adapter_name].lora)
    for module in list(model.modules()):
        for attr in ("adapters", "moelora_routers"):
            holder = getattr(module, attr, None)
            if isinstance(holder, nn.ModuleDict) and adapter_name in holder:
                del holder[adapter_name]
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, AdaptedLinear) and len(child.adapters) == 0:
                setattr(parent, child_name, child.base_layer)
            elif isinstance(child, MixLoraFFN) and len(child.adapters) == 0:
                setattr(parent, child_name, child.base_mlp)


def detach(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Remove one adapter (or all, with ``None``); with none left the model is its base again."""
    ctx = get_context(model)
    names = list(ctx.configs) if adapter_name is None else [adapter_name]
    for name in names:
        if name not in ctx.configs:
            raise KeyError(f"no adapter named {name!r} (attached: {list(ctx.configs)})")
        _remove(model, name)
        ctx.adapter_epoch += 1
        del ctx.configs[name]
        if ctx.residual_base == name:
            ctx.residual_base = None
        ctx.gates.pop(name, None)
        ctx.gate_buffers = {k: v for k, v in ctx.gate_buffers.items() if k[0] != name}
        ctx.gate_any.pop(name, None)
    if ctx.active not in ctx.configs:
        ctx.active = next(iter(ctx.configs), None)
    if not ctx.configs:
        _teardown(model)
    return model


@torch.no_grad()
def merge_and_unload(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Fold a LoRA or DoRA adapter (default: the active one) into the base weights and remove every
    adapter: the plain ``transformers`` model is returned, ready for ``save_pretrained`` or any
    serving stack, with the adapter's outputs and no adapter cost.

    LoRA: ``W + s B A``; DoRA: ``(m / ||W + s B A||) (W + s B A)`` per output row (the bias is
    unchanged in both). Computed in float32, stored in the base weight's dtype. MixLoRA and MiLoRA
    cannot be merged: which experts apply depends on each token (MixLoRA) or prompt (MiLoRA). Other
    adapters attached to the model are removed too (they were trained on the unmerged base), as
    PEFT's ``merge_and_unload`` does.
    """
    ctx = get_context(model)
    name = ctx.active if adapter_name is None else adapter_name
    if name not in ctx.configs:
        raise KeyError(f"no adapter named {name!r} to merge (attached: {list(ctx.configs)})")
    cfg = ctx.configs[name]
    if not isinstance(cfg, LoraConfig):
        raise ValueError(
            f"adapter {name!r} is {cfg.method}: only LoRA and DoRA merge into the base weights (which "
            f"{'experts' if cfg.method == 'mixlora' else 'modules'} apply depends on the "
            f"{'token' if cfg.method == 'mixlora' else 'prompt'}); serve it unmerged"
        )
    wrappers = [m for m in model.modules() if isinstance(m, AdaptedLinear) and name in m.adapters]
    for wrapper in wrappers:  # check everything before changing anything
        if not base_linear(wrapper).weight.dtype.is_floating_point:
            raise ValueError(f"cannot merge into a quantized base layer ({base_linear(wrapper).weight.dtype}); "
                             "load the base in float16/bfloat16/float32 to merge")
    for wrapper in wrappers:
        entry, base = wrapper.adapters[name], base_linear(wrapper)
        lora = entry.lora
        w = base.weight.to(lora.lora_A.dtype) + lora.merged_weight()  # (out, in)
        if entry.variant is not None:
            w = w * (entry.variant.magnitude / torch.linalg.vector_norm(w, dim=1)).unsqueeze(1)
        base.weight.copy_(w.to(base.weight.dtype))
        if is_pissa(cfg):  # PiSSA: W_res + s B A is the merged weight; nothing to give back on removal
            del lora.init_A, lora.init_B
    return detach(model)


@torch.no_grad()
def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None) -> nn.Module:
    """A new LoRA adapter ``adapter_name`` that combines attached LoRA adapters (PEFT's
    ``add_weighted_adapter``; the new one's scale is 1, ``lora_alpha = r``):

    - ``"cat"``: exact, ``sum_i w_i s_i B_i A_i`` as one LoRA of rank ``sum_i r_i`` (``A`` the scaled
      ``A_i`` stacked, ``B`` the ``B_i`` side by side);
    - ``"svd"``: the best rank-``svd_rank`` (default: the largest ``r_i``) approximation of that sum
      (``B = U_r S_r``, ``A = V_r^T``);
    - ``"linear"``: ``A = sum_i +-sqrt(|w_i s_i|) A_i``, ``B = sum_i sqrt(|w_i s_i|) B_i`` (same ranks only;
      a rough approximation, as PEFT warns).

    LoRA adapters only (not DoRA, MixLoRA, MiLoRA, PiSSA), without per-module ranks, alphas or layers; a
    module some adapters do not target takes the others'. The active adapter does not change."""
    ctx = get_context(model)
    if combination_type not in ("cat", "svd", "linear"):
        raise ValueError(f"combination_type must be cat, svd or linear, got {combination_type!r}")
    if not adapters or len(adapters) != len(weights):
        raise ValueError("give one weight per adapter, and at least one adapter")
    cfgs = []
    for a in adapters:
        if a not in ctx.configs:
            raise KeyError(f"no adapter named {a!r} (attached: {list(ctx.configs)})")
        c = ctx.configs[a]
        if (not isinstance(c, LoraConfig) or c.use_dora or c.is_pissa or c.rank_pattern or c.alpha_pattern
                or c.layers_to_transform is not None):
            raise ValueError(f"adapter {a!r}: only plain LoRA adapters combine (no DoRA, MixLoRA, MiLoRA, PiSSA, "
                             "rank/alpha patterns or layers_to_transform)")
        cfgs.append(c)
    ranks = [c.r for c in cfgs]
    if combination_type == "linear" and len(set(ranks)) > 1:
        raise ValueError(f"combination_type linear needs adapters of one rank, got {ranks}")
    rank = {"cat": sum(ranks), "linear": ranks[0], "svd": svd_rank or max(ranks)}[combination_type]
    targets = sorted({t for c in cfgs for t in c.target_modules})
    active = ctx.active
    attach(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=cfgs[0].lora_dropout, target_modules=targets),
           adapter_name)
    ctx.active = active
    for wrapper in [m for m in model.modules() if isinstance(m, AdaptedLinear) and adapter_name in m.adapters]:
        new = wrapper.adapters[adapter_name].lora
        parts = [(w, wrapper.adapters[a].lora) for a, w in zip(adapters, weights) if a in wrapper.adapters]
        A, B = new.lora_A.data[0], new.lora_B.data[0]  # (rank, in), (out, rank)
        A.zero_()  # (a fresh A is Kaiming-initialised)
        B.zero_()
        if combination_type == "cat":
            at = 0
            for w, lora in parts:
                A[at : at + lora.r] = lora.lora_A[0] * (w * lora.scaling)
                B[:, at : at + lora.r] = lora.lora_B[0]
                at += lora.r
        elif combination_type == "linear":
            for w, lora in parts:
                ws = w * lora.scaling
                A += lora.lora_A[0] * (abs(ws) ** 0.5 * (1 if ws >= 0 else -1))
                B += lora.lora_B[0] * abs(ws) ** 0.5
        else:
            delta = sum(w * lora.scaling * (lora.lora_B[0] @ lora.lora_A[0]) for w, lora in parts)
            U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
            k = min(rank, S.numel())
            B[:, :k] = (U[:, :k] * S[:k]).to(B.dtype)
            A[:k] = Vh[:k].to(A.dtype)
    return model


def _teardown(model: nn.Module) -> None:
    """Remove every trace of moelora: hooks, the context, the generate wrapper; restore requires_grad."""
    from .methods.milora import remove_layer_hooks

    ctx: AdapterContext = model._moelora_ctx
    for h in model._moelora_hooks:
        h.remove()
    remove_layer_hooks(model)
    for n, p in model.named_parameters():
        if n in ctx.base_requires_grad:
            p.requires_grad_(ctx.base_requires_grad[n])
    del model._moelora_ctx, model._moelora_hooks
    model.__dict__.pop("generate", None)


def set_adapter(model: nn.Module, adapter_name: str | None) -> None:
    """Make ``adapter_name`` the active adapter (``None``: run the base model)."""
    ctx = get_context(model)
    if adapter_name is not None and adapter_name not in ctx.configs:
        raise KeyError(f"no adapter named {adapter_name!r} (attached: {list(ctx.configs)})")
    ctx.active = adapter_name


@contextlib.contextmanager
def use_adapter(model: nn.Module, adapter_name: str | None):
    """``with moelora.use_adapter(model, name):`` runs with ``name`` active (``None``: the base model),
    then makes the adapter active before it active again, even after an exception, unless the block
    itself removed it or changed the active adapter."""
    ctx = get_context(model)
    if adapter_name is not None and adapter_name not in ctx.configs:
        raise KeyError(f"no adapter named {adapter_name!r} (attached: {list(ctx.configs)})")
    previous = ctx.active
    ctx.active = adapter_name
    try:
        yield model
    finally:
        if ctx.active == adapter_name and (previous is None or previous in ctx.configs):
            ctx.active = previous


def disable_adapter(model: nn.Module):
    """``with moelora.disable_adapter(model):`` runs the base model (PEFT's ``model.disable_adapter()``,
    e.g. a DPO reference): :func:`use_adapter` with ``None``."""
    return use_adapter(model, None)


def set_recompute(model: nn.Module, enabled: bool) -> None:
    """MixLoRA: recompute the expert part of each FFN in the backward pass instead of keeping its
    ``k`` copies of the hidden activations (default on; off trades that memory for ~3-11% less
    step time, docs/benchmarks.md). No effect on other methods or at inference."""
    for m in model.modules():
        if hasattr(m, "recompute"):
            m.recompute = bool(enabled)


def set_backend(model: nn.Module, backend: str) -> None:
    """Choose the grouped-LoRA kernel by name (``reference``, ``torch``, ``grouped``) for every adapter.

    ``"reference"`` also switches MixLoRA's FFN to the naive per-expert loop (the test oracle).
    """
    from .kernels import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {sorted(BACKENDS)}")
    for m in model.modules():
        if isinstance(m, LoraWeights):
            m.backend = backend
        if hasattr(m, "naive"):
            m.naive = backend == "reference"
