"""Quick start: fine-tune the embedded SmolLM2-135M-Instruct with MixLoRA on CPU, evaluate, save, reload.

    python examples/quickstart.py [--method mixlora|milora|lora|dora] [--steps 60]

The data is a small multi-task set generated here (three string tasks the base model gets mostly
wrong); the loss is on the answer tokens only. Prints exact-match accuracy of the base model and of
the adapted one on held-out items, then checks that the saved adapter reloads to the same outputs.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import moelora  # noqa: E402
from moelora.embedded import embedded_model_dir  # noqa: E402

WORDS = "apple river stone cloud music tiger lemon paper glass honey mouse light chair plant sugar".split()


def make_tasks(n: int, seed: int) -> list[tuple[str, str, str]]:
    """(task, prompt, answer) triples: reverse a word, sort three digits, the last letter of a word."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        task = ("reverse", "sort", "last")[i % 3]
        if task == "reverse":
            w = rng.choice(WORDS)
            items.append((task, f"Reverse the word: {w}", w[::-1]))
        elif task == "sort":
            ds = [rng.randint(0, 9) for _ in range(3)]
            items.append((task, f"Sort the digits ascending: {' '.join(map(str, ds))}", " ".join(map(str, sorted(ds)))))
        else:
            w = rng.choice(WORDS)
            items.append((task, f"Last letter of the word: {w}", w[-1]))
    return items


def encode(tok, prompt: str, answer: str | None = None) -> tuple[list[int], int]:
    """A short plain-text prompt (the chat template's default system prompt would triple the tokens)."""
    ids = tok(f"{prompt}\nAnswer:", add_special_tokens=False)["input_ids"]
    if answer is None:
        return ids, len(ids)
    return ids + tok(f" {answer}{tok.eos_token}", add_special_tokens=False)["input_ids"], len(ids)


def collate(tok, items):
    encoded = [encode(tok, p, a) for _, p, a in items]
    T = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(items), T), tok.pad_token_id)
    labels = torch.full((len(items), T), -100)
    mask = torch.zeros(len(items), T, dtype=torch.long)
    for b, (ids, p) in enumerate(encoded):  # right padding; loss on the answer only
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, p : len(ids)] = torch.tensor(ids[p:])
        mask[b, : len(ids)] = 1
    return input_ids, mask, labels, torch.tensor([p for _, p in encoded])


@torch.no_grad()
def accuracy(model, tok, items, batch_size: int = 16) -> dict[str, float]:
    model.eval()
    tok.padding_side = "left"
    hits: dict[str, list[int]] = {}
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        prompts = [tok.decode(encode(tok, p)[0]) for _, p, _ in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        for (task, _, answer), row in zip(chunk, out[:, enc["input_ids"].shape[1] :]):
            hits.setdefault(task, []).append(int(tok.decode(row, skip_special_tokens=True).strip() == answer))
    return {t: sum(h) / len(h) for t, h in hits.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="mixlora", choices=["mixlora", "milora", "lora", "dora"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-items", type=int, default=48)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    path = embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    train, test = make_tasks(args.steps * args.batch_size, seed=1), make_tasks(args.eval_items, seed=2)

    base_acc = accuracy(model, tok, test)
    cfg = {
        "mixlora": moelora.MixLoraConfig(num_experts=4, top_k=2, r=8, lora_alpha=16),
        "milora": moelora.MiLoraConfig(r=8, lora_alpha=16, top_k=3),
        "lora": moelora.LoraConfig(r=16, lora_alpha=32),
        "dora": moelora.LoraConfig(r=16, lora_alpha=32, use_dora=True),
    }[args.method]
    moelora.attach(model, cfg)
    counts = moelora.count_parameters(model)
    print(f"{args.method}: {counts['trainable']:,} trainable, {counts['activated']:,} activated adapter parameters")
    opt = torch.optim.AdamW(moelora.param_groups(model, lr=args.lr), lr=args.lr)
    model.train()
    start = time.time()
    for step in range(args.steps):
        ids, mask, labels, plen = collate(tok, train[step * args.batch_size : (step + 1) * args.batch_size])
        out = model(input_ids=ids, attention_mask=mask, labels=labels, prompt_lengths=plen)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            rl = getattr(out, "router_loss", None)
            rl_text = f" router {rl.item():.4f}" if rl is not None else ""
            print(f"step {step:4d} loss {out.loss.item():.4f}{rl_text} ({time.time() - start:.0f}s)")
    tuned_acc = accuracy(model, tok, test)

    print(f"\n{'task':10s} {'base':>6s} {args.method:>8s}")
    for task in sorted(base_acc):
        print(f"{task:10s} {base_acc[task]:6.2f} {tuned_acc[task]:8.2f}")
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    print(f"{'average':10s} {mean(base_acc):6.2f} {mean(tuned_acc):8.2f}")

    with tempfile.TemporaryDirectory() as d:
        moelora.save_adapter(model, d + "/adapter")
        fresh = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        moelora.load_adapter(fresh, d + "/adapter")
        ids, mask, _, _ = collate(tok, test[:4])
        with torch.no_grad():
            same = torch.allclose(model.eval()(ids, attention_mask=mask).logits, fresh.eval()(ids, attention_mask=mask).logits, atol=1e-5)
    print(f"\nsaved adapter reloads to identical logits: {same}")


if __name__ == "__main__":
    main()
