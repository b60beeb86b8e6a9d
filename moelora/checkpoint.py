"""Save and load adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

Layouts (``docs/checkpoints.md``): MixLoRA in MoE-PEFT's (``mixlora.layers.{l}...``, config
``peft_type: "MIXLORA"``), MiLoRA in the layout METHODS.md defines (``milora.layers.{l}...``,
``peft_type: "MILORA"``), LoRA/DoRA in Hugging Face PEFT's (``peft_type: "LORA"``). moelora's own
extras (library version, base model shapes, every hyperparameter, a hash of the weights) live
under the config's ``"moelora"`` key, which the other libraries ignore.

Writes are atomic: a new directory is written beside the target and renamed into place; an
existing adapter directory gets each file written under a temporary name, fsynced, then renamed
over the old one (weights first, config last). The config records the weights' SHA-256, so the
one window a crash could hit (new weights, old config) is detected on load instead of loading a
mismatched pair. Pickled ``adapter_model.bin`` files (MoE-PEFT, the official ``mixlora``) are read
only with ``torch.load(weights_only=True)`` and must be a flat ``{name: tensor}`` dict.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from . import __version__, pissa
from .config import AdapterConfig, ConfigError, LoraConfig, MiLoraConfig, MixLoraConfig
from .inject import attach, decoder_layers, detach, get_context, set_adapter
from .methods import checkpoint_entries
from .pissa import is_pissa

__all__ = ["save_adapter", "load_adapter", "export_mixlora", "CheckpointError"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"


class CheckpointError(ValueError):
    """An adapter directory is missing, corrupt, or does not fit the model; the message says which."""


# ---------------------------------------------------------------------------------------------
# Config <-> checkpoint JSON


def _base_info(model: nn.Module) -> dict[str, Any]:
    c = model.config
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    return {k: getattr(c, k, None) for k in keys}


def _model_act_fn(model: nn.Module) -> str | None:
    c = model.config
    return getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None)


def _int_if_integral(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def checkpoint_config(model: nn.Module, cfg: AdapterConfig) -> dict[str, Any]:
    """The ``adapter_config.json`` dict of ``cfg`` in its method's layout."""
    common = {
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "r": cfg.r,
        "lora_alpha": _int_if_integral(cfg.lora_alpha),
        "lora_dropout": float(cfg.lora_dropout),
        "target_modules": list(cfg.target_modules or []),
        "use_rslora": cfg.use_rslora,
    }
    extras = {"version": __version__, "method": cfg.method, "config": cfg.to_dict(), "base_model": _base_info(model)}
    if isinstance(cfg, LoraConfig):
        d = {"peft_type": "LORA", **common, "use_dora": cfg.use_dora, "bias": "none", "fan_in_fan_out": False,
             "inference_mode": True, "init_lora_weights": True, "rank_pattern": dict(cfg.rank_pattern),
             "alpha_pattern": {k: _int_if_integral(v) for k, v in cfg.alpha_pattern.items()},
             "layers_to_transform": cfg.layers_to_transform, "layers_pattern": None}
    elif isinstance(cfg, MixLoraConfig):
        d = {"peft_type": "MIXLORA", **common, "bias": "none", "use_dora": False,
             "routing_strategy": "mixlora" if cfg.routing == "top_k" else "mixlora-dynamic",
             "num_experts": cfg.num_experts, "act_fn": cfg.act_fn or _model_act_fn(model),
             # floats, never ints: MoE-PEFT / mixlora 0.2.3 assert isinstance(..., float)
             "router_aux_loss_coef": float(cfg.router_aux_loss_coef),
             "router_init_range": float(cfg.router_init_range), "jitter_noise": float(cfg.jitter_noise)}
        if cfg.routing == "top_k":
            d["top_k"] = cfg.top_k
        else:
            d["top_p"], d["temperature"] = float(cfg.top_p), float(cfg.temperature)
        if (cfg.expert_r, cfg.expert_lora_alpha, cfg.expert_lora_dropout) != (None, None, None):
            d["expert_lora"] = {"r": cfg.expert_rank, "lora_alpha": _int_if_integral(cfg.expert_alpha),
                                "lora_dropout": float(cfg.expert_dropout)}
    elif isinstance(cfg, MiLoraConfig):
        d = {"peft_type": "MILORA", **common, "top_k": cfg.top_k, "pooler": cfg.pooler, "activation": cfg.activation,
             "lb_loss_coef": cfg.lb_loss_coef, "router_init_range": cfg.router_init_range,
             "activation_lr_scale": cfg.activation_lr_scale}
    else:  # pragma: no cover - attach only accepts the three
        raise TypeError(type(cfg).__name__)
    d["moelora"] = extras
    return d


def config_from_checkpoint(d: dict[str, Any], where: str) -> AdapterConfig:
    """Rebuild a config from an ``adapter_config.json`` (ours, PEFT's or MoE-PEFT's)."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(d).__name__}")
    ours = d.get("moelora")
    if isinstance(ours, dict) and isinstance(ours.get("config"), dict):
        from .config import METHOD_CONFIGS

        fields = dict(ours["config"])
        method = fields.pop("moelora_method", ours.get("method"))
        if not isinstance(method, str) or method not in METHOD_CONFIGS:
            raise CheckpointError(f"{where}: unknown moelora method {method!r}")
        try:
            return METHOD_CONFIGS[method].from_dict(fields)
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{where}: invalid adapter config: {e}") from e
    peft_type = d.get("peft_type")
    try:
        if peft_type == "LORA":
            return _peft_lora_config(d, where)
        if peft_type == "MIXLORA":
            return _moe_peft_config(d, where)
        if peft_type == "MILORA":
            raise CheckpointError(f"{where}: a MILORA config without its 'moelora' block cannot be rebuilt")
    except (ConfigError, TypeError) as e:  # TypeError: a field of the wrong JSON type
        raise CheckpointError(f"{where}: invalid adapter config: {e}") from e
    raise CheckpointError(f"{where}: unsupported peft_type {peft_type!r} (moelora loads LORA, MIXLORA and MILORA)")


def _require(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise CheckpointError(f"{where}: missing field {key!r}")
    return d[key]


def _check_names(targets: Any, where: str) -> None:
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise CheckpointError(f"{where}: target_modules must be a list of module names, got {targets!r}")


def _peft_lora_config(d: dict[str, Any], where: str) -> LoraConfig:
    targets = _require(d, "target_modules", where)
    if isinstance(targets, str):
        raise CheckpointError(f"{where}: target_modules as a regex ({targets!r}) is not supported; list the names")
    _check_names(targets, where)
    unsupported = {  # options that change what the adapter computes (or which weights it is relative to)
        "modules_to_save": None,
        "fan_in_fan_out": False, "bias": "none", "lora_bias": False, "layer_replication": None,
        "trainable_token_indices": None, "alora_invocation_tokens": None, "use_qalora": False,
        "target_parameters": None, "velora_config": None, "monteclora_config": None, "kasa_config": None,
        "arrow_config": None, "use_bdlora": None,
    }
    for key, default in unsupported.items():
        if d.get(key, default) not in (default, None, {}, [], False, "none"):
            raise CheckpointError(f"{where}: PEFT option {key}={d[key]!r} is not supported by moelora")
    layers = d.get("layers_to_transform")  # (layers_pattern only says where PEFT finds the index: the decoder layers)
    init = d.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq", "lora_ga")):
        raise CheckpointError(f"{where}: init_lora_weights={init!r}: this adapter is relative to a base model that "
                              "its initialisation changed; convert it to a plain LoRA with PEFT first "
                              "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    return LoraConfig(
        r=_require(d, "r", where), lora_alpha=_require(d, "lora_alpha", where), lora_dropout=d.get("lora_dropout", 0.0),
        target_modules=sorted(targets), use_dora=bool(d.get("use_dora", False)),
        use_rslora=bool(d.get("use_rslora", False)), base_model_name_or_path=d.get("base_model_name_or_path"),
        rank_pattern=d.get("rank_pattern") or {}, alpha_pattern=d.get("alpha_pattern") or {},  # checked there
        layers_to_transform=[layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers,
    )


def _moe_peft_config(d: dict[str, Any], where: str) -> MixLoraConfig:
    strategy = _require(d, "routing_strategy", where)
    if strategy not in ("mixlora", "mixlora-dynamic"):
        raise CheckpointError(f"{where}: routing_strategy {strategy!r} is not supported (mixlora, mixlora-dynamic)")
    if d.get("use_dora"):
        raise CheckpointError(f"{where}: MixLoRA with use_dora is not supported (MoE-PEFT does not save the magnitudes)")
    expert = d.get("expert_lora") or {}
    if not isinstance(expert, dict):
        raise CheckpointError(f"{where}: expert_lora must be an object, got {type(expert).__name__}")
    targets = _require(d, "target_modules", where)
    if isinstance(targets, dict):
        targets = [k for k, v in targets.items() if v]
    _check_names(targets, where)
    return MixLoraConfig(
        r=_require(d, "r", where), lora_alpha=_require(d, "lora_alpha", where), lora_dropout=d.get("lora_dropout", 0.0),
        target_modules=list(targets), use_rslora=bool(d.get("use_rslora", False)),
        num_experts=_require(d, "num_experts", where), top_k=d.get("top_k", 2),
        routing="top_k" if strategy == "mixlora" else "top_p", top_p=d.get("top_p", 0.8),
        temperature=d.get("temperature", 0.0), top_p_renormalize=False, router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001),
        router_init_range=d.get("router_init_range", 0.02), jitter_noise=d.get("jitter_noise", 0.0),
        expert_r=expert.get("r"), expert_lora_alpha=expert.get("lora_alpha"),
        expert_lora_dropout=expert.get("lora_dropout"), act_fn=d.get("act_fn"),
        base_model_name_or_path=d.get("base_model_name_or_path"),
    )


# ---------------------------------------------------------------------------------------------
# Files


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_adapter_dir(path: str | os.PathLike, files: dict[str, bytes]) -> None:
    """Write ``files`` (name -> bytes, the config last in iteration order) atomically into ``path``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            for name, data in files.items():
                _fsync_write(tmp / name, data)
            os.rename(tmp, path)
        except BaseException:
            for f in tmp.glob("*"):
                f.unlink()
            tmp.rmdir()
            raise
        _fsync_dir(path.parent)
        return
    for name in files:  # temporaries left by a save that was killed
        for stale in path.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    staged = []
    try:
        for name, data in files.items():
            fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=path)
            os.close(fd)
            staged.append((Path(tmp_name), path / name))
            _fsync_write(Path(tmp_name), data)
        for tmp_file, final in staged:
            os.replace(tmp_file, final)
    finally:
        for tmp_file, _ in staged:
            tmp_file.unlink(missing_ok=True)
    _fsync_dir(path)


def _read_config(path: Path) -> dict[str, Any]:
    f = path / CONFIG_NAME
    if not f.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in {path}")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from e


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    try:
        n = int.from_bytes(data[:8], "little")
        return json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except (ValueError, UnicodeDecodeError, AttributeError):
        return {}


def _read_adapter(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config dict and tensors of an adapter directory.

    moelora's safetensors carry their own config in the metadata. When the SHA-256 recorded in
    ``adapter_config.json`` does not match the weights, a save was interrupted between renaming
    its weights (the commit point) and its config: the weights' own config is the newer one.
    """
    raw = _read_config(path)
    ours = raw.get("moelora") if isinstance(raw, dict) else None
    expected_sha = ours.get("weights_sha256") if isinstance(ours, dict) else None
    st, binf = path / SAFETENSORS_NAME, path / BIN_NAME
    if st.is_file():
        data = st.read_bytes()
        if expected_sha is not None and hashlib.sha256(data).hexdigest() != expected_sha:
            embedded = _safetensors_metadata(data).get("adapter_config")
            if embedded is None:
                raise CheckpointError(
                    f"{st} does not match the SHA-256 recorded in {path / CONFIG_NAME}: the directory holds weights "
                    "and a config from different saves; re-save the adapter"
                )
            raw = json.loads(embedded)
        try:
            return raw, load_safetensors_bytes(data)
        except Exception as e:  # SafetensorError, truncated headers
            raise CheckpointError(f"{st} is not a valid safetensors file: {e}") from e
    if binf.is_file():
        try:
            obj = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors, forbidden globals, truncated files
            raise CheckpointError(f"{binf} could not be read as a plain tensor dict (weights_only=True): {e}") from e
        if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
            raise CheckpointError(f"{binf} is not a flat {{name: tensor}} dict")
        return raw, obj
    raise CheckpointError(f"no {SAFETENSORS_NAME} or {BIN_NAME} in {path}")


def is_hub_id(path: str | os.PathLike) -> bool:
    """Whether ``path`` reads as a hub repository id (``owner/name``) rather than a local path."""
    text = str(path)
    return not Path(path).exists() and text.count("/") == 1 and not text.startswith((".", "/", "~"))


def resolve_adapter_dir(path: str | os.PathLike) -> Path:
    """An adapter directory: ``path`` itself, or a hub id's download (its config and weights only; for
    users with a network, offline it fails fast); ``CheckpointError`` otherwise."""
    return _resolve_dir(path)


def _resolve_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        return p
    text = str(path)
    if is_hub_id(text):
        try:  # a hub id, for users with a network; offline this fails fast
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id=text, allow_patterns=[CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME]))
        except Exception as e:
            raise CheckpointError(f"no adapter directory at {text!r}, and the hub download failed: {e}") from e
    raise CheckpointError(f"no adapter directory at {text!r}")


# ---------------------------------------------------------------------------------------------
# Public API


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors by checkpoint key, on the CPU. Parameters sharded by FSDP2 (DTensors)
    are gathered in full: then every process of the group must call this, in the same order."""
    cfg = _config_of(model, adapter_name)
    out = {}
    for key, p, i in checkpoint_entries(model, cfg, adapter_name):
        t = p.detach()
        if hasattr(t, "full_tensor"):  # a DTensor
            t = t.full_tensor()
        out[key] = (t[i] if i is not None else t).to("cpu").clone().contiguous()
    return out


def _config_of(model: nn.Module, adapter_name: str) -> AdapterConfig:
    ctx = get_context(model)
    if adapter_name not in ctx.configs:
        raise KeyError(f"no adapter named {adapter_name!r} (attached: {list(ctx.configs)})")
    return ctx.configs[adapter_name]


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Save one adapter to ``path`` (a directory) atomically, in its method's checkpoint layout.

    ``tensors``: the adapter's ``adapter_tensors``, when already gathered (sharded training)."""
    cfg = _config_of(model, adapter_name)
    if tensors is None:
        tensors = adapter_tensors(model, adapter_name)
    original = None
    if is_pissa(cfg):  # saved as the plain rank-2r LoRA it is relative to the original base
        from .methods.lora import pissa_initial

        tensors = pissa.convert(tensors, pissa_initial(model, adapter_name))
        cfg, original = pissa.converted_config(cfg), cfg
    config = checkpoint_config(model, cfg)
    if original is not None:
        config["moelora"]["pissa"] = original.to_dict()  # what resuming the training splits it back into
    metadata = {"format": "pt", "adapter_config": json.dumps(config)}  # the weights carry their own config
    weights = save_safetensors_bytes(tensors, metadata=metadata)
    config["moelora"]["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    write_adapter_dir(path, {SAFETENSORS_NAME: weights, CONFIG_NAME: json.dumps(config, indent=2).encode()})


def export_mixlora(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> None:
    """Export a MixLoRA adapter for the official ``mixlora`` 0.2.3 / MoE-PEFT packages.

    Writes their ``adapter_config.json`` (with ``act_fn``) and ``adapter_model.bin`` (a plain tensor
    dict, which is what they read). Note their own limits: ``lora_alpha`` must be an integer and
    ``lora_dropout`` > 0 for ``mixlora`` 0.2.3 to accept the config.
    """
    cfg = _config_of(model, adapter_name)
    if not isinstance(cfg, MixLoraConfig):
        raise TypeError(f"adapter {adapter_name!r} is {cfg.method}, not MixLoRA")
    import io

    buf = io.BytesIO()
    torch.save(adapter_tensors(model, adapter_name), buf)
    config = checkpoint_config(model, cfg)
    config.pop("moelora")
    if config["base_model_name_or_path"] is None:  # mixlora 0.2.3 asserts a string (a model built from a config has no name)
        config["base_model_name_or_path"] = ""
    write_adapter_dir(path, {BIN_NAME: buf.getvalue(), CONFIG_NAME: json.dumps(config, indent=2).encode()})


def read_adapter_config(path: str | os.PathLike) -> AdapterConfig:
    """The config of the adapter directory ``path`` (any format :func:`load_adapter` reads), without
    its weights. A PEFT config whose ``target_modules`` are module paths or a regex needs the model
    to be resolved (:func:`load_adapter` does): its ``target_modules`` is then ``None`` here."""
    where = _resolve_dir(path)
    raw = _read_config(where)
    if _needs_model(raw):
        cfg = config_from_checkpoint({**raw, "target_modules": []}, str(where / CONFIG_NAME))
        cfg.target_modules = None
        return cfg
    return config_from_checkpoint(raw, str(where / CONFIG_NAME))


def _needs_model(d: Any) -> bool:
    """A PEFT LoRA config whose ``target_modules`` are module paths or a regex (``_peft_targets``)."""
    if not isinstance(d, dict) or isinstance(d.get("moelora"), dict) or d.get("peft_type") != "LORA":
        return False
    targets = d.get("target_modules")
    return isinstance(targets, str) or d.get("exclude_modules") not in (None, [], "") or (
        isinstance(targets, list) and any(isinstance(t, str) and "." in t for t in targets))


def _peft_targets(model: nn.Module, d: dict[str, Any], where: str) -> dict[str, Any]:
    """A PEFT LoRA config whose ``target_modules`` are module paths (what PEFT saves for
    ``"all-linear"``) or a regex, or that has ``exclude_modules``, with its targets replaced by the
    projection names they select (less the excluded modules), when they
    select the same projections in every decoder layer (moelora adapts by name); otherwise a
    ``CheckpointError`` naming what differs. PEFT's matching: a regex must match a module's whole
    path, a listed name must equal the path or end it after a dot."""
    import re

    if not _needs_model(d):
        return d
    targets = d["target_modules"]
    keys = {id(m): k for k, m in model.named_modules()}
    layers_key = keys[id(decoder_layers(model))]
    out_key = keys.get(id(model.get_output_embeddings())) if hasattr(model, "get_output_embeddings") else None
    linear = [k.removesuffix(".base_layer") for k, m in model.named_modules() if isinstance(m, nn.Linear)
              and ".adapters." not in k]
    if isinstance(targets, str):
        def chosen(k: str) -> bool:  # PEFT's all-linear: every linear layer but the output one
            return k != out_key if targets == "all-linear" else re.fullmatch(targets, k) is not None
    else:
        def chosen(k: str) -> bool:
            return any(isinstance(t, str) and (k == t or k.endswith("." + t)) for t in targets)
    exclude = d.get("exclude_modules")

    def excluded(k: str) -> bool:  # PEFT's rules again: a regex string, or names / paths
        if isinstance(exclude, str):
            return re.fullmatch(exclude, k) is not None
        return isinstance(exclude, list) and any(isinstance(t, str) and (k == t or k.endswith("." + t)) for t in exclude)

    picked = [k for k in linear if chosen(k) and not excluded(k)]
    outside = [k for k in picked if not k.startswith(layers_key + ".")]
    if outside:
        raise CheckpointError(f"{where}: target_modules {targets!r} adapts {outside[0]!r}, outside the decoder layers "
                              "(not supported by moelora)")
    if not picked:
        raise CheckpointError(f"{where}: target_modules {targets!r} selects no linear module of "
                              f"{type(model).__name__}")
    n_layers = len(decoder_layers(model))
    by_name: dict[str, set[int]] = {}
    for k in picked:
        by_name.setdefault(k.rsplit(".", 1)[-1], set()).add(int(k[len(layers_key) + 1 :].split(".", 1)[0]))
    sets = {frozenset(found) for found in by_name.values()}
    if len(sets) > 1:  # a projection here and another there: not a names x layers product
        name, found = min(by_name.items(), key=lambda kv: (len(kv[1]), kv[0]))
        raise CheckpointError(f"{where}: target_modules {targets!r} adapts {name} in layers {sorted(found)} but "
                              f"other projections in other layers; moelora adapts the same projections in the "
                              "layers it adapts (layers_to_transform)")
    (layers,) = sets
    out = {**{k: v for k, v in d.items() if k != "exclude_modules"}, "target_modules": sorted(by_name)}
    if len(layers) < n_layers:  # some layers only: PEFT's layers_to_transform says the same
        given = d.get("layers_to_transform")
        given = [given] if isinstance(given, int) else given
        out["layers_to_transform"] = sorted(layers if given is None else layers & set(given))
    return out


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Load an adapter directory into ``model`` (attaching it from the saved config if needed).

    Reads moelora's own checkpoints, PEFT LoRA/DoRA adapters and MoE-PEFT/``mixlora`` MixLoRA
    adapters. Every tensor is checked against the model before anything is copied; on any error
    the model is left as it was. Returns ``model`` with the adapter active.
    """
    where = _resolve_dir(path)
    raw, tensors = _read_adapter(where)
    cfg = config_from_checkpoint(_peft_targets(model, raw, str(where / CONFIG_NAME)), str(where / CONFIG_NAME))
    ctx = getattr(model, "_moelora_ctx", None)
    previous_active = ctx.active if ctx is not None else None
    attached_here = ctx is None or adapter_name not in ctx.configs
    if attached_here:
        attach(model, cfg, adapter_name)
    elif is_pissa(ctx.configs[adapter_name]):  # resuming a PiSSA training from its (converted) checkpoint
        tensors = _pissa_tensors(model, adapter_name, raw, tensors, where)
    else:
        _check_same_config(ctx.configs[adapter_name], cfg, adapter_name, where)
    try:
        _assign(model, adapter_name, tensors, where)
    except BaseException:
        if attached_here:
            detach(model, adapter_name)
            if getattr(model, "_moelora_ctx", None) is not None:
                set_adapter(model, previous_active)
        raise
    set_adapter(model, adapter_name)
    return model


def _pissa_tensors(model: nn.Module, name: str, raw: dict[str, Any], tensors: dict[str, torch.Tensor],
                   where: Path) -> dict[str, torch.Tensor]:
    """A converted PiSSA checkpoint split back into the attached PiSSA adapter's ``A``/``B``, after
    checking that it was saved from the same settings and the same initial ``A0``/``B0``."""
    from .methods.lora import pissa_initial

    saved = raw.get("moelora", {}).get("pissa") if isinstance(raw.get("moelora"), dict) else None
    if not isinstance(saved, dict):
        raise CheckpointError(f"adapter {name!r} is attached as a PiSSA adapter, but {where} is not a PiSSA "
                              "checkpoint; load it on the base model (detach the PiSSA adapter first)")
    try:
        original = LoraConfig.from_dict(saved)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{where}: invalid PiSSA config: {e}") from e
    _check_same_config(get_context(model).configs[name], original, name, where)
    from .methods.lora import PEFT_PREFIX

    trained, init = pissa.split(tensors, lambda key: original.module_rank_alpha(key.removeprefix(PEFT_PREFIX))[0])
    mine = pissa_initial(model, name)
    if init.keys() != mine.keys() or any(
            not torch.equal(init[k][0].to(mine[k][0].dtype), mine[k][0])
            or not torch.equal(init[k][1].to(mine[k][1].dtype), mine[k][1]) for k in mine):
        raise CheckpointError(f"{where}: its PiSSA initialisation (A0, B0) differs from the one just computed from "
                              "this base model: another base, or another seed for pissa_niter's random start")
    return trained


def _check_same_config(attached: AdapterConfig, saved: AdapterConfig, name: str, where: Path) -> None:
    """Loading into an attached adapter only replaces weights: its settings must be the saved ones."""
    if attached.method != saved.method:
        raise CheckpointError(f"adapter {name!r} is attached as {attached.method}, but {where} holds a {saved.method} adapter")
    a, b = attached.to_dict(), saved.to_dict()
    a.pop("base_model_name_or_path"), b.pop("base_model_name_or_path")
    if isinstance(saved, LoraConfig):  # PEFT sorts target names; order means nothing for LoRA
        a["target_modules"], b["target_modules"] = sorted(a["target_modules"]), sorted(b["target_modules"])
    diff = [k for k in a if a[k] != b.get(k)]
    if diff:
        details = ", ".join(f"{k}: attached {a[k]!r} vs saved {b.get(k)!r}" for k in diff)
        raise CheckpointError(
            f"adapter {name!r} is attached with other settings than {where} ({details}); "
            "detach it first or load under another adapter_name"
        )


def _assign(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor], where: Path) -> None:
    cfg = get_context(model).configs[adapter_name]
    entries = checkpoint_entries(model, cfg, adapter_name)
    expected = {key for key, _, _ in entries}
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise CheckpointError(
            f"{where}: {len(missing)} tensors the model needs are missing from the checkpoint, "
            f"e.g. {sorted(missing)[:3]} (saved for a different base or layer count?)"
        )
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"{where}: {len(unexpected)} checkpoint tensors match nothing in the model, e.g. {sorted(unexpected)[:3]}"
        )
    for key, p, i in entries:  # validate everything before copying anything
        want = tuple(p.shape[1:]) if i is not None else tuple(p.shape)
        got = tuple(tensors[key].shape)
        if want != got:
            raise CheckpointError(
                f"{where}: tensor {key} has shape {list(got)} in the checkpoint but the model expects {list(want)} "
                "(an adapter saved for a different base model or rank?)"
            )
        if not tensors[key].is_floating_point():
            raise CheckpointError(f"{where}: tensor {key} has dtype {tensors[key].dtype}, expected floating point")
    with torch.no_grad():
        for key, p, i in entries:
            (p[i] if i is not None else p).copy_(tensors[key])
