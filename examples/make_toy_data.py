"""Write the small generated multi-task set the quick start trains on (examples/toy/).

Three tasks in the llm-adapters format of ../shared/data (instruction / input / output / answer),
written here, not copied from any benchmark: a true/false question (parity), a two-way and a
four-way multiple choice (alphabetical order, addition). The base model is near chance on them.

    python examples/make_toy_data.py   # deterministic: rewrites the same files
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("apple river stone cloud music tiger lemon paper glass honey mouse light chair plant sugar "
         "bread ocean piano queen robot salad table uncle violin water yacht zebra eagle forest garden").split()


def parity(rng: random.Random) -> dict:
    n = rng.randint(10, 999)
    ans = "true" if n % 2 == 0 else "false"
    return {"instruction": f"Please answer the following question with true or false, question: is {n} an even number?"
            "\n\nAnswer format: true/false", "input": "", "output": f"the correct answer is {ans}", "answer": ans}


def _choice(question: str, options: list[str], correct: int) -> dict:
    opts = " ".join(f"Answer{i + 1}: {o}" for i, o in enumerate(options))
    labels = "/".join(f"answer{i + 1}" for i in range(len(options)))
    return {"instruction": f"Please choose the correct answer to the question: {question}\n\n{opts}\n\nAnswer format: {labels}",
            "input": "", "output": f"the correct answer is answer{correct + 1}", "answer": f"answer{correct + 1}"}


def alphabet(rng: random.Random) -> dict:
    a, b = rng.sample(WORDS, 2)
    return _choice("Which word comes first in alphabetical order?", [a, b], 0 if a < b else 1)


def addition(rng: random.Random) -> dict:
    x, y = rng.randint(1, 20), rng.randint(1, 20)
    wrong = rng.sample([v for v in range(max(0, x + y - 6), x + y + 7) if v != x + y], 3)
    options = wrong + [x + y]
    rng.shuffle(options)
    return _choice(f"What is {x} + {y}?", [str(o) for o in options], options.index(x + y))


def main() -> None:
    root = Path(__file__).resolve().parent / "toy"
    for name, make in (("parity", parity), ("alphabet", alphabet), ("addition", addition)):
        for split, n, seed in (("train", 400, 1), ("test", 100, 2)):
            rng = random.Random(f"{name}-{seed}")
            items = [make(rng) for _ in range(n)]
            (root / name).mkdir(parents=True, exist_ok=True)
            with open(root / name / f"{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(it) + "\n" for it in items)


if __name__ == "__main__":
    main()
