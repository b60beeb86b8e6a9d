"""Context-free grammars for guided decoding (vLLM's ``guided_grammar``): GBNF / EBNF text, compiled
once, and an incremental Earley recognizer of output prefixes.

**Syntax** (llama.cpp's GBNF, which vLLM's xgrammar backend reads too):

    root   ::= greeting " " name ("!" | ".")?     # the start rule is ``root``
    greeting ::= "hello" | "hi"
    name   ::= [A-Z] [a-z]* | "world"

- a rule is ``name ::= alternatives``; it runs until the next ``name ::=`` (so it may span lines);
  names are letters, digits, ``_`` and ``-``; ``#`` starts a comment;
- alternatives are separated by ``|``; a sequence is items side by side (an empty one matches "");
- items: ``"literal"`` (or ``'literal'``), a character class ``[a-z0-9_]`` / ``[^"\\\\]``, ``.`` (any
  character), a rule name, ``( ... )``; each may take ``*``, ``+``, ``?``, ``{m}``, ``{m,}`` or
  ``{m,n}``;
- escapes in literals and classes: ``\\n \\r \\t \\\\ \\" \\' \\] \\[ \\- \\^ \\xHH \\uHHHH \\UHHHHHHHH``.

Errors name the line and the problem: an unknown rule, a missing ``root``, a rule that can derive no
finite text, bad syntax.

**Recognizer.** ``GrammarPrefix.feed(text)`` advances an Earley chart one character at a time
(Aycock and Horspool's treatment of nullable rules; quantifiers become left-recursive helper rules,
which Earley parses in linear time). The text so far can still be completed exactly when the newest
set is non-empty, because every rule derives some text (checked at compile time); ``complete`` when
``root`` spans all of it. Sets are never changed once built, so ``copy()`` shares them. A set larger
than ``MAX_ITEMS`` (a wildly ambiguous grammar) rejects the character.
"""

from __future__ import annotations

import functools
from collections import defaultdict

__all__ = ["Grammar", "GrammarError", "GrammarPrefix", "compile_grammar"]

MAX_GRAMMAR = 65536  # characters of a grammar's text
MAX_REPEAT = 1000  # the largest m or n of {m,n}
MAX_ITEMS = 50000  # Earley items in one set


class GrammarError(ValueError):
    """A grammar text that does not compile, with its line."""


class _CharSet:
    __slots__ = ("ranges", "negated")

    def __init__(self, ranges: tuple[tuple[int, int], ...], negated: bool) -> None:
        self.ranges, self.negated = ranges, negated

    def __contains__(self, ch: str) -> bool:
        o = ord(ch)
        return any(lo <= o <= hi for lo, hi in self.ranges) != self.negated


class Grammar:
    """A compiled grammar: productions ``(lhs, rhs)`` over nonterminal ids (>= 0) and terminal ids
    (< 0: ``terminals[-id - 1]``, a character set); ``root`` is the start nonterminal."""

    def __init__(self, names: list[str], prods: list[tuple[int, tuple[int, ...]]], terminals: list[_CharSet],
                 root: int) -> None:
        self.names, self.prods, self.terminals, self.root = names, prods, terminals, root
        self.by_lhs: list[list[int]] = [[] for _ in names]
        for i, (lhs, _) in enumerate(prods):
            self.by_lhs[lhs].append(i)
        self.nullable = _fixpoint(len(names), prods, lambda sym, ok: sym >= 0 and ok[sym])
        self.initial = self._closure(0, [(p, 0, 0) for p in self.by_lhs[root]], [])
        if self.initial is None:
            raise GrammarError(f"guided_grammar: more than {MAX_ITEMS} parse states before any text (too ambiguous)")

    def _closure(self, k: int, kernel: list[tuple[int, int, int]], sets: list[_Set]) -> _Set | None:
        """Earley set ``k`` from its kernel (scanned items): predictions and completions."""
        prods, nullable, by_lhs = self.prods, self.nullable, self.by_lhs
        seen = set(kernel)
        agenda = list(kernel)
        waiting: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        scans: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        predicted: set[int] = set()
        accepting = False

        def add(item: tuple[int, int, int]) -> None:
            if item not in seen:
                seen.add(item)
                agenda.append(item)

        while agenda:
            if len(seen) > MAX_ITEMS:
                return None
            item = agenda.pop()
            p, d, o = item
            lhs, rhs = prods[p]
            if d == len(rhs):
                accepting = accepting or (lhs == self.root and o == 0)
                if o == k:  # a nullable nonterminal: its waiters were advanced when they predicted it
                    continue
                for pp, pd, po in sets[o].waiting.get(lhs, ()):
                    add((pp, pd + 1, po))
                continue
            sym = rhs[d]
            if sym < 0:
                scans[sym].append(item)
                continue
            waiting[sym].append(item)
            if sym not in predicted:
                predicted.add(sym)
                for q in by_lhs[sym]:
                    add((q, 0, k))
            if nullable[sym]:
                add((p, d + 1, o))
        return _Set(dict(waiting), dict(scans), accepting)

    def step(self, sets: list[_Set], ch: str) -> _Set | None:
        """The next Earley set after ``ch`` (None: no parse goes on with it)."""
        kernel = []
        for term, items in sets[-1].scans.items():
            if ch in self.terminals[-term - 1]:
                kernel.extend((p, d + 1, o) for p, d, o in items)
        if not kernel:
            return None
        return self._closure(len(sets), kernel, sets)


class _Set:
    __slots__ = ("waiting", "scans", "accepting")

    def __init__(self, waiting: dict, scans: dict, accepting: bool) -> None:
        self.waiting, self.scans, self.accepting = waiting, scans, accepting


class GrammarPrefix:
    """Text that must end up derived by the grammar from ``root`` (the engine's guided decoding)."""

    final = False  # a complete text may still grow: end tokens are allowed, not forced

    __slots__ = ("grammar", "sets")

    def __init__(self, grammar: Grammar, sets: list[_Set] | None = None) -> None:
        self.grammar = grammar
        self.sets = [grammar.initial] if sets is None else sets

    def copy(self) -> GrammarPrefix:
        return GrammarPrefix(self.grammar, list(self.sets))

    @property
    def complete(self) -> bool:
        return self.sets[-1] is not None and self.sets[-1].accepting

    def feed(self, text: str) -> bool:
        for ch in text:
            if self.sets[-1] is None:
                return False
            self.sets.append(self.grammar.step(self.sets, ch))
        return self.sets[-1] is not None


def _fixpoint(n: int, prods, sym_ok) -> list[bool]:
    """Per nonterminal: whether some production has every symbol ``sym_ok`` (iterated to a fixpoint)."""
    ok = [False] * n
    changed = True
    while changed:
        changed = False
        for lhs, rhs in prods:
            if not ok[lhs] and all(sym_ok(s, ok) for s in rhs):
                ok[lhs] = changed = True
    return ok


# ---------------------------------------------------------------------------------------------- parsing


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.i = text, 0
        self.names: list[str] = []
        self.ids: dict[str, int] = {}
        self.defined: dict[str, int] = {}  # rule name -> line of its definition
        self.used: dict[str, int] = {}  # rule name -> line of its first use
        self.prods: list[tuple[int, tuple[int, ...]]] = []
        self.terminals: list[_CharSet] = []
        self.term_ids: dict[tuple, int] = {}
        self.rule = ""  # the rule being read (helper rules are named after it)
        self.helpers = 0

    # -- characters
    def line(self, at: int | None = None) -> int:
        return self.text.count("\n", 0, self.i if at is None else at) + 1

    def fail(self, msg: str, at: int | None = None) -> GrammarError:
        return GrammarError(f"guided_grammar line {self.line(at)}: {msg}")

    def skip(self) -> None:
        t, n = self.text, len(self.text)
        while self.i < n:
            if t[self.i] in " \t\r\n":
                self.i += 1
            elif t[self.i] == "#":
                while self.i < n and t[self.i] != "\n":
                    self.i += 1
            else:
                break

    def name_at(self, i: int) -> tuple[str, int]:
        j, t = i, self.text
        while j < len(t) and (t[j].isalnum() or t[j] in "_-"):
            j += 1
        return t[i:j], j

    def rule_start(self) -> bool:
        """Whether a ``name ::=`` starts here (the end of the previous rule)."""
        name, j = self.name_at(self.i)
        if not name or not (name[0].isalpha() or name[0] == "_"):
            return False
        while j < len(self.text) and self.text[j] in " \t":
            j += 1
        return self.text.startswith("::=", j)

    # -- symbols
    def nonterminal(self, name: str) -> int:
        if name not in self.ids:
            self.ids[name] = len(self.names)
            self.names.append(name)
        return self.ids[name]

    def helper(self, alternatives: list[list[int]]) -> int:
        self.helpers += 1
        nt = self.nonterminal(f"{self.rule}#{self.helpers}")
        for alt in alternatives:
            self.prods.append((nt, tuple(alt)))
        return nt

    def terminal(self, ranges: list[tuple[int, int]], negated: bool) -> int:
        key = (tuple(sorted(ranges)), negated)
        if key not in self.term_ids:
            self.term_ids[key] = -len(self.terminals) - 1
            self.terminals.append(_CharSet(key[0], negated))
        return self.term_ids[key]

    # -- grammar
    def parse(self) -> Grammar:
        self.skip()
        if self.i >= len(self.text):
            raise self.fail("the grammar is empty")
        while self.i < len(self.text):
            start = self.i
            if not self.rule_start():
                raise self.fail("expected a rule: name ::= ...")
            name, self.i = self.name_at(self.i)
            self.i = self.text.index("::=", self.i) + 3
            if name in self.defined:
                raise self.fail(f"rule {name!r} is defined twice (first on line {self.defined[name]})", start)
            self.defined[name] = self.line(start)
            self.rule, self.helpers = name, 0
            nt = self.nonterminal(name)
            for alt in self.alternatives(nested=False):
                self.prods.append((nt, tuple(alt)))
            self.skip()
        for name, line in self.used.items():
            if name not in self.defined:
                raise GrammarError(f"guided_grammar line {line}: unknown rule {name!r}")
        if "root" not in self.defined:
            raise GrammarError("guided_grammar: no 'root' rule (the start rule is named root)")
        productive = _fixpoint(len(self.names), self.prods, lambda sym, ok: sym < 0 or ok[sym])
        stuck = [name for name in self.defined if not productive[self.ids[name]]]
        if stuck:
            raise GrammarError(f"guided_grammar line {self.defined[stuck[0]]}: rule(s) {', '.join(map(repr, stuck))} "
                               "can derive no finite text (every alternative refers back to them)")
        return Grammar(self.names, self.prods, self.terminals, self.ids["root"])

    def alternatives(self, nested: bool) -> list[list[int]]:
        alts = [self.sequence(nested)]
        while True:
            self.skip()
            if self.i < len(self.text) and self.text[self.i] == "|":
                self.i += 1
                alts.append(self.sequence(nested))
            else:
                return alts

    def sequence(self, nested: bool) -> list[int]:
        seq: list[int] = []
        while True:
            self.skip()
            if self.i >= len(self.text) or self.text[self.i] in "|)" or (not nested and self.rule_start()):
                if self.i < len(self.text) and self.text[self.i] == ")" and not nested:
                    raise self.fail("')' without '('")
                return seq
            atom = self.atom()
            seq.extend(self.quantified(atom))

    def atom(self) -> int:
        t, c = self.text, self.text[self.i]
        if c in "\"'":
            return self.literal(c)
        if c == "[":
            return self.char_class()
        if c == ".":
            self.i += 1
            return self.terminal([], True)
        if c == "(":
            self.i += 1
            alts = self.alternatives(nested=True)
            self.skip()
            if self.i >= len(t) or t[self.i] != ")":
                raise self.fail("'(' without ')'")
            self.i += 1
            return alts[0][0] if len(alts) == 1 and len(alts[0]) == 1 else self.helper(alts)
        name, j = self.name_at(self.i)
        if not name:
            raise self.fail(f"unexpected {c!r}")
        self.used.setdefault(name, self.line())
        self.i = j
        return self.nonterminal(name)

    def literal(self, quote: str) -> int:
        self.i += 1
        chars: list[int] = []
        while True:
            if self.i >= len(self.text) or self.text[self.i] == "\n":
                raise self.fail("unterminated string literal")
            if self.text[self.i] == quote:
                self.i += 1
                break
            chars.append(self.char())
        seq = [self.terminal([(o, o)], False) for o in chars]
        return self.helper([seq]) if len(seq) != 1 else seq[0]

    def char_class(self) -> int:
        self.i += 1
        negated = self.text.startswith("^", self.i)
        self.i += negated
        ranges: list[tuple[int, int]] = []
        while True:
            if self.i >= len(self.text):
                raise self.fail("unterminated character class")
            if self.text[self.i] == "]":
                self.i += 1
                break
            lo = self.char()
            if self.text.startswith("-", self.i) and not self.text.startswith("-]", self.i):
                self.i += 1
                hi = self.char()
                if hi < lo:
                    raise self.fail(f"character range {chr(lo)!r}-{chr(hi)!r} is reversed")
                ranges.append((lo, hi))
            else:
                ranges.append((lo, lo))
        if not ranges and not negated:
            raise self.fail("empty character class")
        return self.terminal(ranges, negated)

    def char(self) -> int:
        t = self.text
        if self.i >= len(t):
            raise self.fail("unexpected end of the grammar (an unterminated literal or class)")
        c = t[self.i]
        if c != "\\":
            self.i += 1
            return ord(c)
        if self.i + 1 >= len(t):
            raise self.fail("a lone backslash")
        e = t[self.i + 1]
        simple = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "'": "'", "]": "]", "[": "[", "-": "-",
                  "^": "^", "/": "/"}
        if e in simple:
            self.i += 2
            return ord(simple[e])
        width = {"x": 2, "u": 4, "U": 8}.get(e)
        digits = t[self.i + 2 : self.i + 2 + width] if width else ""
        if not width or len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
            raise self.fail(f"bad escape \\{e}")
        self.i += 2 + width
        code = int(digits, 16)
        if code > 0x10FFFF:
            raise self.fail(f"\\{e}{digits} is not a character")
        return code

    def quantified(self, atom: int) -> list[int]:
        t = self.text
        if self.i >= len(t):
            return [atom]
        c = t[self.i]
        if c == "*":
            self.i += 1
            return [self.star(atom)]
        if c == "+":
            self.i += 1
            return [self.helper_plus(atom)]
        if c == "?":
            self.i += 1
            return [self.helper([[], [atom]])]
        if c != "{":
            return [atom]
        end = t.find("}", self.i)
        if end < 0:
            raise self.fail("'{' without '}'")
        body = t[self.i + 1 : end].replace(" ", "")
        lo_s, comma, hi_s = body.partition(",")
        if not lo_s.isdigit() or (hi_s and not hi_s.isdigit()):
            raise self.fail(f"bad repetition {{{body}}}: {{m}}, {{m,}} or {{m,n}}")
        lo = int(lo_s)
        hi = int(hi_s) if hi_s else (None if comma else lo)
        if lo > MAX_REPEAT or (hi is not None and (hi > MAX_REPEAT or hi < lo)):
            raise self.fail(f"bad repetition {{{body}}}: m <= n <= {MAX_REPEAT}")
        self.i = end + 1
        seq = [atom] * lo
        if hi is None:
            return seq + [self.star(atom)]
        opt = None  # (X (X (...)?)?)? for the n - m optional ones
        for _ in range(hi - lo):
            opt = self.helper([[], [atom] if opt is None else [atom, opt]])
        return seq + ([opt] if opt is not None else [])

    def star(self, atom: int) -> int:
        nt = self.helper([[]])
        self.prods.append((nt, (nt, atom)))  # left recursion: R ::= "" | R X
        return nt

    def helper_plus(self, atom: int) -> int:
        nt = self.helper([[atom]])
        self.prods.append((nt, (nt, atom)))  # R ::= X | R X
        return nt


def compile_grammar(text: str) -> Grammar:
    """Compile a GBNF/EBNF grammar (``GrammarError`` naming the line and the problem); cached by text."""
    if not isinstance(text, str) or not 0 < len(text) <= MAX_GRAMMAR:
        raise GrammarError(f"guided_grammar must be a non-empty string of at most {MAX_GRAMMAR} characters")
    return _compile(text)


@functools.lru_cache(maxsize=64)
def _compile(text: str) -> Grammar:
    return _Parser(text).parse()
