"""DoRA decoding cost: ours (norm cached while the weights do not change) vs PEFT, CPU mode shape.

    python benchmarks/dora_decode.py      # greedy, batch 1, 16 new tokens after 16 prompt tokens, 1 thread
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
import peft  # noqa: E402

import moelora  # noqa: E402
from moelora.lora import DoraVariant  # noqa: E402

NEW = 16


def ms_per_token(model) -> float:
    ids = torch.randint(3, 8000, (1, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        model.generate(input_ids=ids, **kw)  # warm-up
        t0 = time.perf_counter()
        model.generate(input_ids=ids, **kw)
    return (time.perf_counter() - t0) / NEW * 1e3


def main() -> int:
    torch.set_num_threads(1)
    shape = bench.shape_for("cpu", False)
    base = bench.build_base(shape)
    print(f"base model: {ms_per_token(base):.2f} ms/token")
    cfg = moelora.LoraConfig(r=16, lora_alpha=32, use_dora=True, target_modules=bench.TARGETS)
    moelora.attach(base, cfg).eval()
    print(f"ours, DoRA: {ms_per_token(base):.2f} ms/token")
    cached = DoraVariant._norm
    DoraVariant._norm = lambda self, layer, lora: self._weight_norm(layer.weight, lora)  # no cache
    try:
        print(f"ours, DoRA without the norm cache: {ms_per_token(base):.2f} ms/token")
    finally:
        DoraVariant._norm = cached
    moelora.detach(base)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, use_dora=True,
                                                       target_modules=bench.TARGETS)).eval()
    print(f"PEFT {peft.__version__}, DoRA: {ms_per_token(theirs):.2f} ms/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
