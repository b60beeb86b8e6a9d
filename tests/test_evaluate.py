"""The evaluation layer of ``moelora eval`` (moelora/evaluate.py) on tiny random models.

A small BPE tokenizer is trained in memory on the test prompts (vocabulary <= the tiny models' 128),
so labels such as " answer3" span several tokens and decoding round-trips text exactly.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import randomize_adapters, tiny_model
from torch import nn

import moelora
from moelora.data import options_form
from moelora.evaluate import (
    CHOICE_PREFIX,
    TaskResult,
    _stop_tokens,
    candidate_labels,
    evaluate_choice,
    evaluate_files,
    evaluate_generate,
    format_table,
    generate_responses,
    is_correct,
    llm_adapters_prompt,
    load_items,
    parse_answer,
    parse_option,
    score_choices,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def arc_item(question: str, choices: list[str], answer: int) -> dict:
    opts = " ".join(f"Answer{i + 1}: {c}" for i, c in enumerate(choices))
    fmt = "/".join(f"answer{i + 1}" for i in range(len(choices)))
    return {
        "instruction": f"Please choose the correct answer to the question: {question}\n\n{opts}\n\nAnswer format: {fmt}",
        "input": "",
        "output": f"the correct answer is answer{answer}",
        "answer": f"answer{answer}",
    }


def bool_item(question: str, answer: bool) -> dict:
    return {
        "instruction": f"Please answer the following question with true or false, question: {question}?\n\n"
        "Answer format: true/false",
        "input": "",
        "output": f"the correct answer is {str(answer).lower()}",
        "answer": str(answer).lower(),
    }


def math_item(question: str, answer: str) -> dict:
    return {"instruction": question, "input": "", "output": f"\nA: The answer is {answer}.", "answer": answer}


ARC = [
    arc_item("Which is a gas?", ["ice", "steam", "rock", "wood"], 2),
    arc_item("What melts ice?", ["heat", "cold", "dark"], 1),
    arc_item("Which is a planet?", ["moon", "sun", "comet", "earth", "star"], 4),
    arc_item("Which one is wet?", ["sand", "rock", "water", "wood"], 3),
]
BOOLQ = [bool_item("is ice cold", True), bool_item("is fire cold", False), bool_item("is water wet", True)]


@pytest.fixture(scope="module")
def tok():
    """A character-level BPE tokenizer (Metaspace, BOS added) trained on this file's prompts."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = [llm_adapters_prompt(it["instruction"]) + it["output"] for it in ARC + BOOLQ]
    corpus += ["The answer is 42. It costs $1,234.50 in total.", "no idea, I think answer3 (B)"]
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Metaspace()
    alphabet = list(string.ascii_letters + string.digits + ".,:;?!$()/'-#\n")
    trainer = trainers.BpeTrainer(
        vocab_size=128, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], initial_alphabet=alphabet,
        show_progress=False,
    )
    t.train_from_iterator(corpus, trainer)
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    assert len(hf) <= 128 and (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    return hf


# ---------------------------------------------------------------------------------------------
# Prompts, labels, parsing


def test_prompt_templates():
    assert llm_adapters_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert llm_adapters_prompt("Translate.", "bonjour") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n"
        "### Input:\nbonjour\n\n### Response:\n"
    )


def test_parse_answer_labels():
    arc = [f"answer{i}" for i in range(1, 6)]
    assert parse_answer("the correct answer is answer3", arc) == "answer3"
    assert parse_answer("The correct answer is Answer2. Not answer4.", arc) == "answer2"  # first, any case
    assert parse_answer("answer12 is not a label, answer1 is", arc) == "answer1"  # whole words only
    assert parse_answer("I do not know", arc) is None
    assert parse_answer("True", ["true", "false"]) == "true"
    assert parse_answer("it is FALSE, not true", ["true", "false"]) == "false"
    assert parse_answer("untrue", ["true", "false"]) is None
    # a model that runs on past its answer without a space (no EOS) still answered, as LLM-Adapters reads it
    assert parse_answer("the correct answer is answer3the correct answer is answer1", arc) == "answer3"
    assert parse_answer("truethe correct answer is false", ["true", "false"]) == "true"
    assert parse_answer("the correct answer is solution2", ["solution1", "solution2"]) == "solution2"
    assert parse_answer("option1", ["option1", "option2"]) == "option1"


def test_parse_answer_numbers_and_letters():
    assert parse_answer("He needs 24 * 24 = 576 tiles. The answer is 576.", []) == "576"
    assert parse_answer("The answer is 42.", []) == "42"
    assert parse_answer("So it costs $1,234.50 in total.", []) == "1234.50"
    assert parse_answer("The temperature fell to -3 degrees.", []) == "-3"
    assert parse_answer("no numbers here", []) is None
    assert is_correct("42", "42.0", []) and is_correct("1234.50", "1234.5", [])
    assert is_correct("0.3334", "0.3333", []) and not is_correct("0.336", "0.3333", [])
    assert not is_correct(None, "42.0", [])
    letters = list("ABCDE")
    assert parse_answer("\nRationale: A train goes 5 km. The answer is (D).", letters) == "D"
    assert parse_answer("Answer: C", letters) == "C"
    assert parse_answer("so (B) it is", letters) == "B"
    assert parse_answer("nothing to see", letters) is None
    assert is_correct("answer2", "answer2", ["answer1", "answer2"]) and is_correct("true", "True", ["true", "false"])


def test_candidate_labels():
    assert candidate_labels(ARC) == [f"answer{i}" for i in range(1, 6)]  # Answer5 seen in an instruction only
    assert candidate_labels(ARC[:2]) == ["answer1", "answer2", "answer3", "answer4"]
    assert candidate_labels(BOOLQ) == ["true", "false"]
    assert candidate_labels(BOOLQ[:1]) == ["true", "false"]
    piqa = [{"instruction": "Goal: x\n\nSolution1: a\n\nSolution2: b\n\nAnswer format: solution1/solution2",
             "answer": "solution1"}]
    assert candidate_labels(piqa) == ["solution1", "solution2"]
    wino = [{"instruction": "Fill in: _\n\nOption1: a Option2: b Answer format: option1/option2", "answer": "option2"}]
    assert candidate_labels(wino) == ["option1", "option2"]
    assert candidate_labels([math_item("What is 6 * 7?", "42.0"), math_item("1+1?", "2.0")]) == []
    aqua = [{"instruction": "Pick. Answer Choices: (A) 1 (B) 2 (C) 3 (D) 4 (E) 5", "answer": "B"}]
    assert candidate_labels(aqua) == list("ABCDE")
    assert candidate_labels([math_item("x?", "3.0"), {"instruction": "(A) 1 (B) 2", "answer": "B"}]) == []
    assert candidate_labels([{"instruction": "q", "answer": "yes"}, {"instruction": "q", "answer": "no"}]) == [
        "yes", "no"]


# ---------------------------------------------------------------------------------------------
# choice


def brute_force_ll(model, tok, item: dict, label: str, prompt: str | None = None) -> float:
    prompt = prompt or llm_adapters_prompt(item["instruction"]) + CHOICE_PREFIX
    ctx = tok(prompt)["input_ids"]
    whole = tok(prompt + " " + label)["input_ids"]
    assert whole[: len(ctx)] == ctx and len(whole) > len(ctx)
    with torch.no_grad():
        logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return float(sum(logp[p - 1, whole[p]] for p in range(len(ctx), len(whole))))


class Wrapped(nn.Module):
    """A model without ``logits_to_keep`` (full logits) that can favour one label per prompt."""

    def __init__(self, inner, tok, favour: dict[str, str] | None = None, boost: float = 100.0):
        super().__init__()
        self.inner, self.boost, self.calls = inner, boost, []
        self.favour = []  # (prompt ids, continuation ids)
        for prompt, label in (favour or {}).items():
            ctx = tok(prompt)["input_ids"]
            self.favour.append((ctx, tok(prompt + " " + label)["input_ids"][len(ctx) :]))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.calls.append(sorted(kwargs))
        logits = self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits.clone()
        for r in range(input_ids.shape[0]):
            seq = input_ids[r].tolist()
            for ctx, cont in self.favour:
                if seq[: len(ctx)] == ctx:
                    for j, t in enumerate(cont):
                        logits[r, len(ctx) - 1 + j, t] += self.boost
        return SimpleNamespace(logits=logits)


def test_choice_equals_brute_force_and_batching(tok):
    model = tiny_model("llama")
    ref = [{lab: brute_force_ll(model, tok, it, lab) for lab in cands}
           for it, cands in zip(ARC, [[f"answer{i}" for i in range(1, n + 1)] for n in (4, 3, 5, 4)], strict=True)]
    # shared prompt (KV cache) and one sequence per candidate; different padding and batch compositions
    for share, bs in [(None, 1), (None, 3), (True, 64), (False, 1), (False, 3), (False, 64)]:
        got = score_choices(model, tok, ARC, batch_size=bs, share_prompt=share)
        for g, r in zip(got, ref, strict=True):
            assert g.keys() == r.keys()
            for lab in r:
                assert abs(g[lab] - r[lab]) < 1e-4, (share, bs, lab, g[lab], r[lab])
    # the full-logits path (a model without logits_to_keep) gives the same scores
    wrapped = score_choices(Wrapped(model, tok), tok, ARC, batch_size=3)
    for g, r in zip(wrapped, ref, strict=True):
        assert all(abs(g[lab] - r[lab]) < 1e-4 for lab in r)

    res = evaluate_choice(model, tok, ARC, task="arc", batch_size=3, progress=False)
    want = sum(max(r, key=r.get) == it["answer"] for r, it in zip(ref, ARC, strict=True))
    want_norm = sum(max(r, key=lambda lab: r[lab] / len(" " + lab)) == it["answer"] for r, it in zip(ref, ARC, strict=True))
    assert isinstance(res, TaskResult)
    assert (res.task, res.protocol, res.total, res.unparsed) == ("arc", "choice", 4, 0)
    assert res.correct == want and res.accuracy == want / 4
    assert res.correct_norm == want_norm and res.accuracy_norm == want_norm / 4
    assert evaluate_choice(model, tok, ARC, task="arc", limit=2, progress=False).total == 2


def test_choice_sliding_window_model(tok):
    """Gemma2's window (64 in the tiny config) is shorter than the prompts: still the exact scores."""
    model = tiny_model("gemma2")
    ref = [{lab: brute_force_ll(model, tok, it, lab) for lab in ("true", "false")} for it in BOOLQ]
    for share in (None, True):
        got = score_choices(model, tok, BOOLQ, batch_size=2, share_prompt=share)
        for g, r in zip(got, ref, strict=True):
            assert all(abs(g[lab] - r[lab]) < 1e-4 for lab in r)


def options_prompt(item: dict) -> str:
    """The ``options`` protocol's prompt, written out: the question alone, no option list."""
    question = item["instruction"].split("\n\n")[0]
    return llm_adapters_prompt(question) + CHOICE_PREFIX


def test_options_protocol_scores_the_option_texts(tok, tmp_path):
    from moelora.data import DataSource, read_examples

    model = tiny_model("llama")
    texts = [["ice", "steam", "rock", "wood"], ["heat", "cold", "dark"], ["moon", "sun", "comet", "earth", "star"],
             ["sand", "rock", "water", "wood"]]
    ref = []
    for it, opts in zip(ARC, texts, strict=True):
        prompt = options_prompt(it)
        assert "Answer1" not in prompt
        ref.append({f"answer{i + 1}": brute_force_ll(model, tok, {"instruction": ""}, t, prompt=prompt)
                    for i, t in enumerate(opts)})
    for share, bs in [(None, 2), (False, 3)]:
        got = score_choices(model, tok, ARC, batch_size=bs, share_prompt=share, protocol="options")
        for g, r in zip(got, ref, strict=True):
            assert g.keys() == r.keys() and all(abs(g[k] - r[k]) < 1e-4 for k in r), (share, bs)
    res = evaluate_choice(model, tok, ARC, task="arc", batch_size=4, progress=False, protocol="options")
    want = sum(max(r, key=r.get) == it["answer"] for r, it in zip(ref, ARC, strict=True))
    norm = [{k: v / len((" " + t).encode()) for (k, v), t in zip(r.items(), opts, strict=True)}
            for r, opts in zip(ref, texts, strict=True)]
    want_norm = sum(max(r, key=r.get) == it["answer"] for r, it in zip(norm, ARC, strict=True))
    assert (res.protocol, res.correct, res.correct_norm, res.total) == ("options", want, want_norm, 4)
    # a model that favours the gold option's text gets everything right, the label means nothing to it
    gold = {options_prompt(it): opts[int(it["answer"][-1]) - 1] for it, opts in zip(ARC, texts, strict=True)}
    oracle = Wrapped(model, tok, gold)
    assert evaluate_choice(oracle, tok, ARC, task="arc", progress=False, protocol="options").accuracy == 1.0
    wrong = {options_prompt(it): opts[int(it["answer"][-1]) % len(opts)] for it, opts in zip(ARC, texts, strict=True)}
    assert evaluate_choice(Wrapped(model, tok, wrong), tok, ARC, task="arc", progress=False,
                           protocol="options").correct == 0
    # BoolQ (no option list): its labels, after the question without the "Answer format:" line
    bool_oracle = Wrapped(model, tok, {options_prompt(it): it["answer"] for it in BOOLQ})
    assert evaluate_choice(bool_oracle, tok, BOOLQ, task="b", progress=False, protocol="options").accuracy == 1.0
    # the prompt scored is the one the llm-adapters-options training format trains on
    path = tmp_path / "arc.json"
    path.write_text(json.dumps(ARC + BOOLQ))
    exs = read_examples(DataSource(str(path), format="llm-adapters-options"))
    assert [e.prompt + CHOICE_PREFIX for e in exs] == [options_prompt(it) for it in ARC + BOOLQ]
    assert [e.response for e in exs[:4]] == [f"{CHOICE_PREFIX} {opts[int(it['answer'][-1]) - 1]}"
                                             for it, opts in zip(ARC, texts, strict=True)]
    # through evaluate_files, with acc_norm in the table
    out = evaluate_files(model, tok, [str(path)], "options", batch_size=4, progress=False)
    assert out["protocol"] == "options" and out["tasks"]["arc"]["protocol"] == "options"
    assert "average_norm" in out and "acc_norm" in format_table(out)
    with pytest.raises(ValueError, match="num_beams.*not used by the 'options' protocol"):
        evaluate_files(model, tok, [str(path)], "options", num_beams=4)
    bad = {**ARC[0], "answer": "answer5"}
    with pytest.raises(ValueError, match=r"task 't', item 2: answer 'answer5' is not one of its options "
                                         r"\(answer1, answer2, answer3, answer4\)"):
        evaluate_choice(model, tok, [ARC[1], bad], task="t", progress=False, protocol="options")


@pytest.mark.parametrize("items", [ARC, BOOLQ], ids=["arc", "boolq"])
def test_choice_counts_with_a_model_that_knows(tok, items):
    model = tiny_model("llama")
    labels = candidate_labels(items)
    prompts = [llm_adapters_prompt(it["instruction"]) + CHOICE_PREFIX for it in items]
    oracle = Wrapped(model, tok, {p: it["answer"] for p, it in zip(prompts, items, strict=True)})
    res = evaluate_choice(oracle, tok, items, task="t", batch_size=2, progress=False)
    assert (res.correct, res.total, res.accuracy, res.correct_norm, res.accuracy_norm) == (
        len(items), len(items), 1.0, len(items), 1.0)
    assert all("prompt_lengths" not in kw for kw in oracle.calls)  # a model without moelora: not passed

    def wrong(it):
        return next(lab for lab in labels if lab != it["answer"])

    # favour the gold label on even items, a wrong one on odd items
    favour = {p: (it["answer"] if n % 2 == 0 else wrong(it)) for n, (p, it) in enumerate(zip(prompts, items, strict=True))}
    res = evaluate_choice(Wrapped(model, tok, favour), tok, items, task="t", batch_size=4, progress=False)
    assert res.correct == (len(items) + 1) // 2 and res.accuracy == res.correct / len(items)
    antioracle = Wrapped(model, tok, {p: wrong(it) for p, it in zip(prompts, items, strict=True)})
    assert evaluate_choice(antioracle, tok, items, task="t", progress=False).correct == 0


@pytest.mark.parametrize("share", [True, False], ids=["shared-prompt", "per-candidate"])
def test_choice_milora_routes_on_the_prompt_only(tok, share):
    model = tiny_model("llama")
    moelora.attach(model, moelora.MiLoraConfig(r=4, top_k=2))
    randomize_adapters(model, scale=0.5)
    ctx = moelora.get_context(model)
    n_layers = model.config.num_hidden_layers
    seen = []

    def record(module, args, kwargs, out):
        seen.append(dict(ids=kwargs["input_ids"].clone(), mask=kwargs["attention_mask"].clone(),
                         plen=None if ctx.prompt_lengths is None else ctx.prompt_lengths.clone(),
                         calls=ctx.router_calls, gates={li: g.clone() for li, g in ctx.gates["default"].items()}))

    handle = model.register_forward_hook(record, with_kwargs=True)
    calls0 = ctx.router_calls
    scores = score_choices(model, tok, ARC[:2], batch_size=3, share_prompt=share)
    handle.remove()
    deltas = [b["calls"] - a for a, b in zip([calls0] + [f["calls"] for f in seen], seen, strict=False)]
    routed = [f for f, d in zip(seen, deltas, strict=True) if d]
    assert set(deltas) <= {0, n_layers}
    if share:  # one batch of 2 prompts: one routed prompt forward, then one forward per candidate slot
        assert len(seen) == 1 + 4 and deltas == [n_layers, 0, 0, 0, 0]
    else:  # 4 + 3 candidates, whole items in batches of 3 sequences (an item with more alone): 2 forwards
        assert len(routed) == len(seen) == 2 and ctx.router_calls - calls0 == 2 * n_layers
    differs = False
    for f in routed:
        for r in range(f["ids"].shape[0]):
            real = f["ids"][r][f["mask"][r].bool()]
            prompt = real[: int(f["plen"][r])]
            with torch.no_grad():
                model(input_ids=prompt[None])  # routes on the prompt alone
            for li in range(n_layers):
                torch.testing.assert_close(f["gates"][li][r], ctx.gates["default"][li][0], atol=1e-6, rtol=1e-5)
            with torch.no_grad():
                model(input_ids=torch.cat([prompt, torch.tensor(tok(" answer1", add_special_tokens=False)["input_ids"])])[None])
            differs |= any((f["gates"][li][r] - ctx.gates["default"][li][0]).abs().max() > 1e-6 for li in range(n_layers))
    assert differs, "routing on prompt + continuation should differ from routing on the prompt"
    # routing per row: the batch composition and the path do not change the scores
    again = score_choices(model, tok, ARC[:2], batch_size=1, share_prompt=not share)
    for a, b in zip(scores, again, strict=True):
        assert all(abs(a[lab] - b[lab]) < 1e-4 for lab in a)
    res = evaluate_choice(model, tok, ARC, task="arc", batch_size=4, progress=False)
    assert res.total == 4 and 0 <= res.correct <= 4


# ---------------------------------------------------------------------------------------------
# generate


class StubGenerator:
    """``generate`` answers each prompt with a fixed text (looked up by a substring of its instruction)."""

    def __init__(self, tok, answers: dict[str, str]):
        self.tok, self.answers, self.calls, self.prompts = tok, answers, [], []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.calls.append(dict(kwargs, max_new_tokens=max_new_tokens, batch=input_ids.shape[0]))
        new = []
        for r in range(input_ids.shape[0]):
            n_pad = int((attention_mask[r] == 0).sum())
            assert attention_mask[r, n_pad:].all() and (input_ids[r, :n_pad] == self.tok.pad_token_id).all()
            prompt = self.tok.decode(input_ids[r, n_pad:].tolist(), skip_special_tokens=True)
            self.prompts.append(prompt)
            text = next(a for key, a in self.answers.items() if key in prompt)
            new.append(self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id])
        width = max(map(len, new))
        new = torch.tensor([s + [self.tok.pad_token_id] * (width - len(s)) for s in new])
        return torch.cat([input_ids, new], dim=1)


def test_generate_with_a_stub_model(tok):
    stub = StubGenerator(tok, {
        "Which is a gas": "the correct answer is answer2",  # gold answer2: correct
        "What melts ice": "Answer1 is right",  # gold answer1: correct (case-insensitive)
        "Which is a planet": "I think answer3",  # gold answer4: wrong
        "Which one is wet": "no idea",  # unparsed
    })
    res = evaluate_generate(stub, tok, ARC, task="arc", batch_size=3, progress=False)
    assert (res.correct, res.total, res.unparsed, res.accuracy) == (2, 4, 1, 0.5)
    assert [c["batch"] for c in stub.calls] == [3, 1]
    assert all(c["max_new_tokens"] == 32 and c["num_beams"] == 1 and c["do_sample"] is False for c in stub.calls)
    assert all(c["eos_token_id"] == [tok.eos_token_id] for c in stub.calls)  # the EOS training appends stops
    # what the model answered is kept, in item order
    assert [(x["output"], x["parsed"], x["answer"]) for x in res.samples] == [
        ("the correct answer is answer2", "answer2", "answer2"), ("Answer1 is right", "answer1", "answer1"),
        ("I think answer3", "answer3", "answer4"), ("no idea", None, "answer3")]

    items = [math_item("Q one?", "42.0"), math_item("Q two?", "1234.5"), math_item("Q three?", "8.0"),
             math_item("Q four?", "5.0"), math_item("Q five?", "9.0")]
    stub = StubGenerator(tok, {
        "Q one": "The answer is 42.",
        "Q two": "It costs $1,234.50 in total.",
        "Q three": "The answer is 7",  # wrong
        "Q four": "The answer is 5.\n\n### Instruction:\nWhat is 6?",  # cut at the next section
        "Q five": "no idea",  # unparsed
    })
    res = evaluate_generate(stub, tok, items, task="gsm8k", batch_size=8, num_beams=2, progress=False)
    assert (res.correct, res.total, res.unparsed) == (3, 5, 1)
    assert stub.calls[0]["max_new_tokens"] == 256 and stub.calls[0]["num_beams"] == 2
    evaluate_generate(stub, tok, items, task="gsm8k", max_new_tokens=7, limit=2, progress=False)
    assert stub.calls[-1]["max_new_tokens"] == 7 and stub.calls[-1]["batch"] == 2


def test_parse_option():
    opts = {"answer1": "red", "answer2": "red and blue", "answer3": "Steam.", "answer4": "", "answer5": "ice"}
    assert parse_option("the correct answer is steam", opts) == "answer3"  # case, end punctuation
    assert parse_option("  The  correct answer is   RED AND BLUE. ", opts) == "answer2"  # whole-response match
    assert parse_option("the correct answer is red", opts) == "answer1"
    # found inside a longer response: the earliest, the longest at the same place
    assert parse_option("the correct answer is red and blue, not ice", opts) == "answer2"
    assert parse_option("I would say ice, or red", opts) == "answer5"
    assert parse_option("reddish dice", opts) is None  # whole words only
    assert parse_option("the correct answer is", opts) is None  # the empty option is never found
    assert parse_option("", opts) is None


def test_generate_options_with_a_stub_model(tok):
    """``generate-options`` prompts with the question alone and maps the response to its option."""
    stub = StubGenerator(tok, {
        "Which is a gas": "the correct answer is steam",  # gold answer2: correct
        "What melts ice": "the correct answer is Heat.",  # gold answer1: correct
        "Which is a planet": "the correct answer is moon",  # gold answer4: wrong
        "Which one is wet": "the correct answer is answer3",  # a label, not a text: unparsed
        "is ice cold": "the correct answer is true",  # BoolQ: labels, as generate parses them
        "is fire cold": "the correct answer is true",  # wrong
        "is water wet": "yes",  # unparsed
    })
    res = evaluate_generate(stub, tok, ARC + BOOLQ, task="mix", batch_size=8, progress=False,
                            protocol="generate-options")
    assert (res.protocol, res.correct, res.total, res.unparsed) == ("generate-options", 3, 7, 2)
    assert [x["parsed"] for x in res.samples] == ["answer2", "answer1", "answer1", None, "true", "true", None]
    # the prompts are those the options protocol scores (and llm-adapters-options trains on): no option list
    assert len(stub.prompts) == 7 and all("Answer1" not in p and "Answer format" not in p for p in stub.prompts)
    question, _ = options_form(ARC[0]["instruction"])
    assert llm_adapters_prompt(question) in stub.prompts
    with pytest.raises(ValueError, match="protocol must be one of generate, generate-options"):
        evaluate_generate(stub, tok, ARC, task="arc", progress=False, protocol="options")
    bad = dict(ARC[0], answer="answer9")
    with pytest.raises(ValueError, match="item 2: answer 'answer9' is not one of its options"):
        evaluate_generate(stub, tok, [ARC[1], bad], task="t", progress=False, protocol="generate-options")


def test_generation_stops_at_the_tokenizers_eos_too(tok):
    """Training appends the tokenizer's EOS; a generation config naming another end token (as a model
    converted from GGUF may) must not make a fine-tuned model run on past its answer."""
    model = tiny_model("llama")
    other = (tok.eos_token_id + 1) % model.config.vocab_size
    model.generation_config.eos_token_id = other
    assert _stop_tokens(model, tok) == {"eos_token_id": [other, tok.eos_token_id]}
    model.generation_config.eos_token_id = [tok.eos_token_id, other]
    assert _stop_tokens(model, tok) == {"eos_token_id": [tok.eos_token_id, other]}
    model.generation_config.eos_token_id = None
    assert _stop_tokens(model, tok) == {"eos_token_id": [tok.eos_token_id]}


@pytest.mark.parametrize("method", [None, "lora", "mixlora", "milora"])
def test_greedy_generation_through_the_engine_equals_model_generate(tok, method):
    """``generate_responses`` decodes greedily through the engine (continuous batching, the active
    adapter): the texts of ``model.generate`` one prompt at a time, whatever the batch size; beam
    search keeps ``model.generate``."""
    import moelora.evaluate as ev

    model = tiny_model("llama")
    if method is not None:
        cfg = {"lora": moelora.LoraConfig(r=4), "mixlora": moelora.MixLoraConfig(num_experts=4, top_k=2, r=4),
               "milora": moelora.MiLoraConfig(r=4, top_k=2)}[method]
        moelora.attach(model, cfg, "a")
        moelora.attach(model, moelora.LoraConfig(r=2), "other")  # attached, not active
        moelora.set_adapter(model, "a")
        randomize_adapters(model)
    model.train()
    prompts = [llm_adapters_prompt(it["instruction"]) for it in ARC[:3]] + ["Question: 2+2?"]
    want = []
    for p in prompts:
        ids = torch.tensor([tok(p)["input_ids"]])
        with torch.no_grad():
            out = model.eval().generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                        eos_token_id=tok.eos_token_id)
        want.append(tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True))
    model.train()
    calls = []
    real = ev._engine_generate
    ev._engine_generate = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        for bs in (1, 3):
            assert generate_responses(model, tok, prompts, batch_size=bs, max_new_tokens=6) == want
        assert model.training and len(calls) == 2  # through the engine; the training flag restored
        generate_responses(model, tok, prompts[:1], max_new_tokens=2, num_beams=2)
    finally:
        ev._engine_generate = real
    assert len(calls) == 2  # beam search: model.generate


def test_generate_on_tiny_models_left_padding(tok):
    model = tiny_model("llama")
    prompts = [llm_adapters_prompt(it["instruction"]) for it in ARC[:3]]
    one = generate_responses(model, tok, prompts, batch_size=1, max_new_tokens=4)
    assert generate_responses(model, tok, prompts, batch_size=3, max_new_tokens=4) == one
    moelora.attach(model, moelora.MiLoraConfig(r=4, top_k=2))
    randomize_adapters(model)
    res = evaluate_generate(model, tok, BOOLQ, task="boolq", batch_size=2, max_new_tokens=3, progress=False)
    assert res.total == 3 and res.correct + res.unparsed <= 3


# ---------------------------------------------------------------------------------------------
# files, table, errors


def write(path: Path, items) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(items))
    return str(path)


def test_evaluate_files_and_table(tok, tmp_path):
    model = tiny_model("llama")
    paths = [write(tmp_path / "arc_easy" / "test.json", ARC), write(tmp_path / "boolq.json", BOOLQ)]
    out = evaluate_files(model, tok, paths, "choice", batch_size=4, progress=False)
    assert out["protocol"] == "choice" and list(out["tasks"]) == ["arc_easy", "boolq"]
    assert out["tasks"]["arc_easy"]["total"] == 4 and out["tasks"]["boolq"]["total"] == 3
    direct = evaluate_choice(model, tok, ARC, task="arc_easy", batch_size=4, progress=False)
    assert out["tasks"]["arc_easy"]["correct"] == direct.correct
    assert out["average"] == pytest.approx((direct.accuracy + out["tasks"]["boolq"]["accuracy"]) / 2)
    table = format_table(out)
    lines = table.splitlines()
    assert lines[0].split() == ["task", "protocol", "accuracy", "correct/total", "acc_norm"]
    assert any(ln.startswith("arc_easy") and f"{direct.correct}/4" in ln and "choice" in ln for ln in lines)
    assert lines[-1].startswith("average") and f"{100 * out['average']:.2f}" in lines[-1]
    json.dumps(out)  # serialisable as the CLI's --output

    stub = StubGenerator(tok, {"is ice cold": "true", "is fire cold": "True", "is water wet": "yes"})
    out = evaluate_files(stub, tok, [paths[1]], "generate", progress=False)
    assert out["tasks"]["boolq"] | {"samples": None} == {
        "task": "boolq", "protocol": "generate", "correct": 1, "total": 3, "accuracy": 1 / 3, "unparsed": 1,
        "accuracy_norm": None, "correct_norm": None, "samples": None}
    assert [x["output"] for x in out["tasks"]["boolq"]["samples"]] == ["true", "True", "yes"]
    assert "unparsed" in format_table(out).splitlines()[0]

    # two split files of one task are told apart
    paths2 = [write(tmp_path / "a" / "boolq" / "test.json", BOOLQ), write(tmp_path / "b" / "boolq" / "test.json", BOOLQ)]
    stub = StubGenerator(tok, {"": "true"})
    assert len(evaluate_files(stub, tok, paths2, "generate", progress=False)["tasks"]) == 2


def test_bad_input(tok, tmp_path):
    model = tiny_model("llama")
    good = write(tmp_path / "arc" / "test.json", ARC)
    with pytest.raises(ValueError, match="missing.json.*no such file"):
        evaluate_files(model, tok, [str(tmp_path / "missing.json")], "choice")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "q", "answer": "true"},\n oops]')
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON at line 2"):
        load_items(bad)
    no_answer = write(tmp_path / "noanswer.json", [ARC[0], {"instruction": "q", "output": "x"}])
    with pytest.raises(ValueError, match=r"noanswer\.json: item 1 has no 'answer'"):
        evaluate_files(model, tok, [good, no_answer], "choice")
    no_instr = write(tmp_path / "noinstr.json", [{"answer": "true"}])
    with pytest.raises(ValueError, match=r"noinstr\.json: item 0 has no 'instruction'"):
        load_items(no_instr)
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_items(write(tmp_path / "dict.json", {"instruction": "q"}))
    with pytest.raises(ValueError, match="unknown protocol 'choise'.*did you mean 'choice'"):
        evaluate_files(model, tok, [good], "choise")
    gsm = write(tmp_path / "gsm8k" / "test.json", [math_item("1+1?", "2.0")])
    with pytest.raises(ValueError, match="gsm8k.*open.*generate"):
        evaluate_files(model, tok, [good, gsm], "choice")
    # generation options at their defaults are ignored by "choice"; others are an error
    assert evaluate_files(model, tok, [good], "choice", num_beams=1, max_new_tokens=None, progress=False)["tasks"]
    with pytest.raises(ValueError, match="num_beams.*not used by the 'choice' protocol"):
        evaluate_files(model, tok, [good], "choice", num_beams=4)
    with pytest.raises(ValueError, match="item 0 has no 'answer'"):
        evaluate_choice(model, tok, [{"instruction": "q"}], task="t", progress=False)
    with pytest.raises(ValueError, match="limit"):
        evaluate_choice(model, tok, ARC, task="t", limit=0, progress=False)


# ---------------------------------------------------------------------------------------------
# the real llm-adapters files (no model): labels and the parser on the reference outputs


@pytest.mark.skipif(not (SHARED_DATA / "commonsense").is_dir(), reason=f"shared data folder absent: {SHARED_DATA}")
@pytest.mark.parametrize("task,labels", [
    ("arc_easy", [f"answer{i}" for i in range(1, 6)]),
    ("arc_challenge", [f"answer{i}" for i in range(1, 6)]),
    ("openbookqa", [f"answer{i}" for i in range(1, 5)]),
    ("boolq", ["true", "false"]),
])
def test_real_files_labels_and_parser(task, labels):
    path = SHARED_DATA / "commonsense" / task / "test.json"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    items = load_items(path)
    assert candidate_labels(items) == labels
    for n, it in enumerate(items):
        assert it["output"].startswith(CHOICE_PREFIX + " "), n
        assert parse_answer(it["output"], labels) == it["answer"], n
