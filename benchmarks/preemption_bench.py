"""KV cache budget: recompute preemption (the default, vLLM's) vs reserving every request to its end.

One random Llama-shaped base (``--mode cpu``: the small shape of ``engine_bench.py``; ``--mode gpu``:
the LLaMA-2-7B shape in bf16; ``--mode tiny``: a smoke test) with one LoRA (r=16, all 7
projections). ``--requests`` requests arrive at once, each with a ``--prompt-tokens`` prompt and
``max_tokens=--max-tokens``, sampled (temperature 1, seeded) with 1% of the vocabulary as stop
tokens, so most answers end long before ``max_tokens``, as chat answers do. The engine's
``kv_cache_bytes`` holds ``--rows`` requests of ``prompt + max_tokens``:

- ``reserve`` (``preemption=False``): a request is admitted only while every running one fits to
  its end, so at most ``--rows`` run at once;
- ``preempt``: admitted by what requests hold now (up to ``--max-batch``); when the running ones
  outgrow the budget, the last to arrive is preempted and recomputed later.

Both must give every request the same tokens (checked). Printed per contender: wall time, output
tokens/s, mean running requests per step, preemptions and the tokens the preempted requests prefill again (less what the prefix cache holds); and the ratio
``reserve`` time / ``preempt`` time.

Usage: ``python benchmarks/preemption_bench.py --mode cpu``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from engine_bench import TARGETS, _Tok, build, randomize, shape  # noqa: E402

import moelora  # noqa: E402
from moelora.engine import Engine, SamplingParams  # noqa: E402


def run(model, args, preemption: bool, prompts, params) -> dict:
    probe = Engine(model, _Tok())
    slots = args.rows * (args.prompt_tokens + args.max_tokens)
    eng = Engine(model, _Tok(), max_batch=args.max_batch, kv_cache_bytes=slots * probe.kv_bytes_per_token,
                 preemption=preemption)
    eng.add_attached("lora")
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(str(i), p, "lora", sp)
    out: dict[str, list[int]] = {}
    running, recomputed = [], 0
    sync = torch.cuda.synchronize if eng.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    while eng.has_work():
        was = {r.id for r in eng.running}
        for o in eng.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
        recomputed += sum(len(r.feed) for r in eng.waiting if r.id in was)  # preempted: prefilled again
        running.append(len(eng.running))
    sync()
    seconds = time.perf_counter() - t0
    tokens = sum(len(v) for v in out.values())
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "mean_running": sum(running) / len(running), "steps": len(running),
            "preemptions": eng.num_preemptions, "recomputed_tokens": recomputed,
            "outputs": [out[str(i)] for i in range(len(prompts))]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["cpu", "gpu", "tiny"], default="cpu")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--rows", type=int, default=4, help="the budget: this many requests of prompt + max_tokens")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", default=None, help="JSON file for the figures")
    args = ap.parse_args(argv)
    if args.mode == "tiny":
        args.requests, args.max_tokens, args.prompt_tokens = min(args.requests, 8), min(args.max_tokens, 64), 8
    torch.set_num_threads(args.threads)
    model = build(shape(args.mode))
    moelora.attach(model, moelora.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS), "lora")
    randomize(model)  # a non-zero adapter (a fresh LoRA's B is 0)
    model.eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (args.prompt_tokens,), generator=g).tolist() for _ in range(args.requests)]
    stops = torch.randperm(vocab - 3, generator=g)[: max(1, vocab // 100)].add(3).tolist()
    params = [SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=i, stop_token_ids=stops)
              for i in range(args.requests)]
    print(f"{args.mode}: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); {args.requests} requests of {args.prompt_tokens} prompt tokens, "
          f"max_tokens {args.max_tokens}, 1% of the vocabulary stops; budget {args.rows} x "
          f"(prompt + max_tokens) tokens, max_batch {args.max_batch}")
    figures = {}
    for label, pre in (("reserve", False), ("preempt", True)):
        figures[label] = run(model, args, pre, prompts, params)
        f = figures[label]
        print(f"{label:8s} {f['seconds']:8.2f} s, {f['tokens_per_s']:8.1f} output tokens/s, {f['mean_running']:5.1f} "
              f"running per step ({f['steps']} steps), {f['preemptions']} preemptions "
              f"({f['recomputed_tokens']} tokens to prefill again), {f['tokens']} output tokens", flush=True)
    if figures["reserve"]["outputs"] != figures["preempt"]["outputs"]:
        print("FAIL: outputs with preemption differ from those without", file=sys.stderr)
        return 1
    ratio = figures["reserve"]["seconds"] / figures["preempt"]["seconds"]
    print(f"outputs equal; reserve time / preempt time = {ratio:.2f}")
    if args.output:
        for f in figures.values():
            f.pop("outputs")
        Path(args.output).write_text(json.dumps({"args": vars(args), "figures": figures, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
