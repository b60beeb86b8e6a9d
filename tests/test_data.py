"""The training-data layer: formats, prompt/response split, label masking, truncation, mixing, errors.

Uses a tiny byte-level BPE tokenizer trained in memory (milliseconds, offline, exact decoding).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from moelora.data import (
    PROMPT_TEMPLATES,
    DataError,
    DataSource,
    Example,
    TrainData,
    collate,
    encode_example,
    options_form,
    read_examples,
)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    PROMPT_TEMPLATES["prompt_input"],
    PROMPT_TEMPLATES["prompt_no_input"],
    "the correct answer is true",
    "the correct answer is answer2",
    "Please answer the following question with true or false, question: is the sky blue?",
    "The quick brown fox jumps over the lazy dog. Hello world, hello tokens.",
]


def make_tokenizer(bos: bool = True, chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    kwargs = {"chat_template": chat_template} if chat_template else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", **kwargs)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def tok_nobos():
    return make_tokenizer(bos=False)


def write_json(path: Path, items) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(items, indent=2))
    return str(path)


def write_jsonl(path: Path, items) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return str(path)


def qa(i: int, input: str = "") -> dict:
    return {"instruction": f"Is {i} even? Answer format: true/false", "input": input,
            "output": f"the correct answer is {'true' if i % 2 == 0 else 'false'}",
            "answer": "true" if i % 2 == 0 else "false"}


def response_text(tok, enc) -> str:
    return tok.decode([t for t in enc["labels"] if t != -100])


def check_split(tok, ex: Example, enc: dict, bos: bool = True, added: str = "<s>") -> None:
    """Labels are -100 exactly on the prompt, and the unmasked ones decode to response + EOS;
    the prompt tokens decode to the prompt text after ``added`` (the special tokens put in front)."""
    pl = enc["prompt_length"]
    assert len(enc["input_ids"]) == len(enc["labels"])
    assert enc["labels"][:pl] == [-100] * pl
    assert enc["labels"][pl:] == enc["input_ids"][pl:]
    assert response_text(tok, enc) == ex.response + "</s>"
    assert tok.decode(enc["input_ids"][:pl]) == added + ex.prompt
    assert (enc["input_ids"][0] == tok.bos_token_id) == bos
    assert enc["truncated"] == 0


# ------------------------------------------------------------------------------------------ formats


def test_prompt_templates_are_llm_adapters_alpaca():
    assert PROMPT_TEMPLATES["prompt_no_input"] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    )
    assert PROMPT_TEMPLATES["prompt_input"] == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
        "### Input:\n{input}\n\n### Response:\n"
    )


def test_llm_adapters_prompt_response_and_labels(tmp_path, tok):
    path = write_json(tmp_path / "boolish" / "train.json", [qa(0), qa(1, input="some context"),
                                                             {"instruction": "Say hi", "output": "hi"}])
    src = DataSource(path)
    assert src.name == "boolish" and src.format == "llm-adapters" and src.weight == 1.0
    exs = read_examples(src)
    assert len(exs) == 3 and all(e.task == "boolish" for e in exs)
    assert exs[0].prompt == PROMPT_TEMPLATES["prompt_no_input"].format(instruction=qa(0)["instruction"])
    assert exs[1].prompt == PROMPT_TEMPLATES["prompt_input"].format(instruction=qa(1)["instruction"],
                                                                    input="some context")
    assert exs[0].prompt.endswith("### Response:\n") and "### Input:" not in exs[0].prompt
    assert [e.response for e in exs] == ["the correct answer is true", "the correct answer is false", "hi"]
    assert [e.answer for e in exs] == ["true", "false", None]
    for ex in exs:
        enc = encode_example(ex, tok, cutoff_len=512)
        assert set(enc) == {"input_ids", "labels", "prompt_length", "truncated"}
        check_split(tok, ex, enc)
        assert enc["input_ids"][-1] == tok.eos_token_id
        assert enc["input_ids"].count(tok.bos_token_id) == 1


def test_alpaca_and_jsonl_read_the_same(tmp_path, tok):
    items = [qa(i) for i in range(4)]
    a = read_examples(DataSource(write_json(tmp_path / "a.json", items), format="alpaca"))
    b = read_examples(DataSource(write_jsonl(tmp_path / "b.jsonl", items)))
    # a .json file holding JSONL is read as JSONL too
    c = read_examples(DataSource(write_jsonl(tmp_path / "c.json", items), name="mine"))
    assert [(e.prompt, e.response, e.answer) for e in a] == [(e.prompt, e.response, e.answer) for e in b]
    assert [(e.prompt, e.response) for e in c] == [(e.prompt, e.response) for e in a]
    assert (a[0].task, b[0].task, c[0].task) == ("a", "b", "mine")


ARC_ITEM = {
    "instruction": "Please choose the correct answer to the question: Which is a gas?\n\n"
                   "Answer1: ice Answer2: hot steam Answer3: a rock\n\nAnswer format: answer1/answer2/answer3",
    "input": "", "output": "the correct answer is answer2", "answer": "answer2",
}


def test_options_form_splits_question_and_options():
    q, opts = options_form(ARC_ITEM["instruction"])
    assert q == "Please choose the correct answer to the question: Which is a gas?"
    assert opts == {"answer1": "ice", "answer2": "hot steam", "answer3": "a rock"}
    # PIQA / WinoGrande markers, no format line; a marker glued to a word is not a marker
    q, opts = options_form("Goal: open a jar\n\nSolution1: twist the lid Solution2: hit it with noanswer1: x")
    assert q == "Goal: open a jar" and opts == {"solution1": "twist the lid", "solution2": "hit it with noanswer1: x"}
    # no option list (BoolQ): the question without its "Answer format:" line
    assert options_form("Please answer with true or false, question: is ice cold?\n\nAnswer format: true/false") == (
        "Please answer with true or false, question: is ice cold?", {})
    assert options_form("One marker only. Answer1: x") == ("One marker only. Answer1: x", {})


def test_llm_adapters_options_format(tmp_path, tok):
    path = write_json(tmp_path / "arc" / "train.json", [ARC_ITEM, qa(0)])
    exs = read_examples(DataSource(path, format="llm-adapters-options"))
    assert exs[0].prompt == PROMPT_TEMPLATES["prompt_no_input"].format(
        instruction="Please choose the correct answer to the question: Which is a gas?")
    assert "Answer1" not in exs[0].prompt and "Answer format" not in exs[0].prompt
    assert (exs[0].response, exs[0].answer) == ("the correct answer is hot steam", "answer2")
    assert exs[1].response == "the correct answer is true" and exs[1].answer == "true"
    assert "Answer format" not in exs[1].prompt
    check_split(tok, exs[0], encode_example(exs[0], tok, cutoff_len=512))
    # the label format of the same file is untouched
    assert read_examples(DataSource(path))[0].response == "the correct answer is answer2"
    # errors name the file, the item and the problem
    bad = write_json(tmp_path / "bad.json", [ARC_ITEM, {**ARC_ITEM, "answer": "answer7"}])
    with pytest.raises(DataError, match=r"bad.json, item 2: answer 'answer7' is not one of the item's options "
                                        r"\(answer1, answer2, answer3\)"):
        read_examples(DataSource(bad, format="llm-adapters-options"))
    no_answer = write_json(tmp_path / "na.json", [{k: v for k, v in ARC_ITEM.items() if k != "answer"}])
    with pytest.raises(DataError, match=r"na.json, item 1: format 'llm-adapters-options' needs the item's 'answer'"):
        read_examples(DataSource(no_answer, format="llm-adapters-options"))
    empty = write_json(tmp_path / "empty.json", [{**ARC_ITEM, "instruction": "Q?\n\nAnswer1: x Answer2:"}])
    with pytest.raises(DataError, match=r"item 1: the answer's option 'answer2' has no text"):
        read_examples(DataSource(empty, format="llm-adapters-options"))
    with pytest.raises(DataError, match=r"unknown data format 'llm-adapters-option'.*llm-adapters-options"):
        DataSource(path, format="llm-adapters-option")


def test_task_name_defaults(tmp_path):
    assert DataSource(str(tmp_path / "arc_easy" / "test.json")).name == "arc_easy"
    assert DataSource(str(tmp_path / "math" / "train_math_data.json")).name == "train_math_data"
    assert DataSource(tmp_path / "x" / "train.jsonl", name="t").name == "t"  # PathLike accepted


def test_messages_last_assistant_turn(tmp_path, tok):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hello world"}, {"role": "user", "content": "and the fox?"},
            {"role": "assistant", "content": "The quick brown fox"}]
    trailing = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "ignored"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv}, {"messages": trailing}])
    exs = read_examples(DataSource(path, format="messages"), tok)
    assert exs[0].prompt == tok.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
    assert exs[0].prompt == ("<s><|system|>Be brief.</s><|user|>hello</s><|assistant|>hello world</s>"
                             "<|user|>and the fox?</s><|assistant|>")
    assert exs[0].response == "The quick brown fox"
    assert exs[1].prompt == "<s><|user|>hi</s><|assistant|>" and exs[1].response == "hello"
    for ex in exs:
        enc = encode_example(ex, tok, cutoff_len=512)
        check_split(tok, ex, enc, added="")
        # the template already starts with BOS: it is not added a second time
        assert enc["input_ids"][:2].count(tok.bos_token_id) == 1


def test_messages_all_turns_labels_every_assistant_message_and_its_end(tmp_path, tok):
    """turns: all: one rendering of the conversation; the labels are each assistant message's tokens and
    the template's end-of-turn token after it, nothing else; the routing prompt ends before the first."""
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hello world"}, {"role": "user", "content": "and the fox?"},
            {"role": "assistant", "content": "The quick brown fox"}, {"role": "user", "content": "ignored"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv}])
    (ex,) = read_examples(DataSource(path, format="messages", turns="all"), tok)
    assert ex.prompt == tok.apply_chat_template(conv[:5], tokenize=False)  # up to the last assistant message
    enc = encode_example(ex, tok, cutoff_len=512)
    ids, labels = enc["input_ids"], enc["labels"]
    assert ids == tok(ex.prompt, add_special_tokens=False)["input_ids"]  # BOS once, from the template
    runs, cur = [], []  # the labeled stretches, decoded
    for t, lab in zip(ids, labels, strict=True):
        if lab != -100:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    runs.append(tok.decode(cur)) if cur else None
    assert runs == ["hello world</s>", "The quick brown fox</s>"]
    assert tok.decode(ids[:enc["prompt_length"]]) == "<s><|system|>Be brief.</s><|user|>hello</s><|assistant|>"
    # the last turn alone equals turns: last on the same item
    (last,) = read_examples(DataSource(path, format="messages"), tok)
    last_enc = encode_example(last, tok, cutoff_len=512)
    assert last_enc["input_ids"] == ids and [x for x in last_enc["labels"] if x != -100] == \
        tok("The quick brown fox", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # truncation drops from the left but keeps BOS and the last turn's labels
    n_last = len(tok("The quick brown fox", add_special_tokens=False)["input_ids"]) + 1
    cut = encode_example(ex, tok, cutoff_len=n_last + 3)
    assert len(cut["input_ids"]) == n_last + 3 and cut["input_ids"][0] == tok.bos_token_id
    assert [x for x in cut["labels"] if x != -100] == [x for x in labels if x != -100][-n_last:]
    assert cut["truncated"] == len(ids) - n_last - 3
    # the data summary counts label tokens, not everything after the prompt
    data = TrainData([DataSource(path, format="messages", turns="all")], tok, cutoff_len=512, seed=0)
    assert data.stats["chat"]["response_tokens"] == sum(x != -100 for x in labels)


def test_sharegpt_reads_as_messages_and_bad_chat_data_is_named(tmp_path, tok):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hello world"}]
    share = {"system": "Be brief.", "conversations": [{"from": "human", "value": "hello"},
                                                      {"from": "gpt", "value": "hello world"}]}
    a = write_jsonl(tmp_path / "m.jsonl", [{"messages": conv}])
    b = write_jsonl(tmp_path / "s.jsonl", [share])
    for turns in ("last", "all"):
        (x,) = read_examples(DataSource(a, format="messages", turns=turns), tok)
        (y,) = read_examples(DataSource(b, format="sharegpt", turns=turns), tok)
        assert (x.prompt, x.response, x.spans) == (y.prompt, y.response, y.spans)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "robot", "value": "f()"}]}])
    with pytest.raises(DataError, match=r"bad\.jsonl, line 1, turn 1: 'from' must be one of .*'function_call'"):
        read_examples(DataSource(bad, format="sharegpt"), tok)
    bad = write_jsonl(tmp_path / "bad2.jsonl", [{"conversations": [{"from": "function_call", "value": "f()"}]}])
    with pytest.raises(DataError, match=r"bad2\.jsonl, line 1, turn 1: not JSON"):
        read_examples(DataSource(bad, format="sharegpt"), tok)
    with pytest.raises(DataError, match="turns='all' applies to the chat formats"):
        DataSource(a, format="text", turns="all")
    with pytest.raises(DataError, match="turns must be 'last' or 'all'"):
        DataSource(a, format="messages", turns="every")
    # templates whose turns cannot be located are refused, naming the item
    upper = make_tokenizer(chat_template="{% for m in messages %}{{ m['content'] | upper }}</s>{% endfor %}")
    with pytest.raises(DataError, match=r"m\.jsonl, line 1: the chat template changes assistant message 3"):
        read_examples(DataSource(a, format="messages", turns="all"), upper)
    rewrites = make_tokenizer(chat_template="{% for m in messages %}{% if loop.last %}LAST {% endif %}"
                                            "{{ m['content'] }}</s>{% endfor %}")
    with pytest.raises(DataError, match="not incremental"):
        read_examples(DataSource(a, format="messages", turns="all"), rewrites)
    assert read_examples(DataSource(a, format="messages"), rewrites)  # turns: last still works there

    class Slow:  # a tokenizer without character offsets
        chat_template, is_fast = CHAT_TEMPLATE, False

    with pytest.raises(DataError, match=r"m\.jsonl: turns: all .* needs a fast tokenizer; Slow is not one"):
        read_examples(DataSource(a, format="messages", turns="all"), Slow())
    # a template that ends the text with the last message: EOS is appended and learned, as for single turns
    bare = make_tokenizer(chat_template="{% for m in messages %}|{{ m['content'] }}{% endfor %}")
    (x,) = read_examples(DataSource(a, format="messages", turns="all"), bare)
    enc = encode_example(x, bare, cutoff_len=64)
    assert enc["input_ids"][-1] == enc["labels"][-1] == bare.eos_token_id
    assert bare.decode([t for t in enc["labels"] if t != -100]) == "hello world</s>"


def test_text_format_txt_and_jsonl(tmp_path, tok, tok_nobos):
    txt = tmp_path / "corpus.txt"
    txt.write_text("hello world\n\n   \nThe quick brown fox\n")
    exs = read_examples(DataSource(str(txt), format="text"))
    assert [(e.prompt, e.response, e.task) for e in exs] == [("", "hello world", "corpus"),
                                                             ("", "The quick brown fox", "corpus")]
    j = read_examples(DataSource(write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}]), format="text"))
    assert (j[0].prompt, j[0].response) == ("", "hello world")
    enc = encode_example(exs[0], tok, 64)
    assert enc["prompt_length"] == 1 and enc["input_ids"][0] == tok.bos_token_id  # only BOS is masked
    check_split(tok, exs[0], enc)
    enc = encode_example(exs[0], tok_nobos, 64)
    assert enc["prompt_length"] == 0 and -100 not in enc["labels"]  # loss on every token
    check_split(tok_nobos, exs[0], enc, bos=False, added="")


def test_empty_responses_are_skipped(tmp_path, tok):
    items = [qa(0), {"instruction": "x", "output": "  "}, qa(1)]
    exs = read_examples(DataSource(write_json(tmp_path / "d.json", items)))
    assert len(exs) == 2
    data = TrainData([DataSource(str(tmp_path / "d.json"))], tok, 128, seed=0)
    assert data.stats["d"]["skipped_items"] == 1 and data.stats["d"]["examples"] == 2


def test_response_tokens_are_those_after_the_prompt(tok):
    """SentencePiece-style tokenizers: the response gets the tokens it has after the prompt (as at
    inference), not those of the response alone (which start with a word boundary)."""
    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    sp.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    sp.train_from_iterator(["Answer: yes no", "yes", "no", "\n"], trainer=trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<pad>", "<s>", "</s>"], show_progress=False))
    sp = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>")
    assert sp.convert_ids_to_tokens(sp("yes", add_special_tokens=False).input_ids) == ["\u2581yes"]
    enc = encode_example(Example("Answer:\n", "yes", "t"), sp, 64)
    assert sp.convert_ids_to_tokens(enc["input_ids"]) == ["\u2581Answer:", "\n", "yes", "</s>"]
    assert enc["prompt_length"] == 2 and sp.decode(enc["input_ids"]) == "Answer:\nyes</s>"
    # a prompt ending mid-word merges with the response: the response is then tokenized alone
    ex = Example(prompt="Say t", response="he correct answer", task="t")
    prompt_ids = tok(ex.prompt, add_special_tokens=False).input_ids
    assert tok(ex.prompt + ex.response, add_special_tokens=False).input_ids[: len(prompt_ids)] != prompt_ids
    enc = encode_example(ex, tok, 64)
    check_split(tok, ex, enc)


# --------------------------------------------------------------------------------------- truncation


def test_truncation_drops_prompt_from_the_left_keeping_bos_and_answer(tok):
    ex = Example(prompt="The quick brown fox jumps over the lazy dog. " * 6, response="the correct answer is true",
                 task="t")
    full = encode_example(ex, tok, 4096)
    assert full["truncated"] == 0
    n = len(full["input_ids"])
    resp_len = n - full["prompt_length"]
    cutoff = resp_len + 5
    enc = encode_example(ex, tok, cutoff)
    assert len(enc["input_ids"]) == cutoff and enc["truncated"] == n - cutoff
    assert enc["input_ids"][0] == tok.bos_token_id
    assert enc["prompt_length"] == 5
    assert enc["input_ids"][1:5] == full["input_ids"][full["prompt_length"] - 4 : full["prompt_length"]]
    assert response_text(tok, enc) == ex.response + "</s>"  # the whole answer survives
    assert tok.decode(enc["input_ids"][1:5]) in ex.prompt


def test_truncation_cuts_response_end_only_when_it_alone_is_too_long(tok, tok_nobos):
    ex = Example(prompt="Question: fox?\n", response="The quick brown fox jumps over the lazy dog", task="t")
    full = encode_example(ex, tok, 4096)
    resp = full["input_ids"][full["prompt_length"] :]  # response + EOS
    enc = encode_example(ex, tok, 6)
    assert enc["input_ids"] == [tok.bos_token_id] + resp[:5]  # BOS kept, prompt gone, no EOS
    assert enc["prompt_length"] == 1 and enc["labels"][0] == -100 and enc["labels"][1:] == resp[:5]
    assert enc["truncated"] == len(full["input_ids"]) - 6
    assert tok.eos_token_id not in enc["input_ids"]
    enc = encode_example(ex, tok_nobos, 6)
    assert enc["prompt_length"] == 0 and len(enc["input_ids"]) == 6
    with pytest.raises(DataError, match="cutoff_len must be an integer >= 2"):
        encode_example(ex, tok, 1)


def test_traindata_stats_and_log(tmp_path, tok, caplog):
    long = {"instruction": "The quick brown fox jumps over the lazy dog. " * 20, "output": "the correct answer is true"}
    path = write_json(tmp_path / "a" / "train.json", [qa(0), long, qa(2)])
    huge = write_jsonl(tmp_path / "b.jsonl", [{"text": "hello world " * 200}, {"text": "hello"}])
    exs_a = read_examples(DataSource(path))
    lens = [len(encode_example(e, tok, 10_000)["input_ids"]) for e in exs_a]
    cutoff = max(lens[0], lens[2]) + 2
    assert lens[1] > cutoff
    with caplog.at_level(logging.INFO, logger="moelora.data"):
        data = TrainData([DataSource(path), DataSource(huge, format="text")], tok, cutoff, seed=0)
    sa, sb = data.stats["a"], data.stats["b"]
    assert sa["examples"] == 3 and sa["truncated_examples"] == 1
    assert sa["dropped_tokens"] == sa["dropped_prompt_tokens"] == lens[1] - cutoff
    assert sa["dropped_response_tokens"] == 0
    assert sa["tokens"] == lens[0] + cutoff + lens[2]
    assert sb["examples"] == 2 and sb["truncated_examples"] == 1 and sb["dropped_prompt_tokens"] == 0
    assert sb["dropped_response_tokens"] == sb["dropped_tokens"] > 0
    assert len(data) == 5 and [len(r) for r in data.source_ranges] == [3, 2]
    item = data[1]
    assert item["task"] == "a" and len(item["input_ids"]) == cutoff and item["truncated"] == lens[1] - cutoff
    assert data[4]["task"] == "b"
    assert all(len(data[i]["input_ids"]) <= cutoff for i in range(len(data)))
    records = [r for r in caplog.records if r.name == "moelora.data"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING  # a response was cut
    msg = records[0].getMessage()
    assert "5 examples" in msg and "2 examples truncated" in msg
    assert f"{sa['dropped_prompt_tokens']} prompt tokens dropped from the left" in msg
    assert f"{sb['dropped_response_tokens']} response tokens cut from the end" in msg


# ------------------------------------------------------------------------------------------- mixing


@pytest.fixture
def two_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10)])
    return a, b


def test_mixing_ratio_and_sampling(two_sources, tok):
    a, b = two_sources
    data = TrainData([DataSource(a, "text", 1.0), DataSource(b, "text", 3.0)], tok, 32, seed=1)
    # N = 40; weight * len = 30 and 30: each source gives half of the epoch
    assert data.quotas == [20, 20] and data.epoch_size == 40
    ra, rb = data.source_ranges
    e0, e1 = data.epoch_order(0), data.epoch_order(1)
    for order in (e0, e1):
        assert len(order) == 40
        from_a = [i for i in order if i in ra]
        assert len(from_a) == 20 and len(set(from_a)) == 20  # without replacement
        counts_b = Counter(i for i in order if i in rb)
        assert set(counts_b) == set(rb) and set(counts_b.values()) == {2}  # up-weighted: 2 full passes
        assert Counter(data[i]["task"] for i in order) == {"a": 20, "b": 20}
    # a down-weighted source sees all its items over epochs before repeating any
    assert set(i for i in e0 + e1 if i in ra) == set(ra)
    assert e0 != e1


def test_mixing_is_deterministic_relative_and_seeded(two_sources, tok):
    a, b = two_sources
    mk = lambda wa, wb, seed: TrainData([DataSource(a, "text", wa), DataSource(b, "text", wb)], tok, 32, seed)  # noqa: E731
    torch.manual_seed(123)
    x = mk(1.0, 3.0, 7).epoch_order(3)
    torch.manual_seed(999)  # global RNG state does not matter
    y = mk(1.0, 3.0, 7)
    assert y.epoch_order(3) == x and y.epoch_order(3) == x
    assert mk(2.0, 6.0, 7).epoch_order(3) == x  # weights are relative
    assert mk(1.0, 3.0, 8).epoch_order(3) != x
    equal = mk(1.0, 1.0, 7)  # equal weights: each epoch is one pass over everything
    assert equal.quotas == [30, 10]
    assert sorted(equal.epoch_order(0)) == list(range(40)) and sorted(equal.epoch_order(5)) == list(range(40))
    assert equal.epoch_order(0) != equal.epoch_order(1)
    odd = mk(1.0, 0.5, 7)  # 30 / 5 of 35 mass -> 34.29 / 5.71 of 40 -> 34 / 6 by largest remainder
    assert odd.quotas == [34, 6] and len(odd.epoch_order(2)) == 40
    with pytest.raises(ValueError, match="epoch"):
        y.epoch_order(-1)


# ---------------------------------------------------------------------------------------- collation


def test_collate_right_pads(tok):
    feats = [encode_example(Example("Question: fox?\n", r, "t"), tok, 64) for r in ("hello", "The quick brown fox")]
    batch = collate(feats, tok.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "prompt_lengths"}
    n0, n1 = len(feats[0]["input_ids"]), len(feats[1]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, max(n0, n1))
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["prompt_lengths"].dtype == torch.long
    assert batch["input_ids"][0, :n0].tolist() == feats[0]["input_ids"]
    assert batch["input_ids"][0, n0:].eq(tok.pad_token_id).all()
    assert batch["labels"][0, n0:].eq(-100).all() and batch["labels"][1].tolist() == feats[1]["labels"]
    assert batch["attention_mask"].sum(1).tolist() == [n0, n1]
    assert batch["attention_mask"][0, :n0].eq(1).all() and batch["attention_mask"][0, n0:].eq(0).all()
    assert batch["prompt_lengths"].tolist() == [feats[0]["prompt_length"], feats[1]["prompt_length"]]
    assert collate(feats, 0, pad_to_multiple_of=8)["input_ids"].shape[1] % 8 == 0
    with pytest.raises(ValueError, match="pad_token_id"):
        collate(feats, None)


# ---------------------------------------------------------------------------------------- bad input


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: data file not found"):
        read_examples(DataSource(str(tmp_path / "nope.json")))
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]')
    with pytest.raises(DataError, match=r"bad\.json: invalid JSON at line 3, column 23: Expecting ',' delimiter"):
        read_examples(DataSource(str(bad)))
    badl = tmp_path / "bad.jsonl"
    badl.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": b}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: invalid JSON"):
        read_examples(DataSource(str(badl)))
    obj = tmp_path / "obj.json"
    obj.write_text('{\n "data": [1, 2]\n}\n')
    with pytest.raises(DataError, match=r"obj\.json: expected a JSON list of objects or JSONL.*single JSON object"):
        read_examples(DataSource(str(obj)))


def test_bad_items(tmp_path, tok):
    with pytest.raises(DataError, match=r"m\.json, item 2: missing required field 'output'"):
        read_examples(DataSource(write_json(tmp_path / "m.json", [qa(0), {"instruction": "x"}])))
    with pytest.raises(DataError, match=r"m2\.jsonl, line 1: missing required field 'instruction'"):
        read_examples(DataSource(write_jsonl(tmp_path / "m2.jsonl", [{"output": "x"}])))
    with pytest.raises(DataError, match=r"t\.json, item 1: field 'output' must be a string, got number"):
        read_examples(DataSource(write_json(tmp_path / "t.json", [{"instruction": "x", "output": 3}])))
    with pytest.raises(DataError, match=r"t2\.json, item 2: field 'input' must be a string, got list"):
        read_examples(DataSource(write_json(tmp_path / "t2.json", [qa(0), {**qa(1), "input": ["a"]}])))
    with pytest.raises(DataError, match=r"t3\.json, item 1: field 'answer' must be a string or a number, got object"):
        read_examples(DataSource(write_json(tmp_path / "t3.json", [{**qa(1), "answer": {}}])))
    with pytest.raises(DataError, match=r"l\.json, item 3: expected an object with 'instruction' and 'output', got string"):
        read_examples(DataSource(write_json(tmp_path / "l.json", [qa(0), qa(1), "oops"])))
    with pytest.raises(DataError, match=r"x\.jsonl, line 1: missing required field 'text'"):
        read_examples(DataSource(write_jsonl(tmp_path / "x.jsonl", [{"txt": "a"}]), format="text"))
    with pytest.raises(DataError, match=r"o\.jsonl, line 2: expected an object with 'text', got list"):
        read_examples(DataSource(write_jsonl(tmp_path / "o.jsonl", [{"text": "a"}, ["b"]]), format="text"))


def test_bad_source_fields(tmp_path):
    with pytest.raises(DataError, match=r"d\.json: unknown data format 'llm_adapters' \(did you mean 'llm-adapters'\?\)"):
        DataSource(str(tmp_path / "d.json"), format="llm_adapters")
    with pytest.raises(DataError, match=r"did you mean 'messages'"):
        DataSource(str(tmp_path / "d.json"), format="message")
    for w in (0, -1.0, float("nan"), "2", True):
        with pytest.raises(DataError, match=r"d\.json: weight must be a finite number > 0"):
            DataSource(str(tmp_path / "d.json"), weight=w)
    with pytest.raises(DataError, match=r"unknown key 'wieght' \(did you mean 'weight'\?\)"):
        DataSource.from_dict({"path": "d.json", "wieght": 2})
    with pytest.raises(DataError, match="no data sources"):
        TrainData([], None, 16, 0)


def test_no_usable_examples(tmp_path, tok):
    empty = write_json(tmp_path / "e.json", [{"instruction": "a", "output": ""}, {"instruction": "b", "output": " \n"}])
    with pytest.raises(DataError, match=r"e\.json: no usable examples \(2 item\(s\) with an empty response skipped\)"):
        read_examples(DataSource(empty))
    with pytest.raises(DataError, match=r"z\.json: no usable examples \(the file has no items\)"):
        TrainData([DataSource(write_json(tmp_path / "z.json", []))], tok, 64, seed=0)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    with pytest.raises(DataError, match=r"blank\.txt: no usable examples"):
        read_examples(DataSource(str(blank), format="text"))


def test_messages_errors(tmp_path, tok):
    ok = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    path = write_jsonl(tmp_path / "c.jsonl", ok)
    with pytest.raises(DataError, match=r"c\.jsonl: format 'messages' needs a tokenizer with a chat template"):
        read_examples(DataSource(path, format="messages"), make_tokenizer(chat_template=None))
    with pytest.raises(DataError, match=r"c\.jsonl: format 'messages' needs a tokenizer"):
        read_examples(DataSource(path, format="messages"))
    noassist = write_jsonl(tmp_path / "n.jsonl", ok + [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"n\.jsonl, line 2: no message with role 'assistant'"):
        read_examples(DataSource(noassist, format="messages"), tok)
    badc = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": ["x"]}]}])
    with pytest.raises(DataError, match=r"b\.jsonl, line 1, message 1: field 'content' must be a string, got list"):
        read_examples(DataSource(badc, format="messages"), tok)
    badm = write_jsonl(tmp_path / "m.jsonl", [{"messages": "hi"}])
    with pytest.raises(DataError, match=r"m\.jsonl, line 1: field 'messages' must be a list, got string"):
        read_examples(DataSource(badm, format="messages"), tok)
    norole = write_jsonl(tmp_path / "r.jsonl", [{"messages": [{"content": "hi"}]}])
    with pytest.raises(DataError, match=r"r\.jsonl, line 1, message 1: missing required field 'role'"):
        read_examples(DataSource(norole, format="messages"), tok)


# ----------------------------------------------------------------------------------- real files


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EMBEDDED = Path(os.path.expanduser("~/.cache/moelora/SmolLM2-135M-Instruct"))


@pytest.mark.skipif(not (SHARED_DATA / "commonsense" / "boolq" / "train.json").exists(),
                    reason=f"the LLM-Adapters data is not beside the checkout ({SHARED_DATA})")
def test_shared_boolq_train():
    exs = read_examples(DataSource(str(SHARED_DATA / "commonsense" / "boolq" / "train.json"), format="llm-adapters"))
    assert len(exs) == 9427
    assert {e.answer for e in exs} == {"true", "false"}
    assert all(e.task == "boolq" for e in exs)
    assert all(e.response.endswith(e.answer) for e in exs)
    assert exs[0].prompt.startswith("Below is an instruction that describes a task. Write")


@pytest.mark.skipif(not (EMBEDDED / "tokenizer.json").exists(), reason=f"no converted embedded model at {EMBEDDED}")
def test_embedded_smollm2_chat_template(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(EMBEDDED))
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "What is 2+2?"},
                                                            {"role": "assistant", "content": "4"}]}])
    ex = read_examples(DataSource(path, format="messages"), tok)[0]
    assert ex.prompt.endswith("<|im_start|>assistant\n") and ex.response == "4"
    enc = encode_example(ex, tok, 512)
    assert tok.decode([t for t in enc["labels"] if t != -100]) == "4" + tok.eos_token
    full = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
                                   tokenize=False)
    assert full.startswith(tok.decode(enc["input_ids"]))


FUZZ_ITEM_VALUES = [None, True, 0, 1.5, "", " ", "x", "answer2", "true", "Answer1: a Answer2: b", [], ["x"], {},
                    {"role": "user"}, [{"role": "assistant", "content": "hi"}], [{"role": "user", "content": 3}],
                    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "\u00e9\ud800"[:1],
                    "x" * 3000]
FUZZ_ITEM_KEYS = ["instruction", "input", "output", "answer", "text", "messages", "role", "extra"]


@pytest.mark.parametrize("fmt", ["llm-adapters", "llm-adapters-options", "messages", "text"])
def test_fuzzed_data_files_read_or_name_the_problem(tmp_path, tok, fmt):
    """300 files of random items (wrong types, missing fields, junk lines) per format: each one reads and
    encodes, or raises a DataError naming the file; never another exception."""
    import random

    rnd = random.Random(fmt)
    good = {"llm-adapters": {"instruction": "q", "output": "the correct answer is true", "answer": "true"},
            "llm-adapters-options": {"instruction": "q Answer1: a Answer2: b", "output": "x", "answer": "answer2"},
            "messages": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            "text": {"text": "hello world"}}[fmt]
    outcomes = Counter()
    for i in range(300):
        items = []
        for _ in range(rnd.randint(1, 3)):
            item = json.loads(json.dumps(good))
            for key in rnd.sample(FUZZ_ITEM_KEYS, rnd.randint(0, 2)):
                item[key] = rnd.choice(FUZZ_ITEM_VALUES)
            items.append(item if rnd.random() > 0.05 else rnd.choice(FUZZ_ITEM_VALUES))
        path = tmp_path / f"f{i}.{'jsonl' if i % 2 else 'json'}"
        if i % 2:
            lines = [json.dumps(x) for x in items] + (["{broken"] if rnd.random() < 0.1 else [])
            path.write_text("\n".join(lines) + "\n")
        else:
            path.write_text(json.dumps(items) if rnd.random() > 0.05 else "[{")
        try:
            examples = read_examples(DataSource(str(path), format=fmt), tok)
            for ex in examples:
                encode_example(ex, tok, cutoff_len=64)
            outcomes["ok"] += 1
        except DataError as e:
            assert str(path) in str(e), str(e)
            outcomes["error"] += 1
    assert outcomes["ok"] >= 20 and outcomes["error"] >= 20, outcomes


def test_hugging_face_datasets_and_max_samples(tmp_path, tok):
    """A dataset directory saved with ``save_to_disk`` (one split or several), a dataset repository's
    files (``load_dataset``), ``max_samples`` (first N items) for datasets and files; a hub name
    that is not cached, offline, is a DataError naming it."""
    datasets = pytest.importorskip("datasets")
    items = [qa(i) for i in range(12)]
    datasets.Dataset.from_list(items).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(items[:8]),
                          "test": datasets.Dataset.from_list(items[8:])}).save_to_disk(str(tmp_path / "two"))
    write_jsonl(tmp_path / "repo" / "train.jsonl", items[:5])
    file = write_json(tmp_path / "f.json", items)

    def prompts(**kw):
        return [ex.prompt for ex in read_examples(DataSource(**kw), tok)]

    expected = [ex.prompt for ex in read_examples(DataSource(file), tok)]
    assert prompts(path=str(tmp_path / "one")) == expected
    assert prompts(path=str(tmp_path / "two")) == expected[:8]
    assert prompts(path=str(tmp_path / "two"), split="test") == expected[8:]
    assert prompts(path=str(tmp_path / "repo")) == expected[:5]
    assert prompts(path=str(tmp_path / "two"), max_samples=3) == prompts(path=file, max_samples=3) == expected[:3]
    assert DataSource(str(tmp_path / "two")).name == "two"
    assert DataSource("hf:someone/commonsense").name == "commonsense"
    assert DataSource("hf:someone/alpaca.v2").name == "alpaca.v2"
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: train, test\)"):
        read_examples(DataSource(str(tmp_path / "two"), split="validation"), tok)
    with pytest.raises(DataError, match="a dataset saved with one split"):
        read_examples(DataSource(str(tmp_path / "one"), split="test"), tok)
    with pytest.raises(DataError, match="hf:no-such-owner/no-such-dataset: cannot load the dataset"):
        read_examples(DataSource("hf:no-such-owner/no-such-dataset"), tok)
    with pytest.raises(DataError, match="max_samples must be a positive integer"):
        DataSource(file, max_samples=0)


def test_columns_map_an_items_own_names_to_the_formats_fields(tmp_path, tok):
    """`columns` (LLaMA-Factory's column mapping): a dataset with `question`/`answer` columns reads
    as instruction/output; a mapped column an item lacks is named; bad mappings are refused."""
    datasets = pytest.importorskip("datasets")
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i + 1}", "id": i} for i in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "gsm"))
    mapped = read_examples(DataSource(str(tmp_path / "gsm"), columns={"instruction": "question", "output": "answer"}),
                           tok)
    plain = read_examples(DataSource(write_jsonl(tmp_path / "p.jsonl", [
        {"instruction": r["question"], "output": r["answer"]} for r in rows])), tok)
    assert [(e.prompt, e.response) for e in mapped] == [(e.prompt, e.response) for e in plain]
    chat = write_jsonl(tmp_path / "c.jsonl", [{"turns": [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "hello"}]}])
    assert read_examples(DataSource(str(chat), format="messages", columns={"messages": "turns"}), tok)[0].response == "hello"
    with pytest.raises(DataError, match=r"item 1: no column 'answer' \(mapped by columns"):
        read_examples(DataSource(write_json(tmp_path / "b.json", [{"question": "x"}]),
                                 columns={"instruction": "question", "output": "answer"}), tok)
    with pytest.raises(DataError, match="columns must map field names to column names"):
        DataSource(str(chat), columns={"messages": 3})


def test_trl_prompt_completion_items_train_on_the_completion(tmp_path, tok):
    """TRL's prompt-completion layout in supervised training: text items (raw strings) and message lists."""
    (ex,) = read_examples(DataSource(write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}]),
                                     format="text"), tok)
    assert (ex.prompt, ex.response) == ("Q: 2+2?\nA:", " 4")
    enc = encode_example(ex, tok, 64)
    assert enc["labels"][: enc["prompt_length"]] == [-100] * enc["prompt_length"] and enc["prompt_length"] > 1
    user = [{"role": "user", "content": "2+2?"}]
    (chat,) = read_examples(DataSource(write_jsonl(tmp_path / "m.jsonl", [
        {"prompt": user, "completion": [{"role": "assistant", "content": "4"}]}]), format="messages"), tok)
    assert chat.response == "4" and chat.prompt == tok.apply_chat_template(user, tokenize=False,
                                                                           add_generation_prompt=True)


def test_csv_parquet_and_arrow_files_read_as_their_rows(tmp_path, tok):
    """A .csv / .parquet / .arrow file is read through `datasets` (LLaMA-Factory reads those types too):
    its rows are the items, with the same examples as the JSON file (an empty CSV cell is an empty
    field); a missing file and a split other than train are named."""
    pytest.importorskip("datasets")
    import datasets

    items = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
             {"instruction": "Translate", "input": "chat", "output": "cat"}]
    want = read_examples(DataSource(write_json(tmp_path / "x.json", items)), tok)
    ds = datasets.Dataset.from_list(items)
    ds.to_csv(str(tmp_path / "x.csv"), index=False)
    ds.to_parquet(str(tmp_path / "x.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for path in (tmp_path / "x.csv", tmp_path / "x.parquet", arrow):
        got = read_examples(DataSource(str(path)), tok)
        assert [(e.prompt, e.response) for e in got] == [(e.prompt, e.response) for e in want], path
    with pytest.raises(DataError, match="nope.csv: data file not found"):
        read_examples(DataSource(str(tmp_path / "nope.csv")), tok)
    with pytest.raises(DataError, match="a single file has one split"):
        read_examples(DataSource(str(tmp_path / "x.csv"), split="test"), tok)


def test_split_long_documents_keep_every_token_in_pieces(tmp_path, tok):
    """``split_long`` (continued pretraining): a document longer than a row becomes consecutive pieces
    cut at token offsets; their texts concatenate to the document, each row fits ``cutoff_len`` with
    nothing truncated, and only the last piece ends with EOS. Short documents are unchanged."""
    words = " ".join(f"word{i % 37} and more text {i}" for i in range(120))
    path = write_json(tmp_path / "docs.json", [{"text": words}, {"text": "a short one"}])
    data = TrainData([DataSource(path, format="text", split_long=True)], tok, cutoff_len=48, seed=0)
    pieces = [ex.response for ex in data.examples]
    assert len(pieces) > 5 and "".join(pieces[:-1]) == words and pieces[-1] == "a short one"
    assert data.stats["docs"]["truncated_examples"] == 0
    eos = tok.eos_token_id
    ends = [f["input_ids"][-1] == eos for f in data.features]
    assert ends == [False] * (len(pieces) - 2) + [True, True]
    assert all(len(f["input_ids"]) <= 48 and f["labels"][1:] == f["input_ids"][1:] for f in data.features)
    whole = TrainData([DataSource(path, format="text")], tok, cutoff_len=48, seed=0)
    assert len(whole.features) == 2 and whole.stats["docs"]["truncated_examples"] == 1  # cut at its end
    with pytest.raises(DataError, match="split_long applies to format 'text'"):
        DataSource(path, format="alpaca", split_long=True)


# ------------------------------------------------------------------------------- function calling data
TOOLS_TEMPLATE = (  # Qwen2.5's tool parts, compacted; </s> ends each turn (the tokenizer's EOS)
    "{{ bos_token }}{%- if tools %}<|system|>Tools:{% for tool in tools %} {{ tool.function.name }}{% endfor %}</s>"
    "{% endif %}{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|assistant|>{% for c in m.tool_calls %}<tool_call>"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}</tool_call>{% endfor %}</s>'
    "{%- elif m.role == 'tool' %}<|user|><tool_response>{{ m.content }}</tool_response></s>"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}</s>{% endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif %}"
)
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


def labeled_runs(tok, enc) -> list[str]:
    runs, cur = [], []
    for t, lab in zip(enc["input_ids"], enc["labels"], strict=True):
        if lab != -100:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


def test_tool_calls_are_learned_as_the_template_writes_them(tmp_path):
    """OpenAI's fine-tuning layout (``tools``, assistant ``tool_calls`` with JSON-string arguments,
    ``tool`` messages): the template gets the tools and the calls as objects; a call that is the
    learned turn is labeled as the template renders it, with its end of turn; a final answer after
    the tool's reply is learned as text; ``turns: all`` learns both."""
    tok = make_tokenizer(chat_template=TOOLS_TEMPLATE)
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    conv = [{"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."}]
    path = write_jsonl(tmp_path / "tools.jsonl", [{"messages": conv[:2], "tools": [WEATHER_TOOL]},
                                                   {"messages": conv, "tools": [WEATHER_TOOL]},
                                                   {"messages": [conv[0], {"role": "assistant", "content": "hi"}]}])
    call_ex, answer_ex, plain_ex = read_examples(DataSource(path, format="messages"), tok)
    rendered = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert call_ex.prompt.startswith("<s><|system|>Tools: get_weather</s><|user|>weather in Paris?</s><|assistant|>")
    assert labeled_runs(tok, encode_example(call_ex, tok, cutoff_len=512)) == [rendered + "</s>"]
    assert answer_ex.spans is None and "<tool_response>sunny</tool_response>" in answer_ex.prompt
    assert answer_ex.response == "It is sunny." and rendered in answer_ex.prompt
    (both,) = read_examples(DataSource(write_jsonl(tmp_path / "all.jsonl", [{"messages": conv, "tools": [WEATHER_TOOL]}]),
                                       format="messages", turns="all"), tok)
    assert labeled_runs(tok, encode_example(both, tok, cutoff_len=512)) == [rendered + "</s>", "It is sunny.</s>"]
    data = TrainData([DataSource(path, format="messages")], tok, cutoff_len=512, seed=0)  # spans and not, together
    assert data.stats["tools"]["examples"] == 3
    assert [labeled_runs(tok, f) for f in data.features] == [
        [rendered + "</s>"], ["It is sunny.</s>"], ["hi</s>"]]


def test_sharegpt_function_call_and_observation_turns(tmp_path):
    """LLaMA-Factory's sharegpt function calling (glaive-style): ``function_call`` turns hold the call
    as JSON, ``observation`` turns the tool's answer, ``tools`` a JSON string; through our sharegpt
    format and through a dataset_info.json entry alike."""
    from moelora.llamafactory import convert

    tok = make_tokenizer(chat_template=TOOLS_TEMPLATE)
    item = {"conversations": [{"from": "human", "value": "weather in Paris?"},
                              {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                              {"from": "observation", "value": "sunny"},
                              {"from": "gpt", "value": "It is sunny."}],
            "tools": json.dumps([WEATHER_TOOL["function"]])}
    ours = read_examples(DataSource(write_jsonl(tmp_path / "sg.jsonl", [item]), format="sharegpt", turns="all"), tok)
    spec = {"where": "glaive", "formatting": "sharegpt", "ranking": False,
            "columns": {"messages": "conversations", "tools": "tools"},
            "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                     "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}}
    lf = read_examples(DataSource(write_jsonl(tmp_path / "lf.jsonl", [convert(spec, "item 1", item)]),
                                  format="messages", turns="all"), tok)
    rendered = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    for (ex,) in (ours, lf):
        assert ex.prompt.startswith("<s><|system|>Tools: get_weather</s>")
        assert labeled_runs(tok, encode_example(ex, tok, cutoff_len=512)) == [rendered + "</s>", "It is sunny.</s>"]


@pytest.mark.parametrize(("item", "msg"), [
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"function": {}}]}]},
     r"message 2, tool_calls\[0\]: a call must have a 'name' and object 'arguments'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": "{nope"}]},
     "message 2, tool_calls: not JSON"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "tools": "[oops"},
     "field 'tools' is not JSON"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "tools": [{"a": 1}]},
     r"tools\[0\] must be a function"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "tools": {"a": 1}},
     "field 'tools' must be a list of functions"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]},
     "message 2: field 'content' must be a string, got null"),
])
def test_bad_function_calling_data_is_named(tmp_path, item, msg):
    tok = make_tokenizer(chat_template=TOOLS_TEMPLATE)
    with pytest.raises(DataError, match=msg):
        read_examples(DataSource(write_jsonl(tmp_path / "bad.jsonl", [item]), format="messages"), tok)


def test_a_template_that_ignores_tool_calls_is_named(tmp_path, tok):
    conv = [{"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]
    with pytest.raises(DataError, match="writes nothing for the tool calls of message 2"):
        read_examples(DataSource(write_jsonl(tmp_path / "t.jsonl", [{"messages": conv}]), format="messages"), tok)
