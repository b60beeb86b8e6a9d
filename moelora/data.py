"""Training data for ``moelora train``: reading, prompt/response split, truncation, mixing, collation.

Formats (``DataSource.format``):

- ``llm-adapters`` / ``alpaca`` (the same thing): a JSON list, or JSONL (one object per line), of
  ``{"instruction", "input" (optional), "output", "answer" (optional)}``. The prompt is LLM-Adapters'
  Alpaca template (``PROMPT_TEMPLATES``, with or without the ``### Input:`` block); the response is
  ``output``; ``answer`` is kept on the example for evaluation.
- ``llm-adapters-options``: the same files, with each multiple-choice item's answer given as its
  option's **text** instead of its label (:func:`options_form`): the instruction keeps the question
  and drops the option list ("Answer1: ... Answer2: ...") and the "Answer format:" line; the
  response is ``"the correct answer is " + <text of the answer's option>``. Items without an
  option list (BoolQ's ``true``/``false``) answer with their label. Needs the ``answer`` field. The
  ``options`` evaluation protocol scores exactly this (``moelora.evaluate``).
- ``messages``: ``{"messages": [{"role", "content"}, ...]}``. The loss is on the **last assistant
  message**; the prompt is the tokenizer's chat template applied to the messages before it with
  ``add_generation_prompt=True`` (earlier assistant turns are part of the prompt and masked;
  messages after the last assistant message are ignored). With ``turns: all`` (``DataSource.turns``)
  the loss is on **every assistant message** and on the token that ends it in the template (e.g.
  ``<|im_end|>``), as LLaMA-Factory trains conversations: the whole conversation is rendered once,
  each assistant message is located in it by rendering the template turn by turn (a template that
  rewrites earlier turns, such as Qwen3's thinking removal, is refused with the item named), and the
  labels come from the tokenizer's character offsets (a fast tokenizer is needed).
  ``prompt_length`` (MiLoRA's routing prompt) is then the part before the first assistant message.
  Function calling (OpenAI's fine-tuning layout): an item's ``tools`` go to the chat template,
  assistant messages may carry ``tool_calls``, and ``tool`` messages the tools' answers; a learned
  message with calls is located the same way (its span: what the template writes for it, up to the
  tokenizer's EOS text), whatever ``turns`` says.
- ``sharegpt``: ``{"conversations": [{"from", "value"}, ...], "system": optional}`` (LLaMA-Factory's
  and FastChat's layout; ``from``: ``human``/``user``, ``gpt``/``assistant``, ``system``, and
  LLaMA-Factory's ``function_call`` (the call(s) as JSON) and ``observation``; ``tools``), read as
  ``messages`` (``turns`` applies the same way).
- ``text``: ``{"text": ...}`` objects in JSON/JSONL, or any other file (``.txt``) read as one
  example per non-empty line. The prompt is empty: the loss is on every token. TRL's
  prompt-completion items ``{"prompt", "completion"}`` (raw strings) put the loss on the completion;
  in the ``messages`` format, ``{"prompt": [...], "completion": [...]}`` message lists are read as
  ``messages``.

Preference data (``train.stage: dpo``; TRL's and LLaMA-Factory's layouts): every item is a pair
of responses to one prompt, ``chosen`` and ``rejected``, in place of the response:

- ``llm-adapters`` / ``alpaca``: ``{"instruction", "input" (optional), "chosen", "rejected"}``.
- ``messages``: the prompt is ``messages`` (a list of messages; TRL's ``prompt`` as a list or a
  string, a string being one user message), rendered by the chat template with
  ``add_generation_prompt=True``; ``chosen``/``rejected`` are each a string, an assistant message
  object, or a list of messages: one assistant message, or a whole conversation whose last message
  (the assistant's) is the reply and whose earlier ones are the prompt (TRL's implicit prompt, as
  in UltraFeedback: both sides must then share them).
- ``sharegpt``: ``{"conversations": [...prompt turns...], "chosen": {"from": "gpt", "value"},
  "rejected": {...}}`` (LLaMA-Factory's), or the same forms as ``messages`` with ``from``/``value``.
- ``text``: ``{"prompt" (optional, raw text), "chosen", "rejected"}`` in JSON/JSONL (TRL's
  standard format; no template).

``llm-adapters-options`` and ``turns: all`` have no preference form. A pair with an empty side is
skipped. Both sides are encoded after the same prompt tokens: the prompt is cut from the left as
much as the longer side needs, then each side's end is cut on its own.

Unpaired preference data (``train.stage: kto``): every item is a supervised item of its format
with a boolean label, ``kto_tag`` (LLaMA-Factory's) or ``label`` (TRL's), true when the response is
desirable; also TRL's ``{"prompt", "completion", "label"}`` (``text``: raw strings; ``messages``:
lists of messages). ``turns: all`` does not apply.

Sources are files, or Hugging Face datasets (``path: hf:owner/name`` through ``datasets``, a local
dataset directory, or a ``.csv`` / ``.parquet`` / ``.arrow`` file; ``DataSource.split``) whose rows are
read as the items above;
``DataSource.max_samples`` keeps the first N items of any source.

Items whose response is empty (or only whitespace) are skipped; a source left with no example is
an error. Bad input raises :class:`DataError` naming the file and the 1-based item (JSON list) or
line (JSONL, text).

Encoding (:func:`encode_example`): ``prompt`` tokens (plus the special tokens the tokenizer puts in
front, e.g. BOS, unless the prompt text already starts with them, as chat templates do), then the
response tokens and EOS. Labels are ``-100`` on the prompt. The response tokens are those of the
joint tokenization of ``prompt + response`` after the prompt's tokens (so they are what the model
sees after the prompt at inference), or the response tokenized alone if the joint tokenization
merges across the boundary.

Truncation to ``cutoff_len`` keeps the answer: prompt tokens are dropped from the **left** (after the
leading special tokens such as BOS, which are kept); only when the leading special tokens plus the
response and EOS alone exceed ``cutoff_len`` is the response cut at its **end** (EOS included).
:class:`TrainData` counts both in ``stats`` and logs a one-line summary.

Mixing (:meth:`TrainData.epoch_order`): an epoch has ``N = sum_i len_i`` examples (``len_i`` the
usable examples of source ``i``). Source ``i`` contributes ``n_i`` of them, proportional to
``weight_i * len_i``: ``n_i = N * weight_i * len_i / sum_j(weight_j * len_j)``, rounded by largest
remainder (exact rational arithmetic, ties to the earlier source) so that ``sum_i n_i = N``. Weights
are relative: multiplying every weight by the same factor changes nothing, and equal weights give
plain concatenation (each epoch one full pass over every source). A source's picks are
consecutive positions of an endless stream of shuffled passes over it: epoch ``e`` takes positions
``[e * n_i, (e + 1) * n_i)``. Pass ``k`` is a permutation seeded by ``(seed, i, k)``, stably reordered
so that the items which the epoch straddling into it already took from the previous pass come
last. Hence within an epoch a source's items are drawn without replacement, each appearing
``floor(n_i / len_i)`` or ``ceil(n_i / len_i)`` times (an up-weighted source wraps around), and
across epochs every item is used once per pass (a down-weighted source cycles through all its
items before repeating any). The picks of all sources are then shuffled together with
a generator seeded by ``(seed, epoch)``. The order depends on nothing but the sources (their
lengths and weights, in order), ``seed`` and ``epoch``: no global RNG state is read or changed.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from .config import did_you_mean

__all__ = [
    "DataError",
    "DataSource",
    "Example",
    "FORMATS",
    "PROMPT_TEMPLATES",
    "read_examples",
    "encode_example",
    "TrainData",
    "collate",
    "collate_packed",
    "pack_lengths",
    "preference_rows",
    "kto_kl_rows",
]

logger = logging.getLogger(__name__)

FORMATS = ("llm-adapters", "alpaca", "llm-adapters-options", "messages", "sharegpt", "text")
CHAT_FORMATS = ("messages", "sharegpt")
TURNS = ("last", "all")
STAGES = ("sft", "dpo", "kto")  # how data is read (train.stage: rm reads pairs as dpo does)
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ANSWER_PREFIX = "the correct answer is"  # the fixed start of every llm-adapters commonsense output
IGNORE_INDEX = -100

PROMPT_TEMPLATES: dict[str, str] = {
    # LLM-Adapters' alpaca template (templates/alpaca.json of AGI-Edgerunners/LLM-Adapters).
    "description": "Template used by Alpaca-LoRA and LLM-Adapters.",
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    ),
    "response_split": "### Response:",
}

HUB_PREFIX = "hf:"  # `path: hf:owner/name`: a dataset of the Hugging Face hub (through `datasets`)

# File stems that name a split rather than a task: the task is then the parent directory's name.
_SPLIT_STEMS = ("train", "test", "dev", "valid", "validation")


class DataError(ValueError):
    """Bad training data: the message names the file and, where relevant, the 1-based item or line."""


def _suggest(name: str, valid: tuple[str, ...]) -> str:
    return did_you_mean(name, valid, cutoff=0.5)


@dataclass
class DataSource:
    """One training file. ``weight`` is its relative sampling rate (see the module docstring)."""

    path: str
    format: str = "llm-adapters"
    weight: float = 1.0
    name: str | None = None
    """Task name; default: the parent directory's name for ``train.json``/``test.json`` (any split
    stem: train, test, dev, valid, validation; any suffix), else the file's stem."""
    turns: str = "last"
    """``messages``/``sharegpt``: the loss on the ``last`` assistant message, or on ``all`` of them."""
    split: str | None = None
    """A Hugging Face dataset (``path: hf:owner/name``, or a local dataset directory): the split to
    read (default ``train``; a directory saved with one split needs none)."""
    max_samples: int | None = None
    """Read only the first this many items (LLaMA-Factory's ``max_samples``)."""
    columns: dict[str, str] | None = None
    """The items' own names for the format's fields (LLaMA-Factory's ``columns`` of
    ``dataset_info.json``): ``{field: column}``, e.g. ``{instruction: question, output: answer}``
    reads ``question``/``answer`` columns as ``instruction``/``output``."""
    split_long: bool = False
    """``text`` format: a document longer than ``cutoff_len`` becomes consecutive pieces of at most
    ``cutoff_len`` tokens, each its own example (continued pretraining keeps all of it; EOS only after
    the last piece), instead of being cut at its end. Needs a fast tokenizer (token offsets)."""
    llamafactory: dict | None = None
    """Set by ``{dataset: NAME, dataset_dir: DIR}`` (``moelora.llamafactory``): the dataset_info.json
    entry's layout, columns and tags; each item is converted to the ``messages`` layout."""

    def __post_init__(self) -> None:
        if isinstance(self.path, os.PathLike):
            self.path = os.fspath(self.path)
        if not isinstance(self.path, str) or not self.path:
            raise DataError(f"data source path must be a non-empty string, got {self.path!r}")
        if self.format not in FORMATS:
            raise DataError(
                f"{self.path}: unknown data format {self.format!r}{_suggest(self.format, FORMATS)}; "
                f"valid formats: {', '.join(FORMATS)}"
            )
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise DataError(f"{self.path}: weight must be a finite number > 0, got {w!r}")
        if self.turns not in TURNS:
            raise DataError(f"{self.path}: turns must be 'last' or 'all', got {self.turns!r}")
        if self.turns != "last" and self.format not in CHAT_FORMATS:
            raise DataError(f"{self.path}: turns={self.turns!r} applies to the chat formats "
                            f"({', '.join(CHAT_FORMATS)}), not {self.format!r}")
        if self.max_samples is not None and (isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int)
                                             or self.max_samples < 1):
            raise DataError(f"{self.path}: max_samples must be a positive integer, got {self.max_samples!r}")
        if self.columns is not None and (not isinstance(self.columns, dict) or not all(
                isinstance(k, str) and k and isinstance(v, str) and v for k, v in self.columns.items())):
            raise DataError(f"{self.path}: columns must map field names to column names, got {self.columns!r}")
        if not isinstance(self.split_long, bool):
            raise DataError(f"{self.path}: split_long must be true or false, got {self.split_long!r}")
        if self.split_long and self.format != "text":
            raise DataError(f"{self.path}: split_long applies to format 'text' (plain documents), not {self.format!r}")
        if self.split is not None and (not isinstance(self.split, str) or not self.split):
            raise DataError(f"{self.path}: split must be a non-empty string, got {self.split!r}")
        if self.name is None:
            hub = self.path.startswith(HUB_PREFIX)  # a dataset's name: its last component, whole
            p = Path(self.path.removeprefix(HUB_PREFIX))
            self.name = p.parent.name if p.stem in _SPLIT_STEMS and p.parent.name else p.name if hub or p.is_dir() else p.stem
        elif not isinstance(self.name, str) or not self.name:
            raise DataError(f"{self.path}: name must be a non-empty string, got {self.name!r}")

    @classmethod
    def from_dict(cls, d: dict, base_dir: Path | None = None) -> DataSource:
        """From a config mapping (``{path, format, weight, name}``, or ``{dataset: NAME, dataset_dir: DIR}``
        for a dataset of LLaMA-Factory's dataset_info.json, looked up from ``base_dir``, default the
        working directory); unknown keys are refused."""
        if not isinstance(d, dict):
            raise DataError(f"a data source must be a mapping with 'path', got {type(d).__name__}")
        if "dataset" in d:
            from .llamafactory import expand

            d = expand(d, base_dir or Path.cwd())
        valid = tuple(f.name for f in dataclasses.fields(cls))
        for key in d:
            if key not in valid:
                raise DataError(f"data source {d.get('path', '?')}: unknown key {key!r}{_suggest(key, valid)}; "
                                f"valid keys: {', '.join(valid)}")
        if "path" not in d:
            raise DataError(f"data source {d!r}: missing required key 'path'")
        return cls(**d)


@dataclass
class Example:
    prompt: str
    """Text before the response ("" for ``text``; the chat-templated prompt for ``messages``)."""
    response: str
    """The text the loss is on (EOS is appended at encode time)."""
    task: str
    answer: str | None = None
    """The llm-adapters ``answer`` label, for evaluation."""
    spans: list[tuple[int, int]] | None = None
    """``turns: all``: the whole conversation is ``prompt`` (``response`` is its last assistant
    message, for reference) and the loss is on these character spans of it (each assistant message)
    plus the token after each (the template's end of turn)."""
    rejected: str | None = None
    """Preference data (``train.stage: dpo``): the rejected response (``response`` is the chosen one)."""
    desirable: bool | None = None
    """Unpaired preference data (``train.stage: kto``): whether ``response`` is a desirable one."""
    eos: bool = True
    """Whether EOS follows the response (not after a piece of a split document but its last)."""


# ----------------------------------------------------------------------------------------- reading


def _read_text(path: Path) -> str:
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def _load_items(path: Path, fmt: str) -> list[tuple[str, Any]]:
    """``[(location, item), ...]``: location is "item N" (JSON list) or "line N" (JSONL / text)."""
    text = _read_text(path)
    suffix = path.suffix.lower()
    if fmt == "text" and suffix not in (".json", ".jsonl"):
        return [(f"line {i}", {"text": line}) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    stripped = text.lstrip()
    if suffix != ".jsonl" and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects, got a JSON {_json_type(data)}")
        return [(f"item {i}", item) for i, item in enumerate(data, 1)]
    items = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append((f"line {i}", json.loads(line)))
        except json.JSONDecodeError as e:
            if not items and stripped.startswith("{") and suffix != ".jsonl":
                try:
                    whole = json.loads(text)
                except json.JSONDecodeError:
                    whole = None
                if whole is not None:
                    raise DataError(
                        f"{path}: expected a JSON list of objects or JSONL (one object per line), "
                        f"got a single JSON {_json_type(whole)}"
                    ) from None
            raise DataError(f"{path}, line {i}: invalid JSON at column {e.colno}: {e.msg}") from None
    return items


TABLE_FILES = {".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}  # read through `datasets` (its builders)


def _is_dataset(source: DataSource) -> bool:
    """A Hugging Face dataset: ``hf:owner/name``, a directory (a dataset repository's files, or one
    saved with ``save_to_disk``), or a CSV / Parquet / Arrow file (rows as items)."""
    return (source.path.startswith(HUB_PREFIX) or Path(source.path).is_dir()
            or Path(source.path).suffix.lower() in TABLE_FILES)


def _load_dataset(source: DataSource) -> list[tuple[str, Any]]:
    """``[(location, item), ...]`` of a Hugging Face dataset's split (rows as dicts), through
    ``datasets``: ``load_dataset`` for a hub name or a repository directory, ``load_from_disk`` for a
    directory written by ``save_to_disk``. With ``HF_DATASETS_OFFLINE=1`` a hub name must be cached."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source.path}: reading a Hugging Face dataset needs the datasets package: "
                        "pip install datasets") from None
    name = source.path.removeprefix(HUB_PREFIX)
    local = Path(name)
    try:
        if local.suffix.lower() in TABLE_FILES and not source.path.startswith(HUB_PREFIX):
            if not local.is_file():
                raise DataError(f"{source.path}: data file not found")
            if source.split not in (None, "train"):
                raise DataError(f"{source.path}: a single file has one split; remove split: {source.split}")
            ds = datasets.load_dataset(TABLE_FILES[local.suffix.lower()], data_files=str(local), split="train")
        elif local.is_dir() and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                split = source.split or ("train" if "train" in ds or len(ds) != 1 else next(iter(ds)))
                if split not in ds:
                    raise DataError(f"{source.path}: no split {split!r} (splits: {', '.join(ds)})")
                ds = ds[split]
            elif source.split is not None:
                raise DataError(f"{source.path}: a dataset saved with one split; remove split: {source.split}")
        else:
            ds = datasets.load_dataset(name, split=source.split or "train")
    except DataError:
        raise
    except Exception as e:  # not found, offline, a bad split: datasets' own message names it
        raise DataError(f"{source.path}: cannot load the dataset: {type(e).__name__}: {e}") from None
    if source.max_samples is not None:
        ds = ds.select(range(min(source.max_samples, len(ds))))
    return [(f"row {i}", row) for i, row in enumerate(ds, 1)]


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _field(path: Path, loc: str, item: dict, key: str, *, required: bool, types=(str,), what="a string"):
    if key not in item or (not required and item[key] is None):
        if required:
            raise DataError(f"{path}, {loc}: missing required field '{key}'")
        return None
    value = item[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise DataError(f"{path}, {loc}: field '{key}' must be {what}, got {_json_type(value)}")
    return value


def _object(path: Path, loc: str, item: Any, fields: str) -> dict:
    if not isinstance(item, dict):
        raise DataError(f"{path}, {loc}: expected an object with {fields}, got {_json_type(item)}")
    return item


def _answer(path: Path, loc: str, item: dict) -> str | None:
    value = _field(path, loc, item, "answer", required=False, types=(str, int, float, bool),
                   what="a string or a number")
    if isinstance(value, bool):
        return "true" if value else "false"
    return None if value is None else str(value)


_OPTION_RE = re.compile(r"(?<![^\s])(answer|solution|option|ending)(\d+):\s*", re.IGNORECASE)
_ANSWER_FORMAT_RE = re.compile(r"\s*\bAnswer format:[^\n]*\s*$", re.IGNORECASE)


def options_form(instruction: str) -> tuple[str, dict[str, str]]:
    """An LLM-Adapters multiple-choice instruction split into its question and its options.

    ``"Please choose ...: Q?\\n\\nAnswer1: red Answer2: blue\\n\\nAnswer format: answer1/answer2"``
    -> ``("Please choose ...: Q?", {"answer1": "red", "answer2": "blue"})``. Option markers are
    ``AnswerN:`` / ``SolutionN:`` / ``OptionN:`` / ``EndingN:`` (ARC and OBQA, PIQA, WinoGrande,
    HellaSwag) at the start of the text or after whitespace; an option's text runs to the next
    marker or the trailing "Answer format:" line, which is dropped too. Labels are lower-cased
    (``answer1``), as in the items' ``answer`` field. An instruction with fewer than two markers has
    no options (``{}``): the question is then the instruction without its "Answer format:" line."""
    end = m.start() if (m := _ANSWER_FORMAT_RE.search(instruction)) else len(instruction)
    marks = [m for m in _OPTION_RE.finditer(instruction) if m.start() < end]
    if len(marks) < 2:
        return instruction[:end].rstrip(), {}
    options: dict[str, str] = {}
    for m, nxt in zip(marks, [*marks[1:], None], strict=True):
        options.setdefault(f"{m.group(1).lower()}{m.group(2)}", instruction[m.end():nxt.start() if nxt else end].strip())
    return instruction[:marks[0].start()].rstrip(), options


def _options_example(path: Path, loc: str, instruction: str, answer: str | None) -> tuple[str, str]:
    """(instruction, response) of an item in the ``llm-adapters-options`` format."""
    if answer is None:
        raise DataError(f"{path}, {loc}: format 'llm-adapters-options' needs the item's 'answer' field")
    question, options = options_form(instruction)
    if not options:
        return question, f"{ANSWER_PREFIX} {answer}"
    text = options.get(answer.strip().lower())
    if text is None:
        raise DataError(f"{path}, {loc}: answer {answer!r} is not one of the item's options "
                        f"({', '.join(options)})")
    if not text:
        raise DataError(f"{path}, {loc}: the answer's option {answer!r} has no text")
    return question, f"{ANSWER_PREFIX} {text}"


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _read(source: DataSource, tokenizer=None, stage: str = "sft", cutoff_len: int | None = None
          ) -> tuple[list[Example], int]:
    """The usable examples of ``source`` and the number of items skipped (empty response). With
    ``stage="dpo"``, items are pairs (``chosen``/``rejected``; the module docstring's "Preference
    data") and each example's ``rejected`` is set; with ``stage="kto"`` each item is labelled
    (``desirable`` set; "Unpaired preference data")."""
    path = Path(source.path)
    fmt, task = source.format, source.name
    preference = stage == "dpo"
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    if stage == "kto" and fmt == "text" and not _is_dataset(source) and path.suffix.lower() not in (".json", ".jsonl"):
        raise DataError(f"{path}: a plain text file holds no labels: give JSON or JSONL objects "
                        "{\"prompt\", \"completion\", \"label\"}")
    if stage == "kto" and source.turns != "last":
        raise DataError(f"{path}: turns: all does not apply to train.stage: kto (an item's label is on its response)")
    if preference:
        if fmt == "llm-adapters-options":
            raise DataError(f"{path}: format 'llm-adapters-options' has no preference form: give chosen/rejected "
                            "items in format 'llm-adapters'")
        if source.turns != "last":
            raise DataError(f"{path}: turns: all does not apply to preference pairs (the loss is on chosen/rejected)")
        if fmt == "text" and not _is_dataset(source) and path.suffix.lower() not in (".json", ".jsonl"):
            raise DataError(f"{path}: a plain text file holds no preference pairs: give JSON or JSONL objects "
                            "{\"prompt\", \"chosen\", \"rejected\"}")
    if source.llamafactory is not None and source.llamafactory.get("ranking") and not preference:
        raise DataError(f"{source.llamafactory.get('where', path)}: a ranking dataset holds preference pairs: "
                        "train it with train.stage: dpo (or rm, a reward model)")
    if fmt in CHAT_FORMATS:
        if tokenizer is None:
            raise DataError(f"{path}: format {fmt!r} needs a tokenizer (for its chat template)")
        if not _has_chat_template(tokenizer):
            raise DataError(
                f"{path}: format {fmt!r} needs a tokenizer with a chat template, and "
                f"{type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '') or 'unnamed'}) has none; "
                "use format 'llm-adapters' or 'text', or set tokenizer.chat_template"
            )
        if source.turns == "all" and not getattr(tokenizer, "is_fast", False):
            raise DataError(f"{path}: turns: all locates the turns by character offsets, which needs a fast "
                            f"tokenizer; {type(tokenizer).__name__} is not one (use turns: last)")
    examples: list[Example] = []
    skipped = 0
    items = _load_dataset(source) if _is_dataset(source) else _load_items(path, fmt)
    if source.llamafactory is not None:
        from .llamafactory import convert
    for loc, item in items[: source.max_samples]:
        if source.columns and isinstance(item, dict):
            item = _rename(path, loc, item, source.columns)
        if source.llamafactory is not None:
            item = convert(source.llamafactory, loc, item)
        if preference:
            ex = _pair(path, loc, item, fmt, tokenizer, task)
            if not (ex.response.strip() and ex.rejected.strip()):
                skipped += 1
                continue
            examples.append(ex)
            continue
        try:
            if stage == "kto":
                item = _object(path, loc, item, "a label ('kto_tag' or 'label')")
            trl = _trl_completion(path, loc, item, fmt) if isinstance(item, dict) else item
            ex = _example(path, loc, trl, fmt, tokenizer, task, source.turns)
            if stage == "kto":
                ex.desirable = _label(path, loc, item)
        except DataError as e:
            if isinstance(item, dict) and "chosen" in item and "rejected" in item and "missing required" in str(e):
                raise DataError(f"{e} (the item is a preference pair, chosen/rejected: train it with "
                                "train.stage: dpo)") from None
            raise
        if not (ex.spans if ex.spans is not None else ex.response.strip()):
            skipped += 1
            continue
        examples.append(ex)
    if not examples:
        why = f" ({skipped} item(s) with an empty response skipped)" if skipped else " (the file has no items)"
        raise DataError(f"{path}: no usable examples{why}")
    if source.split_long and cutoff_len is not None:
        examples = _split_documents(path, examples, tokenizer, cutoff_len)
    return examples, skipped


SPLIT_SLACK = 8  # tokens left free in each piece: re-tokenizing a piece's text may merge differently at its ends


def _split_documents(path: Path, examples: list[Example], tokenizer, cutoff_len: int) -> list[Example]:
    """``split_long``: each plain-text example longer than a row becomes consecutive pieces, cut at token
    boundaries (the tokenizer's character offsets), EOS after the last piece only."""
    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{path}: split_long cuts documents at token offsets, which needs a fast tokenizer")
    piece = cutoff_len - len(_special_prefix(tokenizer)) - 1 - SPLIT_SLACK
    if piece < 1:
        raise DataError(f"{path}: cutoff_len {cutoff_len} leaves no room for a piece of a split document")
    out = []
    for ex in examples:
        enc = tokenizer(ex.response, add_special_tokens=False, return_offsets_mapping=True)
        starts = [a for a, _ in enc["offset_mapping"]]
        if ex.prompt or len(starts) <= piece:
            out.append(ex)
            continue
        cuts = [starts[k] for k in range(0, len(starts), piece)][1:]
        bounds = [0, *cuts, len(ex.response)]
        for j in range(len(bounds) - 1):
            out.append(dataclasses.replace(ex, response=ex.response[bounds[j] : bounds[j + 1]],
                                           eos=j == len(bounds) - 2))
    return out


def _example(path: Path, loc: str, item: Any, fmt: str, tokenizer, task: str, turns: str) -> Example:
    """One supervised item as an :class:`Example`."""
    if fmt in ("llm-adapters", "alpaca", "llm-adapters-options"):
        item = _object(path, loc, item, "'instruction' and 'output'")
        if fmt == "llm-adapters-options":
            instruction, output = _options_example(path, loc, _field(path, loc, item, "instruction", required=True),
                                                   _answer(path, loc, item))
            prompt = _alpaca_prompt(path, loc, {**item, "instruction": instruction})
        else:
            prompt = _alpaca_prompt(path, loc, item)
            output = _field(path, loc, item, "output", required=True)
        return Example(prompt=prompt, response=output, task=task, answer=_answer(path, loc, item))
    if fmt == "text":
        item = _object(path, loc, item, "'text'")
        if "completion" in item and "text" not in item:  # TRL's prompt-completion: the loss on the completion
            return Example(prompt=_field(path, loc, item, "prompt", required=False) or "",
                           response=_field(path, loc, item, "completion", required=True), task=task)
        return Example(prompt="", response=_field(path, loc, item, "text", required=True), task=task)
    # messages, sharegpt
    messages = _messages(path, loc, item) if fmt == "messages" else _sharegpt(path, loc, item)
    tools = _tools(path, loc, item)
    last = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(f"{path}, {loc}: no message with role 'assistant' (the loss is on the last one)")
    if turns == "all" or messages[last].get("tool_calls"):  # a call is learned as the template writes it
        return _conversation(path, loc, messages[: last + 1], tokenizer, task, tools, every_turn=turns == "all")
    prompt = _render(path, loc, tokenizer, messages[:last], add_generation_prompt=True, tools=tools)
    return Example(prompt=prompt, response=messages[last]["content"], task=task)


def _rename(path: Path, loc: str, item: dict, columns: dict[str, str]) -> dict:
    """``item`` with each mapped column under its field's name (``DataSource.columns``)."""
    missing = [c for c in columns.values() if c not in item]
    if missing:
        raise DataError(f"{path}, {loc}: no column {missing[0]!r} (mapped by columns; the item has "
                        f"{', '.join(map(repr, item)) or 'none'})")
    out = {k: v for k, v in item.items() if k not in columns.values()}
    out.update({field: item[column] for field, column in columns.items()})
    return out


def _label(path: Path, loc: str, item: dict) -> bool:
    """An unpaired item's label: LLaMA-Factory's ``kto_tag`` or TRL's ``label`` (true: desirable)."""
    keys = [k for k in ("kto_tag", "label") if k in item]
    if not keys:
        raise DataError(f"{path}, {loc}: missing the label of the response ('kto_tag' or 'label': true when the "
                        "response is desirable, false when not)")
    value = item[keys[0]]
    if not isinstance(value, bool):
        raise DataError(f"{path}, {loc}: field '{keys[0]}' must be true or false, got {_json_type(value)}")
    return value


def _trl_completion(path: Path, loc: str, item: dict, fmt: str) -> dict:
    """TRL's conversational prompt-completion layout as a ``messages`` item: ``{"prompt": [...],
    "completion": [...]}`` (message lists) -> ``{"messages": prompt + completion}``; other items
    unchanged (``text`` reads TRL's ``{"prompt", "completion"}`` strings itself)."""
    if fmt == "messages" and "messages" not in item and "completion" in item:
        prompt = item.get("prompt", [])
        completion = item["completion"]
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise DataError(f"{path}, {loc}: 'prompt' and 'completion' must be lists of messages")
        return {"messages": prompt + completion}
    return item


def _alpaca_prompt(path: Path, loc: str, item: dict) -> str:
    instruction = _field(path, loc, item, "instruction", required=True)
    inp = _field(path, loc, item, "input", required=False)
    if inp and inp.strip():
        return PROMPT_TEMPLATES["prompt_input"].format(instruction=instruction, input=inp)
    return PROMPT_TEMPLATES["prompt_no_input"].format(instruction=instruction)


def _pair(path: Path, loc: str, item: Any, fmt: str, tokenizer, task: str) -> Example:
    """One preference item as an :class:`Example` (``response`` chosen, ``rejected`` set)."""
    item = _object(path, loc, item, "'chosen' and 'rejected'")
    if item.get("tools"):
        raise DataError(f"{path}, {loc}: 'tools' (function calling) applies to supervised data, not preference pairs")
    if fmt in ("llm-adapters", "alpaca"):
        chosen, rejected = (_field(path, loc, item, k, required=True) for k in ("chosen", "rejected"))
        return Example(prompt=_alpaca_prompt(path, loc, item), response=chosen, task=task,
                       answer=_answer(path, loc, item), rejected=rejected)
    if fmt == "text":
        prompt = _field(path, loc, item, "prompt", required=False) or ""
        chosen, rejected = (_field(path, loc, item, k, required=True) for k in ("chosen", "rejected"))
        return Example(prompt=prompt, response=chosen, task=task, rejected=rejected)
    # messages / sharegpt: the prompt's messages, then each side's assistant reply
    sides = {}
    for key in ("chosen", "rejected"):
        value = _field(path, loc, item, key, required=True, types=(str, dict, list), what="a string, a message "
                       "object or a list of messages")
        sides[key] = _reply(path, f"{loc}, {key}", value, fmt)
    (c_prompt, chosen), (r_prompt, rejected) = sides["chosen"], sides["rejected"]
    if c_prompt is not None or r_prompt is not None:  # full conversations (TRL's implicit prompt)
        if c_prompt != r_prompt:
            raise DataError(f"{path}, {loc}: 'chosen' and 'rejected' are conversations with different messages "
                            "before their last (the prompt must be the same)")
        messages = c_prompt
    elif fmt == "sharegpt":
        messages = _sharegpt(path, loc, item)
    elif "messages" not in item and isinstance(item.get("prompt"), str):  # a prompt string: one user message
        messages = [{"role": "user", "content": item["prompt"]}]
    else:  # `messages`, or TRL's `prompt` as a list of messages
        messages = _messages(path, loc, item if "messages" in item or "prompt" not in item
                             else {"messages": item["prompt"]})
    if not messages or messages[-1]["role"] == "assistant":
        raise DataError(f"{path}, {loc}: the prompt must end with a message that chosen/rejected answer "
                        f"(got {'no messages' if not messages else 'an assistant message last'})")
    prompt = _render(path, loc, tokenizer, messages, add_generation_prompt=True)
    return Example(prompt=prompt, response=chosen, task=task, rejected=rejected)


def _reply(path: Path, loc: str, value: Any, fmt: str) -> tuple[list[dict] | None, str]:
    """A preference side: ``(prompt messages or None, reply text)``. A string is the reply; an
    object is one assistant message; a list of several messages is a whole conversation whose last
    (an assistant's) is the reply and whose others are the prompt."""
    if isinstance(value, str):
        return None, value
    read = _messages if fmt == "messages" else _sharegpt
    field = "messages" if fmt == "messages" else "conversations"
    messages = read(path, loc, {field: value if isinstance(value, list) else [value]})
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"{path}, {loc}: the reply must be an assistant message"
                        + (f", got role {messages[-1]['role']!r}" if messages else ", got an empty list"))
    return (messages[:-1] or None) if len(messages) > 1 else None, messages[-1]["content"]


def _messages(path: Path, loc: str, item: Any) -> list[dict]:
    """A ``messages`` item's messages: ``role`` and ``content``; an assistant message may have
    OpenAI's ``tool_calls`` instead of content, and ``tool`` messages keep ``tool_call_id``/``name``."""
    item = _object(path, loc, item, "'messages'")
    messages = _field(path, loc, item, "messages", required=True, types=(list,), what="a list")
    out = []
    for j, m in enumerate(messages, 1):
        where = f"{loc}, message {j}"
        if not isinstance(m, dict):
            raise DataError(f"{path}, {loc}: message {j} must be an object with 'role' and "
                            f"'content', got {_json_type(m)}")
        role = _field(path, where, m, "role", required=True)
        calls = m.get("tool_calls") if role == "assistant" else None
        msg = {"role": role, "content": _field(path, where, m, "content", required=not calls) or ""}
        if calls:
            msg["tool_calls"] = _tool_calls(path, f"{where}, tool_calls", calls)
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if _field(path, where, m, key, required=False) is not None:
                    msg[key] = m[key]
        out.append(msg)
    return out


def _tool_calls(path: Path, where: str, calls: Any) -> list[dict]:
    """Tool calls as chat templates take them, ``[{"type": "function", "function": {"name", "arguments":
    {...}}}]``, from OpenAI's list (``arguments`` a JSON string or an object) or LLaMA-Factory's
    ``{"name", "arguments"}`` object(s), possibly as JSON text."""
    if isinstance(calls, str):
        try:
            calls = json.loads(calls)
        except ValueError as e:
            raise DataError(f"{path}, {where}: not JSON ({e})") from None
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{path}, {where}: expected a list of calls, got {_json_type(calls)}")
    out = []
    for i, c in enumerate(calls):
        f = c.get("function", c) if isinstance(c, dict) else None
        name = f.get("name") if isinstance(f, dict) else None
        args = f.get("arguments", f.get("parameters", {})) if isinstance(f, dict) else None
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = None
        if not isinstance(name, str) or not name or not isinstance(args, dict):
            raise DataError(f"{path}, {where}[{i}]: a call must have a 'name' and object 'arguments' (or a JSON "
                            f"string of one), got {json.dumps(c)[:80]}")
        call = {"type": "function", "function": {"name": name, "arguments": args}}
        if isinstance(c, dict) and isinstance(c.get("id"), str):
            call["id"] = c["id"]
        out.append(call)
    return out


def _tools(path: Path, loc: str, item: dict) -> list[dict] | None:
    """An item's ``tools`` (OpenAI's ``{"type": "function", "function": {...}}`` or bare function specs,
    possibly as JSON text) for the chat template; None without."""
    tools = item.get("tools")
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError as e:
            raise DataError(f"{path}, {loc}: field 'tools' is not JSON ({e})") from None
    if not isinstance(tools, list):
        raise DataError(f"{path}, {loc}: field 'tools' must be a list of functions, got {_json_type(tools)}")
    out = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else t
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise DataError(f"{path}, {loc}: tools[{i}] must be a function ({{\"name\": ..., \"parameters\": ...}}, "
                            "or OpenAI's {\"type\": \"function\", \"function\": {...}})")
        out.append({"type": "function", "function": f})
    return out


def _sharegpt(path: Path, loc: str, item: Any) -> list[dict]:
    item = _object(path, loc, item, "'conversations'")
    turns = _field(path, loc, item, "conversations", required=True, types=(list,), what="a list")
    system = _field(path, loc, item, "system", required=False)
    out = [{"role": "system", "content": system}] if system else []
    for j, t in enumerate(turns, 1):
        if not isinstance(t, dict):
            raise DataError(f"{path}, {loc}: turn {j} must be an object with 'from' and 'value', got {_json_type(t)}")
        who = _field(path, f"{loc}, turn {j}", t, "from", required=True)
        value = _field(path, f"{loc}, turn {j}", t, "value", required=True)
        if who == "function_call":  # LLaMA-Factory's tool turns: the call(s) as JSON, then the tool's answer
            out.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(path, f"{loc}, turn {j}", value)})
        elif who == "observation":
            out.append({"role": "tool", "content": value})
        elif who not in _SHAREGPT_ROLES:
            raise DataError(f"{path}, {loc}, turn {j}: 'from' must be one of "
                            f"{sorted([*_SHAREGPT_ROLES, 'function_call', 'observation'])}, got {who!r}")
        else:
            out.append({"role": _SHAREGPT_ROLES[who], "content": value})
    return out


def _render(path: Path, loc: str, tokenizer, messages: list[dict], add_generation_prompt: bool,
            tools: list[dict] | None = None) -> str:
    kw = {"tools": tools} if tools else {}
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kw)
    except Exception as e:  # jinja errors, e.g. a template that requires alternating roles
        raise DataError(f"{path}, {loc}: the chat template failed: {type(e).__name__}: {e}") from None
    if not isinstance(text, str):
        raise DataError(f"{path}, {loc}: the chat template returned {type(text).__name__}, not text")
    return text


def _conversation(path: Path, loc: str, messages: list[dict], tokenizer, task: str, tools: list[dict] | None = None,
                  every_turn: bool = True) -> Example:
    """The conversation up to its last assistant message, with that message (and with ``every_turn``,
    ``turns: all``, every earlier one) located as character spans of the rendered text. A message
    with ``tool_calls`` spans what the template writes for it, up to its end of turn (the
    tokenizer's EOS text, when the turn ends with it)."""
    full = _render(path, loc, tokenizer, messages, add_generation_prompt=False, tools=tools)
    eos = getattr(tokenizer, "eos_token", None) or None
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant" or not (m["content"].strip() or m.get("tool_calls")):
            continue
        if not every_turn and k != len(messages) - 1:
            continue
        before = _render(path, loc, tokenizer, messages[:k], add_generation_prompt=True, tools=tools)
        through = _render(path, loc, tokenizer, messages[: k + 1], add_generation_prompt=False, tools=tools)
        if not (full.startswith(through) and through.startswith(before)):
            raise DataError(f"{path}, {loc}: the chat template is not incremental (it renders earlier turns "
                            "differently once later ones follow): train it with turns: last")
        if m.get("tool_calls"):
            end = len(through.rstrip())
            if eos and through[:end].endswith(eos):
                end = len(through[: end - len(eos)].rstrip())
            if end <= len(before):
                raise DataError(f"{path}, {loc}: the chat template writes nothing for the tool calls of message "
                                f"{k + 1} (does it take tool_calls?)")
            spans.append((len(before), end))
            continue
        content = m["content"].strip()
        at = through.find(content, len(before))
        if at < 0:
            raise DataError(f"{path}, {loc}: the chat template changes assistant message {k + 1}'s text, so its "
                            "tokens cannot be located: train it with turns: last")
        spans.append((at, at + len(content)))
    return Example(prompt=full, response=messages[-1]["content"], task=task, spans=spans)


def read_examples(source: DataSource, tokenizer=None) -> list[Example]:
    """Read ``source`` into examples; ``tokenizer`` is needed (for its chat template) by ``messages``."""
    return _read(source, tokenizer)[0]


# ---------------------------------------------------------------------------------------- encoding


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    out = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [list(x) for x in out]


def _special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts in front of a text (BOS for Llama-like ones), if any."""
    probe = "a b"
    with_special = list(tokenizer(probe, add_special_tokens=True, verbose=False)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"])
    for k in range(len(with_special) - len(plain) + 1):
        if with_special[k : k + len(plain)] == plain:
            return with_special[:k]
    return []


def end_token_ids(generation_config) -> list[int]:
    """The generation config's ``eos_token_id`` as a list (it may be an int, a list or unset): the
    tokens ``generate`` stops at. Training ends every response with the tokenizer's EOS, so that
    token must be among these (``moelora.embedded.align_eos``, the warning of ``moelora train``)."""
    eos = getattr(generation_config, "eos_token_id", None)
    return [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError(f"the tokenizer {type(tokenizer).__name__} has no eos_token: set one before training")
    return int(eos)


def _check_cutoff(cutoff_len: int, head: int) -> None:
    if isinstance(cutoff_len, bool) or not isinstance(cutoff_len, int) or cutoff_len < head + 1:
        raise DataError(
            f"cutoff_len must be an integer >= {head + 1} (the tokenizer's {head} leading special "
            f"token(s) plus one response token), got {cutoff_len!r}"
        )


def _assemble(prompt_raw: list[int], resp_ids: list[int], prefix: list[int], eos: int | None, cutoff_len: int,
              reserve: int = 0) -> dict:
    """Prompt + response + EOS, truncated (left of the prompt first, then the end of the response).
    The prompt is cut as if the response had at least ``reserve`` tokens (a preference pair's longer
    side: both sides then keep the same prompt)."""
    h = len(prefix)
    body = prompt_raw[h:] if h and prompt_raw[:h] == prefix else prompt_raw
    resp = list(resp_ids) + ([] if eos is None else [eos])
    drop_prompt = min(max(h + len(body) + max(len(resp), reserve + 1) - cutoff_len, 0), len(body))
    body = body[drop_prompt:]
    drop_response = max(h + len(body) + len(resp) - cutoff_len, 0)
    resp = resp[: len(resp) - drop_response]
    prompt_ids = prefix + body
    input_ids = prompt_ids + resp
    return {
        "input_ids": input_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + resp,
        "prompt_length": len(prompt_ids),
        "truncated": drop_prompt + drop_response,
        "_dropped_prompt": drop_prompt,
        "_dropped_response": drop_response,
    }


def _encode_conversation(ex: Example, tokenizer, prefix: list[int], cutoff_len: int) -> dict:
    """``turns: all``: one tokenization of the conversation; labels on the tokens that overlap an
    assistant span and on the token right after each span (the end of the turn). Truncation drops
    tokens from the left (after the leading special tokens) but never the last turn's labels; only if
    that turn alone is too long is its end cut, as for single responses."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("turns: all and tool-call turns need a fast tokenizer (character offsets); this one is "
                        f"{type(tokenizer).__name__}")
    enc = tokenizer(ex.prompt, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    labeled = [False] * len(ids)
    for a, b in ex.spans:
        inside = [i for i, (s, e) in enumerate(offsets) if s < b and e > a]
        for i in inside:
            labeled[i] = True
        if inside and inside[-1] + 1 < len(ids):
            labeled[inside[-1] + 1] = True  # the template's end of turn (e.g. <|im_end|>)
        elif inside:  # the template ends the text with the message: end it with EOS, as single responses
            ids.append(_eos_id(tokenizer))
            labeled.append(True)
    h = len(prefix)
    if h and ids[:h] == prefix:  # the template wrote the leading special tokens itself
        ids, labeled = ids[h:], labeled[h:]
    last_start = max((i for i in range(len(ids)) if labeled[i] and (i == 0 or not labeled[i - 1])), default=0)
    excess = h + len(ids) - cutoff_len
    drop_left = min(max(excess, 0), last_start)
    dropped_labels = sum(labeled[:drop_left])
    ids, labeled = ids[drop_left:], labeled[drop_left:]
    cut_end = max(h + len(ids) - cutoff_len, 0)
    if cut_end:
        dropped_labels += sum(labeled[len(ids) - cut_end:])
        ids, labeled = ids[: len(ids) - cut_end], labeled[: len(ids) - cut_end]
    labels = [IGNORE_INDEX] * h + [t if keep else IGNORE_INDEX for t, keep in zip(ids, labeled, strict=True)]
    first = next((i for i, keep in enumerate(labeled) if keep), len(ids))
    return {
        "input_ids": prefix + ids,
        "labels": labels,
        "prompt_length": h + first,
        "truncated": drop_left + cut_end,
        "_dropped_prompt": drop_left + cut_end - dropped_labels,
        "_dropped_response": dropped_labels,
    }


def _encode_many(examples: list[Example], tokenizer, cutoff_len: int) -> list[dict]:
    prefix = _special_prefix(tokenizer)
    _check_cutoff(cutoff_len, len(prefix))
    if any(ex.spans is not None for ex in examples):  # (tool-call turns among single responses: each its way)
        spanned = [j for j, ex in enumerate(examples) if ex.spans is not None]
        if len(spanned) < len(examples) and examples[0].rejected is not None:
            raise DataError("preference pairs cannot have tool-call or turns: all examples")
        out: list[dict | None] = [None] * len(examples)
        for j in spanned:
            out[j] = _encode_conversation(examples[j], tokenizer, prefix, cutoff_len)
        rest = [j for j in range(len(examples)) if examples[j].spans is None]
        for j, enc in zip(rest, _encode_many([examples[j] for j in rest], tokenizer, cutoff_len) if rest else []):
            out[j] = enc
        return out
    eos = _eos_id(tokenizer)
    prompts = _ids(tokenizer, [ex.prompt for ex in examples])
    responses = _response_ids(tokenizer, prompts, [ex.prompt for ex in examples], [ex.response for ex in examples])
    if examples and examples[0].rejected is not None:  # preference pairs: both sides keep the same prompt
        if not all(ex.rejected is not None for ex in examples):
            raise DataError("preference pairs and single responses cannot be encoded together")
        rejected = _response_ids(tokenizer, prompts, [ex.prompt for ex in examples], [ex.rejected for ex in examples])
        out = []
        for p, c, r in zip(prompts, responses, rejected, strict=True):
            reserve = max(len(c), len(r))
            a, b = (_assemble(p, x, prefix, eos, cutoff_len, reserve) for x in (c, r))
            out.append({**a, "rejected_input_ids": b["input_ids"], "rejected_labels": b["labels"],
                        "truncated": a["truncated"] + b["truncated"],
                        "_dropped_response": a["_dropped_response"] + b["_dropped_response"]})
        return out
    out = [_assemble(p, r, prefix, eos if ex.eos else None, cutoff_len)
           for p, r, ex in zip(prompts, responses, examples, strict=True)]
    for enc, ex in zip(out, examples, strict=True):
        if ex.desirable is not None:
            enc["desirable"] = ex.desirable
    return out


def _response_ids(tokenizer, prompts: list[list[int]], prompt_texts: list[str], texts: list[str]) -> list[list[int]]:
    """The tokens of each response after its prompt: those after the prompt's in the joint
    tokenization (what the model sees after the prompt at inference; SentencePiece tokenizers would
    add a word boundary to a response tokenized alone), unless the joint tokenization merges across
    the boundary: then the response tokenized alone."""
    responses = _ids(tokenizer, [p + r for p, r in zip(prompt_texts, texts, strict=True)])
    merged = []
    for j, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if r[: len(p)] == p and len(r) > len(p):
            responses[j] = r[len(p) :]
        else:
            merged.append(j)
    for j, r in zip(merged, _ids(tokenizer, [texts[j] for j in merged]), strict=True):
        responses[j] = r
    return responses


def encode_example(ex: Example, tokenizer, cutoff_len: int) -> dict:
    """Tokenize one example: ``{"input_ids", "labels" (-100 on the prompt), "prompt_length",
    "truncated" (tokens dropped)}``; see the module docstring for the truncation rule. A preference
    pair (``ex.rejected`` set) also has ``rejected_input_ids`` and ``rejected_labels`` (the same
    prompt tokens, then the rejected response; ``input_ids``/``labels`` are the chosen side)."""
    enc = _encode_many([ex], tokenizer, cutoff_len)[0]
    return {k: v for k, v in enc.items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------------ mixing


def _generator(*key) -> torch.Generator:
    digest = hashlib.sha256(repr(("moelora.data",) + tuple(key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _apportion(count: int, masses: list) -> list[int]:
    """``count`` split in proportion to ``masses``, by largest remainder (exact rational arithmetic,
    ties to the earlier entry)."""
    masses = [Fraction(m) for m in masses]
    exact = [Fraction(count) * m / sum(masses) for m in masses]
    parts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in by_remainder[: count - sum(parts)]:
        parts[i] += 1
    return parts


def _quotas(lengths: list[int], weights: list[float]) -> list[int]:
    """Largest-remainder apportionment of ``sum(lengths)`` in proportion to ``weight * length``."""
    return _apportion(sum(lengths), [Fraction(w) * n for w, n in zip(weights, lengths, strict=True)])


def _held_out(lengths: list[int], val_size: float, seed: int, paths: list[str]) -> list[set[int]]:
    """The indices each source keeps for validation (``train.val_size``): a fraction ``0 < v < 1``
    of every source (rounded; the examples drawn with a generator seeded by ``(seed, source)``), or
    an integer count ``v >= 1`` apportioned to the sources by size (largest remainder)."""
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)) or not (val_size >= 0):
        raise DataError(f"val_size must be a fraction in (0, 1) or a count >= 1 (0: none), got {val_size!r}")
    if val_size == 0:
        return [set() for _ in lengths]
    if val_size < 1:
        counts = [round(val_size * n) for n in lengths]
    elif float(val_size).is_integer():
        if val_size > sum(lengths):
            raise DataError(f"val_size={int(val_size)} is more than the {sum(lengths)} training examples")
        counts = _apportion(int(val_size), lengths)
    else:
        raise DataError(f"val_size must be a fraction in (0, 1) or a whole count >= 1, got {val_size!r}")
    if not any(counts):
        raise DataError(f"val_size={val_size} holds out no example of {sum(lengths)}: give a larger fraction or a count")
    for n, k, path in zip(lengths, counts, paths, strict=True):
        if k >= n:
            raise DataError(f"{path}: val_size={val_size} would hold out all {n} of its examples for validation")
    return [set(torch.randperm(n, generator=_generator(seed, "validation", i)).tolist()[:k])
            for i, (n, k) in enumerate(zip(lengths, counts, strict=True))]


class TrainData:
    """Every source read, encoded and truncated once; ``epoch_order`` mixes them by weight.

    Indexing is over all examples, source after source (``source_ranges[i]`` is source ``i``'s
    ``range``); ``data[i]`` is the encoded dict of :func:`encode_example` plus ``"task"``.
    ``stats[task]`` has ``examples``, ``tokens`` (after truncation), ``response_tokens`` (label
    tokens), ``truncated_examples``, ``dropped_tokens``, ``dropped_prompt_tokens``,
    ``dropped_response_tokens`` and ``skipped_items`` (empty responses); ``quotas[i]`` is the number
    of examples source ``i`` contributes to each epoch.

    ``validation`` holds the examples kept out of training: ``val_size`` of the sources (a fraction
    of each, or a count apportioned by size; drawn with a generator seeded by ``(seed, source)``)
    followed by every example of ``val_sources``, each encoded as above plus ``"task"``. They are
    in no epoch, and ``stats`` counts the training examples only.

    With ``stage="dpo"`` every item is a chosen/rejected pair, an example is one pair (its features
    have ``rejected_input_ids``/``rejected_labels`` too) and ``stats`` counts the tokens of both
    sides; with ``stage="kto"`` every feature has ``desirable`` (its label). Neither is packed.
    ``train_on_prompt`` (supervised only) puts the labels on every token, the prompt's too
    (``prompt_length`` still marks the prompt, for MiLoRA's routing).
    """

    def __init__(self, sources: list[DataSource], tokenizer, cutoff_len: int, seed: int, *,
                 val_size: float = 0, val_sources: list[DataSource] = (), stage: str = "sft",
                 train_on_prompt: bool = False):
        if not sources:
            raise DataError("no data sources given")
        if tokenizer is None:
            raise DataError("TrainData needs a tokenizer")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise DataError(f"seed must be an integer, got {seed!r}")
        self.sources = [s if isinstance(s, DataSource) else DataSource.from_dict(s) for s in sources]
        self.cutoff_len = cutoff_len
        self.seed = seed
        self.examples: list[Example] = []
        self.features: list[dict] = []
        self.source_ranges: list[range] = []
        self.stats: dict[str, dict[str, int]] = {}
        self.validation: list[dict] = []
        self.stage = stage
        preference = stage == "dpo"
        _check_cutoff(cutoff_len, len(_special_prefix(tokenizer)))
        if train_on_prompt and stage != "sft":
            raise DataError(f"train_on_prompt applies to supervised training, not train.stage: {stage}")

        def encode(examples: list[Example]) -> list[dict]:
            out = _encode_many(examples, tokenizer, cutoff_len)
            if train_on_prompt:  # the loss on every token (LLaMA-Factory's train_on_prompt)
                for enc in out:
                    enc["labels"] = list(enc["input_ids"])
            return out

        read = [_read(src, tokenizer, stage, cutoff_len) for src in self.sources]
        held = _held_out([len(examples) for examples, _ in read], val_size, seed, [s.path for s in self.sources])
        for src, (examples, skipped), out in zip(self.sources, read, held, strict=True):
            encoded = encode(examples)
            for j in sorted(out):
                enc = {k: v for k, v in encoded[j].items() if not k.startswith("_")}
                self.validation.append({**enc, "task": src.name})
            examples = [ex for j, ex in enumerate(examples) if j not in out]
            encoded = [enc for j, enc in enumerate(encoded) if j not in out]
            start = len(self.features)
            st = self.stats.setdefault(src.name, dict.fromkeys(
                ("examples", "tokens", "response_tokens", "truncated_examples", "dropped_tokens",
                 "dropped_prompt_tokens", "dropped_response_tokens", "skipped_items"), 0))
            st["skipped_items"] += skipped
            for ex, enc in zip(examples, encoded, strict=True):
                st["examples"] += 1
                for side in ("", "rejected_") if preference else ("",):
                    st["tokens"] += len(enc[f"{side}input_ids"])
                    st["response_tokens"] += sum(label != IGNORE_INDEX for label in enc[f"{side}labels"])
                st["truncated_examples"] += enc["truncated"] > 0
                st["dropped_tokens"] += enc["truncated"]
                st["dropped_prompt_tokens"] += enc.pop("_dropped_prompt")
                st["dropped_response_tokens"] += enc.pop("_dropped_response")
                enc["task"] = src.name
                self.examples.append(ex)
                self.features.append(enc)
            self.source_ranges.append(range(start, len(self.features)))
        for src in val_sources:
            src = src if isinstance(src, DataSource) else DataSource.from_dict(src)
            for enc in encode(_read(src, tokenizer, stage, cutoff_len)[0]):
                enc = {k: v for k, v in enc.items() if not k.startswith("_")}
                self.validation.append({**enc, "task": src.name})
        self._passes: dict[int, dict[int, list[int]]] = {}
        self._packed: tuple[tuple[int, int] | None, list[list[int]]] = (None, [])  # packed_order's last epoch
        self.quotas = _quotas([len(r) for r in self.source_ranges], [s.weight for s in self.sources])
        self._log_summary()

    def _log_summary(self) -> None:
        tot = {k: sum(s[k] for s in self.stats.values()) for k in next(iter(self.stats.values()))}
        tasks = ", ".join(f"{t} {s['examples']}" for t, s in self.stats.items())
        per_epoch = ", ".join(f"{s.name} {q}" for s, q in zip(self.sources, self.quotas, strict=True))
        unit = {"dpo": "preference pairs", "kto": "labelled examples"}.get(self.stage, "examples")
        msg = (
            f"data: {tot['examples']} {unit} ({tasks}), {tot['tokens']} tokens; per epoch: {per_epoch}; "
            f"cutoff_len={self.cutoff_len}: {tot['truncated_examples']} examples truncated, "
            f"{tot['dropped_prompt_tokens']} prompt tokens dropped from the left, "
            f"{tot['dropped_response_tokens']} response tokens cut from the end; "
            f"{tot['skipped_items']} items with an empty response skipped"
        )
        if self.validation:
            msg += f"; {len(self.validation)} {unit} kept for validation"
        logger.log(logging.WARNING if tot["dropped_response_tokens"] else logging.INFO, msg)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        return dict(self.features[index])

    @property
    def epoch_size(self) -> int:
        return sum(self.quotas)

    def _source_pass(self, i: int, p: int) -> list[int]:
        """Pass ``p`` over source ``i``: a permutation of its local indices, seeded by ``(seed, i, p)``,
        stably reordered so that the items the epoch straddling into this pass already took from an
        earlier pass come last (an epoch never repeats an item it can avoid repeating)."""
        cache = self._passes.setdefault(i, {})
        n, q = len(self.source_ranges[i]), self.quotas[i]
        for k in range(len(cache), p + 1):  # passes depend on earlier ones: build them in order
            perm = torch.randperm(n, generator=_generator(self.seed, "source", i, k)).tolist()
            start = k * n
            lo = (start // q) * q  # start of the epoch that contains this pass's first position
            if lo < start:
                a = lo // n
                taken = set(cache[a][lo - a * n :])
                perm = [x for x in perm if x not in taken] + [x for x in perm if x in taken]
            cache[k] = perm
        return cache[p]

    def epoch_order(self, epoch: int) -> list[int]:
        """The example indices of epoch ``epoch`` (0-based), mixed by weight; deterministic."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        picks: list[int] = []
        for i, (rng, q) in enumerate(zip(self.source_ranges, self.quotas, strict=True)):
            n = len(rng)
            if q == 0:
                continue
            lo, hi = epoch * q, (epoch + 1) * q  # positions in the source's stream of passes
            for k in range(lo // n, (hi - 1) // n + 1):
                perm = self._source_pass(i, k)
                picks.extend(rng.start + x for x in perm[max(lo, k * n) - k * n : min(hi, (k + 1) * n) - k * n])
        shuffle = torch.randperm(len(picks), generator=_generator(self.seed, "epoch", epoch)).tolist()
        return [picks[j] for j in shuffle]


    def packed_order(self, epoch: int, capacity: int | None = None) -> list[list[int]]:
        """Epoch ``epoch``'s examples packed into rows of at most ``capacity`` tokens (default
        ``cutoff_len``; ``train.packing``): best-fit decreasing over the epoch's examples (ties in the
        epoch's order), each row's examples in the epoch's order, the rows shuffled with a generator
        seeded by ``(seed, epoch)``. Every example of the epoch is in exactly one row."""
        if self.stage != "sft":
            raise DataError(f"train.stage {self.stage} does not pack its examples (each one's response is compared "
                            "with another's)")
        key = (epoch, capacity or self.cutoff_len)
        if self._packed[0] != key:  # the last epoch's rows are kept (asked for again)
            order = self.epoch_order(epoch)
            bins = pack_lengths([len(self.features[i]["input_ids"]) for i in order], key[1])
            shuffle = torch.randperm(len(bins), generator=_generator(self.seed, "packing", epoch)).tolist()
            self._packed = (key, [[order[p] for p in sorted(bins[j])] for j in shuffle])
        return [list(row) for row in self._packed[1]]


def pack_lengths(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: the indices of ``lengths`` grouped so that each group's total
    is at most ``capacity`` (longest first, each into the fullest group it fits; O(n log n))."""
    if any(n > capacity for n in lengths):
        raise DataError(f"an example of {max(lengths)} tokens does not fit a packed row of {capacity}")
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, bin), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        j = bisect.bisect_left(room, (lengths[i], -1))
        if j == len(room):
            bins.append([i])
            left, b = capacity, len(bins) - 1
        else:
            left, b = room.pop(j)
            bins[b].append(i)
        bisect.insort(room, (left - lengths[i], b))
    return bins


# --------------------------------------------------------------------------------------- collation


def collate(features: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids`` (``pad_token_id``), ``attention_mask``, ``labels`` (-100 on
    padding), ``prompt_lengths`` (LongTensor ``(B,)``, for MiLoRA)."""
    if not features:
        raise ValueError("collate needs at least one feature")
    if pad_token_id is None:
        raise ValueError("collate needs a pad_token_id (the tokenizer has no pad token: set one, e.g. to EOS)")
    width = max(len(f["input_ids"]) for f in features)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    B = len(features)
    input_ids = torch.full((B, width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((B, width), dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    for b, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[b, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
        attention_mask[b, :n] = 1
        labels[b, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
    prompt_lengths = torch.tensor([int(f["prompt_length"]) for f in features], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "prompt_lengths": prompt_lengths}



def kto_kl_rows(features: list[dict], cutoff_len: int) -> list[dict]:
    """``train.stage: kto``'s mismatched rows, from which the KL term is estimated: each example's
    prompt followed by the previous example's response (the last example's for the first; TRL's
    cycling within a batch), its end cut to ``cutoff_len``. Labels on that response."""
    if len(features) < 2:
        raise DataError("train.stage: kto estimates its KL term from mismatched examples of a batch: give "
                        "train.batch_size >= 2")
    rows = []
    for f, g in zip(features, features[-1:] + features[:-1], strict=True):
        p, q = int(f["prompt_length"]), int(g["prompt_length"])
        ids = (list(f["input_ids"][:p]) + list(g["input_ids"][q:]))[:cutoff_len]
        labels = ([IGNORE_INDEX] * p + list(g["labels"][q:]))[:cutoff_len]
        rows.append({"input_ids": ids, "labels": labels, "prompt_length": p})
    return rows


def preference_rows(features: list[dict]) -> list[dict]:
    """A batch of preference pairs as rows for :func:`collate`: every pair's chosen side, then every
    pair's rejected side (the same prompt and ``prompt_length``)."""
    return [*features, *({"input_ids": f["rejected_input_ids"], "labels": f["rejected_labels"],
                          "prompt_length": f["prompt_length"]} for f in features)]


def collate_packed(rows: list[list[dict]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Several examples per row, each attending to itself only (``train.packing``): ``input_ids``,
    ``labels``, ``position_ids`` (from 0 in every example, and in the right padding, which so makes
    a segment of its own), ``token_mask`` (1 = a real token; the adapters' routers read it) and, for
    MiLoRA's routing of each example on its prompt, ``segment_ids`` (each token's example, -1 on
    padding), ``segment_prompt`` (each example's prompt positions in the flattened batch, ``(S, L)``)
    and ``segment_prompt_mask``. No
    ``attention_mask``: transformers then finds the examples from the positions and masks attention
    between them (its packed-sequence detection). Each example's first label is dropped (-100): the
    token before it, the previous example's last, must not learn to predict it; unpacked, no token
    predicts it either."""
    if not rows or not all(rows):
        raise ValueError("collate_packed needs rows of at least one feature each")
    width = max(sum(len(f["input_ids"]) for f in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, width), int(pad_token_id), dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, width), dtype=torch.long)
    token_mask = torch.zeros((B, width), dtype=torch.long)
    segment_ids = torch.full((B, width), -1, dtype=torch.long)
    prompts: list[range] = []  # each example's routing positions in the flattened batch
    for b, row in enumerate(rows):
        at = 0
        for f in row:
            n = len(f["input_ids"])
            input_ids[b, at : at + n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[b, at + 1 : at + n] = torch.as_tensor(f["labels"][1:], dtype=torch.long)
            position_ids[b, at : at + n] = torch.arange(n)
            token_mask[b, at : at + n] = 1
            segment_ids[b, at : at + n] = len(prompts)
            k = int(f["prompt_length"]) or n  # no prompt (`text`): all its tokens, as an unpacked row
            prompts.append(range(b * width + at, b * width + at + k))
            at += n
        position_ids[b, at:] = torch.arange(width - at)
    L = max(len(r) for r in prompts)
    segment_prompt = torch.zeros((len(prompts), L), dtype=torch.long)
    segment_prompt_mask = torch.zeros((len(prompts), L), dtype=torch.bool)
    for s, r in enumerate(prompts):
        segment_prompt[s, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        segment_prompt_mask[s, : len(r)] = True
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "token_mask": token_mask,
            "segment_ids": segment_ids, "segment_prompt": segment_prompt, "segment_prompt_mask": segment_prompt_mask}
