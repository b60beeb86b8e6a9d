"""The YAML run configuration of ``moelora train`` (typed, validated, overridable from the command line).

```yaml
model: path/or/hub-id        # default: the embedded SmolLM2-135M-Instruct
method: {type: mixlora, num_experts: 8, top_k: 2, r: 16, lora_alpha: 32}
data:
  - {path: data/train.json, format: llm-adapters, weight: 1.0}
train: {max_steps: 100, num_epochs: 1, batch_size: 8, gradient_accumulation: 1, lr: 2.0e-4,
        warmup_steps: 0, cutoff_len: 512, save_steps: 50, seed: 42, precision: auto}
output_dir: runs/example
eval: {data: [path/test.json], protocol: choice, limit: 100}   # optional, run after training
```
Every key can be overridden after the config as ``train.max_steps=20``, ``method.top_k=1``,
``data.0.weight=2`` (values are parsed as YAML). Unknown keys are refused with the nearest valid
name; wrong types name the key. Relative data paths are resolved against the working directory,
then against the config file's directory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import llamafactory as lf
from .checkpoint import CheckpointError, read_adapter_config
from .config import AdapterConfig, ConfigError, config_from_dict, did_you_mean
from .data import STAGES, DataSource
from .engine import ADAPTER_NAME
from .evaluate import PROTOCOLS
from .llamafactory import expand
from .preference import PREF_LOSSES

__all__ = ["TrainConfig", "EvalConfig", "RunConfig", "load_run_config", "apply_overrides"]

OPTIMIZERS = ("adamw", "adamw_torch", "adamw_torch_fused", "sgd", "adafactor", "adamw_8bit", "paged_adamw_8bit",
              "paged_adamw_32bit")


@dataclass
class TrainConfig:
    max_steps: int = -1
    """Optimizer steps; -1 runs ``num_epochs`` epochs."""
    num_epochs: int | float = 1
    """Epochs when ``max_steps`` is -1; a fraction (``0.5``, ``1.5``) runs that share of the steps,
    rounded up (as HF's Trainer's ``num_train_epochs``)."""
    batch_size: int = 8
    """Examples per device per micro-step (the global batch is this x processes x accumulation)."""
    gradient_accumulation: int = 1
    lr: float = 2.0e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of the run's optimizer steps, rounded up (HF's and LLaMA-Factory's
    ``warmup_ratio``), when ``warmup_steps`` is 0."""
    lr_scheduler: str = "linear"
    """linear (warm-up then linear decay to 0), cosine, or constant (after warm-up)."""
    optim: str = "adamw"
    """The optimizer (HF's and LLaMA-Factory's ``optim`` names): ``adamw`` (= ``adamw_torch``),
    ``adamw_torch_fused``, ``sgd``, ``adafactor`` (transformers', with a fixed lr), or through
    bitsandbytes on a GPU ``adamw_8bit``, ``paged_adamw_8bit``, ``paged_adamw_32bit``."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    """Gradient clipping; 0 disables it."""
    cutoff_len: int = 512
    save_steps: int = 50
    """Checkpoint every this many optimizer steps (0: only the final adapter)."""
    save_total_limit: int = 3
    """Checkpoints kept (the newest); 0 keeps all."""
    log_steps: int = 1
    seed: int = 42
    precision: str = "auto"
    """auto (bf16 on a GPU that has it, else fp32), fp32, bf16 or fp16."""
    fsdp: bool = False
    """Shard the frozen base and the adapters over the processes (FSDP2, one unit per decoder
    layer) instead of replicating them (DDP); no effect in a single process."""
    deepspeed: str | dict[str, Any] | None = None
    """DeepSpeed ZeRO (``pip install 'moelora[deepspeed]'``): ``zero1``, ``zero2``, ``zero3``, the path of a
    DeepSpeed JSON config, or the config inline. Its batch size, accumulation and clipping come from
    this block (``"auto"``); moelora's AdamW and schedule are used. ``accelerate launch`` with a
    DeepSpeed config turns it on too. One adapter per run."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in the backward instead of keeping its activations
    (transformers' non-reentrant activation checkpointing): less memory, about one more forward."""
    loraplus_lr_ratio: float = 0.0
    """LoRA+ (Hayou et al. 2024; LLaMA-Factory's ``loraplus_lr_ratio``): every ``lora_B`` (attention
    LoRAs, experts, MiLoRA modules) learns with ``lr x`` this ratio (the paper suggests 16); 0: off."""
    neftune_noise_alpha: float = 0.0
    """NEFTune (Jain et al. 2023; transformers' and LLaMA-Factory's ``neftune_noise_alpha``): while
    training, uniform noise of magnitude ``alpha / sqrt(seq_len x hidden)`` on the input embeddings
    (5 in the paper); 0: off."""
    packing: bool = False
    """Pack several examples into each row of up to ``cutoff_len`` tokens, each attending to itself
    only (LLaMA-Factory's ``neat_packing``): ``batch_size`` then counts packed rows. MiLoRA routes
    each example on its own prompt (when it trains alone: not in a run of several adapters)."""
    val_size: float = 0.0
    """Examples kept out of training for the validation loss (LLaMA-Factory's ``val_size``): a
    fraction ``0 < v < 1`` of every data source, or a count ``>= 1`` split over the sources by size
    (deterministic in ``seed``); 0: none. Files given under ``val_data`` are validated too."""
    eval_steps: int = 0
    """With validation examples: the validation loss every this many optimizer steps, and always after
    the last step (0: after the last step only)."""
    early_stopping_patience: int = 0
    """Stop when the validation loss has not improved for this many validations in a row (with several
    adapters: for every adapter); 0: never."""
    load_best_model_at_end: bool = False
    """The final adapter is the one of the validation with the lowest loss (kept in ``output_dir/best``
    as it improves), not the last step's."""
    train_on_prompt: bool = False
    """The loss on the prompt tokens too, not only the response's (LLaMA-Factory's ``train_on_prompt``;
    supervised training only)."""
    report_to: list[str] | str = field(default_factory=lambda: ["tensorboard"])
    """Where the metrics go besides ``metrics.jsonl``: ``tensorboard`` (``output_dir/tensorboard``),
    ``wandb`` (Weights & Biases: ``pip install wandb``; the project is ``$WANDB_PROJECT``, default
    ``moelora``; ``WANDB_MODE=offline`` works without a network), or ``[]`` / ``none``."""
    run_name: str | None = None
    """The W&B run's name (default: the output directory's name)."""
    eval_batch_size: int | None = None
    """Examples (pairs with ``stage: dpo``) per validation batch and process; default ``batch_size``."""
    stage: str = "sft"
    """``sft`` (supervised: the loss on the responses), ``rm`` (a reward model on preference pairs:
    a value head on the adapted model, ``moelora.reward``), ``dpo`` (preference pairs: LLaMA-Factory's
    ``stage: dpo``, with the loss of ``pref_loss``; the data give ``chosen``/``rejected`` responses, see
    ``moelora.data``; the reference is the base model, adapters off) or ``kto`` (responses labelled
    desirable or not, ``kto_tag``/``label``: LLaMA-Factory's ``stage: kto``, TRL's KTO loss)."""
    pref_loss: str = "sigmoid"
    """``stage: dpo``: ``sigmoid`` (DPO), ``hinge``, ``ipo``, ``kto_pair``, ``orpo`` or ``simpo`` (the last
    two need no reference forward); the definitions are in ``moelora.preference``."""
    pref_beta: float = 0.1
    """``stage: dpo``: the loss's beta (DPO's KL coefficient)."""
    pref_ftx: float = 0.0
    """``stage: dpo``: add this multiple of the chosen responses' SFT loss (mean token NLL); 0: off."""
    simpo_gamma: float = 0.5
    """``pref_loss: simpo``: the target reward margin."""
    kto_chosen_weight: float = 1.0
    """``stage: kto``: the weight of the desirable examples' losses (LLaMA-Factory's name)."""
    kto_rejected_weight: float = 1.0
    """``stage: kto``: the weight of the undesirable examples' losses."""
    dpo_label_smoothing: float = 0.0
    """``pref_loss: sigmoid``: the probability that a pair's preference is flipped (conservative DPO;
    LLaMA-Factory's ``dpo_label_smoothing``), in [0, 0.5); 0: off."""
    value_head_dropout: float = 0.1
    """``stage: rm``: the value head's dropout (TRL's ``summary_dropout_prob``)."""
    ref_adapter: str | None = None
    """``stage: dpo``: the reference is the base model with this saved adapter (frozen) instead of the
    base model alone (LLaMA-Factory's ``ref_model_adapters``; e.g. the SFT adapter the run starts
    from, as the DPO paper's reference is the SFT model)."""


@dataclass
class EvalConfig:
    data: list[str] = field(default_factory=list)
    protocol: str = "choice"
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    """``generate`` / ``generate-options``: tokens to generate (default 32, or 256 for numeric answers)."""
    num_beams: int = 1
    compare_base: bool = True
    """Also evaluate the base model (adapter off) and print both."""


@dataclass
class RunConfig:
    model: str | None = None
    method: dict[str, Any] = field(default_factory=lambda: {"type": "mixlora"})
    data: list[DataSource] = field(default_factory=list)
    val_data: list[DataSource] = field(default_factory=list)
    """Validation files (the ``data`` entries' form; weights are ignored): their LM loss is logged
    every ``train.eval_steps``, besides the examples ``train.val_size`` keeps out of ``data``."""
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/example"
    eval: EvalConfig | None = None
    quantization: str | None = None
    """``4bit`` / ``8bit``: load the frozen base through bitsandbytes (QLoRA-style; CUDA only)."""
    adapters: dict[str, dict[str, Any]] | None = None
    """Several adapters trained together on one base (name -> method block; replaces ``method``)."""
    adapter_name_or_path: str | None = None
    """Start the adapter from this saved one (LLaMA-Factory's ``adapter_name_or_path``: e.g. DPO after
    SFT, or more SFT): its own config is the method (replaces ``method``; one adapter)."""

    def adapter_config(self) -> AdapterConfig:
        if self.adapter_name_or_path is not None:
            try:
                return read_adapter_config(self.adapter_name_or_path)
            except CheckpointError as e:
                raise ConfigError(f"adapter_name_or_path: {e}") from None
        return config_from_dict(self.method)

    def adapter_configs(self) -> dict[str, AdapterConfig]:
        """name -> config of every adapter this run trains (``{"default": method}`` for one)."""
        if self.adapters is None:
            return {"default": self.adapter_config()}
        configs = {}
        for name, block in self.adapters.items():
            if not isinstance(name, str) or not ADAPTER_NAME.match(name):
                raise ConfigError(f"adapters: invalid adapter name {name!r} (1-64 letters, digits, '_' or '-')")
            if not isinstance(block, dict):
                raise ConfigError(f"adapters.{name} must be a method block like {{type: lora, r: 16}}")
            try:
                configs[name] = config_from_dict(block)
            except ConfigError as e:
                raise ConfigError(f"adapters.{name}: {e}") from None
        if not configs:
            raise ConfigError("adapters: give at least one adapter (or use `method` for a single one)")
        return configs


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: PyYAML (YAML 1.1) reads ``1e-3`` and ``2e-4`` as strings, which every
    learning rate in a config would trip over."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and (item is Any or all(_type_ok(v, item) for v in value))
    if origin is dict:
        key, item = typing.get_args(tp) or (Any, Any)
        return isinstance(value, dict) and all((key is Any or _type_ok(k, key)) and (item is Any or _type_ok(v, item))
                                               for k, v in value.items())
    return isinstance(value, tp)


def _build(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            hint = did_you_mean(key, names)
            raise ConfigError(f"unknown key '{where}.{key}'{hint}".replace("'.", "'"))
        tp = hints[key]
        sub = f"{where}.{key}" if where else key
        if tp is TrainConfig or tp == TrainConfig | None:
            kwargs[key] = _build(TrainConfig, value, sub)
        elif tp == EvalConfig | None:
            kwargs[key] = None if value is None else _build(EvalConfig, value, sub)
        elif tp == list[DataSource]:  # the data layer's own type validates each entry (DataError)
            if not isinstance(value, list):
                raise ConfigError(f"{sub} must be a list of {{path, format, weight}} entries")
            kwargs[key] = [DataSource.from_dict(v if isinstance(v, dict) else {"path": v}) for v in value]
        else:
            if isinstance(value, int) and not isinstance(value, bool) and tp is float:
                value = float(value)
            if isinstance(value, float) and value.is_integer() and not _type_ok(value, tp) and _type_ok(0, tp):
                value = int(value)  # `max_steps: 1e3`: YAML 1.2 reads it as a float
            if not _type_ok(value, tp):
                raise ConfigError(f"{sub} must be {getattr(tp, '__name__', tp)}, got {value!r}")
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where or 'config'}: {e}") from None


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML; numeric parts index lists)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = _yaml_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse the value: {e}") from None
        parts = key.split(".")
        node: Any = d
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: no list item {part!r} in {'.'.join(parts[:i])}")
                node = node[int(part)]
            elif isinstance(node, dict):
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            else:
                break
        last = parts[-1]
        if not isinstance(node, (dict, list)):
            where = ".".join(parts[:-1])
            raise ConfigError(f"override {item!r}: {where} is {node!r}, not a mapping or a list with keys to set")
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override {item!r}: no list item {last!r}")
            node[int(last)] = value
        else:
            node[last] = value
    return d


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (or start from defaults with ``path=None``), apply overrides, validate."""
    d: dict[str, Any] = {}
    base_dir = Path.cwd()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            d = _yaml_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys (model, method, data, train, ...)")
        base_dir = p.resolve().parent
    if lf.is_llamafactory(d):  # a LLaMA-Factory YAML: its own keys (and overrides of them) first
        known = set(lf.KEYS) | set(lf.SPECIAL) | set(lf.IGNORED)
        own = [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] in known]
        d = lf.translate(apply_overrides(d, own))
        overrides = [o for o in overrides if o not in own]
    d = apply_overrides(d, list(overrides))
    d = _dataset_info_entries(d, base_dir)
    if d.get("adapters") is not None and "method" in d:
        raise ConfigError("give either `method` (one adapter) or `adapters` (several trained together), not both")
    if d.get("adapter_name_or_path") is not None and ("method" in d or d.get("adapters") is not None):
        raise ConfigError("adapter_name_or_path starts one adapter from a saved one, whose own config is the method: "
                          "remove `method`/`adapters`")
    run = _build(RunConfig, d, "")
    if run.adapter_name_or_path is not None:
        run.adapter_name_or_path = _resolve(run.adapter_name_or_path, base_dir)
    run.adapter_configs()  # validates the method block(s) (or the saved adapter's) now, not after the model is loaded
    t = run.train
    for name in ("batch_size", "gradient_accumulation", "cutoff_len", "log_steps"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    if not 0 < t.num_epochs < float("inf"):
        raise ConfigError(f"train.num_epochs must be > 0, got {t.num_epochs}")
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"train.max_steps must be -1 (use num_epochs) or >= 1, got {t.max_steps}")
    if t.lr <= 0 or t.warmup_steps < 0 or t.save_steps < 0 or t.save_total_limit < 0:
        raise ConfigError("train.lr must be > 0 and warmup_steps, save_steps, save_total_limit >= 0")
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    for name in ("loraplus_lr_ratio", "neftune_noise_alpha"):
        if not getattr(t, name) >= 0:
            raise ConfigError(f"train.{name} must be >= 0 (0: off), got {getattr(t, name)}")
    if t.eval_steps < 0 or t.early_stopping_patience < 0:
        raise ConfigError("train.eval_steps and train.early_stopping_patience must be >= 0 (0: off)")
    if not (0 <= t.val_size < 1 or (t.val_size >= 1 and float(t.val_size).is_integer())):
        raise ConfigError(f"train.val_size must be a fraction in (0, 1) or a whole count >= 1 (0: none), got {t.val_size}")
    if t.packing and run.adapters is not None:
        routed = [n for n, c in run.adapter_configs().items() if c.method == "milora"]
        if routed:
            raise ConfigError(f"train.packing cannot train MiLoRA ({', '.join(routed)}) beside other adapters: a batch "
                              "of several adapters routes each row once; train it alone, or unpacked")
    stages = (*STAGES, "rm")
    if t.stage not in stages:
        raise ConfigError(f"train.stage must be one of {', '.join(stages)}, got {t.stage!r}{did_you_mean(t.stage, stages)}")
    if not 0 <= t.value_head_dropout < 1:
        raise ConfigError(f"train.value_head_dropout must be in [0, 1), got {t.value_head_dropout}")
    if t.stage == "rm":
        for bad, why in ((t.fsdp, "train.fsdp"), (t.deepspeed is not None, "train.deepspeed"),
                         (t.ref_adapter is not None, "train.ref_adapter")):
            if bad:
                raise ConfigError(f"train.stage: rm does not support {why}: train reward models unsharded")
    if t.stage == "kto":
        if t.pref_loss != "sigmoid" or t.dpo_label_smoothing:
            raise ConfigError("train.pref_loss and train.dpo_label_smoothing apply to train.stage: dpo, not kto")
        if t.batch_size < 2:
            raise ConfigError("train.stage: kto estimates its KL term from mismatched examples of each batch: "
                              "train.batch_size must be >= 2")
    if not (t.kto_chosen_weight > 0 and t.kto_rejected_weight > 0):
        raise ConfigError("train.kto_chosen_weight and train.kto_rejected_weight must be > 0")
    if t.pref_loss not in PREF_LOSSES:
        raise ConfigError(f"train.pref_loss must be one of {', '.join(PREF_LOSSES)}, got {t.pref_loss!r}"
                          f"{did_you_mean(t.pref_loss, PREF_LOSSES)}")
    if not t.pref_beta > 0 or not t.pref_ftx >= 0 or not t.simpo_gamma >= 0:
        raise ConfigError("train.pref_beta must be > 0, and train.pref_ftx and train.simpo_gamma >= 0")
    if not 0 <= t.dpo_label_smoothing < 0.5:
        raise ConfigError(f"train.dpo_label_smoothing must be in [0, 0.5), got {t.dpo_label_smoothing}")
    if t.dpo_label_smoothing and t.pref_loss != "sigmoid":
        raise ConfigError(f"train.dpo_label_smoothing applies to pref_loss: sigmoid, not {t.pref_loss}")
    if isinstance(t.report_to, str):  # `report_to: wandb`, as HF and LLaMA-Factory write it
        t.report_to = [t.report_to]
    t.report_to = [x for x in t.report_to if x != "none"]
    for x in t.report_to:
        if x not in ("tensorboard", "wandb"):
            raise ConfigError(f"train.report_to: unknown {x!r}{did_you_mean(x, ('tensorboard', 'wandb'))}; "
                              "valid: tensorboard, wandb, none")
    if "wandb" in t.report_to and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.report_to: wandb needs the wandb package: pip install wandb")
    if t.eval_batch_size is not None and t.eval_batch_size < 1:
        raise ConfigError(f"train.eval_batch_size must be >= 1 (or null: batch_size), got {t.eval_batch_size}")
    if t.ref_adapter is not None and (t.stage == "sft" or (t.stage == "dpo" and t.pref_loss in ("orpo", "simpo"))):
        raise ConfigError(f"train.ref_adapter is the reference of train.stage: kto, and of dpo with pref_loss sigmoid, "
                          f"hinge, ipo or kto_pair (this run: stage {t.stage}, pref_loss {t.pref_loss})")
    if t.stage != "sft" and t.train_on_prompt:
        raise ConfigError(f"train.train_on_prompt applies to supervised training, not train.stage: {t.stage}")
    if t.stage != "sft" and t.packing:
        raise ConfigError(f"train.packing does not apply to train.stage: {t.stage} (each response is compared with "
                          "another one); turn one of them off")
    validating = t.val_size > 0 or bool(run.val_data)
    for name in ("eval_steps", "early_stopping_patience", "load_best_model_at_end"):
        if getattr(t, name) and not validating:
            raise ConfigError(f"train.{name} needs validation data: set train.val_size or give val_data files")
    if t.optim not in OPTIMIZERS:
        raise ConfigError(f"train.optim must be one of {', '.join(OPTIMIZERS)}, got {t.optim!r}"
                          f"{did_you_mean(t.optim, OPTIMIZERS)}")
    if not (0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1 and t.adam_epsilon > 0):
        raise ConfigError("train.adam_beta1 and adam_beta2 must be in [0, 1) and adam_epsilon > 0")
    if t.lr_scheduler not in ("linear", "cosine", "constant"):
        raise ConfigError(f"train.lr_scheduler must be linear, cosine or constant, got {t.lr_scheduler!r}")
    if t.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision must be auto, fp32, bf16 or fp16, got {t.precision!r}")
    if run.quantization not in (None, "4bit", "8bit"):
        raise ConfigError(f"quantization must be 4bit, 8bit or null, got {run.quantization!r}")
    if run.eval is not None and run.eval.protocol not in PROTOCOLS:
        raise ConfigError(f"eval.protocol must be one of {', '.join(PROTOCOLS)}, got {run.eval.protocol!r}")
    for entry in run.data + run.val_data:
        entry.path = _resolve(entry.path, base_dir)
    if t.ref_adapter is not None:
        t.ref_adapter = _resolve(t.ref_adapter, base_dir)
        try:
            read_adapter_config(t.ref_adapter)
        except CheckpointError as e:
            raise ConfigError(f"train.ref_adapter: {e}") from None
    if run.eval is not None:
        run.eval.data = [_resolve(x, base_dir) for x in run.eval.data]
    _check_pissa(run)
    return run


def _check_pissa(run: RunConfig) -> None:
    """PiSSA replaces the base weights by its residual (``moelora.pissa``): what needs the original
    base beside it, or shards or quantizes it, is refused before anything is loaded."""
    if run.adapter_name_or_path is not None:
        return  # a saved adapter is never PiSSA (saved PiSSA adapters are plain LoRAs)
    configs = run.adapter_configs()
    if not any(getattr(c, "is_pissa", False) for c in configs.values()):
        return
    t = run.train
    why = ("several adapters share its base" if len(configs) > 1 else
           f"stage {t.stage} compares it with the base model (its reference)" if t.stage in ("dpo", "kto") else
           "FSDP/DeepSpeed shard the base" if t.fsdp or t.deepspeed else
           f"a {run.quantization} base cannot be decomposed" if run.quantization else None)
    if why:
        raise ConfigError(f"init_lora_weights: PiSSA replaces the base weights by its residual, so not here: {why}")


def _dataset_info_entries(d: dict, base_dir: Path) -> dict:
    """LLaMA-Factory's top-level ``dataset: a,b`` / ``eval_dataset`` / ``dataset_dir`` become ``data`` /
    ``val_data`` entries, and every ``{dataset: NAME, ...}`` entry is looked up in its directory's
    dataset_info.json (``moelora.llamafactory``; directories relative to the working directory, then
    to the config's)."""
    d = dict(d)
    ddir = d.pop("dataset_dir", None)
    for key, target in (("dataset", "data"), ("eval_dataset", "val_data")):
        names = d.pop(key, None)
        if names is None:
            continue
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"{key} must be dataset names of dataset_info.json, as 'a,b' or a list, got {names!r}")
        existing = d.get(target) or []
        if not isinstance(existing, list):
            raise ConfigError(f"{target} must be a list of {{path, format, weight}} entries")
        d[target] = existing + [{"dataset": n, **({"dataset_dir": ddir} if ddir else {})} for n in names]
    named = [e for target in ("data", "val_data") if isinstance(d.get(target), list)
             for e in d[target] if isinstance(e, dict) and "dataset" in e]
    if ddir is not None and not named:
        raise ConfigError("dataset_dir applies to datasets named by `dataset:` (LLaMA-Factory's dataset_info.json)")
    for target in ("data", "val_data"):
        if isinstance(d.get(target), list):
            d[target] = [expand(e, base_dir) if isinstance(e, dict) and "dataset" in e else e for e in d[target]]
    return d


def _resolve(path: str, base_dir: Path) -> str:
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return str(p)
    alt = base_dir / p
    return str(alt) if alt.exists() else str(p)
