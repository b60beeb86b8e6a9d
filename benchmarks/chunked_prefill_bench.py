"""What chunked prefill does for the requests already decoding when a long prompt arrives.

    python benchmarks/chunked_prefill_bench.py [--model DIR] [--streams 8] [--long 2048] [--budget 256]

The engine (embedded SmolLM2-135M-Instruct by default, a random LoRA r=16 on every projection)
decodes ``--streams`` requests; once they run, a request with a ``--long``-token prompt arrives.
The figure is the running streams' longest gap between two tokens (the step that prefills the
long prompt), and the long request's time to first token, with the prompt prefilled in chunks of
``--budget`` tokens (``max_prefill_tokens``) and in one step (``chunked_prefill=False``), in the
same run; every stream's tokens are checked to be the same both ways (greedy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def run(engine_kw: dict, args, model, tok) -> dict:
    from moelora.engine import Engine, SamplingParams

    eng = Engine(model, tok, max_batch=args.streams + 1, prefix_cache_bytes=0, **engine_kw)
    eng.add_attached("lora")
    for i in range(args.streams):
        eng.add_request(f"s{i}", list(range(100 + i, 132 + i)), "lora", SamplingParams(max_tokens=args.tokens, ignore_eos=True))
    for _ in range(4):  # the streams are decoding
        eng.step()
    long_prompt = [(1000 + 7 * j) % 40000 for j in range(args.long)]
    t_arrive = time.perf_counter()
    eng.add_request("long", long_prompt, "lora", SamplingParams(max_tokens=4, ignore_eos=True))
    last = {f"s{i}": t_arrive for i in range(args.streams)}
    gaps, first, tokens = [], None, {}
    while eng.has_work():
        outs = eng.step()
        now = time.perf_counter()
        for o in outs:
            tokens.setdefault(o.request_id, []).extend(o.token_ids)
            if o.request_id == "long":
                if first is None and o.token_ids:
                    first = now - t_arrive
            elif o.token_ids:
                gaps.append(now - last[o.request_id])
                last[o.request_id] = now
    return {"max_gap_s": max(gaps), "median_gap_s": sorted(gaps)[len(gaps) // 2], "ttft_long_s": first,
            "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48, help="tokens each stream generates")
    ap.add_argument("--long", type=int, default=2048, help="the long prompt's tokens")
    ap.add_argument("--budget", type=int, default=256, help="max_prefill_tokens (the chunk size)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    import moelora
    from moelora.train import load_model_and_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(args.model)
    torch.manual_seed(0)
    moelora.attach(model, moelora.LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                   "up_proj", "down_proj"]), "lora")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    results = {}
    for label, kw in (("chunked", {"max_prefill_tokens": args.budget}),
                      ("one step", {"max_prefill_tokens": args.budget, "chunked_prefill": False})):
        results[label] = run(kw, args, model, tok)
    same = results["chunked"].pop("tokens") == results["one step"].pop("tokens")
    print(f"{args.streams} streams decoding, a {args.long}-token prompt arrives; budget {args.budget} tokens a step "
          f"({torch.get_num_threads()} threads)")
    for label, r in results.items():
        print(f"  {label:9s} longest gap between a stream's tokens {r['max_gap_s'] * 1000:7.0f} ms (median "
              f"{r['median_gap_s'] * 1000:.0f} ms); the long request's first token after {r['ttft_long_s']:.2f} s")
    c, o = results["chunked"], results["one step"]
    print(f"longest stall, one step / chunked: {o['max_gap_s'] / c['max_gap_s']:.1f}x; the long request's first token "
          f"chunked / one step: {c['ttft_long_s'] / o['ttft_long_s']:.2f}x; same tokens both ways: {same}")
    if args.output:
        Path(args.output).write_text(json.dumps({**results, "same_tokens": same, "args": vars(args)}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
