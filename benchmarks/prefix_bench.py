"""Prefix caching in the engine: time to first token of prompts that share a long system prompt.

Each contender is one engine (``--mode cpu``: the small Llama shape of ``engine_bench.py``;
``--mode gpu``: the LLaMA-2-7B shape in bf16; ``--mode tiny``: a smoke test) with one adapter of a
method (LoRA r=16, MixLoRA 8 experts top-2, MiLoRA; all 7 projections, random weights), its prefix
cache on (the default, 256 MiB) or off. The engine first answers one request with the system prompt
(which fills the cache), then:

- ``batch``: ``--requests`` requests, each the system prompt plus its own question, admitted in one
  step with ``max_tokens=1``: the step's wall time is their prefill (time to first token);
- ``single``: one more such request alone (a chat's next turn);
- ``burst``: ``--requests`` requests with a system prompt never seen before, admitted together: the
  first computes its blocks, the others continue from them in the same step.

Before timing, every request's first 8 greedy tokens with the cache on are checked against the same
engine with the cache off. Printed: median ms per contender and the ratio off / on per method (MiLoRA
never uses the cache: its routing of every prompt token depends on the whole prompt, so its ratio
shows the cost of looking blocks up, about 1).

Usage: ``python benchmarks/prefix_bench.py --mode cpu``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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

METHODS = {
    "lora": lambda: moelora.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS),
    "mixlora": lambda: moelora.MixLoraConfig(num_experts=8, top_k=2, r=16, lora_alpha=32, target_modules=TARGETS),
    "milora": lambda: moelora.MiLoraConfig(r=16, lora_alpha=32, top_k=3, target_modules=TARGETS),
}


def engine_for(model, method: str, cache: bool) -> Engine:
    eng = Engine(model, _Tok(), max_batch=64, prefix_cache_bytes=256 * 2**20 if cache else 0)
    eng.add_attached(method)
    return eng


def run(eng: Engine, method: str, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """Admit ``prompts`` in one step; the wall time of that step (ms) and every request's tokens."""
    sp = SamplingParams(max_tokens=max_tokens)
    ids = [f"r{eng.steps}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        eng.add_request(rid, p, method, sp)
    out = {rid: [] for rid in ids}
    sync = torch.cuda.synchronize if eng.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    first = eng.step()
    sync()
    ms = (time.perf_counter() - t0) * 1e3
    for o in first:
        out[o.request_id] += o.token_ids
    while eng.has_work():
        for o in eng.step():
            out[o.request_id] += o.token_ids
    return ms, [out[rid] for rid in ids]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["cpu", "gpu", "tiny"], default="cpu")
    ap.add_argument("--system-tokens", type=int, default=512)
    ap.add_argument("--question-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", default=None, help="JSON file for the figures")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = shape(args.mode)
    if args.mode == "tiny":
        args.system_tokens, args.requests, args.repeats = min(args.system_tokens, 40), min(args.requests, 3), 1
    model = build(s)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    system = torch.randint(3, vocab, (args.system_tokens,), generator=g).tolist()

    def questions(n: int, head: list[int] | None = None) -> list[list[int]]:
        head = system if head is None else head
        return [head + torch.randint(3, vocab, (args.question_tokens,), generator=g).tolist() for _ in range(n)]

    for m in args.methods:
        moelora.attach(model, METHODS[m](), m)
    randomize(model)  # non-zero adapters (a fresh LoRA's B is 0)
    model.eval()
    print(f"{args.mode}: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); system prompt {args.system_tokens} tokens, questions "
          f"{args.question_tokens}, batch {args.requests}")
    figures: dict = {}
    for m in args.methods:
        engines = {c: engine_for(model, m, c) for c in (False, True)}
        for eng in engines.values():
            run(eng, m, [system + [5]], 1)  # fills the cache (and warms up)
        check = questions(4)
        _, off = run(engines[False], m, check, 8)
        _, on = run(engines[True], m, check, 8)
        if off != on:
            print(f"FAIL {m}: outputs with the prefix cache differ from those without", file=sys.stderr)
            return 1
        for kind, n in (("batch", args.requests), ("single", 1), ("burst", args.requests)):
            times = {c: [] for c in engines}
            for _ in range(args.repeats):
                fresh = torch.randint(3, vocab, (args.system_tokens,), generator=g).tolist()
                qs = questions(n, fresh if kind == "burst" else None)
                for c, eng in engines.items():
                    times[c].append(run(eng, m, qs, 1)[0])
            off_ms, on_ms = statistics.median(times[False]), statistics.median(times[True])
            figures[f"{m}/{kind}"] = {"off_ms": off_ms, "on_ms": on_ms, "ratio": off_ms / on_ms,
                                      "hit_tokens": engines[True].prefix.hits}
            print(f"{m:8s} {kind:6s} prefill (time to first token): cache off {off_ms:9.1f} ms, on {on_ms:9.1f} ms, "
                  f"off / on = {off_ms / on_ms:5.2f}")
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "figures": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
