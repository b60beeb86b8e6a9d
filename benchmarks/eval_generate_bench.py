"""The ``generate`` evaluation protocol's decoding: through the engine (continuous batching, the
default of ``moelora.evaluate.generate_responses``) vs left-padded batches of ``model.generate``.

The embedded SmolLM2-135M-Instruct (or ``--model DIR``, optionally ``--adapter DIR``) answers the
first ``--limit`` items of each toy task's test file (``examples/toy``; or ``--data FILE ...``)
greedily, ``--batch-size`` at a time, both ways in the same run; the texts must be equal (checked).
Printed: seconds of each way, their ratio, and the mean answer length.

Usage: ``python benchmarks/eval_generate_bench.py [--limit 60] [--batch-size 8] [--max-new-tokens 32]``
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moelora
    from moelora.embedded import resolve_model
    from moelora.evaluate import generate_responses, llm_adapters_prompt, load_items

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--data", nargs="*", default=None)
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    if args.adapter:
        moelora.load_adapter(model, args.adapter)
    files = args.data or [str(p) for p in sorted((REPO / "examples" / "toy").glob("*/test.jsonl"))
                          if p.parent.name in ("addition", "successor", "letters")]
    prompts = []
    for f in files:
        prompts += [llm_adapters_prompt(it["instruction"], it.get("input", "") or "")
                    for it in load_items(f)[: args.limit]]
    print(f"{len(prompts)} prompts from {len(files)} file(s), batch {args.batch_size}, max_new_tokens "
          f"{args.max_new_tokens}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)", flush=True)
    seconds, texts = {}, {}
    for way, engine in (("model.generate", False), ("engine", True)):
        t0 = time.perf_counter()
        texts[way] = generate_responses(model, tok, prompts, batch_size=args.batch_size,
                                        max_new_tokens=args.max_new_tokens, engine=engine)
        seconds[way] = time.perf_counter() - t0
        print(f"{way:15s} {seconds[way]:7.1f} s", flush=True)
    same = sum(a == b for a, b in zip(texts["model.generate"], texts["engine"]))
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts["engine"]]
    print(f"same texts {same}/{len(prompts)}; mean answer {sum(lengths) / len(lengths):.1f} tokens; "
          f"model.generate / engine = {seconds['model.generate'] / seconds['engine']:.2f}")
    return 0 if same == len(prompts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
