"""Evaluation of a (possibly adapted) causal LM on llm-adapters task files (``moelora eval``).

Data: JSON lists of ``{"instruction", "input", "output", "answer"}`` (LLM-Adapters' format, see
``../shared/data/README.md``). Two protocols (METHODS.md section 4); a results table always names
the one it used:

``choice`` (log-likelihood of each choice, lm-evaluation-harness style)
    The prompt is LLM-Adapters' alpaca template followed by the fixed prefix of the training
    outputs, ``"the correct answer is"``; each candidate label is scored as the continuation
    ``" " + label``: the sum of its tokens' log-probabilities given the prompt. ``acc`` takes the
    argmax of that sum, ``acc_norm`` the argmax of the sum divided by the continuation's UTF-8 byte
    length (ties: the first label). The candidates of an item are the task's labels that its
    instruction mentions (e.g. "Answer format: answer1/answer2/answer3" for a 3-choice ARC item); the
    task's whole label set when it mentions fewer than two. The continuation's tokens are those of
    ``tokenize(prompt + continuation)`` after the prompt's own (lm-evaluation-harness' split).
    Computation: each prompt runs once (left-padded, explicit position ids, KV cache kept) and the
    candidates run on copies of its cache; models whose forward takes no ``past_key_values`` (and
    batches reaching a sliding attention window) instead score each ``prompt + continuation`` as its
    own right-padded sequence. Both give the unbatched log-likelihoods (tested to 1e-4). MiLoRA routes
    on the prompt only: it routes at the prompt forward (``prompt_lengths`` passed to moelora models)
    and reuses the gates for the candidates, as in generation.

``options`` (log-likelihood of each option's text, lm-evaluation-harness' ARC / OpenBookQA style)
    As ``choice``, but the candidates are the options' texts, not their labels, and the prompt does
    not list them: the prompt is the alpaca template of the item's question
    (:func:`moelora.data.options_form`: the instruction without its "Answer1: ..." list and its
    "Answer format:" line) followed by ``"the correct answer is"``; each option is scored as the
    continuation ``" " + text`` (``acc``; ``acc_norm``: per UTF-8 byte of the continuation). Items
    without an option list (BoolQ) score their candidate labels, as ``choice`` does, after the
    question without its "Answer format:" line. This is what adapters trained on the
    ``llm-adapters-options`` data format answer; small models that cannot bind option symbols to
    option texts (the labels ``answer1``...) score above chance here (docs/results.md).

``generate`` (generate and parse, LLM-Adapters)
    Greedy (or beam) generation from the left-padded prompt; only the new tokens are decoded, cut
    at the next ``### Instruction:`` / ``### Input:`` / ``### Response:`` header if the model starts a
    new turn, and parsed by
    :func:`parse_answer`: the first label found (case-insensitive, whole word) for choice tasks, the
    last number for math (``abs(pred - gold) <= 1e-3``, LLM-Adapters' tolerance), the letter for
    AQuA. Unparsable outputs count as wrong and are reported as ``unparsed``.

``generate-options`` (generate and parse the option's text)
    ``generate`` for adapters trained on the ``llm-adapters-options`` format: the prompt is the
    question without its option list (as ``options``), and :func:`parse_option` maps the response
    (``"the correct answer is steam"``) back to the option whose text it names. Items without an
    option list (BoolQ) are parsed as ``generate`` parses them. The model never sees the options: it
    must produce an option's text by itself (closed-book), far harder than ranking the given texts
    (``options``); a base model that was not trained to answer in that form names almost none.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .config import did_you_mean
from .data import ANSWER_PREFIX, end_token_ids, options_form

PROTOCOLS = ("choice", "options", "generate", "generate-options")
GENERATED = ("generate", "generate-options")  # the protocols that generate: num_beams, max_new_tokens
SCORED = ("choice", "options")  # the log-likelihood protocols: acc and acc_norm, no generation
CHOICE_PREFIX = ANSWER_PREFIX  # the fixed prefix of every llm-adapters commonsense output
LABEL_FAMILIES = ("answer", "solution", "option", "ending")  # ARC/OBQA/SIQA, PIQA, WinoGrande, HellaSwag
NUMBER_TOLERANCE = 1e-3  # LLM-Adapters' `miss`
SAMPLES_KEPT = 20  # generate: outputs kept per task in the results (to see what a model answers)
SPLIT_NAMES = {"test", "train", "dev", "val", "valid", "validation", "eval"}

_NUMBER_RE = re.compile(r"-?\d+\.?\d*")
_LETTER_ANSWER_RE = re.compile(r"(?i:answer\s*(?:is|:))\s*:?\s*\(?([A-Z])\)?(?![A-Za-z0-9])")
_LETTER_PAREN_RE = re.compile(r"\(([A-Z])\)")


@dataclass
class TaskResult:
    task: str
    protocol: str
    correct: int
    total: int
    accuracy: float
    unparsed: int
    accuracy_norm: float | None = None  # choice/options: acc_norm (log-likelihood per byte)
    correct_norm: int | None = None
    samples: list[dict] | None = None  # generate: the first outputs as generated, parsed and expected


# ---------------------------------------------------------------------------------------------
# Prompts, labels, parsing


def llm_adapters_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 (LLM-Adapters' field name)
    """LLM-Adapters' alpaca template (``generate_prompt`` of its evaluate scripts)."""
    if input:
        return (
            "Below is an instruction that describes a task, paired with an input that provides further "
            "context. Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    return (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        f"the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    )


def _is_number(s: str) -> bool:
    try:
        return math.isfinite(float(s.replace(",", "")))
    except ValueError:
        return False


def _is_letter(s: str) -> bool:
    return len(s) == 1 and "A" <= s <= "Z"


def _item_text(item: dict) -> str:
    return f"{item.get('instruction', '')}\n{item.get('input', '') or ''}"


def candidate_labels(items: Sequence[dict]) -> list[str]:
    """The label set of a task, from its items' ``answer`` fields and instruction text.

    - ``answerN`` / ``solutionN`` / ``optionN`` / ``endingN``: ``family1 .. familyN`` with ``N`` the
      largest index seen in the answers or the instructions ("Answer5:", "answer1/.../answer5");
    - ``true`` / ``false``: both;
    - numbers (math): ``[]``, an open answer; also for a mix of numbers and letters (math training
      mixes, where :func:`evaluate_generate` parses letter answers per item);
    - single capital letters (AQuA): ``A`` up to the largest letter of the answers and of the
      instructions' "(X)" choices;
    - anything else: the distinct answers, in order of first appearance.
    """
    answers = [str(it.get("answer", "")).strip() for it in items]
    if not answers:
        return []
    if all(_is_number(a) for a in answers):
        return []
    if all(_is_letter(a) for a in answers):
        letters = set(answers)
        for it in items:
            letters.update(_LETTER_PAREN_RE.findall(_item_text(it)))
        return [chr(c) for c in range(ord("A"), ord(max(letters)) + 1)]
    if all(_is_number(a) or _is_letter(a) for a in answers):
        return []
    labels: list[str] = []
    lowered = [a.lower() for a in answers]
    covered = set()
    if any(a in ("true", "false") for a in lowered):
        labels += ["true", "false"]
        covered |= {"true", "false"}
    for family in LABEL_FAMILIES:
        pattern = re.compile(rf"{family}(\d+)")
        indices = [int(m.group(1)) for a in lowered if (m := pattern.fullmatch(a))]
        if not indices:
            continue
        text_re = re.compile(rf"\b{family}(\d+)\b", re.IGNORECASE)
        for it in items:
            indices += [int(i) for i in text_re.findall(_item_text(it))]
        n = max(indices)
        family_labels = [f"{family}{i}" for i in range(1, n + 1)]
        labels += family_labels
        covered |= set(family_labels)
    for a in answers:  # free-form closed sets ("yes"/"no", ...)
        if a.lower() not in covered:
            labels.append(a)
            covered.add(a.lower())
    return labels


def _label_regex(labels: Sequence[str]) -> re.Pattern:
    alternatives = "|".join(re.escape(lab) for lab in sorted(labels, key=len, reverse=True))
    # a label starts a word and is not followed by a digit: "answer3the ..." (a model that runs on
    # past its answer) is answer3, as in LLM-Adapters' substring search; "answer12" and "untrue" are not
    return re.compile(rf"(?<![A-Za-z0-9_])({alternatives})(?![0-9])", re.IGNORECASE)


def parse_answer(text: str, labels: Sequence[str]) -> str | None:
    """The answer in generated ``text``, or ``None`` when there is none.

    - ``labels == []`` (math, open answer): LLM-Adapters' rule, the last number in the text after
      removing thousands separators (``"... $1,234.50 ..."`` -> ``"1234.50"``; a trailing ``.`` is
      dropped: ``"The answer is 42."`` -> ``"42"``).
    - single-letter labels (AQuA): the letter of ``"answer is (X)"`` / ``"answer: X"``, else the
      first ``"(X)"``, else the first standalone capital letter among the labels.
    - otherwise: the first label found, case-insensitive, at the start of a word and not followed by
      a digit (``"answer3the"`` -> ``answer3``; ``"answer12"``, ``"untrue"`` -> nothing); returned
      as spelled in ``labels`` (``"True"`` -> ``"true"``).
    """
    if not labels:
        found = _NUMBER_RE.findall(text.replace(",", ""))
        if not found:
            return None
        return found[-1].rstrip(".")
    if all(_is_letter(lab) for lab in labels):
        allowed = set(labels)
        for rx in (_LETTER_ANSWER_RE, _LETTER_PAREN_RE):
            for m in rx.finditer(text):
                if m.group(1) in allowed:
                    return m.group(1)
        for m in re.finditer(r"(?<![A-Za-z0-9_])([A-Z])(?![A-Za-z0-9_])", text):
            if m.group(1) in allowed:
                return m.group(1)
        return None
    m = _label_regex(labels).search(text)
    if m is None:
        return None
    found = m.group(1).lower()
    return next(lab for lab in labels if lab.lower() == found)


def _norm_text(s: str) -> str:
    """Lower case, runs of whitespace as one space, no surrounding whitespace or end punctuation."""
    return " ".join(s.lower().split()).strip(" .,;:!?\"'")


def parse_option(text: str, options: dict[str, str]) -> str | None:
    """The label of the option whose text a generated response names, or ``None``.

    ``text`` is compared with the options' texts lower-cased, with whitespace runs as one space and
    end punctuation dropped, after removing a leading ``"the correct answer is"``: an option equal to
    the whole response wins; else the option found earliest in the response (whole words), the
    longest of those found at the same place (``"red"`` and ``"red and blue"``: the latter). Options
    with no text are never found."""
    body = _norm_text(text)
    prefix = _norm_text(ANSWER_PREFIX)
    if body.startswith(prefix):
        body = body[len(prefix):].strip()
    normed = {lab: _norm_text(t) for lab, t in options.items()}
    for lab, t in normed.items():
        if t and t == body:
            return lab
    best, best_key = None, None
    for lab, t in normed.items():
        if not t:
            continue
        m = re.search(rf"(?<![\w]){re.escape(t)}(?![\w])", body)
        if m and (best_key is None or (m.start(), -len(t)) < best_key):
            best, best_key = lab, (m.start(), -len(t))
    return best


def is_correct(pred: str | None, gold: str, labels: Sequence[str]) -> bool:
    """``pred`` matches ``gold``: numbers within :data:`NUMBER_TOLERANCE` for open answers, else the
    label case-insensitively."""
    if pred is None:
        return False
    gold = str(gold).strip()
    if not labels and _is_number(gold) and _is_number(pred):
        return abs(float(pred.replace(",", "")) - float(gold.replace(",", ""))) <= NUMBER_TOLERANCE
    return pred.strip().lower() == gold.lower()


def _item_labels(item: dict, labels: list[str]) -> list[str]:
    """The labels to parse an item's generation with: the task's, or for a letter answer in an open
    (math) task, the letters of that item's choices."""
    gold = str(item["answer"]).strip()
    if labels or not _is_letter(gold):
        return labels
    letters = set(_LETTER_PAREN_RE.findall(_item_text(item))) | {gold}
    return [chr(c) for c in range(ord("A"), ord(max(letters)) + 1)]


def _item_candidates(item: dict, labels: list[str]) -> list[str]:
    """The labels an item's own text mentions (its answer format), or the task's when it mentions fewer
    than two. Never looks at the gold answer."""
    text = _item_text(item)
    if all(_is_letter(lab) for lab in labels):
        seen = set(_LETTER_PAREN_RE.findall(text))
        mentioned = [lab for lab in labels if lab in seen]
    else:
        seen = {m.lower() for m in _label_regex(labels).findall(text)}
        mentioned = [lab for lab in labels if lab.lower() in seen]
    return mentioned if len(mentioned) >= 2 else list(labels)


# ---------------------------------------------------------------------------------------------
# Loading and validation


def _validate_items(items: Any, where: str) -> list[dict]:
    if not isinstance(items, list):
        raise ValueError(f"{where}: expected a JSON list of items, got {type(items).__name__}")
    if not items:
        raise ValueError(f"{where}: no items")
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            raise ValueError(f"{where}: item {i} is a {type(it).__name__}, not an object")
        for key in ("instruction", "answer"):
            if key not in it:
                raise ValueError(f"{where}: item {i} has no {key!r} field (keys: {sorted(it)})")
        if not isinstance(it["instruction"], str):
            raise ValueError(f"{where}: item {i}: 'instruction' must be a string")
        if not isinstance(it.get("input", "") or "", str):
            raise ValueError(f"{where}: item {i}: 'input' must be a string")
        if it["answer"] is None or (isinstance(it["answer"], str) and not it["answer"].strip()):
            raise ValueError(f"{where}: item {i} has an empty 'answer'")
    return items


def load_items(path: str | Path) -> list[dict]:
    """The items of an llm-adapters JSON file (a list of objects; ``.jsonl``: one object per line)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        items = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno}: invalid JSON ({e.msg})") from None
    else:
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    return _validate_items(items, str(path))


def task_name(path: str | Path) -> str:
    """``arc_easy/test.json`` -> ``arc_easy``; ``gsm8k.json`` -> ``gsm8k``."""
    p = Path(path)
    if p.stem.lower() in SPLIT_NAMES and p.parent.name:
        return p.parent.name
    return p.stem


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        hint = did_you_mean(protocol, PROTOCOLS)
        raise ValueError(f"unknown protocol {protocol!r}{hint}: expected one of {', '.join(PROTOCOLS)}")


def _prepare(items: Sequence[dict], task: str, limit: int | None) -> list[dict]:
    items = _validate_items(list(items), f"task {task!r}")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be a positive number of items, got {limit}")
        items = items[:limit]
    return items


# ---------------------------------------------------------------------------------------------
# Model plumbing


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device(getattr(model, "device", "cpu"))


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class _EvalMode:
    """``model.eval()`` and ``torch.no_grad()`` for the block; the training flag restored after."""

    def __init__(self, model: Any):
        self.model = model
        self.was_training = bool(getattr(model, "training", False))
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        if hasattr(self.model, "eval"):
            self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        if self.was_training and hasattr(self.model, "train"):
            self.model.train()


def _progress(total: int, desc: str, unit: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# Protocol "choice": log-likelihood of each candidate


def _encode_requests(tokenizer: Any, prompts: list[str], conts: list[str]) -> list[tuple[list[int], list[int]]]:
    """``(context_ids, continuation_ids)`` per request: the tokens of ``prompt + cont`` split after the
    prompt's own tokens (lm-evaluation-harness' rule), or the continuation encoded alone when the
    tokenizer merges across the boundary."""
    ctx_ids = tokenizer(prompts)["input_ids"]
    whole_ids = tokenizer([p + c for p, c in zip(prompts, conts, strict=True)])["input_ids"]
    out = []
    for p, c, ctx, whole in zip(prompts, conts, ctx_ids, whole_ids, strict=True):
        ctx, whole = list(ctx), list(whole)
        if len(whole) > len(ctx) and whole[: len(ctx)] == ctx:
            cont = whole[len(ctx) :]
        else:
            cont = list(tokenizer(c, add_special_tokens=False)["input_ids"])
        if not cont:
            raise ValueError(f"the continuation {c!r} of prompt {p[-60:]!r} encodes to no tokens")
        out.append((ctx, cont))
    return out


def _continuation_logprobs(logits: torch.Tensor, cont: list[int]) -> float:
    """Sum of ``log p(cont[k])`` with ``logits[k]`` the logits that predict ``cont[k]``."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(cont, device=logits.device)
    return float(logprobs.gather(-1, target[:, None]).sum())


def _sliding_window(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


def _score_unshared(model: Any, groups: list[tuple[list[int], list[list[int]]]], pad: int, device: torch.device,
                    routed: bool, keep_logits: bool) -> list[list[float]]:
    """One right-padded forward over every ``context + continuation`` of ``groups``: real tokens keep
    positions ``0..L-1`` and never see the padding (causal attention)."""
    rows = [(g, ctx, cont) for g, (ctx, conts) in enumerate(groups) for cont in conts]
    T = max(len(ctx) + len(cont) for _, ctx, cont in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for r, (_, ctx, cont) in enumerate(rows):
        ids[r, : len(ctx) + len(cont)] = torch.tensor(ctx + cont)
        mask[r, : len(ctx) + len(cont)] = 1
    # position p's logits predict token p + 1: a continuation is predicted by [len(ctx) - 1, len(ctx) + n - 1)
    spans = [(len(ctx) - 1, len(ctx) + len(cont) - 1) for _, ctx, cont in rows]
    kwargs: dict[str, Any] = {"attention_mask": mask.to(device)}
    if routed:  # MiLoRA routes on the prompt only
        kwargs["prompt_lengths"] = torch.tensor([len(ctx) for _, ctx, _ in rows], device=device)
    positions = sorted({p for a, b in spans for p in range(a, b)})
    if keep_logits:
        kwargs["logits_to_keep"] = torch.tensor(positions, device=device)
        where = {p: k for k, p in enumerate(positions)}
    else:
        where = {p: p for p in positions}
    out = model(input_ids=ids.to(device), **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    scores: list[list[float]] = [[] for _ in groups]
    for r, ((g, _, cont), (a, b)) in enumerate(zip(rows, spans, strict=True)):
        cols = torch.tensor([where[p] for p in range(a, b)], device=logits.device)
        scores[g].append(_continuation_logprobs(logits[r, cols], cont))
    return scores


def _score_shared(model: Any, groups: list[tuple[list[int], list[list[int]]]], pad: int, device: torch.device,
                  routed: bool) -> list[list[float]]:
    """The prompts once (left-padded, explicit positions, KV cache kept), then the ``j``-th candidate of
    every prompt in one short forward on a copy of that cache, for each ``j``. MiLoRA routes at the
    prompt forward and reuses its gates for the candidates, as in generation."""
    B = len(groups)
    T = max(len(ctx) for ctx, _ in groups)
    ids = torch.full((B, T), pad, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for r, (ctx, _) in enumerate(groups):
        ids[r, T - len(ctx) :] = torch.tensor(ctx)
        mask[r, T - len(ctx) :] = 1
    lengths = mask.sum(1)
    kwargs: dict[str, Any] = {}
    if routed:
        kwargs["prompt_lengths"] = lengths.to(device)
    out = model(
        input_ids=ids.to(device), attention_mask=mask.to(device),
        position_ids=(mask.cumsum(1) - 1).clamp(min=0).to(device), use_cache=True, logits_to_keep=1, **kwargs,
    )
    first = out.logits[:, -1]  # (B, V): predicts every row's first continuation token
    cache = out.past_key_values
    n_slots = max(len(conts) for _, conts in groups)
    scores: list[list[float]] = [[] for _ in groups]
    for j in range(n_slots):
        conts = [c[j] if j < len(c) else c[0] for _, c in groups]  # rows without a j-th: a dummy
        n = max(map(len, conts))
        cont_ids = torch.full((B, n), pad, dtype=torch.long)
        cont_mask = torch.zeros((B, n), dtype=torch.long)
        for r, c in enumerate(conts):
            cont_ids[r, : len(c)] = torch.tensor(c)
            cont_mask[r, : len(c)] = 1
        step = model(
            input_ids=cont_ids.to(device), attention_mask=torch.cat([mask, cont_mask], 1).to(device),
            position_ids=(lengths[:, None] + torch.arange(n)[None]).to(device),
            past_key_values=cache if j == n_slots - 1 else copy.deepcopy(cache), use_cache=True,
        )
        for r, c in enumerate(conts):
            if j < len(groups[r][1]):
                logits = torch.cat([first[r : r + 1], step.logits[r, : len(c) - 1]], 0)
                scores[r].append(_continuation_logprobs(logits, c))
    return scores


def _loglikelihoods(
    model: Any,
    tokenizer: Any,
    groups: list[tuple[list[int], list[list[int]]]],
    *,
    batch_size: int,
    share_prompt: bool | None = None,
    desc: str,
    progress: bool,
) -> list[list[float]]:
    """For each ``(context, [continuation, ...])``, the sums of the continuations' token log-probabilities.

    ``share_prompt`` (default: when the model's forward takes ``past_key_values``) runs each context
    once and its continuations on its KV cache; ``batch_size`` contexts per forward. Otherwise every
    ``context + continuation`` is its own sequence; ``batch_size`` sequences per forward. A batch whose
    padded length reaches the model's sliding window takes the second way (exact in both cases)."""
    device = _device(model)
    pad = _pad_id(tokenizer)
    routed = hasattr(model, "_moelora_ctx")
    forward = getattr(model, "forward", model)
    keep_logits = _accepts(forward, "logits_to_keep")
    if share_prompt is None:
        share_prompt = keep_logits and _accepts(forward, "past_key_values")
    window = _sliding_window(model)
    scores: list[list[float]] = [[] for _ in groups]
    with _progress(sum(len(c) for _, c in groups), desc, "choice", progress) as bar, _EvalMode(model):
        if share_prompt:
            order = sorted(range(len(groups)), key=lambda g: -len(groups[g][0]))
            batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
        else:  # batches of batch_size sequences, whole groups, longest first
            order = sorted(range(len(groups)), key=lambda g: -(len(groups[g][0]) + max(map(len, groups[g][1]))))
            batches, current, size = [], [], 0
            for g in order:
                if current and size + len(groups[g][1]) > batch_size:
                    batches.append(current)
                    current, size = [], 0
                current.append(g)
                size += len(groups[g][1])
            batches.append(current)
        for idx in batches:
            sub = [groups[g] for g in idx]
            longest = max(len(ctx) for ctx, _ in sub) + max(len(c) for _, cs in sub for c in cs)
            if share_prompt and (window is None or longest < window):
                got = _score_shared(model, sub, pad, device, routed)
            else:
                got = _score_unshared(model, sub, pad, device, routed, keep_logits)
            for g, sc in zip(idx, got, strict=True):
                scores[g] = sc
            bar.update(sum(len(c) for _, c in sub))
    return scores


def _candidates(item: dict, labels: list[str], protocol: str) -> tuple[str, dict[str, str]]:
    """(prompt, {label: continuation text}) of an item under ``protocol`` ("choice" or "options")."""
    instruction, inp = item["instruction"], item.get("input", "") or ""
    if protocol == "options":
        question, options = options_form(instruction)
        if options:
            return llm_adapters_prompt(question, inp) + CHOICE_PREFIX, options
        instruction = question
    return (llm_adapters_prompt(instruction, inp) + CHOICE_PREFIX,
            {lab: lab for lab in _item_candidates(item, labels)})


def score_choices(
    model: Any,
    tokenizer: Any,
    items: Sequence[dict],
    *,
    labels: list[str] | None = None,
    batch_size: int = 8,
    share_prompt: bool | None = None,
    progress: bool = False,
    desc: str = "choice",
    protocol: str = "choice",
) -> list[dict[str, float]]:
    """Per item, ``{label: log-likelihood of " " + candidate after the prompt}`` over the item's
    candidates: its labels (``protocol="choice"``) or its options' texts (``"options"``), see the
    module docstring. ``share_prompt``: see :func:`_loglikelihoods`."""
    items = _validate_items(list(items), desc)
    built = _build(items, candidate_labels(items) if labels is None else labels, protocol, desc)
    return _score(model, tokenizer, built, batch_size=batch_size, share_prompt=share_prompt, progress=progress,
                  desc=desc)


def _build(items: list[dict], labels: list[str], protocol: str, desc: str) -> list[tuple[str, dict[str, str]]]:
    """Each item's ``(prompt, {label: continuation text})`` under ``protocol``."""
    if protocol not in SCORED:
        raise ValueError(f"protocol must be one of {', '.join(SCORED)}, got {protocol!r}")
    if not labels:
        raise ValueError(
            f"{desc}: the answers are open (numbers): the {protocol!r} protocol needs a closed label set; "
            "use the 'generate' protocol"
        )
    return [_candidates(it, labels, protocol) for it in items]


def _score(model, tokenizer, built: list[tuple[str, dict[str, str]]], *, batch_size, share_prompt, progress, desc):
    """The log-likelihoods of :func:`_build`'s continuations, ``{label: score}`` per item."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts, conts = [], []
    for prompt, cs in built:
        prompts += [prompt] * len(cs)
        conts += [" " + text for text in cs.values()]
    requests = iter(_encode_requests(tokenizer, prompts, conts))
    groups = []
    for _, cs in built:
        pairs = [next(requests) for _ in cs]
        groups.append((pairs[0][0], [cont for _, cont in pairs]))
    lls = _loglikelihoods(
        model, tokenizer, groups, batch_size=batch_size, share_prompt=share_prompt, desc=desc, progress=progress
    )
    return [dict(zip(cs, sc, strict=True)) for (_, cs), sc in zip(built, lls, strict=True)]


def _check_answers(items: list[dict], options: list[dict[str, str]], task: str) -> None:
    """An item whose option list (non-empty) lacks its answer is bad data: say so before any model runs."""
    for i, (it, opts) in enumerate(zip(items, options, strict=True)):
        if opts and str(it["answer"]).strip().lower() not in opts:
            raise ValueError(f"task {task!r}, item {i + 1}: answer {it['answer']!r} is not one of its options "
                             f"({', '.join(opts)})")


def _argmax(scores: dict[str, float], key=lambda lab, s: s) -> str:
    best, best_v = None, -math.inf
    for lab, s in scores.items():  # the first label wins ties
        v = key(lab, s)
        if best is None or v > best_v:
            best, best_v = lab, v
    return best


def evaluate_choice(
    model: Any,
    tokenizer: Any,
    items: Sequence[dict],
    *,
    task: str,
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = True,
    protocol: str = "choice",
) -> TaskResult:
    """Rank each item's candidates (labels for ``choice``, option texts for ``options``) by
    log-likelihood (``acc``) and per byte of the continuation (``acc_norm``)."""
    items = _prepare(items, task, limit)
    labels = candidate_labels(items)
    if not labels:
        raise ValueError(
            f"task {task!r} has open (numeric) answers: the {protocol!r} protocol needs a closed label set; "
            "use the 'generate' protocol"
        )
    built = _build(items, labels, protocol, task)
    if protocol == "options":
        _check_answers(items, [cs for _, cs in built], task)
    scores = _score(model, tokenizer, built, batch_size=batch_size, share_prompt=None, progress=progress,
                    desc=f"{task} ({protocol})")
    correct = correct_norm = 0
    for it, sc, (_, cs) in zip(items, scores, built, strict=True):
        gold = str(it["answer"]).strip().lower()
        correct += _argmax(sc).lower() == gold
        correct_norm += _argmax(sc, lambda lab, s, cs=cs: s / len((" " + cs[lab]).encode("utf-8"))).lower() == gold
    n = len(items)
    return TaskResult(
        task=task, protocol=protocol, correct=correct, total=n, accuracy=correct / n, unparsed=0,
        accuracy_norm=correct_norm / n, correct_norm=correct_norm,
    )


# ---------------------------------------------------------------------------------------------
# Protocol "generate": generate, then parse


_NEXT_SECTION_RE = re.compile(r"#{2,}\s*(?:Instruction|Input|Response)\s*:", re.IGNORECASE)


def _cut_response(text: str) -> str:
    """The response up to the next ``### Instruction:`` / ``### Input:`` / ``### Response:`` header (a
    model that goes on with a new turn; LLM-Adapters keeps the text up to the next "### Response:")."""
    body = text.lstrip()
    m = _NEXT_SECTION_RE.match(body)  # a response that opens with a header: skip that one
    start = m.end() if m else 0
    m = _NEXT_SECTION_RE.search(body, start)
    return body[start : m.start()] if m else body[start:]


def _stop_tokens(model: Any, tokenizer: Any) -> dict:
    """``eos_token_id`` for ``generate``: the model's generation config's end tokens plus the
    tokenizer's EOS, which ``moelora train`` appends to every response (the two can differ, e.g. a
    model converted from GGUF whose generation config names another end token)."""
    ids = end_token_ids(getattr(model, "generation_config", None))
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos not in ids:
        ids.append(eos)
    return {"eos_token_id": ids} if ids else {}


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    progress: bool = False,
    desc: str = "generate",
    engine: bool = True,
) -> list[str]:
    """Greedy (or beam) generation from each prompt; the decoded new tokens of each.

    Greedy decoding of a ``transformers`` model runs through :class:`moelora.engine.Engine`
    (continuous batching: ``batch_size`` requests at a time, a finished one replaced at once, the
    model's active adapter), with the outputs of ``model.generate`` (tested); beam search, quantized
    models, a model holding a PiSSA adapter and models that are not ``transformers`` ones use
    left-padded batches of ``model.generate`` (as all do with ``engine=False``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _device(model)
    pad = _pad_id(tokenizer)
    encoded = [list(x) for x in tokenizer(prompts)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    stop = _stop_tokens(model, tokenizer)
    texts = [""] * len(prompts)
    from transformers import PreTrainedModel

    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 0
    pissa = getattr(getattr(model, "_moelora_ctx", None), "residual_base", None) is not None  # no base rows
    quantized = getattr(model, "hf_quantizer", None) is not None  # (the engine is not tested on bitsandbytes)
    if engine and num_beams == 1 and isinstance(model, PreTrainedModel) and not pissa and not quantized and all(
            len(e) + max_new_tokens <= limit for e in encoded):
        with _progress(len(prompts), desc, "item", progress) as bar, _EvalMode(model):
            return _engine_generate(model, tokenizer, encoded, batch_size, max_new_tokens, stop, bar)
    with _progress(len(prompts), desc, "item", progress) as bar, _EvalMode(model):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            T = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), T), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            for r, i in enumerate(idx):
                seq = encoded[i]
                ids[r, T - len(seq) :] = torch.tensor(seq)
                mask[r, T - len(seq) :] = 1
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                num_beams=num_beams, do_sample=False, pad_token_id=pad, **stop,
            )
            seqs = out.sequences if hasattr(out, "sequences") else out
            new = seqs[:, T:]
            for r, i in enumerate(idx):
                texts[i] = tokenizer.decode(new[r].tolist(), skip_special_tokens=True)
            bar.update(len(idx))
    return texts


def _engine_generate(model: Any, tokenizer: Any, encoded: list[list[int]], batch_size: int, max_new_tokens: int,
                     stop: dict, bar: Any) -> list[str]:
    """Greedy generation of every prompt through the engine (``generate_responses``)."""
    from .engine import Engine, SamplingParams

    ctx = getattr(model, "_moelora_ctx", None)
    adapter = ctx.active if ctx is not None else None
    engine = Engine(model, tokenizer, max_batch=batch_size, max_queue=len(encoded) + 1)
    if adapter is not None:
        engine.add_attached(adapter)
    params = SamplingParams(max_tokens=max_new_tokens, stop_token_ids=list(stop.get("eos_token_id", [])))
    for i, ids in enumerate(encoded):
        engine.add_request(str(i), ids, adapter, params)
    texts = [""] * len(encoded)
    while engine.has_work():
        for out in engine.step():
            texts[int(out.request_id)] += out.text
            if out.finished:
                bar.update(1)
    return texts


def evaluate_generate(
    model: Any,
    tokenizer: Any,
    items: Sequence[dict],
    *,
    task: str,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    num_beams: int = 1,
    limit: int | None = None,
    progress: bool = True,
    protocol: str = "generate",
) -> TaskResult:
    """Generate from each item's prompt, parse the answer, compare with ``item["answer"]``.

    ``protocol``: ``"generate"`` (the item's prompt, labels parsed) or ``"generate-options"`` (the
    question without its option list, option texts parsed: :func:`parse_option`). ``max_new_tokens``
    defaults to 32 for label tasks and 256 for math (open answers)."""
    if protocol not in GENERATED:
        raise ValueError(f"protocol must be one of {', '.join(GENERATED)}, got {protocol!r}")
    items = _prepare(items, task, limit)
    labels = candidate_labels(items)
    if max_new_tokens is None:
        max_new_tokens = 32 if labels else 256
    forms = [options_form(it["instruction"]) if protocol == "generate-options" else (it["instruction"], {})
             for it in items]
    _check_answers(items, [options for _, options in forms], task)
    prompts = [llm_adapters_prompt(q, it.get("input", "") or "") for it, (q, _) in zip(items, forms, strict=True)]
    texts = generate_responses(
        model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, num_beams=num_beams,
        progress=progress, desc=f"{task} ({protocol})",
    )
    correct = unparsed = 0
    samples = []
    for it, text, (_, options) in zip(items, texts, forms, strict=True):
        if options:
            pred = parse_option(_cut_response(text), options)
            correct += pred is not None and pred == str(it["answer"]).strip().lower()
        else:
            item_labels = _item_labels(it, labels)
            pred = parse_answer(_cut_response(text), item_labels)
            correct += is_correct(pred, it["answer"], item_labels)
        if pred is None:
            unparsed += 1
        if len(samples) < SAMPLES_KEPT:
            samples.append({"output": text, "parsed": pred, "answer": str(it["answer"])})
    n = len(items)
    return TaskResult(task=task, protocol=protocol, correct=correct, total=n, accuracy=correct / n, unparsed=unparsed,
                      samples=samples)


# ---------------------------------------------------------------------------------------------
# Files and tables


def evaluate_files(model: Any, tokenizer: Any, paths: Sequence[str | Path], protocol: str, **kw: Any) -> dict:
    """Evaluate every file with ``protocol``; ``kw`` goes to :func:`evaluate_choice` or
    :func:`evaluate_generate`. Every file is read and checked before the first evaluation.

    Returns ``{"protocol", "tasks": {name: TaskResult as a dict}, "average": mean accuracy over tasks,
    "files": {name: path}}`` (plus ``"average_norm"`` for ``choice``). Task names come from the
    parent folder for split-named files (``arc_easy/test.json`` -> ``arc_easy``), else the file stem;
    names that clash get their parent folder prefixed."""
    _check_protocol(protocol)
    if not paths:
        raise ValueError("no data files given")
    loaded = [(Path(p), load_items(p)) for p in paths]
    names = [task_name(p) for p, _ in loaded]
    for k, (p, _) in enumerate(loaded):
        if names.count(names[k]) > 1:
            names[k] = f"{p.parent.name}/{p.stem}" if p.parent.name else p.stem
    seen: dict[str, int] = {}
    for k, name in enumerate(names):
        if name in seen:
            seen[name] += 1
            names[k] = f"{name}#{seen[name]}"
        else:
            seen[name] = 1
    if protocol in SCORED:
        for p, items in loaded:
            if not candidate_labels(items):
                raise ValueError(
                    f"{p}: open (numeric) answers: the {protocol!r} protocol needs a closed label set; "
                    "use --protocol generate"
                )
    kw["protocol"] = protocol
    fn = evaluate_choice if protocol in SCORED else evaluate_generate
    if protocol in SCORED:  # generation options left at their defaults are ignored by "choice"/"options"
        if kw.get("num_beams") in (None, 1):
            kw.pop("num_beams", None)
        if kw.get("max_new_tokens") is None:
            kw.pop("max_new_tokens", None)
        extra = sorted({"num_beams", "max_new_tokens"} & set(kw))
        if extra:
            raise ValueError(f"{', '.join(extra)}: generation options, not used by the {protocol!r} protocol")
    tasks = {}
    for (_p, items), name in zip(loaded, names, strict=True):
        tasks[name] = asdict(fn(model, tokenizer, items, task=name, **kw))
    result: dict[str, Any] = {
        "protocol": protocol,
        "tasks": tasks,
        "average": sum(t["accuracy"] for t in tasks.values()) / len(tasks),
        "files": {name: str(p) for (p, _), name in zip(loaded, names, strict=True)},
    }
    if protocol in SCORED:
        result["average_norm"] = sum(t["accuracy_norm"] for t in tasks.values()) / len(tasks)
    return result


def format_table(results: dict) -> str:
    """A plain-text table: task, protocol, accuracy (%), correct/total, and acc_norm (%) for ``choice``
    or the unparsed count for ``generate``; an ``average`` row when there are several tasks."""
    tasks = results.get("tasks", {})
    choice = any(t.get("accuracy_norm") is not None for t in tasks.values())
    header = ["task", "protocol", "accuracy", "correct/total", "acc_norm" if choice else "unparsed"]
    rows = []
    for name, t in tasks.items():
        extra = f"{100 * t['accuracy_norm']:.2f}" if choice else str(t.get("unparsed", 0))
        rows.append([name, t["protocol"], f"{100 * t['accuracy']:.2f}", f"{t['correct']}/{t['total']}", extra])
    footer = []
    if len(tasks) > 1 and results.get("average") is not None:
        norm = results.get("average_norm")
        extra = f"{100 * norm:.2f}" if choice and norm is not None else ""
        footer = [["average", results.get("protocol", ""), f"{100 * results['average']:.2f}", "", extra]]
    widths = [max(len(r[c]) for r in [header, *rows, *footer]) for c in range(len(header))]
    rule = "  ".join("-" * w for w in widths)

    def fmt(r: list[str]) -> str:
        cells = (v.ljust(w) if c < 2 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths, strict=True)))
        return "  ".join(cells).rstrip()

    lines = [fmt(header), rule, *map(fmt, rows)]
    if footer:
        lines += [rule, fmt(footer[0])]
    return "\n".join(lines)
