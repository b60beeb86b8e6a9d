"""Make a base model directory and N adapters of every method (random, non-zero weights) for the
load test and serving demos: ``python benchmarks/make_adapters.py OUT [--n 16] [--model DIR]``.

Without ``--model`` the base is a small random Llama (hidden 256, 4 layers) with a byte-level
tokenizer trained on a few sentences, saved to ``OUT/base``. Prints the ``--adapter NAME=PATH``
arguments for ``moelora serve`` / ``benchmarks/load_test.py --model``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers

import moelora

KINDS = {
    "lora": lambda: moelora.LoraConfig(r=8, lora_alpha=16),
    "dora": lambda: moelora.LoraConfig(r=8, lora_alpha=16, use_dora=True),
    "mixlora": lambda: moelora.MixLoraConfig(num_experts=4, top_k=2, r=8, lora_alpha=16),
    "milora": lambda: moelora.MiLoraConfig(r=8, lora_alpha=16, top_k=3),
}


def small_base(out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog.", "Many tenants share one model."] * 50,
                            trainer=trainer)
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", chat_template=template)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=len(fast), max_position_embeddings=1024,
                                   pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id,
                                   eos_token_id=fast.eos_token_id)
    path = out / "base"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--model", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out)
    base = Path(args.model) if args.model else small_base(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(1)
    specs = []
    for i in range(args.n):
        kind = list(KINDS)[i % len(KINDS)]
        name = f"{kind}-{i}"
        moelora.attach(model, KINDS[kind](), name)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f".{name}." in n and "magnitude" not in n and "activation" not in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        moelora.save_adapter(model, out / name, name)
        moelora.detach(model, name)
        specs.append(f"--adapter {name}={out / name}")
    print(f"--model {base} " + " ".join(specs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
