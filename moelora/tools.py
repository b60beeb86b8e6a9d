"""Tool-call formats of ``moelora serve --tool-call-parser NAME`` (vLLM's parser names): how a model
writes its calls, how the server finds them in a reply, and what guided decoding forces for
``tool_choice: "required"`` or a named function.

- ``hermes`` (Qwen2.5/3, Hermes, ...): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks after optional text (the last one may be unclosed).
- ``llama3_json`` (Llama 3.1/3.3): the reply *is* the calls, JSON objects ``{"name": ...,
  "parameters": {...}}`` separated by ``;`` (after an optional ``<|python_tag|>``).
- ``mistral`` (Mistral 7B v0.3, Nemo, ...): ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``;
  ``[TOOL_CALLS]`` is a control token that decoding drops, so a reply that starts with the JSON list
  is read as calls too. Call ids are 9 letters and digits, as Mistral's template requires.
- ``pythonic`` (Llama 3.2/4): the reply is a Python list of calls with keyword arguments,
  ``[get_weather(city='Paris', days=3), get_time()]`` (literals only), read with ``ast``. Forced
  calls are not available in this format.

A reply whose calls do not parse is content, whole, with no call. Each format also tells the
streaming server where to hold text back: from where calls (may) begin.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
import string
import uuid

import regex

__all__ = ["ToolFormat", "TOOL_FORMATS", "tool_format", "ReasoningSplitter", "REASONING_PARSERS"]


def _call(name: str, args: dict, call_id: str | None = None) -> dict:
    return {"id": call_id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def _json_call(obj, *arg_keys: str, required: bool = False) -> tuple[str, dict] | None:
    """``(name, arguments)`` of a ``{"name": ..., <arg_key>: {...}}`` object (arguments may be a JSON
    string; ``required``: one of ``arg_keys`` must be there, so that a JSON answer with a "name" field
    is not read as a call), or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if required and not any(k in obj for k in arg_keys):
        return None
    args = next((obj[k] for k in arg_keys if k in obj), {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return (obj["name"], args) if isinstance(args, dict) else None


def _partial_tail(text: str, tag: str) -> int:
    """Characters at the end of ``text`` that begin ``tag`` (held back while streaming)."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:k])), 0)


class ToolFormat:
    """One model family's way of writing tool calls."""

    name = ""
    forced_ok = True  # whether ``forced`` is implemented

    def hold(self, text: str, streamed: bool) -> int:
        """Streaming: how much of ``text`` (not yet sent; ``streamed``: some of the reply was already
        sent as content) may go out now; the rest is held until more comes or the reply ends."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str, list[dict]]:
        """A whole reply -> (its content before the calls, OpenAI ``tool_calls``); ``(text, [])`` when
        it holds no call that parses."""
        raise NotImplementedError

    def forced(self, calls: list[tuple[str, str]], parallel: bool) -> str:
        """The pattern of replies made only of calls: ``calls`` are ``(name, arguments regex)``; one call,
        or several unless ``parallel`` is false."""
        raise NotImplementedError

    def call_id(self) -> str | None:
        return None


class Hermes(ToolFormat):
    name = "hermes"
    OPEN = "<tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)

    def hold(self, text: str, streamed: bool) -> int:
        cut = text.find(self.OPEN)
        return len(text) - _partial_tail(text, self.OPEN) if cut < 0 else cut

    def parse(self, text: str) -> tuple[str, list[dict]]:
        start = text.find(self.OPEN)
        if start < 0:
            return text, []
        calls = []
        for m in self._BLOCK.finditer(text, start):
            try:
                got = _json_call(json.loads((m.group(1) if m.group(1) is not None else m.group(2)).strip()),
                                 "arguments", "parameters")
            except ValueError:
                got = None
            if got is None:
                return text, []
            calls.append(_call(*got))
        return text[:start], calls

    def forced(self, calls: list[tuple[str, str]], parallel: bool) -> str:
        one = "(?:" + "|".join(regex.escape(self.OPEN) + r"\n?\{ ?\"name\": ?" + regex.escape(json.dumps(name))
                               + r", ?\"arguments\": ?" + args + r" ?\}\n?</tool_call>" for name, args in calls) + ")"
        return one + (r"(?:\n?" + one + ")*" if parallel else "")


def _hold_start(text: str, streamed: bool, starts: tuple[str, ...]) -> int:
    """Formats whose calls are the whole reply: hold everything while the reply (nothing streamed
    yet) is blank or begins like a call."""
    if streamed:
        return len(text)
    s = text.lstrip()
    return 0 if not s or any(s.startswith(p) or p.startswith(s) for p in starts) else len(text)


class Llama3Json(ToolFormat):
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def hold(self, text: str, streamed: bool) -> int:
        return _hold_start(text, streamed, ("{", self.TAG))

    def parse(self, text: str) -> tuple[str, list[dict]]:
        s = text.strip()
        s = s[len(self.TAG):].lstrip() if s.startswith(self.TAG) else s
        if not s.startswith("{"):
            return text, []
        decoder, calls, i = json.JSONDecoder(), [], 0
        while i < len(s):
            try:
                obj, i = decoder.raw_decode(s, i)
            except ValueError:
                return text, []
            got = _json_call(obj, "parameters", "arguments", required=True)
            if got is None:
                return text, []
            calls.append(_call(*got))
            while i < len(s) and s[i] in " \t\n;":
                i += 1
        return "", calls

    def forced(self, calls: list[tuple[str, str]], parallel: bool) -> str:
        one = "(?:" + "|".join(r"\{ ?\"name\": ?" + regex.escape(json.dumps(name)) + r", ?\"parameters\": ?" + args
                               + r" ?\}" for name, args in calls) + ")"
        return one + (r"(?:; ?" + one + ")*" if parallel else "")


class Mistral(ToolFormat):
    name = "mistral"
    TAG = "[TOOL_CALLS]"
    _ID = string.ascii_letters + string.digits

    def hold(self, text: str, streamed: bool) -> int:
        cut = text.find(self.TAG)
        if cut >= 0:
            return cut
        if _hold_start(text, streamed, ("[{",)) == 0:
            return 0
        return len(text) - _partial_tail(text, self.TAG)

    def parse(self, text: str) -> tuple[str, list[dict]]:
        at = text.find(self.TAG)
        content, body = (text[:at], text[at + len(self.TAG):]) if at >= 0 else ("", text)
        body = body.strip()
        if not body.startswith("["):
            return text, []
        try:
            items = json.loads(body)
        except ValueError:
            return text, []
        got = [_json_call(x, "arguments", "parameters", required=True) for x in items] if isinstance(items, list) \
            else [None]
        if not got or None in got:
            return text, []
        return content, [_call(name, args, self.call_id()) for name, args in got]

    def forced(self, calls: list[tuple[str, str]], parallel: bool) -> str:
        one = "(?:" + "|".join(r"\{ ?\"name\": ?" + regex.escape(json.dumps(name)) + r", ?\"arguments\": ?" + args
                               + r" ?\}" for name, args in calls) + ")"
        return r"\[" + one + (r"(?:, ?" + one + ")*" if parallel else "") + r"\]"

    def call_id(self) -> str:
        return "".join(secrets.choice(self._ID) for _ in range(9))


class Pythonic(ToolFormat):
    name = "pythonic"
    forced_ok = False

    def hold(self, text: str, streamed: bool) -> int:
        return _hold_start(text, streamed, ("[",))

    def parse(self, text: str) -> tuple[str, list[dict]]:
        s = text.strip()
        if not s.startswith("["):
            return text, []
        try:
            tree = ast.parse(s, mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                return text, []
            calls = []
            for c in tree.elts:
                if not isinstance(c, ast.Call) or not isinstance(c.func, ast.Name) or c.args:
                    return text, []
                if any(k.arg is None for k in c.keywords):  # **kwargs
                    return text, []
                calls.append(_call(c.func.id, {k.arg: ast.literal_eval(k.value) for k in c.keywords}))
        except (SyntaxError, ValueError, TypeError, RecursionError):
            return text, []
        return "", calls

    def forced(self, calls: list[tuple[str, str]], parallel: bool) -> str:  # pragma: no cover - forced_ok False
        raise NotImplementedError


TOOL_FORMATS = {f.name: f for f in (Hermes(), Llama3Json(), Mistral(), Pythonic())}


def tool_format(name: str) -> ToolFormat:
    if name not in TOOL_FORMATS:
        raise ValueError(f"unknown tool call parser {name!r} (available: {', '.join(TOOL_FORMATS)})")
    return TOOL_FORMATS[name]


# ------------------------------------------------------------------------------------------ reasoning
REASONING_PARSERS = ("deepseek_r1", "qwen3")


class ReasoningSplitter:
    """``serve --reasoning-parser`` (vLLM's names): a chat reply's thinking, ``<think>...</think>``, goes
    to ``reasoning_content`` and the rest to ``content`` (what a tool parser then reads).

    ``deepseek_r1``: the reply is reasoning from its start (the ``<think>`` tag optional: R1's template
    opens it in the prompt) to ``</think>``. ``qwen3``: reasoning only when the reply opens with
    ``<think>`` (thinking off: all content). A reply whose reasoning never closes is reasoning only.
    ``feed`` takes the reply's text as it streams and returns ``(reasoning, content)`` deltas, holding
    back what may be the start of a tag; ``finish`` returns the rest. Feeding the whole reply at once
    and finishing gives the same split (the non-streamed reply)."""

    START, END = "<think>", "</think>"

    def __init__(self, kind: str) -> None:
        if kind not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {kind!r} (available: {', '.join(REASONING_PARSERS)})")
        self.kind, self.buf, self.phase = kind, "", "start"

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        reasoning = ""
        if self.phase == "start":
            s = self.buf.lstrip()
            if not s or (self.START.startswith(s) and s != self.START):
                return "", ""  # blank, or maybe the start tag: wait
            if s.startswith(self.START):
                self.buf, self.phase = s[len(self.START):], "reasoning"
            else:
                self.phase = "reasoning" if self.kind == "deepseek_r1" else "content"
        if self.phase == "reasoning":
            at = self.buf.find(self.END)
            if at < 0:
                keep = _partial_tail(self.buf, self.END)
                reasoning, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                return reasoning, ""
            reasoning, self.buf, self.phase = self.buf[:at], self.buf[at + len(self.END):], "content"
        content, self.buf = self.buf, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        rest, self.buf = self.buf, ""
        if self.phase == "reasoning" or (self.phase == "start" and self.kind == "deepseek_r1"):
            return rest, ""
        return "", rest

    def split(self, text: str) -> tuple[str, str]:
        """A whole reply: ``(reasoning, content)``."""
        r1, c1 = self.feed(text)
        r2, c2 = self.finish()
        return r1 + r2, c1 + c2
