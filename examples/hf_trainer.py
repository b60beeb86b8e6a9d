"""Train a moelora adapter with the Hugging Face `Trainer` (the router loss is part of `outputs.loss`).

    python examples/hf_trainer.py [--steps 20]

moelora's forward hook adds the router loss to the loss in training mode and accepts the
`prompt_lengths` column that `moelora.data.collate` produces (MiLoRA routes on the prompt only), so
`Trainer` needs nothing special: keep `remove_unused_columns=False` so that column reaches the model.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import Trainer, TrainingArguments  # noqa: E402

import moelora  # noqa: E402
from moelora.data import DataSource, TrainData, collate  # noqa: E402
from moelora.train import load_model_and_tokenizer  # noqa: E402

TOY = Path(__file__).resolve().parent / "toy"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--method", default="milora", choices=["mixlora", "milora"])
    args = ap.parse_args()
    model, tok = load_model_and_tokenizer(None)  # the embedded SmolLM2-135M-Instruct
    cfg = moelora.MiLoraConfig(r=8, lora_alpha=16) if args.method == "milora" else moelora.MixLoraConfig(num_experts=4, r=8)
    moelora.attach(model, cfg)
    data = TrainData([DataSource(str(TOY / t / "train.jsonl")) for t in ("addition", "successor", "letters")],
                     tok, cutoff_len=256, seed=0)
    train_set = [data[i] for i in data.epoch_order(0)]
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir="runs/hf_trainer", per_device_train_batch_size=4, max_steps=args.steps,
                               learning_rate=1e-3, logging_steps=5, save_strategy="no", report_to=[],
                               remove_unused_columns=False),
        train_dataset=train_set,
        data_collator=lambda feats: collate(feats, tok.pad_token_id),
    )
    trainer.train()
    moelora.save_adapter(model, "runs/hf_trainer/adapter")
    print("saved runs/hf_trainer/adapter")


if __name__ == "__main__":
    main()
