"""What benchmarks/bench.py and benchmarks/moe_peft_bench.py share: the model shapes, the figures
and the timing loop. It imports neither moelora nor a particular transformers version, because
moe_peft_bench.py runs in its own environment (transformers 4.46)."""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FIGURES = [
    "train_step_ms",
    "train_tokens_per_s",
    "peak_memory_mb",
    "activations_mb",
    "prefill_ms",
    "decode_b1_ms_per_token",
    "decode_b32_ms_per_token",
    "decode_b1_floor_ms_per_token",
    "trainable_params",
]
GATE_ATOL = 1e-4


@dataclass
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    dtype: torch.dtype
    device: str
    train_batch: int
    train_len: int
    prefill_len: int
    decode_prompt_len: int
    decode_new_tokens: int
    decode_batches: tuple[int, int] = (1, 32)

    def config(self, layers: int | None = None):
        import transformers

        return transformers.LlamaConfig(
            hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=layers or self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.heads, vocab_size=self.vocab,
            max_position_embeddings=max(2048, self.train_len + 16),
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )


def shape_for(mode: str, tiny: bool) -> Shape:
    if tiny:
        return Shape(64, 96, 2, 4, 256, torch.float32, "cpu", 2, 32, 32, 8, 4)
    if mode == "cpu":
        return Shape(512, 1376, 4, 8, 8192, torch.float32, "cpu", 4, 128, 128, 16, 32)
    # 32 new tokens (not 128): a 7B eager decode step is ~0.1 s of launch-bound work, and 9 contenders x
    # 2 batch sizes x 4 generate calls of 128 tokens took 80-100 s per contender on the H100
    return Shape(4096, 11008, 32, 32, 32000, torch.bfloat16, "cuda", 4, 512, 512, 16, 32)


# ---------------------------------------------------------------------------------------------
# models


def _sync(shape: Shape) -> None:
    if shape.device == "cuda":
        torch.cuda.synchronize()


def _free(shape: Shape) -> None:
    gc.collect()
    if shape.device == "cuda":
        torch.cuda.empty_cache()


def timed(fn: Callable[[], object], shape: Shape, warmup: int, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(shape)
    times = []
    for _ in range(repeats):
        _sync(shape)
        t0 = time.perf_counter()
        fn()
        _sync(shape)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fmt(v, digits=1):
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.{digits}f}"


def finish(report: dict, print_report: Callable[[dict], None], t_start: float, output: str | None) -> None:
    """Total time into ``report["meta"]``, the printed report, and the JSON file when asked for."""
    report["meta"]["total_seconds"] = time.perf_counter() - t_start
    print_report(report)
    print(f"\ntotal {report['meta']['total_seconds']:.1f} s")
    if output:
        with open(output, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {output}")
