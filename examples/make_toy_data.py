"""Write the small generated multi-task set the quick start trains on (examples/toy/).

Three tasks in the llm-adapters math format of ../shared/data (instruction / input / output /
answer, the output ending "The answer is N."), written here, not copied from any benchmark:
two-number addition, the successor of a number, and the letter count of a word (and
``addition_pairs``: addition as preference pairs for ``train.stage: dpo``; ``addition_labelled``:
the same as labelled single answers for ``train.stage: kto``). Evaluated with the
`generate` protocol (the last number of the generated text), the base model often answers at
length or with other numbers; a short fine-tune teaches the answer format and sharpens the answers.

    python examples/make_toy_data.py   # deterministic: rewrites the same files
"""

from __future__ import annotations

import json
import random
from pathlib import Path


def _numeric(instruction: str, answer: int) -> dict:
    return {"instruction": instruction, "input": "", "output": f"The answer is {answer}.", "answer": str(answer)}


def addition(rng: random.Random) -> dict:
    x, y = rng.randint(1, 49), rng.randint(1, 49)
    return _numeric(f"What is {x} + {y}?", x + y)


def successor(rng: random.Random) -> dict:
    n = rng.randint(1, 998)
    return _numeric(f"Which number comes right after {n}?", n + 1)


WORDS = ("apple river stone cloud music tiger lemon paper glass honey mouse light chair plant sugar bread ocean "
         "piano queen robot salad table uncle violin water yacht zebra eagle forest garden cat dog sun moon "
         "butterfly elephant banana window computer mountain").split()


def letters(rng: random.Random) -> dict:
    w = rng.choice(WORDS)
    return _numeric(f"How many letters are in the word '{w}'?", len(w))


def addition_pair(rng: random.Random) -> dict:
    """A preference pair (``train.stage: dpo``): the right sum, stated, chosen; a hedged sum off by
    1-9 rejected."""
    item = addition(rng)
    right = int(item.pop("answer"))
    wrong = right + rng.choice([-1, 1]) * rng.randint(1, 9)
    del item["output"]
    return {**item, "chosen": f"The answer is {right}.", "rejected": f"I am not sure, maybe {wrong}."}


def addition_labelled(rng: random.Random) -> dict:
    """An unpaired, labelled example (``train.stage: kto``, LLaMA-Factory's ``kto_tag``): half the time
    the right sum stated (desirable), else a hedged wrong one (undesirable)."""
    item = addition(rng)
    right = int(item.pop("answer"))
    if rng.random() < 0.5:
        return {**item, "output": f"The answer is {right}.", "kto_tag": True}
    wrong = right + rng.choice([-1, 1]) * rng.randint(1, 9)
    return {**item, "output": f"I am not sure, maybe {wrong}.", "kto_tag": False}


def main() -> None:
    root = Path(__file__).resolve().parent / "toy"
    for name, make in (("addition", addition), ("successor", successor), ("letters", letters),
                       ("addition_pairs", addition_pair), ("addition_labelled", addition_labelled)):
        for split, n, seed in (("train", 400, 1), ("test", 100, 2)):
            rng = random.Random(f"{name}-{seed}")
            items = [make(rng) for _ in range(n)]
            (root / name).mkdir(parents=True, exist_ok=True)
            with open(root / name / f"{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(it) + "\n" for it in items)
    # the same files registered as LLaMA-Factory's dataset_info.json does (configs/llamafactory_sft.yaml)
    alpaca = {"prompt": "instruction", "query": "input", "response": "output"}
    info = {name: {"file_name": f"{name}/train.jsonl", "columns": alpaca} for name in ("addition", "successor", "letters")}
    info["addition_test"] = {"file_name": "addition/test.jsonl", "columns": alpaca}
    info["addition_pairs"] = {"file_name": "addition_pairs/train.jsonl", "ranking": True,
                              "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen",
                                          "rejected": "rejected"}}
    info["addition_labelled"] = {"file_name": "addition_labelled/train.jsonl", "columns": {**alpaca, "kto_tag": "kto_tag"}}
    (root / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
