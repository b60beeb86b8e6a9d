"""Prompt lookup decoding (`moelora generate --prompt-lookup N`, transformers'
``prompt_lookup_num_tokens``) against plain greedy decoding, per method, on the embedded
SmolLM2-135M-Instruct (CPU).

    python benchmarks/prompt_lookup_bench.py [--tokens 96] [--lookup 10] [--repeats 3] [--threads 2]

Prompts that the reply mostly copies (rewrite a paragraph): the case prompt lookup is for. Each
method's adapter (LoRA r=16, MixLoRA 8 experts top-2 r=16, MiLoRA r=16) has small random weights
(B ~ N(0, 0.002): a fresh B is 0 and would be the base model). The greedy outputs are checked equal
first; then the median seconds of ``--repeats`` timed calls each way, the tokens accepted per
verifying forward, and the ratio are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PARAGRAPH = ("The river starts in the mountains, where snow melts every spring and feeds a hundred small "
             "streams. It runs through three valleys and two towns before it reaches the sea, and its water "
             "turns the wheels of an old mill that still grinds flour for the bakery in the square.")
PROMPTS = [f"Repeat the following text exactly, word for word:\n\n{PARAGRAPH}",
           f"Copy this paragraph, then stop:\n\n{PARAGRAPH}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--lookup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moelora
    from moelora.embedded import resolve_model

    path = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(path)
    configs = {"lora": moelora.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0),
               "mixlora": moelora.MixLoraConfig(num_experts=8, top_k=2, r=16, lora_alpha=32, lora_dropout=0.0),
               "milora": moelora.MiLoraConfig(r=16, lora_alpha=32, lora_dropout=0.0)}
    print(f"prompt lookup decoding (N={args.lookup}), {args.tokens} new tokens, greedy, {args.threads} threads")
    print(f"{'method':<8} {'plain s':>8} {'lookup s':>9} {'tokens/verify':>14} {'lookup / plain':>15}")
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        moelora.attach(model, cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad and "lora_B" in n:
                    p.normal_(0, 0.002)
        times = {"plain": [], "lookup": []}
        forwards = 0  # of one lookup call per prompt, prefill excluded
        for prompt in PROMPTS:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            enc = tok(text, return_tensors="pt", add_special_tokens=False)
            kw = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                      pad_token_id=tok.pad_token_id)
            outs = {}
            for mode in ("plain", "lookup"):
                extra = {"prompt_lookup_num_tokens": args.lookup} if mode == "lookup" else {}
                with torch.no_grad():
                    outs[mode] = model.generate(**enc, **kw, **extra)  # warm-up, and the output to compare
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        model.generate(**enc, **kw, **extra)
                        times[mode].append(time.perf_counter() - t0)
            if not torch.equal(outs["plain"], outs["lookup"]):
                raise SystemExit(f"{name}: prompt lookup changed the greedy output")
            calls: list[int] = []
            hook = model.register_forward_pre_hook(lambda m, a, k, calls=calls: calls.append(1), with_kwargs=True)
            with torch.no_grad():
                model.generate(**enc, **kw, prompt_lookup_num_tokens=args.lookup)
            hook.remove()
            forwards += len(calls) - 1
        plain, look = statistics.median(times["plain"]), statistics.median(times["lookup"])
        per_verify = len(PROMPTS) * args.tokens / max(1, forwards)
        print(f"{name:<8} {plain:>8.2f} {look:>9.2f} {per_verify:>14.2f} {look / plain:>15.2f}")


if __name__ == "__main__":
    main()
