"""Preference training on a commonsense task: SFT, DPO after SFT, and DPO alone, with the `options` protocol.

    python benchmarks/accuracy/dpo_options.py --task openbookqa --method mixlora --seed 0 --out runs/dpo_options

The study's single-task `options` setting (`docs/results.md`: data format `llm-adapters-options`,
40 steps of 8, AdamW lr 5e-4, 4 warm-up steps, cutoff 256, the config of
`configs/<method>.yaml`) is run three ways on one task of `../shared/data/commonsense` (never
copied into the repository; the pairs are written under ``--out``):

1. ``sft``: the study's run (the response: ``the correct answer is <gold option text>``).
2. ``dpo_after_sft``: `train.stage: dpo` from the SFT adapter (`adapter_name_or_path`) with it as
   the reference (`train.ref_adapter`): pairs of the same prompts, chosen the gold option's text,
   rejected another option's text (drawn with the seed), 40 steps of 8 pairs at ``--dpo-lr``.
3. ``dpo``: the same pairs from a fresh adapter (the base model as the reference).

Each is evaluated with `moelora eval --protocol options` on the first ``--limit`` test items; the
accuracies are printed and written to ``OUT/summary.json``. BoolQ items (no options) are skipped:
their pair would be true/false.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def pairs(items: list[dict], seed: int) -> list[dict]:
    """The preference form of llm-adapters multiple-choice items (the options format's prompt)."""
    from moelora.data import ANSWER_PREFIX, options_form

    rng = random.Random(seed)
    out = []
    for it in items:
        question, options = options_form(it["instruction"])
        gold = options.get(str(it.get("answer", "")).strip().lower())
        wrong = [text for label, text in options.items() if text and text != gold]
        if not gold or not wrong:
            continue
        out.append({"instruction": question, "input": it.get("input", ""),
                    "chosen": f"{ANSWER_PREFIX} {gold}", "rejected": f"{ANSWER_PREFIX} {rng.choice(wrong)}"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="openbookqa")
    ap.add_argument("--method", default="mixlora", choices=["lora", "dora", "mixlora", "milora"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "commonsense"))
    ap.add_argument("--out", default="runs/dpo_options")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--dpo-lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--runs", default="sft,dpo_after_sft,dpo")
    args = ap.parse_args()

    import yaml

    root = Path(args.data_root) / args.task
    if not (root / "train.json").is_file():
        raise SystemExit(f"{root}/train.json not found (--data-root)")
    out = Path(args.out) / args.task / args.method / f"seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    pair_file = out / "pairs.jsonl"
    items = json.loads((root / "train.json").read_text())
    pair_file.write_text("".join(json.dumps(p) + "\n" for p in pairs(items, args.seed)))
    method = yaml.safe_load((REPO / "benchmarks/accuracy/configs" / f"{args.method}.yaml").read_text())["method"]
    train = {"max_steps": 40, "batch_size": 8, "lr": 5e-4, "warmup_steps": 4, "lr_scheduler": "linear",
             "max_grad_norm": 1.0, "cutoff_len": 256, "save_steps": 0, "seed": args.seed, "precision": "auto"}
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    runs = {
        "sft": {"method": method, "data": [{"path": str(root / "train.json"), "format": "llm-adapters-options"}],
                "train": train},
        "dpo_after_sft": {"adapter_name_or_path": str(out / "sft"), "data": [{"path": str(pair_file)}],
                          "train": {**train, "stage": "dpo", "lr": args.dpo_lr, "pref_beta": args.beta,
                                    "ref_adapter": str(out / "sft")}},
        "dpo": {"method": method, "data": [{"path": str(pair_file)}],
                "train": {**train, "stage": "dpo", "lr": args.dpo_lr, "pref_beta": args.beta}},
    }
    summary = {}
    for name in args.runs.split(","):
        run_dir = out / name
        if not (run_dir / "adapter_model.safetensors").is_file():
            cfg = {**runs[name], "output_dir": str(run_dir)}
            (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
            subprocess.run([sys.executable, "-m", "moelora.cli", "train", "--config", str(out / f"{name}.yaml"),
                            "--no-progress", "--overwrite"], env=env, check=True)
        result = run_dir / "eval_options.json"
        if not result.is_file():
            subprocess.run([sys.executable, "-m", "moelora.cli", "eval", "--adapter", str(run_dir), "--data",
                            str(root / "test.json"), "--protocol", "options", "--limit", str(args.limit),
                            "--batch-size", "32", "--output", str(result)], env=env, check=True)
        res = next(iter(json.loads(result.read_text()).values()))["tasks"][args.task]  # keyed by the adapter's method
        summary[name] = {"accuracy": res["accuracy"], "accuracy_norm": res["accuracy_norm"], "total": res["total"]}
        print(f"{args.task} {args.method} seed {args.seed} {name}: options accuracy {res['accuracy']:.1%} "
              f"(acc_norm {res['accuracy_norm']:.1%}, {res['total']} items)")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
