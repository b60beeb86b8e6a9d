"""Reward models (``train.stage: rm``, LLaMA-Factory's and TRL's pairwise reward modelling).

A value head (TRL's ``ValueHead``: dropout, then ``Linear(hidden, 1)``) reads the decoder's final
hidden states (after the last norm); a sequence's reward is its value at its last token. Training
minimises ``-log sigmoid(r(chosen) - r(rejected))`` over preference pairs (LLaMA-Factory's
``PairwiseTrainer``), with any adapter of this library underneath. Each adapter has its own head,
saved beside it as ``value_head.safetensors`` with LLaMA-Factory's tensor names
(``v_head.summary.weight`` ``(1, hidden)``, ``v_head.summary.bias`` ``(1,)``, float32).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from .checkpoint import CheckpointError, write_adapter_dir

__all__ = ["ValueHead", "attach_value_head", "value_head", "sequence_rewards", "save_value_head", "load_value_head",
           "reward_scores", "pairwise_accuracy", "VALUE_HEAD_NAME"]

VALUE_HEAD_NAME = "value_head.safetensors"
HOLDER = "moelora_value_heads"  # model.moelora_value_heads[adapter]: parameters belong to that adapter


class ValueHead(nn.Module):
    def __init__(self, hidden: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.summary = nn.Linear(hidden, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(..., hidden)`` -> ``(...)`` values (float32)."""
        return self.summary(self.dropout(hidden_states.to(self.summary.weight.dtype))).squeeze(-1)


def value_head(model: nn.Module, adapter_name: str) -> ValueHead | None:
    heads = getattr(model, HOLDER, None)
    return heads[adapter_name] if heads is not None and adapter_name in heads else None


def attach_value_head(model: nn.Module, adapter_name: str, dropout: float = 0.1) -> ValueHead:
    """A new float32 value head for ``adapter_name`` (trainable), on the model's device (``dropout``:
    TRL's ``summary_dropout_prob``)."""
    if not hasattr(model, HOLDER):
        model.add_module(HOLDER, nn.ModuleDict())
    device = next(model.parameters()).device
    head = ValueHead(model.config.hidden_size, dropout).to(device=device, dtype=torch.float32)
    getattr(model, HOLDER)[adapter_name] = head
    return head


def _final_norm(model: nn.Module) -> nn.Module:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    norm = getattr(decoder, "norm", None)
    if norm is None:
        raise ValueError(f"{type(model).__name__}: no final norm found (decoder.norm) to read the hidden states from")
    return norm


@contextlib.contextmanager
def _capture(model: nn.Module):
    """The final norm's output of the forwards run inside (the last one in ``box[0]``)."""
    box: list[torch.Tensor] = []
    hook = _final_norm(model).register_forward_hook(lambda m, args, out: box.__setitem__(slice(None), [out]))
    try:
        yield box
    finally:
        hook.remove()


def sequence_rewards(forward_model: nn.Module, model: nn.Module, batch: dict, adapter_name: str | list[str],
                     return_outputs: bool = False):
    """``(B,)`` float32 rewards of a right-padded ``batch`` (``input_ids``, ``attention_mask``, ...):
    ``forward_model`` (``model`` or its DDP wrapper) runs the forward (logits for the last position
    only), ``model``'s value head of ``adapter_name`` reads the hidden state of each row's last token.
    Several names: the batch is their rows in that order, equally many each (a mixed batch with its
    ``adapter_names``), each read by its own head. With ``return_outputs``: ``(rewards, the forward's
    outputs)`` (their ``router_loss``)."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    heads = [value_head(model, n) for n in names]
    for n, head in zip(names, heads):
        if head is None:
            raise ValueError(f"adapter {n!r} has no value head (train.stage: rm attaches one)")
    with _capture(model) as box:
        outputs = forward_model(**batch, use_cache=False, logits_to_keep=1)
    last = batch["attention_mask"].sum(-1) - 1
    hidden = box[0][torch.arange(len(last), device=last.device), last]  # (B, hidden)
    per = len(last) // len(names)
    rewards = torch.cat([head(hidden[i * per : (i + 1) * per]).float() for i, head in enumerate(heads)])
    return (rewards, outputs) if return_outputs else rewards


def save_value_head(model: nn.Module, path: str | os.PathLike, adapter_name: str) -> None:
    """Write ``adapter_name``'s head into the adapter directory ``path`` (atomically; no-op without one)."""
    head = value_head(model, adapter_name)
    if head is None:
        return
    tensors = {"v_head.summary.weight": head.summary.weight.detach().float().cpu().contiguous(),
               "v_head.summary.bias": head.summary.bias.detach().float().cpu().contiguous()}
    write_adapter_dir(path, {VALUE_HEAD_NAME: save_safetensors_bytes(tensors, metadata={"format": "pt"})})


def load_value_head(model: nn.Module, path: str | os.PathLike, adapter_name: str) -> bool:
    """Load ``path/value_head.safetensors`` (ours or LLaMA-Factory's) as ``adapter_name``'s head,
    attaching one if needed; False when the directory has none. Shapes are checked first."""
    f = Path(path) / VALUE_HEAD_NAME
    if not f.is_file():
        return False
    try:
        tensors = load_file(str(f))
    except Exception as e:
        raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    hidden = model.config.hidden_size
    want = {"v_head.summary.weight": (1, hidden), "v_head.summary.bias": (1,)}
    for key, shape in want.items():
        if key not in tensors:
            raise CheckpointError(f"{f}: missing tensor {key!r} (has {sorted(tensors)})")
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"{f}: {key} has shape {tuple(tensors[key].shape)}, the model needs {shape}")
    head = value_head(model, adapter_name) or attach_value_head(model, adapter_name)
    with torch.no_grad():
        head.summary.weight.copy_(tensors["v_head.summary.weight"])
        head.summary.bias.copy_(tensors["v_head.summary.bias"])
    return True


@torch.no_grad()
def reward_scores(model: nn.Module, tokenizer, prompts: list[str], responses: list[str], adapter_name: str = "default",
                  batch_size: int = 8, format: str = "messages") -> list[float]:
    """The rewards of ``responses`` to ``prompts``, encoded as training encodes pairs of that data
    ``format``: ``messages`` / ``sharegpt`` (the prompt as one user message through the chat
    template), ``alpaca`` / ``llm-adapters`` (the prompt as the instruction of LLM-Adapters' Alpaca
    template) or ``text`` (the prompt as raw text); the response and EOS after it. ``adapter_name``
    is active with its value head, in eval mode."""
    from .data import PROMPT_TEMPLATES, Example, collate, encode_example
    from .inject import use_adapter

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    if format not in ("messages", "sharegpt", "alpaca", "llm-adapters", "text"):
        raise ValueError(f"format must be messages, sharegpt, alpaca, llm-adapters or text, got {format!r}")
    feats = []
    for p, r in zip(prompts, responses):
        if format in ("messages", "sharegpt"):
            text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True)
        elif format == "text":
            text = p
        else:
            text = PROMPT_TEMPLATES["prompt_no_input"].format(instruction=p)
        feats.append(encode_example(Example(prompt=text, response=r, task="score"), tokenizer,
                                    cutoff_len=1 << 30))
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    try:
        with use_adapter(model, adapter_name):
            for i in range(0, len(feats), batch_size):
                batch = collate(feats[i : i + batch_size], tokenizer.pad_token_id)
                batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                out += sequence_rewards(model, model, batch, adapter_name).tolist()
    finally:
        model.train(was)
    return out


def _response_logps(model: nn.Module, batch: dict, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` summed log-probabilities of each row's response tokens (``labels`` != -100), as DPO's
    training computes them (logits only where a response token is predicted)."""
    import inspect

    from .preference import sequence_logps
    from .train import _token_losses  # (train imports this module)

    keeps = "logits_to_keep" in inspect.signature(model.forward).parameters
    _, token_ce, rows = _token_losses(model, dict(batch), labels.to(batch["input_ids"].device), keeps, None)
    return sequence_logps(token_ce, rows, len(labels))[0]


@torch.no_grad()
def pairwise_accuracy(model: nn.Module, tokenizer, source, adapter_name: str = "default", batch_size: int = 8,
                      cutoff_len: int = 1024, limit: int | None = None, beta: float | None = None) -> dict:
    """Preference pairs scored by ``adapter_name`` (``source``: a :class:`moelora.data.DataSource` of
    pairs, read and encoded as ``train.stage: rm`` / ``dpo`` read them): ``{"pairs", "accuracy"``
    (the chosen side scores above the rejected one), ``"margin"``, ``"chosen"``, ``"rejected"``
    (means)``}``, in eval mode. The score is the value head's reward (a reward model) or, with
    ``beta``, DPO's implicit reward ``beta x (log p_adapter - log p_base)`` of the response, the base
    model (adapters off) as the reference (TRL's ``rewards/accuracies``)."""
    from .data import _encode_many, _read, collate, preference_rows
    from .inject import use_adapter

    examples = _read(source, tokenizer, "dpo")[0][:limit]
    feats = _encode_many(examples, tokenizer, cutoff_len)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    chosen: list[float] = []
    rejected: list[float] = []
    try:
        for i in range(0, len(feats), batch_size):
            part = feats[i : i + batch_size]
            batch = collate(preference_rows(part), tokenizer.pad_token_id)
            labels = batch.pop("labels")
            batch = {k: v.to(device) for k, v in batch.items()}
            with use_adapter(model, adapter_name):
                r = sequence_rewards(model, model, batch, adapter_name) if beta is None else \
                    _response_logps(model, batch, labels)
            if beta is not None:
                with use_adapter(model, None):
                    r = beta * (r - _response_logps(model, batch, labels))
            r = r.tolist()
            chosen += r[: len(part)]
            rejected += r[len(part):]
    finally:
        model.train(was)
    n = len(chosen)
    return {"pairs": n, "accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n,
            "margin": sum(c - r for c, r in zip(chosen, rejected)) / n, "chosen": sum(chosen) / n,
            "rejected": sum(rejected) / n}
