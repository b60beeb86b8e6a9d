"""An lm-evaluation-harness model type, ``moelora``: any base model plus a moelora / PEFT / MoE-PEFT adapter.

    lm_eval --model moelora --model_args pretrained=DIR,adapter=ADAPTER_DIR \\
        --tasks my_task --include_path my_tasks/ --device cpu
    moelora-lm-eval ...                         # the same command line
    python -m moelora.lm_eval_model ...         # the same command line

or from Python (importing this module registers the name ``moelora`` with lm_eval)::

    import lm_eval, moelora.lm_eval_model
    lm_eval.simple_evaluate(model="moelora", model_args="pretrained=DIR,adapter=ADAPTER_DIR", tasks=[...])

``MoeLoraLM`` is lm_eval's ``HFLM`` (same arguments: ``batch_size``, ``device``, ``dtype``,
``max_length``, ...) with the adapter loaded by ``moelora.load_adapter`` after the base model.
``pretrained`` defaults to the embedded SmolLM2-135M-Instruct.

Plain ``lm_eval --model moelora`` finds this class too: through the ``lm_eval.models`` entry point on
lm-eval releases that read one, and through ``moelora_lm_eval_plugin`` (a ``.pth`` start-up hook) on
0.4.x, which reads none (docs/lm_eval.md). ``moelora-lm-eval`` / ``python -m moelora.lm_eval_model``
import it and then run lm_eval's own CLI.

MiLoRA routes on the prompt only. For loglikelihood requests HFLM scores context + continuation
in one forward, so this class tells the model how many tokens of each row are the context
(``prompt_lengths``): the routing is the one a forward on the context alone computes, exactly as at
generation time. ``generate_until`` needs nothing extra (moelora's ``generate`` routes on the prompt).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .checkpoint import load_adapter
from .config import MiLoraConfig

MODEL_NAME = "moelora"
_PAD = 0  # HFLM right-pads loglikelihood batches with token id 0 (lm_eval.models.utils_hf.pad_and_concat)

Request = tuple[Any, list[int], list[int]]  # ((context, continuation) strings or None, context ids, continuation ids)


def _strip(tokens: Sequence[int]) -> tuple[int, ...]:
    """Tokens without trailing ``_PAD`` ids: the key a right-padded row and its unpadded input share."""
    end = len(tokens)
    while end and tokens[end - 1] == _PAD:
        end -= 1
    return tuple(tokens[:end])


def _register(cls: type) -> type:
    # `python -m moelora.lm_eval_model` executes this file as `__main__` and then imports it as
    # `moelora.lm_eval_model` (main() below): only the importable module's class is registered.
    return cls if __name__ == "__main__" else register_model(MODEL_NAME)(cls)


@_register
class MoeLoraLM(HFLM):
    """lm_eval's ``HFLM`` with a moelora adapter (``adapter=DIR``) on the base model (``pretrained=``)."""

    def __init__(
        self,
        pretrained: str | os.PathLike | Any | None = None,
        adapter: str | os.PathLike | None = None,
        adapter_name: str = "default",
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        if adapter and kwargs.get("peft"):
            raise ValueError("give either adapter= (loaded by moelora, which also reads PEFT adapters) or peft=, not both")
        if pretrained is None or isinstance(pretrained, str):
            from .embedded import resolve_model

            pretrained = resolve_model(pretrained)
        if isinstance(pretrained, os.PathLike):
            pretrained = os.fspath(pretrained)
        # device=None lets HFLM pick cuda when available, else cpu (HFLM's own default is "cuda").
        super().__init__(pretrained=pretrained, device=device, **kwargs)
        self.adapter = os.fspath(adapter) if adapter else None
        self.adapter_name = adapter_name
        # Set only inside _loglikelihood_tokens: stripped input row -> context tokens in that row.
        self._context_lengths: dict[tuple[int, ...], int] | None = None
        if self.adapter:
            # After HFLM placed the base model: new adapter weights go to each base layer's device.
            load_adapter(self.model, self.adapter, adapter_name=adapter_name)
            self.model.eval()

    # ------------------------------------------------------------------------------------------
    # MiLoRA: route loglikelihood requests on the context only

    def _routes_on_prompt(self) -> bool:
        ctx = getattr(self.model, "_moelora_ctx", None)
        return ctx is not None and isinstance(ctx.configs.get(ctx.active), MiLoraConfig)

    def _context_tables(self, requests: Sequence[Request]) -> list[tuple[list[int], dict[tuple[int, ...], int]]]:
        """Split ``requests`` into groups in which every input row names its context length unambiguously.

        HFLM's row for a request is ``(context + continuation)[-(max_length + 1):][:-1]``, right-padded
        with ``_PAD``; its first ``len(row) - (len(continuation) - 1)`` tokens are the context. Two
        requests whose rows coincide (up to trailing ``_PAD`` ids) but split differently, e.g.
        ``("a b", " c d")`` and ``("a b c", " d")``, would be confused, and HFLM's logits cache
        (``logits_cache=True``) would even score them with one forward: they go to separate groups.
        One group in practice.
        """
        groups: list[tuple[list[int], dict[tuple[int, ...], int]]] = []
        for i, (_, context, continuation) in enumerate(requests):
            row = (context + continuation)[-(self.max_length + 1) :][:-1]
            n_context = len(row) - (len(continuation) - 1)
            key = _strip(row)
            for indices, table in groups:
                if table.setdefault(key, n_context) == n_context:
                    indices.append(i)
                    break
            else:
                groups.append(([i], {key: n_context}))
        return groups

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        if self.backend != "causal" or not self._routes_on_prompt():
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        results: list[Any] = [None] * len(requests)
        for indices, table in self._context_tables(requests):
            self._context_lengths = table
            try:
                scored = super()._loglikelihood_tokens(
                    [requests[i] for i in indices], disable_tqdm=disable_tqdm, override_bs=override_bs
                )
            finally:
                self._context_lengths = None
            for i, r in zip(indices, scored, strict=True):
                results[i] = r
        return results

    def _model_call(
        self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        table = self._context_lengths
        if table is None or attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        lengths = [table.get(_strip(row)) for row in inps.tolist()]
        if all(n is None for n in lengths):  # a probe batch (batch_size=auto detection)
            return super()._model_call(inps)
        if any(n is None for n in lengths):
            raise RuntimeError("moelora: a loglikelihood batch holds a row that no request produced")
        prompt_lengths = torch.tensor(lengths, dtype=torch.long, device=inps.device)
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            return self.model(inps, prompt_lengths=prompt_lengths).logits

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        if self.adapter:
            info["moelora_adapter"] = self.adapter
        return info


def main(argv: Sequence[str] | None = None) -> None:
    """``moelora-lm-eval``: lm_eval's command line with the ``moelora`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0] if sys.argv else "moelora-lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    from moelora.lm_eval_model import main as _main  # the importable module: registers "moelora"

    _main()
