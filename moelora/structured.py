"""Structured output: an incremental validator of JSON prefixes (the engine's JSON mode).

``JsonPrefix`` reads text character by character and says whether it can still be extended to one
JSON object (RFC 8259, as ``json.loads`` with ``strict=True`` and no NaN/Infinity reads it), and
whether that object is complete. The engine's JSON mode keeps one per request and, at each step,
takes the best (greedy) or a sampled token whose text keeps the prefix valid: the constrained
distribution, computed lazily (only the tokens it must reject are ever checked).
"""

from __future__ import annotations

__all__ = ["JsonPrefix"]

_WS = " \t\n\r"
_HEX = set("0123456789abcdefABCDEF")
_ESCAPES = set('"\\/bfnrt')


class JsonPrefix:
    """The state of a JSON-object prefix: ``feed(text)`` -> still valid?; ``complete``: one object read.

    States: ``value`` (a value may start), ``key_or_end`` (after ``{``), ``key`` (after ``,`` in an
    object), ``colon``, ``after`` (a value ended: ``,``, a closing bracket or space), ``first_or_end``
    (after ``[``), ``string`` / ``escape`` / ``unicode`` (in a string: ``hex`` digits left), ``number``
    (``num``: the last part read), ``literal`` (``rest``: the characters still due), ``done``.
    """

    __slots__ = ("stack", "state", "is_key", "hex", "num", "rest", "ws", "max_ws", "started")

    def __init__(self, max_ws: int | None = None, leading_ws: bool = True) -> None:
        """``max_ws``: at most this many whitespace characters in a row (None: any); ``leading_ws``:
        whitespace may come before the object (the engine allows neither unbounded runs nor a
        leading one, where a small model can otherwise spend its whole budget)."""
        self.stack: list[str] = []  # "{" or "[" per open container
        self.state = "value"
        self.is_key = False
        self.hex = 0
        self.num = ""
        self.rest = ""
        self.ws = 0  # whitespace characters in a row so far
        self.max_ws = max_ws
        self.started = leading_ws  # whitespace allowed from here on

    def copy(self) -> JsonPrefix:
        c = JsonPrefix.__new__(JsonPrefix)
        for k in self.__slots__:
            setattr(c, k, getattr(self, k))
        c.stack = list(self.stack)
        return c

    @property
    def complete(self) -> bool:
        return self.state == "done"

    def feed(self, text: str) -> bool:
        """Advance over ``text``; False (and the state undefined) as soon as no JSON object can follow."""
        return all(self._char(ch) for ch in text)

    def _value_ended(self) -> None:
        self.state = "after" if self.stack else "done"

    def _char(self, ch: str) -> bool:  # noqa: C901 (one branch per state keeps the automaton readable)
        s = self.state
        if s == "string":
            if ch == '"':
                if self.is_key:
                    self.state = "colon"
                else:
                    self._value_ended()
            elif ch == "\\":
                self.state = "escape"
            elif ord(ch) < 0x20:
                return False
            return True
        if s == "escape":
            if ch == "u":
                self.state, self.hex = "unicode", 4
                return True
            self.state = "string"
            return ch in _ESCAPES
        if s == "unicode":
            self.hex -= 1
            if self.hex == 0:
                self.state = "string"
            return ch in _HEX
        if s == "number":
            nxt = self._number(ch)
            if nxt is not None:
                self.num = nxt
                return True
            if self.num not in ("int", "frac", "exp", "zero"):  # "-", "1.", "1e", "1e+": unfinished
                return False
            self._value_ended()
            return self._char(ch)
        if s == "literal":
            if not self.rest or ch != self.rest[0]:
                return False
            self.rest = self.rest[1:]
            if not self.rest:
                self._value_ended()
            return True
        if ch in _WS:
            self.ws += 1
            return self.started and (self.max_ws is None or self.ws <= self.max_ws)
        self.ws, self.started = 0, True
        if s == "done":
            return False
        if s in ("value", "first_or_end"):
            if s == "first_or_end" and ch == "]":
                return self._close("[")
            if not self.stack and ch != "{":  # JSON mode: the top level is an object
                return False
            return self._start_value(ch)
        if s in ("key_or_end", "key"):
            if ch == "}" and s == "key_or_end":
                return self._close("{")
            if ch != '"':
                return False
            self.state, self.is_key = "string", True
            return True
        if s == "colon":
            if ch != ":":
                return False
            self.state = "value"
            return True
        if s == "after":
            if ch == ",":
                self.state = "key" if self.stack[-1] == "{" else "value"
                return True
            if ch in "}]":
                return self._close("{" if ch == "}" else "[")
            return False
        raise AssertionError(f"unknown state {s!r}")

    def _start_value(self, ch: str) -> bool:
        if ch == "{":
            self.stack.append("{")
            self.state = "key_or_end"
        elif ch == "[":
            self.stack.append("[")
            self.state = "first_or_end"
        elif ch == '"':
            self.state, self.is_key = "string", False
        elif ch == "-" or ch.isdigit() and ch.isascii():
            self.state, self.num = "number", "minus" if ch == "-" else ("zero" if ch == "0" else "int")
        elif ch in "tfn":
            self.state, self.rest = "literal", {"t": "rue", "f": "alse", "n": "ull"}[ch]
        else:
            return False
        return True

    def _close(self, opener: str) -> bool:
        if not self.stack or self.stack[-1] != opener:
            return False
        self.stack.pop()
        self._value_ended()
        return True

    def _number(self, ch: str) -> str | None:
        """The number's next part after ``ch``, or None if ``ch`` does not continue it."""
        digit = ch.isdigit() and ch.isascii()
        n = self.num
        if n == "minus":
            return "zero" if ch == "0" else ("int" if digit else None)
        if n in ("zero", "int"):
            if digit and n == "int":
                return "int"
            if ch == ".":
                return "dot"
            if ch in "eE":
                return "e"
            return None
        if n in ("dot", "frac"):
            if digit:
                return "frac"
            return "e" if ch in "eE" and n == "frac" else None
        if n == "e":
            return "esign" if ch in "+-" else ("exp" if digit else None)
        if n in ("esign", "exp"):
            return "exp" if digit else None
        return None
