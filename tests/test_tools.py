"""Tool-call formats (``moelora.tools``): parsing replies, holding back streamed text, and the
patterns of forced calls, for each of vLLM's parser names we implement."""

from __future__ import annotations

import json

import pytest
import regex

from moelora.structured import schema_regex
from moelora.tools import TOOL_FORMATS, tool_format

ARGS = schema_regex({"type": "object", "properties": {"city": {"type": "string"}}})


def calls_of(fmt: str, text: str):
    content, calls = tool_format(fmt).parse(text)
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), [
    ("hermes", 'Sure.<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>', "Sure.", [("f", {"a": 1})]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1}', None, []),  # unclosed and broken JSON
    ("llama3_json", ' {"name": "f", "parameters": {"a": [1, 2]}};{"name": "g", "arguments": "{}"}', "",
     [("f", {"a": [1, 2]}), ("g", {})]),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {}}', "", [("f", {})]),
    ("llama3_json", 'The answer is {"name": "f"}', None, []),  # calls must be the whole reply
    ("llama3_json", '{"name": "f", "parameters": {}} and more', None, []),
    ("llama3_json", '{"name": 3, "parameters": {}}', None, []),
    ("llama3_json", '{"name": "Bob", "age": 3}', None, []),  # a JSON answer, not a call: no parameters
    ("mistral", '[{"name": "Bob"}]', None, []),
    ("mistral", 'ok[TOOL_CALLS][{"name": "f", "arguments": {"x": "y"}}]', "ok", [("f", {"x": "y"})]),
    ("mistral", '[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"n": 1}}]', "",
     [("f", {}), ("g", {"n": 1})]),  # [TOOL_CALLS] is a control token that decoding drops
    ("mistral", "[1, 2, 3] are numbers", None, []),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": [1]}]', None, []),
    ("pythonic", "[f(a=1, b='x', c=[True, None]), g()]", "", [("f", {"a": 1, "b": "x", "c": [True, None]}),
                                                              ("g", {})]),
    ("pythonic", "[f(1)]", None, []),  # positional arguments: not a call we can name
    ("pythonic", "[f(a=open('x'))]", None, []),  # not a literal
    ("pythonic", "[f(**k)]", None, []),
    ("pythonic", "[obj.f(a=1)]", None, []),
    ("pythonic", "[f(a={1, 2})]", None, []),  # a set has no JSON form
    ("pythonic", "I would call [f(a=1)]", None, []),
])
def test_each_format_parses_its_calls_and_leaves_the_rest_as_content(fmt, text, content, calls):
    got_content, got = calls_of(fmt, text)
    assert got == calls
    assert got_content == (text if content is None else content)


@pytest.mark.parametrize(("fmt", "text", "streamed", "out"), [
    ("hermes", "Hello <tool", False, "Hello "), ("hermes", "Hi <tool_call>{", False, "Hi "),
    ("hermes", "Hi there", True, "Hi there"),
    ("llama3_json", "  ", False, ""), ("llama3_json", ' {"na', False, ""), ("llama3_json", "<|python", False, ""),
    ("llama3_json", "Paris is", False, "Paris is"), ("llama3_json", "{braces} later", True, "{braces} later"),
    ("mistral", "ok [TOOL_C", False, "ok "), ("mistral", "[", False, ""), ("mistral", "[{", False, ""),
    ("mistral", "[1]", False, "[1]"), ("mistral", "x[TOOL_CALLS][", True, "x"),
    ("pythonic", "[get_w", False, ""), ("pythonic", "Sure", False, "Sure"), ("pythonic", "[x]", True, "[x]"),
])
def test_streaming_holds_back_what_may_be_a_call(fmt, text, streamed, out):
    assert text[: tool_format(fmt).hold(text, streamed)] == out


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "mistral"])
def test_forced_patterns_take_calls_in_the_format_with_valid_arguments(fmt):
    f = tool_format(fmt)
    calls = [("get_weather", ARGS), ("get_time", schema_regex({"type": "object", "properties": {}}))]
    one = {"hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
           "llama3_json": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
           "mistral": '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'}[fmt]
    two = {"hermes": one + '\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
           "llama3_json": one + '; {"name": "get_time", "parameters": {}}',
           "mistral": one[:-1] + ', {"name": "get_time", "arguments": {}}]'}[fmt]
    parallel, single = regex.compile(f.forced(calls, parallel=True)), regex.compile(f.forced(calls, parallel=False))
    assert parallel.fullmatch(one) and parallel.fullmatch(two) and single.fullmatch(one) and not single.fullmatch(two)
    assert not parallel.fullmatch(one.replace('"Paris"', "3"))  # arguments must fit the schema
    assert not parallel.fullmatch(one.replace("get_weather", "get_rain"))
    _, parsed = calls_of(fmt, two)  # what the pattern admits, the parser reads back
    assert parsed == [("get_weather", {"city": "Paris"}), ("get_time", {})]


def test_the_formats_are_vllm_s_parser_names_and_unknown_ones_are_named():
    assert set(TOOL_FORMATS) == {"hermes", "llama3_json", "mistral", "pythonic"}
    assert not tool_format("pythonic").forced_ok
    with pytest.raises(ValueError, match="unknown tool call parser 'granite' .available: hermes, llama3_json"):
        tool_format("granite")


@pytest.mark.parametrize("kind", ["deepseek_r1", "qwen3"])
def test_reasoning_split_is_the_same_streamed_in_any_pieces(kind):
    """Fed in random pieces, ``ReasoningSplitter`` gives the split of the whole reply: tags never leak
    into either part, a partial tag at a piece's end is held back."""
    import random

    from moelora.tools import ReasoningSplitter

    rng = random.Random(0)
    replies = ["<think>\nplan</think>\n\nanswer", "  <think>a < b </thin</think>x", "plan</think>answer",
               "just answer", "<think>never closed <", "", "<th", "<think></think>", "a</think>b</think>c"]
    for text in replies:
        whole = ReasoningSplitter(kind).split(text)
        for _ in range(20):
            s, got, at = ReasoningSplitter(kind), ["", ""], 0
            while at < len(text):
                n = rng.randint(1, 4)
                r, c = s.feed(text[at : at + n])
                got[0] += r
                got[1] += c
                at += n
            r, c = s.finish()
            assert (got[0] + r, got[1] + c) == whole, (kind, text)
        assert "<think>" not in whole[0] + whole[1] or kind == "qwen3"
    assert ReasoningSplitter(kind).split("<think>x</think>y") == ("x", "y")
