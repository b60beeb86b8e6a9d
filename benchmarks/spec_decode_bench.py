"""N-gram speculative decoding in the engine (``Engine(speculative=...)``, ``moelora serve
--speculative-config``) against the same engine without it, on the embedded SmolLM2-135M-Instruct.

    python benchmarks/spec_decode_bench.py [--tokens 96] [--k 3 5 8] [--min 2] [--repeats 2] [--threads 2]
                                           [--device cpu|cuda] [--model DIR]

Workloads: prompts the reply mostly copies (rewrite a paragraph: what n-gram drafts are for) and
open-ended prompts (a story: drafts mostly rejected, the cost of trying), each at batch 1 (MixLoRA)
and batch 4 (LoRA, MixLoRA, MiLoRA and the base model in one batch). Adapters have small random
weights (B ~ N(0, 0.002)). Greedy outputs are checked equal to the plain engine's first; then the
median seconds of ``--repeats`` runs, the engine steps, the accepted share of draft tokens and
the time ratio speculative / plain are printed.
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
sys.path.insert(0, str(REPO / "benchmarks"))

from prompt_lookup_bench import PARAGRAPH, PROMPTS  # noqa: E402  (the same copy prompts)

COPY = [*PROMPTS,
        f"Rewrite this text, keeping every sentence:\n\n{PARAGRAPH}",
        f"Here is a paragraph:\n\n{PARAGRAPH}\n\nWrite it again exactly."]
OPEN = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "Explain how a bicycle works to a ten-year-old.",
        "List some ideas for a rainy weekend and say why each is fun.",
        "Describe a busy market in a city you imagine."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--k", type=int, nargs="+", default=[3, 5, 8], help="num_speculative_tokens values")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--min", type=int, default=2, help="prompt_lookup_min (prompt_lookup_max is 4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (float32) or cuda (bfloat16)")
    ap.add_argument("--model", default=None, help="a chat model directory (default: the embedded SmolLM2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moelora
    from moelora.embedded import resolve_model
    from moelora.engine import Engine, SamplingParams

    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    configs = {"lora": moelora.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0),
               "mixlora": moelora.MixLoraConfig(num_experts=8, top_k=2, r=16, lora_alpha=32, lora_dropout=0.0),
               "milora": moelora.MiLoraConfig(r=16, lora_alpha=32, lora_dropout=0.0)}
    for name, cfg in configs.items():
        moelora.attach(model, cfg, name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.002)

    def ids(text: str) -> list[int]:
        chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return tok(chat, add_special_tokens=False)["input_ids"]

    def build(spec: dict | None) -> Engine:
        eng = Engine(model, tok, max_batch=8, prefix_cache_bytes=0, speculative=spec)
        for name in configs:
            eng.add_attached(name)
        return eng

    sp = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    workloads = {}
    for kind, texts in (("copy", COPY), ("open", OPEN)):
        workloads[f"{kind} b1"] = ([ids(texts[0])], ["mixlora"])
        workloads[f"{kind} b4"] = ([ids(t) for t in texts], ["lora", "mixlora", "milora", None])

    def run(eng: Engine, prompts, adapters) -> tuple[float, list, int]:
        steps0 = eng.steps
        t0 = time.perf_counter()
        out = eng.generate(prompts, adapters, sp)  # synchronised: sampling reads the logits on the host
        return time.perf_counter() - t0, [o["token_ids"] for o in out], eng.steps - steps0

    print(f"n-gram speculative decoding in the engine, {Path(path).name} {str(dtype)[6:]} on {args.device}, "
          f"{args.tokens} new tokens, greedy, {args.threads} threads, prompt_lookup 4..{args.min}")
    print(f"{'workload':<8} {'k':>3} {'plain s':>8} {'spec s':>7} {'steps':>11} {'accepted':>9} {'spec / plain':>13}")
    plain_engine = build(None)
    for wname, (prompts, adapters) in workloads.items():
        run(plain_engine, prompts, adapters)  # warm-up
        plain = [run(plain_engine, prompts, adapters) for _ in range(args.repeats)]
        t_plain = statistics.median(t for t, _, _ in plain)
        for k in args.k:
            eng = build({"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": args.min})
            first = run(eng, prompts, adapters)
            if first[1] != plain[0][1]:
                raise SystemExit(f"{wname}, k={k}: speculative decoding changed the greedy output")
            st = dict(eng.spec_stats)
            timed = [run(eng, prompts, adapters) for _ in range(args.repeats)]
            t_spec = statistics.median(t for t, _, _ in timed)
            acc = st["accepted"] / max(1, st["proposed"])
            print(f"{wname:<8} {k:>3} {t_plain:>8.2f} {t_spec:>7.2f} {f'{first[2]}/{plain[0][2]}':>11} {acc:>9.0%} "
                  f"{t_spec / t_plain:>13.2f}")


if __name__ == "__main__":
    main()
