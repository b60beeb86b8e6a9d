"""The training recipe of ``moelora train``: plain, readable code on top of ``accelerate``.

One optimizer step consumes ``batch_size x processes x gradient_accumulation`` examples, in the
deterministic order of ``TrainData.epoch_order`` (a function of the data, the seed and the epoch
only). Each process takes its own contiguous slice of every global micro-batch. The LM loss is
the sum of token losses divided by the number of response tokens in the whole global micro-batch
(counted across processes), so N processes compute the same gradient as one process with the
same global batch; the router loss (MixLoRA's aux loss, MiLoRA's load-balance loss) is computed on
each process's own rows and averaged by DDP. With ``train.fsdp`` the model is sharded (FSDP2,
``shard_model``) instead of replicated; under ``train.deepspeed`` a DeepSpeed ZeRO engine holds it
(``sharding.deepspeed_config``). Gradients are averaged the same way in both.

Checkpoints (``output_dir/checkpoint-{step}``, every ``save_steps``) hold the adapter (the
``save_adapter`` format), the optimizer and scheduler states, every process's RNG states and
``trainer_state.json``. They are written into a hidden directory and renamed into place, so a run
killed at any moment leaves the newest complete checkpoint loadable. ``resume=True`` continues from
the newest one exactly as if never stopped (same data position, optimizer, scheduler and RNG).
A NaN or infinite loss stops the run with ``TrainingError`` before anything is saved for that step.

``train.stage: dpo`` trains on preference pairs instead (``moelora.preference``): a micro-batch of
``batch_size`` pairs is one forward of their chosen and rejected rows, after a gradient-free
forward of the same rows through the base model (adapters off) for the losses with a reference;
the loss is the mean over the global micro-batch's pairs. ``train.stage: kto`` trains on labelled
responses: a gradient-free forward of the batch's mismatched rows (``data.kto_kl_rows``) gives the
KL estimate, the reference forward covers both, and the loss is the mean over the examples.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import checkpoint, reward
from .data import TrainData, collate, collate_packed, end_token_ids, kto_kl_rows, preference_rows
from .inject import adapter_of, attach, get_context, set_adapter, use_adapter
from .preference import kto_loss, needs_reference, preference_loss, sequence_logps
from .runconfig import RunConfig
from .sharding import accelerate_fsdp, deepspeed_config, deepspeed_source, shard_model
from .stats import count_parameters, expert_load, param_groups

__all__ = ["train", "TrainingError", "load_model_and_tokenizer", "latest_checkpoint", "shard_model"]

logger = logging.getLogger(__name__)
STATE_NAME = "trainer_state.json"
DEEPSPEED_DIR = "deepspeed"  # in a checkpoint of a DeepSpeed run: the engine's own files (optimizer partitions)


class TrainingError(RuntimeError):
    """The run cannot go on (bad output_dir, non-finite loss, ...); the message says why."""


def quantization_config(quantization: str | None):
    """``BitsAndBytesConfig`` for a 4-bit (NF4, double quantization, bf16 compute) or 8-bit base
    (QLoRA-style: the base is frozen and quantized, adapters train in float32). GPU only."""
    if quantization is None:
        return None
    if quantization not in ("4bit", "8bit"):
        raise TrainingError(f"quantization must be 4bit, 8bit or null, got {quantization!r}")
    if not torch.cuda.is_available():
        raise TrainingError(
            f"a {quantization} base model needs a CUDA GPU (bitsandbytes); this machine has none. "
            "Remove `quantization` to train on the CPU in full precision."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TrainingError(f"a {quantization} base model needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_model_and_tokenizer(name_or_path: str | None, dtype: torch.dtype | str = torch.float32,
                             quantization: str | None = None):
    """A causal LM and its tokenizer; ``None`` is the embedded SmolLM2-135M-Instruct, and an
    embedded model's name (``gemma-3-270m``, ``moelora.embedded``) that model.

    ``quantization`` ("4bit" / "8bit") loads the base through bitsandbytes on the GPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .embedded import resolve_model

    quant = quantization_config(quantization)  # fails before anything is loaded
    name_or_path = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if quant is not None:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map={"": torch.cuda.current_device()})
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    _warn_eos_mismatch(tokenizer, getattr(model, "generation_config", None), name_or_path)
    return model, tokenizer


def _warn_eos_mismatch(tokenizer, generation_config, where: str) -> None:
    """Training ends every response with the tokenizer's EOS; ``generate`` stops at the generation
    config's end tokens. When the first is not among the second, a trained adapter does not stop."""
    ends = end_token_ids(generation_config)
    if ends and tokenizer.eos_token_id not in ends:
        warnings.warn(
            f"{where}: the tokenizer's EOS {tokenizer.eos_token!r} (id {tokenizer.eos_token_id}) is not among the "
            f"generation config's end tokens {ends}: training appends the former, generate() stops at the latter; "
            f"set one to the other (moelora.embedded.align_eos does it for the tokenizer)",
            stacklevel=3,
        )


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (with a trainer state), oldest first."""
    found = []
    for p in Path(output_dir).glob("checkpoint-*"):
        suffix = p.name.split("-", 1)[1]
        if suffix.isdigit() and (p / STATE_NAME).is_file():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def make_optimizer(groups: list[dict], t, device: torch.device) -> torch.optim.Optimizer:
    """``train.optim``'s optimizer over ``groups`` (``moelora.param_groups``: each with its lr and weight
    decay), with HF ``TrainingArguments``' settings for each name."""
    betas, eps = (t.adam_beta1, t.adam_beta2), t.adam_epsilon
    if t.optim in ("adamw", "adamw_torch"):
        return torch.optim.AdamW(groups, lr=t.lr, betas=betas, eps=eps)
    if t.optim == "adamw_torch_fused":
        return torch.optim.AdamW(groups, lr=t.lr, betas=betas, eps=eps, fused=True)
    if t.optim == "sgd":
        return torch.optim.SGD(groups, lr=t.lr)
    if t.optim == "adafactor":  # HF's: a fixed learning rate, no relative step or parameter scaling
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=t.lr, scale_parameter=False, relative_step=False)
    # bitsandbytes' 8-bit / paged optimizers keep their states on the GPU
    if device.type != "cuda":
        raise TrainingError(f"train.optim: {t.optim} (bitsandbytes) needs a CUDA GPU; this run is on {device.type}: "
                            "use adamw")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TrainingError(f"train.optim: {t.optim} needs bitsandbytes: pip install bitsandbytes") from None
    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[t.optim]
    return cls(groups, lr=t.lr, betas=betas, eps=eps)


def _scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _precision(name: str) -> str:
    if name == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[name]


def _check_output_dir(out: Path, resume: bool, overwrite: bool, names: list[str] | None = None) -> None:
    existing = checkpoints(out) if out.exists() else []
    has_adapter = (out / checkpoint.CONFIG_NAME).exists() or any((out / n / checkpoint.CONFIG_NAME).exists()
                                                                 for n in names or [])
    if (existing or has_adapter) and not (resume or overwrite):
        what = f"{len(existing)} checkpoint(s)" if existing else "an adapter"
        raise TrainingError(
            f"output_dir {out} already holds {what} of another run; pass --resume to continue it or "
            "--overwrite to start over (its checkpoints are then replaced)"
        )
    if overwrite and not resume:
        for p in existing:
            shutil.rmtree(p)
        shutil.rmtree(out / BEST_DIR, ignore_errors=True)  # a previous run's best adapter


class _Logger:
    """Metrics to ``metrics.jsonl`` (for ``moelora plot loss``), and to TensorBoard (when available)
    and Weights & Biases as ``train.report_to`` asks. A resumed run continues its W&B run (its id is
    kept in ``output_dir/wandb_run_id``)."""

    def __init__(self, out: Path, enabled: bool, start_step: int, report_to: list[str] = ("tensorboard",),
                 run_name: str | None = None, config: dict | None = None) -> None:
        self.enabled = enabled
        self.file = None
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        path = out / "metrics.jsonl"
        kept = []  # on resume: the rows up to the checkpoint; later ones are about to be redone
        if start_step > 0 and path.exists():
            kept = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= start_step]
        self.file = open(path, "w", encoding="utf-8")
        self.file.writelines(x + "\n" for x in kept)
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None
        if SummaryWriter is not None and "tensorboard" in report_to:
            self.tb = SummaryWriter(str(out / "tensorboard"))
        if "wandb" in report_to:
            import wandb

            id_file = out / "wandb_run_id"
            run_id = id_file.read_text().strip() if start_step > 0 and id_file.is_file() else None
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "moelora"), name=run_name or out.name,
                                    id=run_id, resume="allow" if run_id else None, config=config, dir=str(out))
            id_file.write_text(self.wandb.id)

    def log(self, step: int, scalars: dict[str, float], load: dict[int, torch.Tensor], section: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, **scalars}
        if section == "train":
            record["expert_load"] = {str(k): v.tolist() for k, v in load.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        flat = {f"{section}/{k}": v for k, v in scalars.items()}
        for layer, frac in load.items():
            for e, f in enumerate(frac.tolist()):
                where = f"layer{layer:02d}" if isinstance(layer, int) else layer  # "adapter/layer" (several)
                flat[f"expert_load/{where}/expert{e}"] = f
        if self.tb is not None:
            for k, v in flat.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(flat, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def neftune_hook(alpha: float):
    """NEFTune's forward hook for the input embeddings (as transformers' Trainer): in training mode,
    add ``U(-m, m)`` noise with ``m = alpha / sqrt(seq_len * hidden)`` (padding counted, as there)."""

    def hook(module: torch.nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        mag = alpha / math.sqrt(output.size(1) * output.size(2))
        return output + torch.zeros_like(output).uniform_(-mag, mag)

    return hook


def train(run: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          _stop_after: int | None = None) -> Path:
    """Train ``run`` and save the final adapter in ``run.output_dir``; returns that directory.

    ``_stop_after`` (tests) stops after that many optimizer steps, as a crash would.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    t = run.train
    out = Path(run.output_dir)
    configs = run.adapter_configs()
    names = list(configs)
    multi = run.adapters is not None  # several adapters, each row of a batch repeated for each
    if not run.data:
        raise TrainingError("the config has no data: add at least one entry under `data:`")
    fsdp = t.fsdp or accelerate_fsdp()
    if fsdp and any(getattr(c, "is_pissa", False) for c in configs.values()):
        raise TrainingError("init_lora_weights: PiSSA replaces the base weights by its residual: not with FSDP")
    ds_cfg = _deepspeed_config(run, fsdp)  # None without DeepSpeed; checked before anything is loaded
    if ds_cfg is not None:
        accelerator = _deepspeed_accelerator(ds_cfg, t)
    else:  # without a GPU, `cpu=True` lets accelerate run torchrun/`accelerate launch` processes as gloo DDP
        accelerator = Accelerator(mixed_precision=_precision(t.precision), cpu=not torch.cuda.is_available())
    zero3 = ds_cfg is not None and ds_cfg["zero_optimization"]["stage"] == 3
    main = accelerator.is_main_process
    if main:
        _check_output_dir(out, resume, overwrite, names if multi else None)
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(t.seed)

    model, tokenizer = load_model_and_tokenizer(run.model, quantization=run.quantization)
    for name, cfg in configs.items():
        set_seed(t.seed)  # each adapter starts as it would alone, whatever was attached before it
        if run.adapter_name_or_path is not None:  # its own config and weights
            checkpoint.load_adapter(model, run.adapter_name_or_path, adapter_name=name)
        else:
            attach(model, cfg, name)
    if t.stage == "rm":  # a value head per adapter (from the starting adapter's directory when it has one)
        for name in names:
            set_seed(t.seed)
            if run.adapter_name_or_path is None or not reward.load_value_head(model, run.adapter_name_or_path, name):
                reward.attach_value_head(model, name, t.value_head_dropout)
    reference = _load_reference(model, t.ref_adapter, names)
    if run.quantization is None and not zero3:  # bitsandbytes places at load time; ZeRO-3 places shards itself
        model.to(accelerator.device)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    dpo, kto, rm = t.stage == "dpo", t.stage == "kto", t.stage == "rm"
    pref = dpo or kto  # compared with a reference: the reference's forward, reward metrics
    data = TrainData(run.data, tokenizer, cutoff_len=t.cutoff_len, seed=t.seed, val_size=t.val_size,
                     val_sources=run.val_data, stage="dpo" if rm else t.stage, train_on_prompt=t.train_on_prompt)
    files = _CheckpointFiles(names if multi else None)
    ckpt = latest_checkpoint(out) if resume else None
    if resume and ckpt is None:
        logger.warning("--resume: no checkpoint in %s, starting from scratch", out)
    state = json.loads((ckpt / STATE_NAME).read_text()) if ckpt is not None else None
    if ckpt is not None:  # adapters before any sharding: each process loads the full tensors
        for name in names:
            checkpoint.load_adapter(model, ckpt / files.adapter(name), adapter_name=name)
            reward.load_value_head(model, ckpt / files.adapter(name), name)

    world, rank = accelerator.num_processes, accelerator.process_index
    sharded = fsdp and world > 1
    full_optim = bool(state and state.get("fsdp"))  # optimizer states by parameter name, gathered in full
    if state is not None and sharded and not full_optim:
        raise TrainingError(f"{ckpt} was written without FSDP sharding (optimizer states by parameter index): "
                            "resume it without train.fsdp")
    ds_state = None if ds_cfg is None else {"zero_stage": ds_cfg["zero_optimization"]["stage"], "world_size": world}
    if state is not None and state.get("deepspeed") != ds_state:
        saved = state.get("deepspeed")
        raise TrainingError(
            f"{ckpt} was written without DeepSpeed: resume it without DeepSpeed" if saved is None else
            f"{ckpt} was written by DeepSpeed ZeRO-{saved['zero_stage']} with {saved['world_size']} processes (its "
            f"optimizer states are split per process): resume it with that stage and {saved['world_size']} processes")
    micro = t.batch_size * world  # global micro-batch
    per_step = micro * t.gradient_accumulation
    epoch_rows = (lambda e: data.packed_order(e)) if t.packing else data.epoch_order  # noqa: E731
    steps_per_epoch = max(1, len(epoch_rows(0)) // per_step)
    total = t.max_steps if t.max_steps > 0 else math.ceil(steps_per_epoch * t.num_epochs)  # HF's rounding
    if t.packing:  # (ZeRO-3's partitioned model cannot run the probe's forwards before its engine exists)
        check_packing(model, probe=not zero3)
    if sharded:  # FSDP2: each process keeps 1/world of every parameter, frozen base included
        shard_model(model)
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters  # transformers >= 4.50
    optimizers, schedulers = {}, {}  # one per adapter: each trains exactly as it would alone
    warmup = t.warmup_steps or math.ceil(t.warmup_ratio * total)
    if ds_cfg is not None:  # the engine takes the model and its one optimizer together; steps, clips, reduces
        [name] = names
        opt = make_optimizer(param_groups(model, t.lr, t.weight_decay, adapter_name=name,
                                          loraplus_lr_ratio=t.loraplus_lr_ratio), t, accelerator.device)
        schedulers[name] = _scheduler(opt, t.lr_scheduler, warmup, total)  # moves the lr of `opt`'s groups
        ddp_model, optimizers[name] = accelerator.prepare(model, opt)
    else:
        ddp_model = model if sharded else accelerator.prepare_model(model)  # before the optimizer, as accelerate asks
        for name in names:
            opt = make_optimizer(param_groups(model, t.lr, t.weight_decay, adapter_name=name,
                                              loraplus_lr_ratio=t.loraplus_lr_ratio), t, accelerator.device)
            schedulers[name] = _scheduler(opt, t.lr_scheduler, warmup, total)
            optimizers[name] = accelerator.prepare_optimizer(opt)  # fp16 loss scaling needs the wrapped optimizer
    counts = {name: count_parameters(model, name) for name in names}

    step, start_epoch, position = 0, 0, 0
    validation = _Validation(names, "reward accuracy" if pref or rm else "token accuracy")
    if ckpt is not None:
        for name in names:
            if ds_cfg is not None:  # the engine's own files: adapter weights and this process's optimizer partition
                ddp_model.load_checkpoint(str(ckpt / DEEPSPEED_DIR), tag="state", load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
                schedulers[name].load_state_dict(torch.load(ckpt / files.scheduler(name), weights_only=True))
                continue
            saved = torch.load(ckpt / files.optimizer(name), weights_only=True)
            if full_optim:  # into a sharded model or not: the states are scattered to match
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(model, optimizers[name].optimizer, saved,
                                         options=StateDictOptions(full_state_dict=True))
            else:
                optimizers[name].load_state_dict(saved)
            schedulers[name].load_state_dict(torch.load(ckpt / files.scheduler(name), weights_only=True))
        rng_file = ckpt / f"rng_{rank}.pt"
        if rng_file.exists():  # our own file: python's RNG state is a tuple, not a tensor
            _set_rng_state(torch.load(rng_file, weights_only=False))
        step, start_epoch, position = state["step"], state["epoch"], state["position"]
        validation.restore(state.get("validation"))
        before = state.get("global_batch", t.batch_size * state.get("world_size", world) * t.gradient_accumulation)
        if before != per_step:
            logger.warning("resuming a run of %d processes with %d: the global batch changes from %d to %d examples",
                           state.get("world_size", world), world, before, per_step)
        if main:
            print(f"resuming from {ckpt} (step {step})")

    metrics = _Logger(out, main, step, t.report_to, t.run_name, asdict(run))
    if main:
        (out / "run_config.json").write_text(json.dumps(asdict(run), indent=2, default=str))
        for name, cfg in configs.items():
            label = cfg.method if not multi else f"{name} ({cfg.method})"
            print(f"{label}: {counts[name]['trainable']:,} trainable / {counts[name]['activated']:,} activated "
                  f"adapter parameters")
        if run.adapter_name_or_path is not None:
            print(f"starting from the adapter {run.adapter_name_or_path}")
        if rm:
            print("reward model: a value head on the adapted model, pairwise loss -log sigmoid(r_chosen - r_rejected)")
        if pref:
            print(f"{t.pref_loss if dpo else 'kto'} preference loss (beta {t.pref_beta}); reference: " + (
                f"the base model with the adapter {t.ref_adapter}" if reference else
                "the base model (adapters off)" if kto or needs_reference(t.pref_loss) else "none"))
        unit = {"dpo": "preference pairs", "kto": "labelled examples"}.get(t.stage, "examples")
        if t.packing:
            rows0 = epoch_rows(0)
            fill = sum(len(data[i]["input_ids"]) for r in rows0 for i in r) / (len(rows0) * t.cutoff_len)
            unit = f"packed rows (epoch 0: {data.epoch_size} examples in {len(rows0)} rows, {fill:.0%} filled)"
        print(f"{len(data)} {'pairs' if dpo or rm else 'examples'}, {total} steps of {per_step} {unit}"
              + (f" for each of {len(names)} adapters in one batch" if multi else ""))
    bar = tqdm(total=total, initial=step, disable=not (progress and main), desc="train", dynamic_ncols=True)
    neftune = (model.get_input_embeddings().register_forward_hook(neftune_hook(t.neftune_noise_alpha))
               if t.neftune_noise_alpha else None)
    ddp_model.train()
    last_good = latest_checkpoint(out)
    epoch = start_epoch
    order = epoch_rows(epoch)
    tokens_seen, t_start = 0, time.time()
    try:
        while step < total:
            loss_sum = dict.fromkeys(names, 0.0)
            router_sum = dict.fromkeys(names, 0.0)
            extra_sum = {name: dict.fromkeys(PREF_METRICS if dpo else KTO_METRICS if kto else RM_METRICS if rm else (),
                                             0.0) for name in names}
            for _ in range(t.gradient_accumulation):
                if position + micro > len(order):
                    epoch, position = epoch + 1, 0
                    order = epoch_rows(epoch)
                rows = order[position : position + micro]
                position += micro
                mine = rows[rank * t.batch_size : (rank + 1) * t.batch_size]
                extras = {}
                if rm:  # the mean over this process's pairs; DDP averages over the processes
                    outputs, pair = _reward_losses(ddp_model, model, [data[i] for i in mine], names,
                                                   tokenizer.pad_token_id, accelerator)
                    lm = pair["loss"].mean(-1)
                    extras = _reward_metrics(pair)
                    n_seen = pair["tokens"]
                elif pref:  # the mean over the pairs / examples: every process has batch_size of them, DDP averages
                    losses_of = _preference_losses if dpo else _kto_losses
                    outputs, pair = losses_of(ddp_model, model, [data[i] for i in mine], names, tokenizer.pad_token_id,
                                              accelerator, keeps_logits, t, reference)
                    lm = pair["loss"].mean(-1)
                    extras = _preference_metrics(pair) if dpo else _kto_metrics(pair, accelerator)
                    n_seen = pair["tokens"]
                else:
                    if t.packing:
                        feats = [[data[i] for i in row] for row in mine]
                        batch = collate_packed(feats * len(names), tokenizer.pad_token_id)
                    else:
                        feats = [data[i] for i in mine]
                        batch = collate(feats * len(names), tokenizer.pad_token_id)
                    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                    labels = batch.pop("labels")
                    n_tokens = (labels[: len(feats), 1:] != -100).sum()  # one adapter's share
                    global_tokens = accelerator.reduce(n_tokens.clone(), reduction="sum").clamp_min(1)
                    if multi:
                        batch["adapter_names"] = [n for n in names for _ in feats]
                    n_seen = int(batch["attention_mask" if "attention_mask" in batch else "token_mask"].sum())
                    outputs, token_ce, rows = _token_losses(ddp_model, batch, labels, keeps_logits, accelerator)
                    ce = token_ce.new_zeros(len(names)).index_add(0, rows // len(feats), token_ce)  # per adapter
                    lm = ce * world / global_tokens  # DDP averages over processes: this makes it a global token mean
                routers = getattr(outputs, "router_losses", None) if multi else None
                if routers is None:
                    router = getattr(outputs, "router_loss", None)
                    routers = {names[0]: router} if router is not None else {}
                loss = (lm.sum() + sum(routers.values(), torch.zeros((), device=lm.device))) / t.gradient_accumulation
                if not torch.isfinite(loss):
                    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
                    raise TrainingError(f"the loss is {loss.item()} at step {step + 1}: stopping ({where})")
                if ds_cfg is not None:  # already divided by the accumulation; the engine steps at its boundary
                    ddp_model.backward(loss, scale_wrt_gas=False)
                    ddp_model.step()
                else:
                    accelerator.backward(loss)  # adapters share no parameter: each gets its own loss's gradient
                for i, name in enumerate(names):
                    loss_sum[name] += lm[i].item() / world / t.gradient_accumulation
                    if name in routers:
                        router_sum[name] += routers[name].item() / t.gradient_accumulation
                    for key, value in extras.items():
                        extra_sum[name][key] += value[i].item() / world / t.gradient_accumulation
                tokens_seen += n_seen * world
            for name in names:
                if ds_cfg is None:  # DeepSpeed clipped and stepped in ddp_model.step()
                    if t.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(_adapter_params(model, name), t.max_grad_norm)
                    optimizers[name].step()
                    optimizers[name].zero_grad(set_to_none=True)
                schedulers[name].step()
            step += 1
            sums = torch.tensor([loss_sum[n] for n in names] + [v for n in names for v in extra_sum[n].values()],
                                device=accelerator.device)
            sums = accelerator.reduce(sums, reduction="sum").tolist()
            global_loss = dict(zip(names, sums[: len(names)]))
            global_extra = dict(zip([(n, k) for n in names for k in extra_sum[n]], sums[len(names):]))
            lr = schedulers[names[0]].get_last_lr()[0]
            tok_s = tokens_seen / max(1e-9, time.time() - t_start)
            mean_loss = sum(global_loss.values()) / len(names)
            mean_router = sum(router_sum.values()) / len(names)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", router=f"{mean_router:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
            if step % t.log_steps == 0 or step == total:
                scalars = {"loss": mean_loss, "router_loss": mean_router, "lr": lr, "tokens_per_s": tok_s,
                           "epoch": epoch + position / max(1, len(order))}
                for (name, key), value in global_extra.items():  # rewards/chosen, ... (per adapter when several)
                    scalars[f"{key}/{name}" if multi else key] = value
                load = {}
                if multi:
                    for name in names:
                        scalars[f"loss/{name}"], scalars[f"router_loss/{name}"] = global_loss[name], router_sum[name]
                        if get_context(model).records.get(name):
                            load.update({f"{name}/{k}": v for k, v in expert_load(model, name).items()})
                elif get_context(model).records:
                    load = expert_load(model)
                metrics.log(step, scalars, load)
            stop = False
            if data.validation and (step == total or (t.eval_steps and step % t.eval_steps == 0)):
                size = t.eval_batch_size or t.batch_size
                if pref or rm:
                    losses = preference_validation(ddp_model, model, data.validation, names, size,
                                                   tokenizer.pad_token_id, accelerator, keeps_logits, t, reference)
                else:
                    losses = validation_loss(ddp_model, data.validation, names, size, tokenizer.pad_token_id,
                                             accelerator, keeps_logits)
                improved = validation.update(step, losses)
                metrics.log(step, validation.scalars(losses, multi), {}, section="eval")
                if main:
                    bar.write(f"step {step}: " + validation.summary(losses))
                if improved and t.load_best_model_at_end:
                    _save_best(model, improved, out, multi, main, sharded, zero3, step, losses)
                stop = validation.exhausted(t.early_stopping_patience) and step < total
                if stop and main:
                    bar.write(f"early stopping at step {step}: no improvement in {t.early_stopping_patience} "
                              f"validation(s) (best: " + ", ".join(
                                  f"{n} {v['best_loss']:.4f} at step {v['best_step']}"
                                  for n, v in validation.state.items()) + ")")
            if t.save_steps and step % t.save_steps == 0 and step < total and not stop:
                last_good = _save_checkpoint(accelerator, model, optimizers, schedulers, files, out, step, epoch,
                                             position, t, sharded, ddp_model if ds_cfg is not None else None, zero3,
                                             validation=validation.state)
            if stop:
                total = step
                break
            if _stop_after is not None and step >= _stop_after:
                return out
    finally:
        bar.close()
        metrics.close()
        if neftune is not None:
            neftune.remove()
    tensors = _adapter_tensors(model, names, main, sharded, zero3)
    if main:
        for name in names:
            target = out / name if multi else out
            checkpoint.save_adapter(model, target, name, tensors=tensors[name])
            reward.save_value_head(model, target, name)
            if t.load_best_model_at_end and data.validation:  # the best validation's adapter replaces it
                best = _best_dir(out, name, multi)
                kept = [f for f in (reward.VALUE_HEAD_NAME, checkpoint.SAFETENSORS_NAME, checkpoint.CONFIG_NAME)
                        if (best / f).is_file()]
                checkpoint.write_adapter_dir(target, {f: (best / f).read_bytes() for f in kept})
                print(f"{name if multi else 'final adapter'}: the best validation's (step "
                      f"{validation.state[name]['best_step']}, loss {validation.state[name]['best_loss']:.4f})")
        _write_summary(out, names, total, time.time() - t_start, accelerator.device,
                       validation.state if data.validation else None)
    accelerator.wait_for_everyone()
    if ds_cfg is not None:  # accelerate registered the config with transformers: a later from_pretrained in
        from transformers.integrations import unset_hf_deepspeed_config  # this process (the evaluation after

        unset_hf_deepspeed_config()  # training) would load the model partitioned (ZeRO-3's zero.Init)
    return out


def _deepspeed_config(run: RunConfig, fsdp: bool) -> dict[str, Any] | None:
    """The run's DeepSpeed config (``train.deepspeed`` or accelerate's), or None; what DeepSpeed
    cannot do here is refused before anything is loaded."""
    t = run.train
    source = deepspeed_source(t.deepspeed)
    if source is None:
        return None
    if run.adapters is not None:
        raise TrainingError("DeepSpeed trains one adapter per run (its engine owns one optimizer): train several "
                            "adapters together with plain DDP or train.fsdp: true")
    if fsdp:
        raise TrainingError("train.fsdp and DeepSpeed both shard the model: choose one")
    if run.quantization is not None:
        raise TrainingError("DeepSpeed with a bitsandbytes-quantized base is not supported: use plain DDP")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise TrainingError("DeepSpeed is not installed: pip install 'moelora[deepspeed]'") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return deepspeed_config(source, batch_size=t.batch_size, gradient_accumulation=t.gradient_accumulation,
                            max_grad_norm=t.max_grad_norm, world=world)


def _deepspeed_accelerator(cfg: dict[str, Any], t):
    """An ``Accelerator`` whose ``prepare`` builds a DeepSpeed engine from ``cfg``. A single process
    started without a launcher gets the environment of a one-process group, as DeepSpeed needs one.
    Creating it registers ``cfg`` with transformers, so under ZeRO-3 the base loads already
    partitioned (``zero.Init`` in ``from_pretrained``); the adapters attached after it are
    partitioned when the engine is built."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    if "WORLD_SIZE" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    plugin = DeepSpeedPlugin(hf_ds_config=cfg, gradient_accumulation_steps=t.gradient_accumulation,
                             gradient_clipping=t.max_grad_norm, zero3_init_flag=False)
    # Without a GPU accelerate finds no backend and would take every process for process 0 of 1 while
    # DeepSpeed groups them: naming gloo makes both see the same process group.
    handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    before = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    try:
        return Accelerator(mixed_precision=_precision(t.precision), deepspeed_plugin=plugin, kwargs_handlers=handlers,
                           gradient_accumulation_steps=t.gradient_accumulation)  # the engine's; the loop steps it
    finally:  # accelerate sets it for good: a later run in this process would take it for accelerate's config
        if before is None:
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = before


BEST_DIR = "best"  # output_dir/best[/adapter]: the adapter of the best validation so far (load_best_model_at_end)


class _Validation:
    """The validation-loss bookkeeping of a run: per adapter the best loss, its step, and the number
    of validations since it last improved (saved in every checkpoint's trainer state)."""

    def __init__(self, names: list[str], accuracy: str = "token accuracy") -> None:
        self.state = {n: {"best_loss": None, "best_step": None, "bad": 0} for n in names}
        self.accuracy = accuracy  # what val_accuracy is, for the summary line

    def restore(self, saved: dict | None) -> None:
        if saved:
            self.state = {n: dict(saved[n]) for n in self.state}

    def update(self, step: int, losses: dict[str, dict[str, float]]) -> list[str]:
        """Record a validation; returns the adapters whose loss improved (strictly)."""
        improved = []
        for name, st in self.state.items():
            loss = losses[name]["loss"]
            if st["best_loss"] is None or loss < st["best_loss"]:
                st.update(best_loss=loss, best_step=step, bad=0)
                improved.append(name)
            else:
                st["bad"] += 1
        return improved

    def exhausted(self, patience: int) -> bool:
        return patience > 0 and all(st["bad"] >= patience for st in self.state.values())

    @staticmethod
    def scalars(losses: dict[str, dict], multi: bool) -> dict[str, float]:
        """``val_loss`` and ``val_accuracy`` (means over adapters); ``val_loss/<task>`` ... with
        several tasks; ``val_loss/<adapter>[/<task>]`` ... with several adapters."""
        out = {}
        for metric in ("loss", "accuracy"):
            out[f"val_{metric}"] = sum(v[metric] for v in losses.values()) / len(losses)
            for name, v in losses.items():
                prefix = f"val_{metric}/{name}" if multi else f"val_{metric}"
                if multi:
                    out[prefix] = v[metric]
                if len(v["tasks"]) > 1 or multi:
                    out.update({f"{prefix}/{task}": x[metric] for task, x in v["tasks"].items()})
        return out

    def summary(self, losses: dict[str, dict[str, float]]) -> str:
        return "; ".join(f"{name + ' ' if len(losses) > 1 else ''}val_loss {v['loss']:.4f}, {self.accuracy} "
                         f"{v['accuracy']:.1%} (best loss "
                         f"{self.state[name]['best_loss']:.4f} at step {self.state[name]['best_step']})"
                         for name, v in losses.items())


def _best_dir(out: Path, name: str, multi: bool) -> Path:
    return out / BEST_DIR / name if multi else out / BEST_DIR


def _save_best(model, names: list[str], out: Path, multi: bool, main: bool, sharded: bool, zero3: bool, step: int,
               losses: dict[str, dict[str, float]]) -> None:
    """Save the adapters that just improved into ``output_dir/best`` (every process gathers when
    sharded); each file is replaced atomically, ``best.json`` (step, loss) after the weights."""
    tensors = _adapter_tensors(model, names, main, sharded, zero3)
    if not main:
        return
    for name in names:
        where = _best_dir(out, name, multi)
        checkpoint.save_adapter(model, where, name, tensors=tensors[name])
        reward.save_value_head(model, where, name)
        tmp = where / ".best.json.tmp"
        tmp.write_text(json.dumps({"step": step, "val_loss": losses[name]["loss"]}))
        os.replace(tmp, where / "best.json")


@torch.no_grad()
def check_packing(model: torch.nn.Module, probe: bool = True) -> None:
    """``train.packing`` relies on transformers finding the examples of a packed row from its
    position ids (restarting at 0) and masking attention between them. A probe of two short
    sequences refuses a model where that does not happen (an old transformers, remote code): the
    second one's logits packed after the first must equal its logits alone far better than with
    attention across (10x). The probe runs the base model (adapters off): a resumed MiLoRA adapter
    would route the unsegmented probe row on both sequences and move the logits by itself."""
    import contextlib

    from transformers import masking_utils

    from .inject import disable_adapter

    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        raise TrainingError("train.packing needs a transformers version that detects packed sequences "
                            "(masking_utils.find_packed_sequence_indices): upgrade transformers or train unpacked")
    if not probe:
        return
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    a, b = torch.arange(1, 9, device=device) % vocab, torch.arange(11, 17, device=device) % vocab
    both = torch.cat([a, b])[None]
    restart = torch.cat([torch.arange(len(a)), torch.arange(len(b))]).to(device)[None]
    was_training = model.training
    model.eval()
    base = disable_adapter(model) if getattr(model, "_moelora_ctx", None) is not None else contextlib.nullcontext()
    try:
        with base:
            alone = model(input_ids=b[None], use_cache=False).logits[0].float()
            packed = model(input_ids=both, position_ids=restart, use_cache=False).logits[0, len(a):].float()
            crossed = model(input_ids=both, use_cache=False).logits[0, len(a):].float()
    finally:
        model.train(was_training)
    leak, cross = (packed - alone).abs().max().item(), (crossed - alone).abs().max().item()
    if cross > 0 and not leak <= 0.1 * cross:
        raise TrainingError(f"train.packing: {type(model).__name__} lets packed examples attend to each other "
                            f"(logits moved by {leak:.3g}, {cross:.3g} with plain attention across): this model's "
                            "attention does not detect packed sequences; train it unpacked")


def _token_losses(ddp_model, batch: dict, labels: torch.Tensor, keeps_logits: bool, accelerator, accuracy: bool = False):
    """Forward ``batch``; returns the outputs, the float32 cross-entropy of every response token
    (``(tokens,)``) and the row of each (and with ``accuracy``, whether the argmax is that token).
    ``accelerator`` None: no autocast (evaluation outside a run)."""
    # logits only at the positions some row predicts a response token from (not the prompt):
    # with a large vocabulary the (rows, length, vocab) logits are most of a step's memory
    targets = labels[:, 1:]
    rows, cols = (targets != -100).nonzero(as_tuple=True)
    keep = torch.unique(cols) if keeps_logits else None  # sorted positions
    if keep is not None:
        batch["logits_to_keep"] = keep
    with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
        outputs = ddp_model(**batch, use_cache=False)
    at = torch.searchsorted(keep, cols) if keep is not None else cols
    # float32 logits of the response tokens only: (tokens, vocab), not (rows, length, vocab)
    logits = outputs.logits[rows, at].float()
    token_ce = F.cross_entropy(logits, targets[rows, cols], reduction="none")
    if accuracy:
        return outputs, token_ce, rows, logits.argmax(-1) == targets[rows, cols]
    return outputs, token_ce, rows


@torch.no_grad()
def validation_loss(ddp_model, features: list[dict], names: list[str], batch_size: int, pad_token_id: int,
                    accelerator, keeps_logits: bool = True) -> dict[str, dict[str, float]]:
    """The LM loss (mean cross-entropy over the response tokens, the router loss left out) and the
    token accuracy (the argmax is the response token: LLaMA-Factory's ``compute_accuracy``) of every
    adapter on ``features``: ``{adapter: {"loss", "accuracy", "tasks": {task: {"loss", "accuracy"}}}}``,
    each a mean over the response tokens. The examples go
    longest first in batches of ``batch_size``; process ``r`` of ``N`` takes batches ``r, r + N, ...``
    and every process runs the same number of forwards (sharded models gather layers together), the
    missing ones on a batch whose losses count zero."""
    tasks = sorted({f["task"] for f in features})
    A = len(names)  # rows of `sums`: each adapter's loss sums, its correct tokens, then the token counts
    sums = torch.zeros(2 * A + 1, len(tasks), dtype=torch.float64, device=accelerator.device)
    for feats, real in _validation_batches(ddp_model, features, batch_size, accelerator):
        batch = {k: v.to(accelerator.device) for k, v in collate(feats * len(names), pad_token_id).items()}
        labels = batch.pop("labels")
        if len(names) > 1:
            batch["adapter_names"] = [n for n in names for _ in feats]
        _, token_ce, rows, correct = _token_losses(ddp_model, batch, labels, keeps_logits, accelerator, accuracy=True)
        if not real:
            continue
        task = torch.tensor([tasks.index(f["task"]) for f in feats], device=rows.device)[rows % len(feats)]
        cell = (rows // len(feats)) * len(tasks) + task
        sums[:A].view(-1).index_add_(0, cell, token_ce.double())
        sums[A : 2 * A].view(-1).index_add_(0, cell, correct.double())
        sums[-1].index_add_(0, task[rows < len(feats)], torch.ones_like(task[rows < len(feats)], dtype=torch.float64))
    return _validation_means(accelerator.reduce(sums, reduction="sum").cpu(), names, tasks)


def _validation_batches(ddp_model, features: list[dict], batch_size: int, accelerator):
    """This process's validation batches, longest first, with the model in eval mode: ``(features,
    real)``; process ``r`` of ``N`` takes batches ``r, r + N, ...`` and every process gets the same
    number (the missing ones repeat the last batch with ``real`` False: forward it, count nothing)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    was_training = ddp_model.training
    ddp_model.eval()
    try:
        for r in range(-(-len(batches) // world)):
            index = r * world + rank
            yield [features[i] for i in batches[min(index, len(batches) - 1)]], index < len(batches)
    finally:
        ddp_model.train(was_training)


def _validation_means(sums: torch.Tensor, names: list[str], tasks: list[str]) -> dict[str, dict]:
    """``{adapter: {"loss", "accuracy", "tasks": {task: {...}}}}`` from ``sums``: ``A`` rows of loss
    sums, ``A`` of accuracy sums, then the counts, each with a column per task."""
    A, counts = len(names), sums[-1]
    mean = lambda row, j=None: float((row.sum() if j is None else row[j]) / (counts.sum() if j is None else counts[j]).clamp_min(1))  # noqa: E731
    return {name: {"loss": mean(sums[i]), "accuracy": mean(sums[A + i]),
                   "tasks": {task: {"loss": mean(sums[i], j), "accuracy": mean(sums[A + i], j)}
                             for j, task in enumerate(tasks)}}
            for i, name in enumerate(names)}


PREF_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected")  # TRL's names, logged with the loss


REFERENCE = "reference"  # the adapter name of train.ref_adapter


def _load_reference(model: torch.nn.Module, path: str | None, names: list[str]) -> str | None:
    """``train.ref_adapter``: load it (frozen) beside the trained adapters; returns its name, or
    None when the reference is the base model."""
    if path is None:
        return None
    if REFERENCE in names:
        raise TrainingError(f"an adapter named {REFERENCE!r} cannot train beside train.ref_adapter (which uses the name)")
    active = get_context(model).active
    checkpoint.load_adapter(model, path, adapter_name=REFERENCE)
    for n, p in model.named_parameters():
        if adapter_of(n) == REFERENCE:
            p.requires_grad_(False)
    set_adapter(model, active)
    return REFERENCE


def _reference_logps(ddp_model, model, rows: list[dict], reference: str | None, pad_token_id: int, accelerator,
                     keeps_logits: bool) -> torch.Tensor:
    """The reference's summed response log-probs of ``rows`` (``(len(rows),)``): one forward in eval
    mode, without gradient, of the base model with the adapter ``reference`` (None: with none)."""
    batch = {k: v.to(accelerator.device) for k, v in collate(rows, pad_token_id).items()}
    labels = batch.pop("labels")
    was_training = ddp_model.training
    ddp_model.eval()
    try:
        with torch.no_grad(), use_adapter(model, reference):
            _, token_ce, at = _token_losses(ddp_model, batch, labels, keeps_logits, accelerator)
    finally:
        ddp_model.train(was_training)
    return sequence_logps(token_ce, at, len(rows))[0]


def _policy_logps(ddp_model, rows: list[dict], names: list[str], pad_token_id: int, accelerator,
                  keeps_logits: bool) -> tuple[Any, torch.Tensor, torch.Tensor, int]:
    """One forward of ``rows`` for every adapter of ``names`` (a mixed batch when several): the
    outputs, the summed response log-probs and token counts (each ``(adapters, len(rows))``) and
    the batch's token count."""
    A = len(names)
    batch = {k: v.to(accelerator.device) for k, v in collate(rows * A, pad_token_id).items()}
    labels = batch.pop("labels")
    if A > 1:
        batch["adapter_names"] = [n for n in names for _ in rows]
    tokens = int(batch["attention_mask"].sum())
    outputs, token_ce, at = _token_losses(ddp_model, batch, labels, keeps_logits, accelerator)
    logps, counts = (x.view(A, len(rows)) for x in sequence_logps(token_ce, at, A * len(rows)))
    return outputs, logps, counts, tokens


def _preference_losses(ddp_model, model, feats: list[dict], names: list[str], pad_token_id: int, accelerator,
                       keeps_logits: bool, t, reference: str | None = None) -> tuple[Any, dict[str, Any]]:
    """One micro-batch of preference pairs (``feats``, ``B`` of them) for every adapter: the reference
    forward (:func:`_reference_logps`) when ``t.pref_loss`` has one, then one forward of every
    adapter's chosen and rejected rows. Returns the outputs and ``{"loss", "reward_chosen",
    "reward_rejected", "logps_chosen", "logps_rejected"}``, each ``(adapters, B)``, plus ``"tokens"``
    (the policy batch's)."""
    B = len(feats)
    rows = preference_rows(feats)  # B chosen, then B rejected
    ref = None
    if needs_reference(t.pref_loss):
        ref = _reference_logps(ddp_model, model, rows, reference, pad_token_id, accelerator, keeps_logits).view(2, B)
    outputs, logps, counts, tokens = _policy_logps(ddp_model, rows, names, pad_token_id, accelerator, keeps_logits)
    logps, counts = logps.view(-1, 2, B), counts.view(-1, 2, B)
    loss, reward_c, reward_r = preference_loss(
        t.pref_loss, t.pref_beta, (logps[:, 0], counts[:, 0]), (logps[:, 1], counts[:, 1]),
        None if ref is None else ref[0], None if ref is None else ref[1], gamma=t.simpo_gamma, ftx=t.pref_ftx,
        label_smoothing=t.dpo_label_smoothing)
    return outputs, {"loss": loss, "reward_chosen": reward_c, "reward_rejected": reward_r,
                     "logps_chosen": logps[:, 0].detach(), "logps_rejected": logps[:, 1].detach(), "tokens": tokens}


KTO_METRICS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def _kto_losses(ddp_model, model, feats: list[dict], names: list[str], pad_token_id: int, accelerator,
                keeps_logits: bool, t, reference: str | None = None) -> tuple[Any, dict[str, Any]]:
    """One micro-batch of labelled examples (``feats``, ``B``) for every adapter (``moelora.preference``'s
    KTO): the reference forward of the examples and of their mismatched rows
    (``data.kto_kl_rows``), a gradient-free forward of the mismatched rows for every adapter (train
    mode, as TRL), then the examples' forward. The KL estimate is each adapter's mean over the
    mismatched rows, averaged over the processes and clamped at 0. Returns the outputs and
    ``{"loss", "reward", "logps"}`` (``(adapters, B)``), ``"kl"`` (``(adapters,)``), ``"desirable"``
    (``(B,)``) and ``"tokens"``."""
    B = len(feats)
    mismatched = kto_kl_rows(feats, t.cutoff_len)
    ref = _reference_logps(ddp_model, model, [*feats, *mismatched], reference, pad_token_id, accelerator,
                           keeps_logits)
    with torch.no_grad():
        _, kl_logps, _, _ = _policy_logps(ddp_model, mismatched, names, pad_token_id, accelerator, keeps_logits)
    kl = accelerator.reduce((kl_logps - ref[B:]).mean(-1), reduction="mean").clamp_min(0)
    outputs, logps, counts, tokens = _policy_logps(ddp_model, feats, names, pad_token_id, accelerator, keeps_logits)
    desirable = torch.tensor([bool(f["desirable"]) for f in feats], device=logps.device)
    loss, reward = kto_loss(t.pref_beta, logps, ref[:B], desirable, kl[:, None], t.kto_chosen_weight,
                            t.kto_rejected_weight)
    if t.pref_ftx:  # the desirable responses' SFT loss (mean token NLL)
        loss = loss + t.pref_ftx * torch.where(desirable, -logps / counts.clamp_min(1), 0.0)
    return outputs, {"loss": loss, "reward": reward, "logps": logps.detach(), "kl": kl, "desirable": desirable,
                     "tokens": tokens}


def _kto_metrics(pair: dict[str, Any], accelerator) -> dict[str, torch.Tensor]:
    """:data:`KTO_METRICS` of a micro-batch, one per adapter: the means over the desirable
    (``chosen``) and the undesirable (``rejected``) examples of all processes. The loop divides what
    it is given by the processes and sums it over them: the sums are scaled to that."""
    d = pair["desirable"].float()
    counts = accelerator.reduce(torch.stack([d.sum(), (1 - d).sum()]), reduction="sum").clamp_min(1)
    world = accelerator.num_processes

    def mean(x: torch.Tensor, w: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return (x * w).sum(-1) / n * world

    out = {"kl": pair["kl"],
           "rewards/chosen": mean(pair["reward"], d, counts[0]), "rewards/rejected": mean(pair["reward"], 1 - d, counts[1]),
           "logps/chosen": mean(pair["logps"], d, counts[0]), "logps/rejected": mean(pair["logps"], 1 - d, counts[1])}
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def _preference_metrics(pair: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The micro-batch means of :data:`PREF_METRICS`, one per adapter."""
    return {**_reward_metrics(pair), "logps/chosen": pair["logps_chosen"].mean(-1),
            "logps/rejected": pair["logps_rejected"].mean(-1)}


@torch.no_grad()
def preference_validation(ddp_model, model, features: list[dict], names: list[str], batch_size: int,
                          pad_token_id: int, accelerator, keeps_logits: bool, t,
                          reference: str | None = None) -> dict[str, dict[str, Any]]:
    """``train.stage: dpo``/``kto``/``rm``'s validation: each adapter's mean preference loss over the pairs
    (examples) and its reward accuracy, overall and per task, in :func:`validation_loss`'s layout and
    batches (``batch_size`` pairs or examples). DPO's (and a reward model's) reward accuracy is the
    share of pairs whose chosen reward is above the rejected one; KTO's the share of examples on their label's side of
    the batch's KL estimate (a desirable one's log-ratio above it, an undesirable one's below)."""
    tasks = sorted({f["task"] for f in features})
    A = len(names)
    sums = torch.zeros(2 * A + 1, len(tasks), dtype=torch.float64, device=accelerator.device)
    kto = t.stage == "kto"
    for feats, real in _validation_batches(ddp_model, features, batch_size, accelerator):
        n = len(feats)
        if t.stage == "rm":
            _, pair = _reward_losses(ddp_model, model, feats, names, pad_token_id, accelerator)
        else:
            losses_of = _kto_losses if kto else _preference_losses
            # (KTO: a last batch of one has no mismatched row of its own: it is paired with itself)
            _, pair = losses_of(ddp_model, model, feats * 2 if kto and n == 1 else feats, names, pad_token_id,
                                accelerator, keeps_logits, t, reference)
        if not real:
            continue
        if kto:
            above = pair["reward"][:, :n] > t.pref_beta * pair["kl"][:, None]
            right = torch.where(pair["desirable"][:n], above, ~above)
        else:
            right = pair["reward_chosen"] > pair["reward_rejected"]
        task = torch.tensor([tasks.index(f["task"]) for f in feats], device=accelerator.device)
        for i in range(A):
            sums[i].index_add_(0, task, pair["loss"][i, :n].double())
            sums[A + i].index_add_(0, task, right[i].double())
        sums[-1].index_add_(0, task, torch.ones(len(feats), dtype=torch.float64, device=accelerator.device))
    return _validation_means(accelerator.reduce(sums, reduction="sum").cpu(), names, tasks)


RM_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def _reward_losses(ddp_model, model, feats: list[dict], names: list[str], pad_token_id: int,
                   accelerator) -> tuple[Any, dict[str, Any]]:
    """``train.stage: rm``: one forward of the pairs' chosen then rejected rows for every adapter (a
    mixed batch when several), each adapter's value head's reward of its rows (``moelora.reward``) and
    LLaMA-Factory's pairwise loss ``-log sigmoid(r_c - r_r)``. Returns the outputs and ``{"loss",
    "reward_chosen", "reward_rejected"}`` (``(adapters, B)``) and ``"tokens"``."""
    A, B = len(names), len(feats)
    rows = preference_rows(feats)
    batch = {k: v.to(accelerator.device) for k, v in collate(rows * A, pad_token_id).items()}
    batch.pop("labels")
    if A > 1:
        batch["adapter_names"] = [n for n in names for _ in rows]
    with accelerator.autocast():
        r, outputs = reward.sequence_rewards(ddp_model, model, batch, names, return_outputs=True)
    r = r.view(A, 2, B)
    chosen, rejected = r[:, 0], r[:, 1]
    loss = -F.logsigmoid(chosen - rejected)
    return outputs, {"loss": loss, "reward_chosen": chosen.detach(), "reward_rejected": rejected.detach(),
                     "tokens": int(batch["attention_mask"].sum())}


def _reward_metrics(pair: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The micro-batch means of :data:`RM_METRICS` (the rewards of DPO's and a reward model's pairs)."""
    c, r = pair["reward_chosen"], pair["reward_rejected"]
    return {"rewards/chosen": c.mean(-1), "rewards/rejected": r.mean(-1),
            "rewards/accuracies": (c > r).float().mean(-1), "rewards/margins": (c - r).mean(-1)}


def _adapter_params(model: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if p.requires_grad and adapter_of(n) == name]


def _write_summary(out: Path, names: list[str], steps: int, seconds: float, device: torch.device,
                   validation: dict | None = None) -> None:
    """``train_summary.json``: steps, time, the process's peak memory (GPU: allocated tensors) and,
    with validation data, each adapter's best validation loss and its step."""
    import resource

    summary = {"adapters": names, "steps": steps, "seconds": round(seconds, 3), "device": str(device),
               "peak_cpu_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if validation is not None:
        summary["validation"] = validation
    if device.type == "cuda":
        summary["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))


class _CheckpointFiles:
    """File names inside a checkpoint: one adapter keeps the original layout; several get suffixes."""

    def __init__(self, names: list[str] | None) -> None:
        self.multi = names is not None

    def adapter(self, name: str) -> str:
        return f"adapter-{name}" if self.multi else "adapter"

    def optimizer(self, name: str) -> str:
        return f"optimizer-{name}.pt" if self.multi else "optimizer.pt"

    def scheduler(self, name: str) -> str:
        return f"scheduler-{name}.pt" if self.multi else "scheduler.pt"


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """transformers' activation checkpointing of every decoder layer, non-reentrant (the kind
    routers need: see ``moelora.inject``); the method's name changed in transformers 5."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise TrainingError(f"{type(model).__name__} does not support gradient checkpointing (train.gradient_checkpointing)")
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _adapter_tensors(model: torch.nn.Module, names: list[str], main: bool, sharded: bool,
                     zero3: bool = False) -> dict[str, dict | None]:
    """Each adapter's full tensors for saving: gathered by every process when sharded (a collective),
    else read by the main process only. Under ZeRO-3 every process gathers the partitioned
    parameters (a collective too) and the main process copies them."""
    if zero3:
        import deepspeed

        out = {}
        for name in names:
            params = [p for n, p in model.named_parameters() if adapter_of(n) == name]
            with deepspeed.zero.GatheredParameters(params):
                out[name] = checkpoint.adapter_tensors(model, name) if main else None  # copies (cpu clones)
        return out
    return {name: checkpoint.adapter_tensors(model, name) if (main or sharded) else None for name in names}


def _save_checkpoint(accelerator, model, optimizers, schedulers, files, out: Path, step: int, epoch: int, position: int,
                     t, sharded: bool = False, engine=None, zero3: bool = False, validation: dict | None = None) -> Path:
    """Write ``checkpoint-{step}`` atomically: every process writes its RNG state into a hidden
    directory, then the main process adds the rest and renames it into place. Sharded (FSDP), the
    adapters and optimizer states are first gathered in full by every process: a checkpoint is the
    same files whatever the number of processes. Under DeepSpeed (``engine``) every process writes
    its optimizer partition with the engine's own ``save_checkpoint`` (frozen base excluded) into
    ``deepspeed/``; the adapter is saved in full beside it as usual."""
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    tensors = _adapter_tensors(model, list(optimizers), accelerator.is_main_process, sharded, zero3)
    if engine is not None:
        engine.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag="state", exclude_frozen_parameters=True)
    optim_states = {}
    for name, opt in optimizers.items():
        if engine is not None:
            continue
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optim_states[name] = get_optimizer_state_dict(
                model, opt.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        elif accelerator.is_main_process:
            optim_states[name] = opt.state_dict()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name in optimizers:
            checkpoint.save_adapter(model, tmp / files.adapter(name), name, tensors=tensors[name])
            reward.save_value_head(model, tmp / files.adapter(name), name)
            if name in optim_states:
                torch.save(optim_states[name], tmp / files.optimizer(name))
            torch.save(schedulers[name].state_dict(), tmp / files.scheduler(name))
        state = {"step": step, "epoch": epoch, "position": position, "world_size": accelerator.num_processes,
                 "global_batch": t.batch_size * accelerator.num_processes * t.gradient_accumulation, "fsdp": sharded,
                 "validation": validation}
        if engine is not None:
            state["deepspeed"] = {"zero_stage": engine.zero_optimization_stage(), "world_size": accelerator.num_processes}
        (tmp / STATE_NAME).write_text(json.dumps(state))
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        if t.save_total_limit:
            for old in checkpoints(out)[: -t.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final

