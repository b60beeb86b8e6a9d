"""What `train.packing` saves: tokens computed per epoch, and (``--time``) the seconds of one pass.

    python benchmarks/packing_bench.py                      # counts only (seconds)
    python benchmarks/packing_bench.py --time --limit 64    # and a timed pass over the same examples

Data: the llm-adapters commonsense train files of ARC-e, ARC-c, BoolQ and OpenBookQA (``--data``,
default ``../shared/data/commonsense``), ``--limit`` examples of each, mixed as ``moelora train``
mixes them (one epoch of ``TrainData``), tokenized by the model's tokenizer (default: the embedded
SmolLM2-135M-Instruct). Unpacked: batches of ``--batch-size`` examples in the epoch's order, each
padded to its longest. Packed: the same epoch in rows of up to ``--cutoff-len`` tokens, batches of
``--rows`` rows, each padded to its longest row. "computed" counts every position of every batch
(padding included): it is what the linear layers cost. Attention costs more per packed row: with
``sdpa``/``eager`` a packed row's attention is computed over the whole row and masked (flash
attention's varlen kernels skip that), which the timed pass includes.

``--time`` trains one pass over the epoch each way (forward, backward, AdamW step; adapters of
``--method``), after one untimed warm-up batch, and prints the seconds and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TASKS = ("arc_easy", "arc_challenge", "boolq", "openbookqa")


def batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def computed(groups: list[list[int]]) -> int:
    """Positions computed: rows x longest row, summed over batches."""
    return sum(len(g) * max(g) for g in groups)


def timed_pass(model, feats_batches, collate_fn, pad_id: int) -> float:
    import torch.nn.functional as F

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()

    def step(feats):
        batch = collate_fn(feats, pad_id)
        labels = batch.pop("labels")
        out = model(**batch, use_cache=False)
        keep = labels[:, 1:] != -100
        loss = F.cross_entropy(out.logits[:, :-1][keep].float(), labels[:, 1:][keep])
        loss = loss + getattr(out, "router_loss", 0.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(feats_batches[0])  # warm-up
    t0 = time.perf_counter()
    for feats in feats_batches:
        step(feats)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory or embedded name (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "commonsense"))
    ap.add_argument("--limit", type=int, default=256, help="examples per task")
    ap.add_argument("--cutoff-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8, help="examples per unpacked batch")
    ap.add_argument("--rows", type=int, default=0, help="rows per packed batch (0: as many tokens per batch as unpacked)")
    ap.add_argument("--method", default="mixlora", choices=["lora", "mixlora"])
    ap.add_argument("--time", action="store_true", help="also time one training pass each way")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--output", default=None, help="write the figures as JSON")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = Path(args.data)
    files = [data_dir / t / "train.json" for t in TASKS]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        print(f"skipped: the benchmark data is not here ({', '.join(missing)}); see ../shared/data/README.md")
        return 0

    import moelora
    from moelora.data import DataSource, TrainData, collate, collate_packed
    from moelora.train import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.model)
    sources = [DataSource(str(f), name=t, max_samples=args.limit) for t, f in zip(TASKS, files, strict=True)]
    data = TrainData(sources, tok, args.cutoff_len, seed=0)  # the first --limit items of each task
    order = data.epoch_order(0)
    lengths = {i: len(data[i]["input_ids"]) for i in order}
    real = sum(lengths.values())
    plain = batches(order, args.batch_size)
    rows = data.packed_order(0)
    per_batch = args.rows or max(1, round(args.batch_size * real / len(order) / args.cutoff_len))
    packed = batches(rows, per_batch)
    plain_positions = computed([[lengths[i] for i in b] for b in plain])
    packed_positions = computed([[sum(lengths[i] for i in r) for r in b] for b in packed])
    report = {
        "model": args.model or "SmolLM2-135M-Instruct", "examples": len(order), "real_tokens": real,
        "cutoff_len": args.cutoff_len, "unpacked": {"batch_size": args.batch_size, "batches": len(plain),
                                                    "computed_tokens": plain_positions},
        "packed": {"rows": len(rows), "rows_per_batch": per_batch, "batches": len(packed),
                   "computed_tokens": packed_positions},
    }
    print(f"{len(order)} examples ({', '.join(f'{t} {args.limit}' for t in TASKS)}), {real:,} real tokens, "
          f"mean {real / len(order):.1f}, cutoff_len {args.cutoff_len}")
    print(f"unpacked: {len(plain)} batches of {args.batch_size} examples, {plain_positions:,} positions computed "
          f"({1 - real / plain_positions:.1%} padding)")
    print(f"packed:   {len(rows)} rows ({len(order) / len(rows):.2f} examples per row) in {len(packed)} batches of "
          f"{per_batch} rows, {packed_positions:,} positions computed ({1 - real / packed_positions:.1%} padding)")
    print(f"positions computed, unpacked / packed: {plain_positions / packed_positions:.2f}x")
    if args.time:
        cfg = (moelora.MixLoraConfig(num_experts=8, top_k=2, r=16) if args.method == "mixlora"
               else moelora.LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
        moelora.attach(model, cfg)
        feats = lambda ids: [data[i] for i in ids]  # noqa: E731
        t_plain = timed_pass(model, [feats(b) for b in plain], collate, tok.pad_token_id)
        t_packed = timed_pass(model, [[feats(r) for r in b] for b in packed], collate_packed, tok.pad_token_id)
        report["unpacked"]["seconds"], report["packed"]["seconds"] = round(t_plain, 2), round(t_packed, 2)
        print(f"one pass ({args.method}, {torch.get_num_threads()} threads): unpacked {t_plain:.1f} s, packed "
              f"{t_packed:.1f} s: {t_plain / t_packed:.2f}x faster packed ({real / t_plain:,.0f} vs "
              f"{real / t_packed:,.0f} real tokens/s)")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
