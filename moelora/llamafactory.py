"""LLaMA-Factory compatibility: its YAML training configs and its ``dataset_info.json`` datasets.

**Configs.** :func:`translate` turns a LLaMA-Factory training YAML (flat keys: ``model_name_or_path``,
``stage``, ``finetuning_type: lora``, ``lora_rank``, ``dataset``, ``per_device_train_batch_size``,
``learning_rate``, ...) into a ``moelora train`` config, with LLaMA-Factory's and HF
``TrainingArguments``' defaults for what it leaves out (``KEYS`` lists every key read). A key that
changes the training and is not supported (``finetuning_type: full``, ``stage: ppo``,
``use_galore``, ...) is refused by name (``pissa_init`` is PiSSA: ``moelora.pissa``); keys that only concern LLaMA-Factory's process (workers,
caches, ``template``, ...) are listed in ``IGNORED`` and skipped. ``method:`` (moelora's) may replace
the ``lora_*`` keys to train MixLoRA or MiLoRA from the same YAML.

**Datasets.**

A LLaMA-Factory data directory (``dataset_dir``, default ``data``) registers each dataset in
``dataset_info.json``: where it is (``file_name`` in the directory, or ``hf_hub_url``), its layout
(``formatting``: ``alpaca`` or ``sharegpt``), whether it holds preference pairs (``ranking``), its
own column names (``columns``) and, for ``sharegpt``, its role and content keys (``tags``).
:func:`expand` turns a ``{dataset: NAME, dataset_dir: DIR, ...}`` entry of a run config into a
:class:`moelora.data.DataSource` mapping, and :func:`convert` turns each item into the ``messages``
layout as LLaMA-Factory reads it:

- ``alpaca``: ``[system] + history turns + user(prompt + "\\n" + query) + assistant(response)``
  (the prompt alone when the query is empty); ``ranking``: the same prompt with ``chosen`` and
  ``rejected`` strings; ``kto_tag``: kept as the label.
- ``pretraining`` (LLaMA-Factory's ``stage: pt``; an ``alpaca`` dataset): the prompt column
  (default ``text``) as plain text, the loss on every token.
- ``sharegpt``: the ``messages`` column's turns, roles read through ``tags`` (``from``/``value``,
  ``human``/``gpt``/``system`` by default; OpenAI's ``role``/``content`` with tags); a ``system``
  column comes first; ``ranking``: ``chosen``/``rejected`` are assistant messages.

The chat template is the tokenizer's (LLaMA-Factory's ``template:`` is not read). LLaMA-Factory
learns every assistant turn of a conversation by default: set ``turns: all`` for that (the default
here is the last turn). Function calling data is read: ``function_call`` turns (the calls as JSON)
become assistant messages with ``tool_calls``, ``observation`` turns ``tool`` messages, and the
``tools`` column goes to the chat template. Refused by name, not skipped: images/videos/audios, ``ms_hub_url``/``script_url``/``cloud_file_name``-only datasets,
``subset`` and ``folder``. ``num_samples`` keeps the first N items (LLaMA-Factory samples N at random).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import ConfigError, did_you_mean
from .data import HUB_PREFIX, DataError

__all__ = ["expand", "convert", "load_info", "translate", "is_llamafactory"]

ENTRY_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "file_name", "file_sha1",
              "formatting", "ranking", "subset", "split", "folder", "num_samples", "columns", "tags", "load_from")
COLUMN_KEYS = ("prompt", "query", "response", "history", "messages", "system", "tools", "images", "videos", "audios",
               "chosen", "rejected", "kto_tag")
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
DEFAULT_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "chosen": "chosen",
               "rejected": "rejected"},
    "sharegpt": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
}
DEFAULT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
SOURCE_KEYS = ("weight", "name", "turns", "max_samples", "split_long")  # what a `dataset:` entry may add


def load_info(dataset_dir: Path) -> dict:
    path = dataset_dir / "dataset_info.json"
    if not path.is_file():
        raise DataError(f"{path}: not found (LLaMA-Factory's dataset registry; dataset_dir is {dataset_dir})")
    try:
        info = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: expected a JSON object of datasets, got {type(info).__name__}")
    return info


def _find_dir(dataset_dir: str | Path, base_dir: Path) -> Path:
    """``dataset_dir`` as given, relative to the working directory, else to the config's directory."""
    p = Path(dataset_dir).expanduser()
    if p.is_absolute() or p.is_dir():
        return p
    alt = base_dir / p
    return alt if alt.is_dir() else p


def expand(entry: dict, base_dir: Path = Path(".")) -> dict:
    """``{dataset: NAME, dataset_dir: DIR (default "data"), weight, name, turns, max_samples}`` -> the
    mapping of a :class:`moelora.data.DataSource` reading that dataset (``format: messages`` with the
    entry's conversion in ``llamafactory``)."""
    extra = sorted(set(entry) - {"dataset", "dataset_dir", "pretraining", *SOURCE_KEYS})
    name = entry.get("dataset")
    if not isinstance(name, str) or not name:
        raise DataError(f"data source {entry!r}: 'dataset' must be a dataset name of dataset_info.json")
    if extra:
        raise DataError(f"dataset {name!r}: key(s) {extra} do not apply to a dataset_info.json entry (its file, "
                        f"format and columns come from there); valid keys: dataset, dataset_dir, pretraining, "
                        f"{', '.join(SOURCE_KEYS)}")
    ddir = _find_dir(entry.get("dataset_dir") or "data", base_dir)
    info = load_info(ddir)
    where = f"{ddir / 'dataset_info.json'}, dataset {name!r}"
    if name not in info:
        raise DataError(f"{ddir / 'dataset_info.json'}: no dataset {name!r}{did_you_mean(name, list(info))} "
                        f"(it has {len(info)}: {', '.join(list(info)[:20])}{', ...' if len(info) > 20 else ''})")
    spec = info[name]
    if not isinstance(spec, dict):
        raise DataError(f"{where}: expected an object, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(ENTRY_KEYS))
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; known: {', '.join(ENTRY_KEYS)}")
    for key in ("subset", "folder"):
        if spec.get(key):
            raise DataError(f"{where}: '{key}' is not supported (save that subset/folder as a file or a dataset "
                            "directory and give its file_name)")
    fmt = spec.get("formatting", "alpaca")
    if fmt not in DEFAULT_COLUMNS:
        raise DataError(f"{where}: formatting must be 'alpaca' or 'sharegpt', got {fmt!r}")
    if spec.get("hf_hub_url"):
        path = HUB_PREFIX + spec["hf_hub_url"]
    elif spec.get("file_name"):
        path = str(ddir / spec["file_name"])
    else:
        given = [k for k in ("ms_hub_url", "om_hub_url", "script_url", "cloud_file_name") if spec.get(k)]
        raise DataError(f"{where}: " + (f"{given[0]} is not supported (ModelScope/Modelers hubs, loading scripts and "
                                        "cloud files): give file_name or hf_hub_url" if given else
                                        "needs file_name (a file or directory in dataset_dir) or hf_hub_url"))
    columns = spec.get("columns") or {}
    tags = spec.get("tags") or {}
    for what, d, keys in (("columns", columns, COLUMN_KEYS), ("tags", tags, TAG_KEYS)):
        if not isinstance(d, dict) or not all(isinstance(v, str) and v for v in d.values()):
            raise DataError(f"{where}: '{what}' must map names to strings, got {d!r}")
        bad = sorted(set(d) - set(keys))
        if bad:
            raise DataError(f"{where}: unknown {what} key(s) {bad}; known: {', '.join(keys)}")
    if tags and fmt != "sharegpt":
        raise DataError(f"{where}: 'tags' apply to formatting 'sharegpt' only")
    ranking = spec.get("ranking", False)
    if not isinstance(ranking, bool):
        raise DataError(f"{where}: ranking must be true or false, got {ranking!r}")
    n = spec.get("num_samples")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DataError(f"{where}: num_samples must be a positive integer, got {n!r}")
    pretraining = entry.get("pretraining", False)
    if not isinstance(pretraining, bool):
        raise DataError(f"dataset {name!r}: pretraining must be true or false, got {pretraining!r}")
    if pretraining and (fmt != "alpaca" or ranking):
        raise DataError(f"{where}: pretraining (LLaMA-Factory's stage: pt) reads plain text: the dataset must be "
                        "formatting 'alpaca' without ranking")
    if pretraining:  # the prompt column is the text (LLaMA-Factory's pt datasets map it to `text`)
        columns = {"prompt": "text", **columns}
    out = {"path": path, "format": "text" if pretraining else "messages", "name": name,
           "llamafactory": {"where": where, "formatting": fmt, "ranking": ranking, "pretraining": pretraining,
                            "columns": {**DEFAULT_COLUMNS[fmt], **columns}, "tags": {**DEFAULT_TAGS, **tags}}}
    if spec.get("split"):
        out["split"] = spec["split"]
    if n is not None:
        out["max_samples"] = n
    out.update({k: entry[k] for k in SOURCE_KEYS if k in entry})
    return out


def _text(where: str, item: dict, column: str, required: bool = True) -> str | None:
    value = item.get(column)
    if value is None or value == "":
        if required:
            raise DataError(f"{where}: missing column {column!r} (the item has {', '.join(map(repr, item)) or 'none'})")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} must be a string, got {type(value).__name__}")
    return value


def convert(spec: dict, loc: str, item: Any) -> dict:
    """One item of a ``dataset_info.json`` dataset in the ``messages`` layout of ``moelora.data``
    (``{"messages"}`` + ``chosen``/``rejected`` strings for ranking, + ``kto_tag`` when mapped)."""
    where = f"{spec['where']}, {loc}"
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object, got {type(item).__name__}")
    cols, tags = spec["columns"], spec["tags"]
    for key in ("images", "videos", "audios"):
        if key in cols and item.get(cols[key]):
            raise DataError(f"{where}: column {cols[key]!r} ({key}) is not supported (text-only training)")
    if spec.get("pretraining"):  # stage pt: the prompt column is a document, the loss on all of it
        return {"text": _text(where, item, cols["prompt"])}
    messages: list[dict] = []
    system = _text(where, item, cols["system"], required=False) if "system" in cols else None
    if spec["formatting"] == "alpaca":
        if system:
            messages.append({"role": "system", "content": system})
        history = item.get(cols["history"]) if "history" in cols else None
        if history:
            if not isinstance(history, list) or not all(
                    isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history):
                raise DataError(f"{where}: column {cols['history']!r} (history) must be a list of [prompt, response] "
                                "string pairs")
            for q, a in history:
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        prompt = _text(where, item, cols["prompt"])
        query = _text(where, item, cols["query"], required=False)
        messages.append({"role": "user", "content": f"{prompt}\n{query}" if query else prompt})
        if spec["ranking"]:
            return {"messages": messages, "chosen": _text(where, item, cols["chosen"]),
                    "rejected": _text(where, item, cols["rejected"])}
        messages.append({"role": "assistant", "content": _text(where, item, cols["response"])})
    else:
        turns = item.get(cols["messages"])
        if not isinstance(turns, list):
            raise DataError(f"{where}: column {cols['messages']!r} (messages) must be a list of messages")
        roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system",
                 tags["function_tag"]: "function_call", tags["observation_tag"]: "tool"}
        for j, turn in enumerate(turns, 1):
            role, content = _turn(f"{where}, message {j}", turn, tags, roles)
            if role == "system" and j != 1:
                raise DataError(f"{where}, message {j}: a system message must come first")
            if role == "function_call":  # the call(s) as JSON: read into tool_calls by moelora.data
                messages.append({"role": "assistant", "content": "", "tool_calls": content})
            else:
                messages.append({"role": role, "content": content})
        if system and not (messages and messages[0]["role"] == "system"):  # a system turn overrides the column
            messages.insert(0, {"role": "system", "content": system})
        if spec["ranking"]:
            sides = {}
            for key in ("chosen", "rejected"):
                role, content = _turn(f"{where}, {key}", item.get(cols[key]), tags, roles)
                if role != "assistant":  # (a function_call side too: preference pairs are text)
                    raise DataError(f"{where}: {key} must be an assistant message ({tags['role_tag']}: "
                                    f"{tags['assistant_tag']!r}), got {role!r}")
                sides[key] = content
            return {"messages": messages, **sides}
    out = {"messages": messages}
    if "tools" in cols and item.get(cols["tools"]):
        out["tools"] = item[cols["tools"]]  # a JSON string or a list: read by moelora.data
    if "kto_tag" in cols:
        out["kto_tag"] = item.get(cols["kto_tag"])
    return out


def _turn(where: str, turn: Any, tags: dict, roles: dict) -> tuple[str, str]:
    if not isinstance(turn, dict):
        raise DataError(f"{where}: expected a message object with {tags['role_tag']!r} and {tags['content_tag']!r}")
    who, content = turn.get(tags["role_tag"]), turn.get(tags["content_tag"])
    if who not in roles:
        raise DataError(f"{where}: {tags['role_tag']} must be one of {sorted(roles)} (the dataset's tags), got {who!r}")
    if not isinstance(content, str):
        raise DataError(f"{where}: {tags['content_tag']} must be a string, got {type(content).__name__}")
    return roles[who], content


# ---------------------------------------------------------------------------------------------
# Training configs

# LLaMA-Factory key -> (section, moelora key); section "" is the top level, "method" the adapter
KEYS: dict[str, tuple[str, str]] = {
    "model_name_or_path": ("", "model"), "adapter_name_or_path": ("", "adapter_name_or_path"),
    "output_dir": ("", "output_dir"),
    "cutoff_len": ("train", "cutoff_len"), "val_size": ("train", "val_size"),
    "train_on_prompt": ("train", "train_on_prompt"), "per_device_train_batch_size": ("train", "batch_size"),
    "per_device_eval_batch_size": ("train", "eval_batch_size"),
    "gradient_accumulation_steps": ("train", "gradient_accumulation"), "learning_rate": ("train", "lr"),
    "max_steps": ("train", "max_steps"), "warmup_ratio": ("train", "warmup_ratio"),
    "warmup_steps": ("train", "warmup_steps"), "weight_decay": ("train", "weight_decay"),
    "max_grad_norm": ("train", "max_grad_norm"), "seed": ("train", "seed"), "optim": ("train", "optim"),
    "adam_beta1": ("train", "adam_beta1"), "adam_beta2": ("train", "adam_beta2"),
    "adam_epsilon": ("train", "adam_epsilon"), "logging_steps": ("train", "log_steps"),
    "save_steps": ("train", "save_steps"), "eval_steps": ("train", "eval_steps"), "run_name": ("train", "run_name"),
    "load_best_model_at_end": ("train", "load_best_model_at_end"), "deepspeed": ("train", "deepspeed"),
    "loraplus_lr_ratio": ("train", "loraplus_lr_ratio"), "neftune_noise_alpha": ("train", "neftune_noise_alpha"),
    "pref_beta": ("train", "pref_beta"), "pref_ftx": ("train", "pref_ftx"), "pref_loss": ("train", "pref_loss"),
    "dpo_label_smoothing": ("train", "dpo_label_smoothing"), "simpo_gamma": ("train", "simpo_gamma"),
    "kto_chosen_weight": ("train", "kto_chosen_weight"), "kto_rejected_weight": ("train", "kto_rejected_weight"),
    "lora_rank": ("method", "r"), "lora_alpha": ("method", "lora_alpha"), "lora_dropout": ("method", "lora_dropout"),
    "use_rslora": ("method", "use_rslora"), "use_dora": ("method", "use_dora"),
}
# read and turned into something else below
SPECIAL = ("stage", "finetuning_type", "lora_target", "pissa_init", "pissa_iter", "pissa_convert", "dataset", "eval_dataset", "dataset_dir", "max_samples", "mask_history",
           "num_train_epochs", "lr_scheduler_type", "bf16", "fp16", "disable_gradient_checkpointing", "packing",
           "neat_packing", "report_to", "save_total_limit", "save_strategy", "eval_strategy", "evaluation_strategy",
           "quantization_bit", "quantization_method", "do_train", "do_eval", "do_predict", "method",
           "ref_model_adapters")
# LLaMA-Factory's process, caching, logging and template keys: they do not change what is trained here
IGNORED = ("template", "trust_remote_code", "overwrite_cache", "preprocessing_num_workers", "dataloader_num_workers",
           "plot_loss", "overwrite_output_dir", "save_only_model", "ddp_timeout", "flash_attn",
           "include_num_input_tokens_seen", "logging_first_step", "enable_thinking", "enable_liger_kernel",
           "tokenized_path", "streaming", "bf16_full_eval", "print_param_status", "use_fast_tokenizer",
           "dataloader_pin_memory", "remove_unused_columns", "ddp_find_unused_parameters", "infer_backend",
           "export_dir", "cache_dir", "hf_hub_token", "low_cpu_mem_usage")
# accepted when false / null (as LLaMA-Factory's examples write them), refused when set: they would change the run
OFF_ONLY = {"resume_from_checkpoint": "resume with `moelora train --resume` (the newest checkpoint of output_dir)",
            "upcast_layernorm": "norms are not upcast here", "upcast_lmhead_output": "the lm_head is not upcast here",
            "use_unsloth": "unsloth's kernels are not used", "push_to_hub": "nothing is pushed to the hub",
            "use_galore": "GaLore is not supported",
            "use_badam": "BAdam is not supported", "use_apollo": "APOLLO is not supported"}
LF_ONLY = ("model_name_or_path", "finetuning_type", "stage", "per_device_train_batch_size", "learning_rate",
           "num_train_epochs", "lora_rank", "lora_target", "do_train")


def is_llamafactory(d: dict) -> bool:
    """Whether a config mapping is a LLaMA-Factory YAML (it has one of its flat training keys)."""
    return any(k in d for k in LF_ONLY)


def translate(d: dict) -> dict:
    """A LLaMA-Factory training YAML as a ``moelora train`` config mapping (see the module docstring)."""
    for key, why in OFF_ONLY.items():
        if d.get(key):
            raise ConfigError(f"LLaMA-Factory config: {key}: {d[key]!r} is not supported ({why}); leave it out or "
                              "false")
    unknown = sorted(k for k in d if k not in KEYS and k not in SPECIAL and k not in IGNORED and k not in OFF_ONLY)
    if unknown:
        known = list(KEYS) + list(SPECIAL)
        raise ConfigError(f"LLaMA-Factory config: key(s) {unknown} are not read by moelora"
                          f"{did_you_mean(unknown[0], known)} (supported: {', '.join(sorted(known))}; "
                          f"ignored as process-only: {', '.join(IGNORED)})")

    def refuse(key: str, why: str) -> None:
        raise ConfigError(f"LLaMA-Factory config: {key}: {why}")

    if d.get("do_predict"):
        refuse("do_predict", "prediction is not a training stage here: use `moelora eval` or `moelora generate`")
    if d.get("do_train") is False:
        refuse("do_train", "false: nothing to train")
    stage = d.get("stage", "sft")
    if stage not in ("pt", "sft", "rm", "dpo", "kto"):
        refuse("stage", f"{stage!r} is not supported (pt, sft, rm, dpo and kto are; not ppo)")
    ft = d.get("finetuning_type", "lora")
    if ft != "lora":
        refuse("finetuning_type", f"{ft!r}: moelora trains adapters (lora, with use_dora for DoRA; or give "
               "moelora's `method:` for MixLoRA / MiLoRA)")
    out: dict = {"train": {
        # HF TrainingArguments' and LLaMA-Factory's defaults, where moelora's differ
        "lr": 5e-5, "num_epochs": 3, "batch_size": 8, "log_steps": 500, "save_steps": 500, "save_total_limit": 0,
        "cutoff_len": 2048, "precision": "fp32", "gradient_checkpointing": True,
        "stage": "sft" if stage == "pt" else stage,  # pt: the loss on every token of plain text
    }}
    lora_keys = [k for k in d if KEYS.get(k, ("",))[0] == "method" or k == "lora_target"]
    if "method" in d:
        if lora_keys:
            refuse("method", f"give either LLaMA-Factory's LoRA keys ({', '.join(lora_keys)}) or moelora's method")
        out["method"] = d["method"]
    else:
        rank = d.get("lora_rank", 8)
        method = {"type": "lora", "r": rank, "lora_alpha": d.get("lora_alpha") or 2 * rank, "lora_dropout": 0.0}
        target = d.get("lora_target", "all")
        if not isinstance(target, str) or not target.strip():
            refuse("lora_target", f"must be 'all' or comma-separated module names, got {target!r}")
        names = [t.strip() for t in target.split(",") if t.strip()]
        if names != ["all"]:
            method["target_modules"] = names
        out["method"] = method
    if d.get("pissa_init"):  # saved converted to a plain LoRA whatever pissa_convert says (moelora.pissa)
        if "method" in d:
            refuse("pissa_init", "with `method:`, set its init_lora_weights ('pissa' or 'pissa_niter_N') instead")
        it = d.get("pissa_iter", 16)
        if isinstance(it, bool) or not isinstance(it, int) or (it < 1 and it != -1):
            refuse("pissa_iter", f"must be -1 (an exact SVD) or a positive integer, got {it!r}")
        out["method"]["init_lora_weights"] = "pissa" if it == -1 else f"pissa_niter_{it}"
    for key, value in d.items():
        if key in KEYS:
            section, name = KEYS[key]
            if section == "":
                out[name] = value
            elif section == "method":
                if "method" not in d:
                    out["method"][name] = value
            else:
                out["train"][name] = value
    t = out["train"]
    if "num_train_epochs" in d:
        n = d["num_train_epochs"]
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not 0 < n < float("inf"):
            refuse("num_train_epochs", f"{n!r}: it must be a positive number")
        t["num_epochs"] = int(n) if float(n).is_integer() else float(n)  # a fraction: that share of the steps
    sched = d.get("lr_scheduler_type", "linear")
    if sched not in ("linear", "cosine", "constant", "constant_with_warmup"):
        refuse("lr_scheduler_type", f"{sched!r} is not supported (linear, cosine, constant, constant_with_warmup)")
    t["lr_scheduler"] = "constant" if sched == "constant_with_warmup" else sched  # moelora's constant warms up
    if d.get("bf16") and d.get("fp16"):
        refuse("bf16", "and fp16 are both true")
    if d.get("bf16") or d.get("fp16"):
        t["precision"] = "bf16" if d.get("bf16") else "fp16"
    t["gradient_checkpointing"] = not d.get("disable_gradient_checkpointing", False)
    if d.get("packing", stage == "pt") or d.get("neat_packing"):  # LLaMA-Factory packs pt data by default
        t["packing"] = True  # moelora's packing is LLaMA-Factory's neat_packing (each example attends to itself)
    if "report_to" in d:
        r = d["report_to"]
        t["report_to"] = [] if r in ("none", None, []) else ["tensorboard"] if r == "all" else r  # HF's "all"
    if d.get("save_total_limit") is not None:
        t["save_total_limit"] = d["save_total_limit"]
    if d.get("save_strategy", "steps") not in ("steps", "no"):
        refuse("save_strategy", f"{d['save_strategy']!r}: steps (save_steps) or no")
    if d.get("save_strategy") == "no":
        t["save_steps"] = 0
    strategy = d.get("eval_strategy", d.get("evaluation_strategy", "no" if "eval_steps" not in d else "steps"))
    if strategy not in ("steps", "no"):
        refuse("eval_strategy", f"{strategy!r}: steps (eval_steps) or no")
    if strategy == "no":
        t.pop("eval_steps", None)  # validation (val_size / eval_dataset) after the last step only
    elif "eval_steps" not in t:
        t["eval_steps"] = t["log_steps"]  # HF: eval_steps defaults to logging_steps
    q = d.get("quantization_bit")
    if q is not None:
        if q not in (4, 8) or d.get("quantization_method", "bnb") not in ("bnb", "bitsandbytes"):
            refuse("quantization_bit", f"{q!r} with {d.get('quantization_method', 'bnb')}: 4 or 8 with bitsandbytes")
        out["quantization"] = f"{q}bit"
    if d.get("ref_model_adapters"):
        t["ref_adapter"] = d["ref_model_adapters"]
    # datasets: one entry per name, with max_samples, and every turn learned unless mask_history (LF's default)
    turns = "last" if d.get("mask_history") or stage != "sft" else "all"
    for key, target in (("dataset", "data"), ("eval_dataset", "val_data")):
        names = d.get(key)
        if names is None:
            continue
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            refuse(key, f"dataset names of dataset_info.json, as 'a,b' or a list, got {names!r}")
        entries = []
        for n in names:
            # pt: long documents in cutoff_len pieces, as LLaMA-Factory's block splitting keeps all of them
            e = {"dataset": n, "pretraining": True, "split_long": True} if stage == "pt" else {"dataset": n,
                                                                                               "turns": turns}
            if d.get("dataset_dir"):
                e["dataset_dir"] = d["dataset_dir"]
            if d.get("max_samples") is not None and target == "data":
                e["max_samples"] = d["max_samples"]
            entries.append(e)
        out[target] = entries
    if "data" not in out:
        refuse("dataset", "missing: name the training datasets of dataset_info.json")
    return out
