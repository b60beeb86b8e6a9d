"""Shared fixtures: tiny random models of every supported architecture (built in milliseconds)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they thrash.
torch.set_num_threads(1)

COMMON = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=256, pad_token_id=0, eos_token_id=2, bos_token_id=1,
)


def tiny_config(arch: str = "llama"):
    if arch == "llama":
        return transformers.LlamaConfig(**COMMON)
    if arch == "mistral":
        return transformers.MistralConfig(**COMMON, sliding_window=None)
    if arch == "qwen2":
        return transformers.Qwen2Config(**COMMON)
    if arch == "qwen3":
        return transformers.Qwen3Config(**COMMON, head_dim=16)
    if arch == "gemma":
        return transformers.GemmaConfig(**COMMON, head_dim=16)
    if arch == "gemma2":
        return transformers.Gemma2Config(**COMMON, head_dim=16, sliding_window=64)
    if arch == "gemma3_text":
        return transformers.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=64)
    if arch == "phi3":
        return transformers.Phi3Config(**COMMON)
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"]


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def randomize_adapters(model, seed: int = 1, scale: float = 0.1):
    """Give every adapter parameter non-zero random values (a fresh LoRA has B = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                if n.endswith("magnitude"):
                    p.mul_(1 + scale * torch.randn(p.shape, generator=g).to(p))
                elif "activation" in n:
                    continue
                else:
                    p.copy_(torch.randn(p.shape, generator=g).to(p) * scale)
    return model


@pytest.fixture
def llama():
    return tiny_model("llama")


def batch(model, B: int = 3, T: int = 7, seed: int = 0, left_pad: bool = True):
    """input_ids and attention mask with varying lengths (left padding by default)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        pad = b % 3  # rows have 0, 1, 2 pad tokens
        if pad:
            if left_pad:
                mask[b, :pad] = 0
                ids[b, :pad] = 0
            else:
                mask[b, T - pad :] = 0
                ids[b, T - pad :] = 0
    return ids, mask


def bpe_tokenizer(corpus: list[str], vocab_size: int = 320):
    """A byte-level BPE tokenizer trained in memory (BOS added, pad/eos, a tiny chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", chat_template=template)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama (vocab 320) with a BPE tokenizer trained on the toy tasks: a real model directory."""
    import json
    from pathlib import Path

    from moelora.data import PROMPT_TEMPLATES

    toy = Path(__file__).resolve().parents[1] / "examples" / "toy"
    corpus = [PROMPT_TEMPLATES["prompt_no_input"], PROMPT_TEMPLATES["prompt_input"]]
    for f in sorted(toy.glob("*/train.jsonl")):
        if f.parent.name in ("addition_pairs", "addition_labelled"):  # the corpus (the tokenizer) as before them
            continue
        for line in f.read_text().splitlines()[:50]:
            item = json.loads(line)
            corpus += [item["instruction"], item["output"]]
    tok = bpe_tokenizer(corpus)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**COMMON, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
                                      "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id})
    model = transformers.LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory):
    """Saved adapters of every method (``test_mixed.CONFIGS``, random weights) for tiny Llama, Gemma-2
    and Phi-3 bases: ``{(arch, method): dir}`` (the engine's tests load them by name)."""
    from test_mixed import CONFIGS  # imported here: test_mixed imports this module

    import moelora

    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for arch in ("llama", "gemma2", "phi3"):
        src = tiny_model(arch)
        for n in ("lora", "mixlora", "milora", "dora"):
            moelora.attach(src, CONFIGS[n], n)
        randomize_adapters(src)
        for n in ("lora", "mixlora", "milora", "dora"):
            moelora.save_adapter(src, root / arch / n, n)
            out[arch, n] = root / arch / n
    return out
