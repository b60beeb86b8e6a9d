"""Cross-check of `train.stage: dpo` (and `kto`) against TRL's DPOTrainer (KTOTrainer), the peer implementations.

    python -m venv --system-site-packages /tmp/trlenv && /tmp/trlenv/bin/pip install --no-deps trl==1.16.0
    /tmp/trlenv/bin/python benchmarks/dpo_vs_trl.py [--steps 5] [--pairs 16] [--loss sigmoid]

(TRL is not a dependency of moelora: a separate environment keeps it out of ours.) One PEFT LoRA
(r=8, alpha 16, all seven projections, dropout 0; PEFT's init: B = 0) on the embedded
SmolLM2-135M-Instruct, fp32 on the CPU, is saved once; TRL trains it with DPOTrainer and moelora
trains the same saved adapter (`adapter_name_or_path`) with `moelora train`, both on the first
``--pairs`` pairs of ``examples/toy/addition_pairs`` (prompt: the Alpaca template) as one batch per
step (so the data order cannot differ), AdamW at lr 1e-3 with a linear decay, clipping at 1.0, beta
0.1, ``--steps`` steps, the reference the base model (adapters off) in both. Printed: each step's loss
and reward accuracy from both, the seconds per step of each training loop (TRL's ``train_runtime``,
ours ``train_summary.json``), and the difference between the two trained adapters. ``--stage kto``
does the same with TRL's KTOTrainer on ``examples/toy/addition_labelled`` (TRL's prompt /
completion / label layout, which moelora reads too), printing the KL estimates; moelora's batch is
then put in the file's order (as TRL's sequential sampling), since KTO pairs each prompt with the
previous example's response.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--loss", default="sigmoid", choices=["sigmoid", "hinge", "ipo"])
    ap.add_argument("--stage", default="dpo", choices=["dpo", "kto"],
                    help="kto: TRL's KTOTrainer on examples/toy/addition_labelled")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    args = ap.parse_args()

    import datasets
    import peft
    import trl
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moelora
    from moelora.data import PROMPT_TEMPLATES
    from moelora.embedded import resolve_model
    from moelora.runconfig import load_run_config
    from moelora.train import train

    model_dir = resolve_model(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="dpo_vs_trl_"))
    kto = args.stage == "kto"
    toy = REPO / "examples/toy" / ("addition_labelled" if kto else "addition_pairs") / "train.jsonl"
    items = [json.loads(x) for x in toy.read_text().splitlines()][: args.pairs]
    prompts = [PROMPT_TEMPLATES["prompt_no_input"].format(instruction=it["instruction"]) for it in items]
    if kto:  # TRL's unpaired layout, which moelora's `text` format reads too
        rows = [{"prompt": p, "completion": it["output"], "label": it["kto_tag"]} for p, it in zip(prompts, items)]
    else:
        rows = [{"prompt": p, "chosen": it["chosen"], "rejected": it["rejected"]} for p, it in zip(prompts, items)]
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    policy = peft.get_peft_model(base, lora)
    policy.save_pretrained(tmp / "init")

    common = dict(output_dir=str(tmp / "trl"), beta=0.1, learning_rate=1e-3, per_device_train_batch_size=args.pairs,
                  gradient_accumulation_steps=1, max_steps=args.steps, lr_scheduler_type="linear", warmup_steps=0,
                  weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, report_to="none",
                  save_strategy="no", seed=0, use_cpu=True, max_length=None, disable_dropout=True, bf16=False,
                  fp16=False)
    if kto:  # KL completions are built over the dataset in order: one batch of all of it, in that order
        cfg = trl.KTOConfig(**common, train_sampling_strategy="sequential")
        trainer = trl.KTOTrainer(model=policy, args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tok)
    else:
        cfg = trl.DPOConfig(**common, loss_type=[args.loss])
        trainer = trl.DPOTrainer(model=policy, args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tok)
    trainer.train()
    theirs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    policy.save_pretrained(tmp / "trl_adapter")

    run = {"model": str(model_dir), "adapter_name_or_path": str(tmp / "init"),
           "data": [{"path": str(tmp / "pairs.jsonl"), "format": "text"}], "output_dir": str(tmp / "ours"),
           "train": {"stage": args.stage, "pref_beta": 0.1, "max_steps": args.steps,
                     **({} if kto else {"pref_loss": args.loss}),
                     "batch_size": args.pairs, "lr": 1e-3, "lr_scheduler": "linear", "warmup_steps": 0,
                     "max_grad_norm": 1.0, "weight_decay": 0.0, "cutoff_len": 1024, "save_steps": 0,
                     "precision": "fp32", "seed": 0}}
    (tmp / "ours.json").write_text(json.dumps(run))
    if kto:  # the batch in the file's order, as TRL's (KTO pairs each prompt with the previous response)
        from moelora.data import TrainData

        TrainData.epoch_order = lambda self, epoch: list(range(len(self)))
    out = train(load_run_config(tmp / "ours.json"), progress=False)
    ours = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    what = "KTO" if kto else f"DPO ({args.loss})"
    print(f"\n{what} on {args.pairs} {'examples' if kto else 'pairs'}, {args.steps} steps; trl {trl.__version__}, "
          f"peft {peft.__version__}")
    extra = "kl" if kto else "rewards/accuracies"
    print(f"{'step':>4} {'loss (TRL)':>12} {'loss (ours)':>12} {extra + ' (TRL)':>16} {extra + ' (ours)':>16}")
    for step, (a, b) in enumerate(zip(theirs, ours, strict=False), 1):
        print(f"{step:>4} {a['loss']:>12.6f} {b['loss']:>12.6f} {a.get(extra, float('nan')):>16.6f} {b[extra]:>16.6f}")
    t_trl = next(h["train_runtime"] for h in trainer.state.log_history if "train_runtime" in h)
    t_ours = json.loads((out / "train_summary.json").read_text())["seconds"]
    print(f"training loop: TRL {t_trl / args.steps:.2f} s/step, ours {t_ours / args.steps:.2f} s/step "
          f"(ours / TRL = {t_ours / t_trl:.2f}; one run each, {torch.get_num_threads()} threads)")
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    moelora.load_adapter(ref, tmp / "trl_adapter")
    mine = load_file(out / "adapter_model.safetensors")
    trl_tensors = moelora.checkpoint.adapter_tensors(ref, "default")
    diff = sum(((mine[k] - trl_tensors[k]) ** 2).sum().item() for k in mine) ** 0.5
    norm = sum((trl_tensors[k] ** 2).sum().item() for k in mine) ** 0.5
    worst = max((mine[k] - trl_tensors[k]).abs().max().item() for k in mine)
    print(f"adapters after {args.steps} steps: ||ours - TRL's|| / ||TRL's|| = {diff / norm:.3g}; largest elementwise "
          f"difference {worst:.3g} (Adam moves a weight by about lr = 1e-3 whatever its gradient's size, so the "
          "near-zero gradients of the first steps differ in sign by rounding)")


if __name__ == "__main__":
    main()
