"""List the host-device synchronisations of one training step and one short ``generate`` per contender.

A synchronising op (``.item()``, boolean indexing, a pageable host-to-device copy...) stops the host
from queueing kernels ahead of the GPU: in a step of thousands of small kernels each one leaves the
GPU idle while the host catches up. CUDA only (``torch.cuda.set_sync_debug_mode``); each distinct
Python call site is printed once with its count.

Usage: ``python benchmarks/sync_check.py [--layers 2] [--autocast] [--contenders ...]``
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import build_base, make_contender  # noqa: E402
from common import shape_for  # noqa: E402


def sites(fn) -> collections.Counter:
    """Call sites (the innermost frames outside torch) of every synchronising op ``fn`` runs."""
    found: collections.Counter = collections.Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename and "warnings" not in f.filename]
        found[" <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames[-1:-5:-1])] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the 7B-shaped model (syncs repeat per layer)")
    ap.add_argument("--autocast", action="store_true", help="train under bf16 autocast")
    ap.add_argument("--contenders", nargs="*", default=["peft_lora_r16", "ours_lora_r16", "ours_mixlora_fast", "ours_milora_r16"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sync_check needs CUDA")
        return 2
    shape = shape_for("gpu", False)
    for name in args.contenders:
        model = make_contender(name, shape, build_base(shape, layers=args.layers))
        ids = torch.randint(3, shape.vocab, (shape.train_batch, shape.train_len), device="cuda")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step(model=model, ids=ids, opt=opt):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.autocast):
                out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def gen(model=model, ids=ids):
            model.generate(input_ids=ids[:2, :16], attention_mask=torch.ones_like(ids[:2, :16]), max_new_tokens=4,
                           min_new_tokens=4, do_sample=False, pad_token_id=0)

        model.train()
        step()  # warm-up: first-call work is not the steady state
        for what, fn in (("training step", step), ("generate 4 tokens", gen)):
            if what.startswith("generate"):
                model.eval()
                gen()
            found = sites(fn)
            print(f"\n{name}, {what}: {sum(found.values())} synchronising ops, {args.layers} layers")
            for site, n in found.most_common():
                print(f"  {n:5d}  {site}")
        del model, opt
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
