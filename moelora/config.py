"""Method configurations: typed, validated dataclasses saved as JSON beside the weights.

Each config knows its ``method`` name and converts to and from the ``adapter_config.json`` of its
checkpoint layout (see ``docs/checkpoints.md``). Unknown keys are refused with the nearest valid
name, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["LoraConfig", "MixLoraConfig", "MiLoraConfig", "AdapterConfig", "config_from_dict"]

POOLERS = ("attention", "last", "mean", "max")
ACTIVATIONS = ("rational", "gelu", "relu", "identity")
ROUTINGS = ("top_k", "top_p")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the problem."""


def did_you_mean(name: object, valid, cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the nearest valid name, or ``""``: every "unknown X" error uses it."""
    close = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=cutoff)
    return f" (did you mean '{close[0]}'?)" if close else ""



@dataclass
class AdapterConfig:
    """Fields shared by every method. Not used directly: pick a method's config."""

    method: ClassVar[str] = ""

    r: int = 16
    """LoRA rank (per expert for the mixtures)."""
    lora_alpha: float = 32
    """LoRA scale numerator: the delta is scaled by ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input, active in ``train()`` only."""
    target_modules: list[str] | None = None
    """Module names to adapt (``q_proj``...); ``None`` takes the architecture's default (all of them)."""
    use_rslora: bool = False
    """Rank-stabilised scale ``alpha / sqrt(r)``."""
    base_model_name_or_path: str | None = None
    """Filled in by ``attach`` from the model; saved for reference."""

    def __post_init__(self) -> None:
        self._check_int("r", self.r, minimum=1)
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool) or self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.target_modules is not None:
            if not isinstance(self.target_modules, (list, tuple)) or not all(
                isinstance(t, str) and t for t in self.target_modules
            ):
                raise ConfigError(f"target_modules must be a list of module names, got {self.target_modules!r}")
            if len(set(self.target_modules)) != len(self.target_modules):
                raise ConfigError(f"target_modules has duplicates: {self.target_modules}")
            self.target_modules = list(self.target_modules)

    @staticmethod
    def _check_int(name: str, value: Any, minimum: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")

    @staticmethod
    def _check_number(name: str, value: Any, *, optional: bool = False) -> None:
        if optional and value is None:
            return
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            raise ConfigError(f"{name} must be a number, got {value!r}")

    def _check_numbers(self, *names: str, optional: tuple[str, ...] = ()) -> None:
        for n in names:
            self._check_number(n, getattr(self, n))
        for n in optional:
            self._check_number(n, getattr(self, n), optional=True)

    def scaling(self, r: int | None = None, alpha: float | None = None) -> float:
        r = self.r if r is None else r
        alpha = self.lora_alpha if alpha is None else alpha
        return alpha / (r**0.5) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` fields (method-specific layout, plus every hyperparameter)."""
        d = dataclasses.asdict(self)
        d["moelora_method"] = self.method
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        d = dict(d)
        method = d.pop("moelora_method", cls.method)
        if method != cls.method:
            raise ConfigError(f"this is a {method!r} config, not {cls.method!r} ({cls.__name__})")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in names]
        if unknown:
            k = unknown[0]
            raise ConfigError(f"unknown {cls.__name__} field '{k}'{did_you_mean(k, names)}")
        return cls(**d)


@dataclass
class LoraConfig(AdapterConfig):
    """Plain LoRA (Hu et al. 2021), or DoRA (Liu et al. 2024) with ``use_dora=True``.

    Saved in Hugging Face PEFT's layout, so PEFT loads ours and we load PEFT's.
    """

    method: ClassVar[str] = "lora"
    use_dora: bool = False
    """Weight-decomposed LoRA: ``W' = m * (W + s B A) / ||W + s B A||_row`` with a trained magnitude ``m``."""
    init_lora_weights: bool | str = True
    """PEFT's names. ``True``: ``A`` Kaiming-uniform, ``B = 0``; ``"gaussian"``: ``A ~ N(0, 1/r)``,
    ``B = 0``; ``"pissa"`` (exact SVD) or ``"pissa_niter_N"`` (``torch.svd_lowrank``, N subspace
    iterations): PiSSA (Meng et al. 2024), ``B A`` the top-``r`` singular part of ``W / s`` and the
    base weight replaced by the residual ``W - s B A``; saved as a plain rank-``2r`` LoRA relative to
    the original base (``moelora.pissa``). Not with ``use_dora``."""

    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    """PEFT's: module paths or regexes -> their rank instead of ``r`` (a pattern matches a module's
    path when it ends it after a dot, ``(.*\\.)?pattern$``; the first matching pattern wins)."""
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    """PEFT's: the same, for ``lora_alpha``."""
    layers_to_transform: list[int] | None = None
    """PEFT's: only the decoder layers of these indices get the LoRA (None: every layer)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
            patterns = getattr(self, name)
            if not isinstance(patterns, dict):
                raise ConfigError(f"{name} must map module paths or regexes to numbers, got {patterns!r}")
            for key, value in patterns.items():
                try:
                    re.compile(key)
                except (re.error, TypeError) as e:
                    raise ConfigError(f"{name} key {key!r} is not a regular expression: {e}") from None
                if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
                    raise ConfigError(f"{name}[{key!r}] must be a positive {'integer' if kind is int else 'number'}, "
                                      f"got {value!r}")
        layers = self.layers_to_transform
        if layers is not None and (not isinstance(layers, list) or not layers or len(set(layers)) != len(layers)
                                   or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
            raise ConfigError(f"layers_to_transform must be a list of distinct layer indices >= 0, got {layers!r}")
        init = self.init_lora_weights
        if init is not True and init != "gaussian" and pissa_iterations(init) is None:
            raise ConfigError(f"init_lora_weights must be true, 'gaussian', 'pissa' or 'pissa_niter_N' (N >= 1), "
                              f"got {init!r}")
        if self.use_dora and self.is_pissa:
            raise ConfigError("init_lora_weights: PiSSA is for LoRA, not DoRA (use_dora: false)")

    @property
    def is_pissa(self) -> bool:
        return pissa_iterations(self.init_lora_weights) is not None

    def module_rank_alpha(self, path: str) -> tuple[int, float]:
        """The rank and alpha of the module at ``path`` (``rank_pattern``/``alpha_pattern``, PEFT's matching)."""
        def lookup(patterns: dict, default):
            key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", path)), None)
            return default if key is None else patterns[key]

        return lookup(self.rank_pattern, self.r), lookup(self.alpha_pattern, self.lora_alpha)


def pissa_iterations(init: Any) -> int | None:
    """``init_lora_weights``' PiSSA form: 0 for ``"pissa"`` (exact SVD), N for ``"pissa_niter_N"``; else None."""
    if init == "pissa":
        return 0
    if isinstance(init, str) and init.startswith("pissa_niter_") and init[12:].isdigit() and int(init[12:]) >= 1:
        return int(init[12:])
    return None


@dataclass
class MixLoraConfig(AdapterConfig):
    """MixLoRA (Li et al., arXiv 2404.15159): top-k mixture of LoRA experts in each FFN.

    Attention projections get an ordinary LoRA; each FFN becomes ``num_experts`` copies of the
    frozen FFN, each with its own LoRA on the targeted FFN projections, chosen per token by a
    router. See ``moelora.methods.mixlora`` for the equations.
    """

    method: ClassVar[str] = "mixlora"
    num_experts: int = 8
    top_k: int = 2
    routing: str = "top_k"
    """``top_k`` (MixLoRA's Mixtral routing) or ``top_p`` (MoE-PEFT's ``mixlora-dynamic``)."""
    top_p: float = 0.8
    temperature: float = 0.0
    """``top_p`` routing only: divide the probabilities by this before selection (0 = off), as MoE-PEFT."""
    top_p_renormalize: bool = True
    """``top_p`` routing only: renormalise the selected weights to sum to 1 (False = MoE-PEFT's raw
    probabilities, which scale the FFN output down; used for imported MoE-PEFT dynamic adapters)."""
    router_aux_loss_coef: float = 0.001
    router_init_range: float = 0.02
    jitter_noise: float = 0.0
    """Multiplicative jitter ``x * U(1-eps, 1+eps)`` on the router input, training only."""
    expert_r: int | None = None
    """Rank of the expert LoRAs (default ``r``); the attention LoRAs keep ``r``."""
    expert_lora_alpha: float | None = None
    expert_lora_dropout: float | None = None
    act_fn: str | None = None
    """The experts' FFN activation (a ``transformers`` ACT2FN name, as MoE-PEFT's ``act_fn``);
    ``None`` uses the FFN's own activation (and exports its name)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_numbers("top_p", "temperature", "router_aux_loss_coef", "router_init_range", "jitter_noise",
                            optional=("expert_lora_alpha", "expert_lora_dropout"))
        self._check_int("num_experts", self.num_experts, minimum=1)
        if self.routing not in ROUTINGS:
            raise ConfigError(f"routing must be one of {ROUTINGS}, got {self.routing!r}{did_you_mean(str(self.routing), list(ROUTINGS))}")
        self._check_int("top_k", self.top_k, minimum=1)
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k ({self.top_k}) must not exceed num_experts ({self.num_experts})")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.router_aux_loss_coef < 0:
            raise ConfigError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef!r}")
        if self.router_init_range < 0:
            raise ConfigError(f"router_init_range must be >= 0, got {self.router_init_range!r}")
        if not 0.0 <= self.jitter_noise < 1.0:
            raise ConfigError(f"jitter_noise must be in [0, 1), got {self.jitter_noise!r}")
        if self.expert_r is not None:
            self._check_int("expert_r", self.expert_r, minimum=1)
        if self.expert_lora_alpha is not None and self.expert_lora_alpha <= 0:
            raise ConfigError(f"expert_lora_alpha must be positive, got {self.expert_lora_alpha!r}")
        if self.act_fn is not None:
            from transformers.activations import ACT2FN

            if self.act_fn not in ACT2FN:
                raise ConfigError(f"unknown act_fn {self.act_fn!r}{did_you_mean(str(self.act_fn), list(ACT2FN))}")
        if self.expert_lora_dropout is not None and not 0.0 <= self.expert_lora_dropout < 1.0:
            raise ConfigError(f"expert_lora_dropout must be in [0, 1), got {self.expert_lora_dropout!r}")

    @property
    def expert_rank(self) -> int:
        return self.r if self.expert_r is None else self.expert_r

    @property
    def expert_alpha(self) -> float:
        return self.lora_alpha if self.expert_lora_alpha is None else self.expert_lora_alpha

    @property
    def expert_dropout(self) -> float:
        return self.lora_dropout if self.expert_lora_dropout is None else self.expert_lora_dropout


@dataclass
class MiLoraConfig(AdapterConfig):
    """MiLoRA (Zhang et al., EMNLP 2024 Findings): every LoRA module of a layer is an expert.

    Not the other "MiLoRA" (minor singular components, arXiv 2406.09044). A prompt-aware router per
    layer picks ``top_k`` of the layer's LoRA modules once per prompt; see
    ``moelora.methods.milora``.
    """

    method: ClassVar[str] = "milora"
    r: int = 32
    lora_alpha: float = 64
    top_k: int = 3
    pooler: str = "attention"
    activation: str = "rational"
    lb_loss_coef: float = 0.01
    router_init_range: float = 0.02
    activation_lr_scale: float = 0.01
    """Learning-rate multiplier for the rational activation's coefficients (see ``param_groups``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_numbers("lb_loss_coef", "router_init_range", "activation_lr_scale")
        self._check_int("top_k", self.top_k, minimum=1)
        if self.target_modules is not None and self.top_k > len(self.target_modules):
            raise ConfigError(
                f"top_k ({self.top_k}) must not exceed the number of experts "
                f"(len(target_modules) = {len(self.target_modules)})"
            )
        if self.pooler not in POOLERS:
            raise ConfigError(f"unknown pooler {self.pooler!r}{did_you_mean(str(self.pooler), list(POOLERS))}; choose from {POOLERS}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"unknown activation {self.activation!r}{did_you_mean(str(self.activation), list(ACTIVATIONS))}; choose from {ACTIVATIONS}"
            )
        if self.lb_loss_coef < 0:
            raise ConfigError(f"lb_loss_coef must be >= 0, got {self.lb_loss_coef!r}")
        if self.activation_lr_scale <= 0:
            raise ConfigError(f"activation_lr_scale must be positive, got {self.activation_lr_scale!r}")


METHOD_CONFIGS: dict[str, type[AdapterConfig]] = {c.method: c for c in (LoraConfig, MixLoraConfig, MiLoraConfig)}


def config_from_dict(d: dict[str, Any]) -> AdapterConfig:
    """Build a config from a ``{"type": method, **fields}`` dict (the CLI's ``method:`` block)."""
    if not isinstance(d, dict):
        raise ConfigError(f"the method block must be a mapping like {{type: lora, r: 8}}, got {type(d).__name__}")
    d = dict(d)
    kind = d.pop("type", None)
    if kind == "dora":
        d["use_dora"] = True
        kind = "lora"
    if not isinstance(kind, str) or kind not in METHOD_CONFIGS:  # (a list or mapping is not hashable)
        names = [*METHOD_CONFIGS, "dora"]
        raise ConfigError(f"unknown method type {kind!r}{did_you_mean(str(kind), names)}; choose from {names}")
    return METHOD_CONFIGS[kind].from_dict(d)

