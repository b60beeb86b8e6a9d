"""Structured output: incremental validators of output prefixes (the engine's guided decoding).

- ``JsonPrefix`` reads text character by character and says whether it can still be extended to
  one JSON object (RFC 8259, as ``json.loads`` with ``strict=True`` and no NaN/Infinity reads it),
  and whether that object is complete (JSON mode).
- ``RegexPrefix``: whether the text can still be extended to a full match of a regular expression
  (the ``regex`` package's partial matching), and whether it matches now (``guided_regex``;
  ``guided_choice`` as an alternation of the escaped choices; a JSON schema through
  ``schema_regex``, as Outlines does).
- ``GrammarPrefix`` (``moelora.grammar``): whether the text can still be extended to a sentence of a
  GBNF/EBNF context-free grammar, and whether it is one (``guided_grammar``).

The engine keeps one per request and, at each step, takes the best (greedy) or a sampled token whose
text keeps the prefix valid: the constrained distribution, computed lazily (only the tokens it must
reject are ever checked). End tokens are valid once the prefix is ``complete``; a ``final`` one
(a closed JSON object) ends the output at once.
"""

from __future__ import annotations

from .grammar import GrammarPrefix, compile_grammar

__all__ = ["JsonPrefix", "RegexPrefix", "GrammarPrefix", "SchemaError", "schema_regex", "guide_for", "check_guides"]

MAX_PATTERN = 65536  # characters of a guided_regex (or of all choices together; a schema's regex)
MAX_CHOICES = 256
REGEX_TIMEOUT = 0.05  # seconds per match: a pattern that backtracks this long rejects the candidate

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

    final = complete  # once the object is closed only whitespace could follow: the output ends

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


class RegexPrefix:
    """Text that must end up matching ``pattern`` entirely (``regex`` syntax, full match)."""

    final = False  # a match may still grow (``\d+``): end tokens are allowed, not forced

    __slots__ = ("pattern", "text")

    def __init__(self, pattern, text: str = "") -> None:
        import regex

        self.pattern = regex.compile(pattern) if isinstance(pattern, str) else pattern
        self.text = text

    def copy(self) -> RegexPrefix:
        return RegexPrefix(self.pattern, self.text)

    @property
    def complete(self) -> bool:
        return self._match(partial=False)

    def feed(self, text: str) -> bool:
        self.text += text
        return self._match(partial=True)

    def _match(self, partial: bool) -> bool:
        try:
            return self.pattern.fullmatch(self.text, partial=partial, timeout=REGEX_TIMEOUT) is not None
        except TimeoutError:
            return False


def check_guides(json_object: bool, guided_regex, guided_choice, guided_grammar=None) -> None:
    """ValueError naming the problem unless at most one guide is set and it is well formed."""
    import regex

    if sum((bool(json_object), guided_regex is not None, guided_choice is not None, guided_grammar is not None)) > 1:
        raise ValueError("use at most one of json_object, guided_regex, guided_choice and guided_grammar")
    if guided_grammar is not None:
        compile_grammar(guided_grammar)  # GrammarError (a ValueError) naming the line
    if guided_regex is not None:
        if not isinstance(guided_regex, str) or not 0 < len(guided_regex) <= MAX_PATTERN:
            raise ValueError(f"guided_regex must be a non-empty string of at most {MAX_PATTERN} characters")
        try:
            regex.compile(guided_regex)
        except regex.error as e:
            raise ValueError(f"guided_regex does not compile: {e}") from None
    if guided_choice is not None:
        if (not isinstance(guided_choice, list) or not 0 < len(guided_choice) <= MAX_CHOICES
                or not all(isinstance(c, str) and c for c in guided_choice)
                or sum(map(len, guided_choice)) > MAX_PATTERN):
            raise ValueError(f"guided_choice must be a list of 1-{MAX_CHOICES} non-empty strings "
                             f"({MAX_PATTERN} characters in all)")


def guide_for(json_object: bool, guided_regex, guided_choice, max_ws: int | None = 64, guided_grammar=None):
    """The validator of a request's guide (None: unguided); JSON mode allows no leading whitespace."""
    import regex

    if guided_grammar is not None:
        return GrammarPrefix(compile_grammar(guided_grammar))
    if json_object:
        return JsonPrefix(max_ws=max_ws, leading_ws=False)
    if guided_regex is not None:
        return RegexPrefix(guided_regex)
    if guided_choice is not None:
        return RegexPrefix("(?:" + "|".join(regex.escape(c) for c in guided_choice) + ")")
    return None


# ------------------------------------------------------------------------------ JSON schema -> regex
_WS_RE = r"[ \n\t]{0,8}"  # whitespace between JSON tokens (bounded: a small model may not stop otherwise)
_STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
_INTEGER = r"-?(?:0|[1-9][0-9]*)"
_NUMBER = _INTEGER + r"(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_IGNORED = {"title", "description", "examples", "default", "$schema", "$id", "$comment", "deprecated",
            "readOnly", "writeOnly", "additionalProperties", "required", "$defs", "definitions", "format"}
_MAX_DEPTH = 32  # nesting (and $ref expansion) depth


class SchemaError(ValueError):
    """A JSON schema (or a part of it) that ``schema_regex`` does not implement."""


def schema_regex(schema: dict) -> str:
    """A regular expression whose full matches are JSON texts valid under ``schema`` (a subset of JSON
    Schema: ``type`` object / array / string / integer / number / boolean / null, ``properties``,
    ``items``, ``enum``, ``const``, ``anyOf``, ``$ref`` to ``#/$defs/...``, ``minItems`` /
    ``maxItems``, ``minLength`` / ``maxLength``; what Pydantic models produce). An object's
    properties all come, in the schema's order (valid whatever ``required`` says); other keywords
    raise ``SchemaError`` naming them rather than being ignored."""
    import json

    import regex

    if not isinstance(schema, dict):
        raise SchemaError("the schema must be a JSON object")
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}

    def lit(value) -> str:
        return regex.escape(json.dumps(value, ensure_ascii=False))

    def count(lo, hi, what: str) -> str:
        for v in (lo, hi):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise SchemaError(f"{what} must be integers >= 0")
        if hi is not None and lo is not None and hi < lo:
            raise SchemaError(f"{what}: the maximum is below the minimum")
        return f"{{{lo or 0},{'' if hi is None else hi}}}"

    def rx(s, depth: int, where: str) -> str:
        if depth > _MAX_DEPTH:
            raise SchemaError(f"{where}: nested more than {_MAX_DEPTH} levels (or a recursive $ref)")
        if s is True or s == {}:
            raise SchemaError(f"{where}: an unconstrained value is not supported; give it a type")
        if not isinstance(s, dict):
            raise SchemaError(f"{where}: a schema must be an object")
        if "$ref" in s:
            ref = s["$ref"]
            name = ref.rsplit("/", 1)[-1] if isinstance(ref, str) else None
            if not isinstance(ref, str) or not ref.startswith(("#/$defs/", "#/definitions/")) or name not in defs:
                raise SchemaError(f"{where}: $ref {ref!r} is not one of this schema's $defs")
            return rx(defs[name], depth + 1, ref)
        if "enum" in s:
            if not isinstance(s["enum"], list) or not s["enum"]:
                raise SchemaError(f"{where}: enum must be a non-empty list")
            return "(?:" + "|".join(lit(v) for v in s["enum"]) + ")"
        if "const" in s:
            return lit(s["const"])
        if "anyOf" in s:
            if not isinstance(s["anyOf"], list) or not s["anyOf"]:
                raise SchemaError(f"{where}: anyOf must be a non-empty list")
            return "(?:" + "|".join(rx(sub, depth + 1, f"{where}.anyOf[{i}]") for i, sub in enumerate(s["anyOf"])) + ")"
        t = s.get("type")
        if isinstance(t, list):
            return "(?:" + "|".join(rx({**s, "type": one}, depth + 1, where) for one in t) + ")"
        known = {"object": {"properties"}, "array": {"items", "minItems", "maxItems"},
                 "string": {"minLength", "maxLength"}, "integer": set(), "number": set(), "boolean": set(),
                 "null": set()}
        if t is None:
            raise SchemaError(f"{where}: needs a type, enum, const, anyOf or $ref (got {sorted(s)}; oneOf, allOf, "
                              "not and conditionals are not supported)")
        if t not in known:
            raise SchemaError(f"{where}: type {t!r} is not supported (object, array, string, integer, number, "
                              "boolean, null)")
        extra = sorted(set(s) - _IGNORED - {"type"} - known[t])
        if extra:
            raise SchemaError(f"{where}: {extra} not supported for type {t!r}")
        if t == "object":
            props = s.get("properties", {})
            if not isinstance(props, dict):
                raise SchemaError(f"{where}: properties must be an object")
            items = [_WS_RE + lit(k) + _WS_RE + ":" + _WS_RE + rx(v, depth + 1, f"{where}.{k}")
                     for k, v in props.items()]
            return r"\{" + ",".join(items) + _WS_RE + r"\}"
        if t == "array":
            if "items" not in s:
                raise SchemaError(f"{where}: an array needs 'items'")
            lo, hi = s.get("minItems", 0), s.get("maxItems")
            count(lo, hi, f"{where}: minItems/maxItems")
            if hi == 0:
                return r"\[" + _WS_RE + r"\]"
            item = _WS_RE + rx(s["items"], depth + 1, f"{where}[]") + _WS_RE
            body = item + "(?:," + item + ")" + f"{{{max(lo - 1, 0)},{'' if hi is None else hi - 1}}}"
            return r"\[" + (body if lo >= 1 else "(?:" + body + "|" + _WS_RE + ")") + r"\]"
        if t == "string":
            return '"' + _STRING_CHAR + count(s.get("minLength"), s.get("maxLength"), f"{where}: minLength/maxLength") + '"'
        return {"integer": _INTEGER, "number": _NUMBER, "boolean": "(?:true|false)", "null": "null"}[t]

    return rx(schema, 0, "schema")
