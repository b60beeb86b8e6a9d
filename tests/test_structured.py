"""JSON mode's validator (moelora.structured.JsonPrefix) against ``json.loads`` as the oracle."""

from __future__ import annotations

import json
import random
import re

import pytest

from moelora.structured import JsonPrefix


def strict_loads(s: str):
    def refuse(name):
        raise ValueError(name)

    return json.loads(s, parse_constant=refuse)  # no NaN / Infinity: not JSON


def accepted(s: str, **kw) -> bool:
    state = JsonPrefix(**kw)
    return state.feed(s) and state.complete


def is_object(s: str) -> bool:
    try:
        return isinstance(strict_loads(s), dict)
    except ValueError:
        return False


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)

    def key():
        return "".join(rng.choice('kq"\\é\u2603') for _ in range(rng.randrange(4)))

    def value(depth=0):
        k = rng.randrange(7 if depth < 3 else 4)
        if k == 0:
            return rng.choice([0, -1, 12, 3.5, -0.25, 1e10, 2.5e-3, 10**20, -0.0])
        if k == 1:
            return "".join(rng.choice('ab"\\/\n\t é\u2603\x01\U0001f600') for _ in range(rng.randrange(5)))
        if k == 2:
            return rng.choice([True, False, None])
        if k == 3:
            return rng.choice(["", "x", [], {}])
        if k in (4, 5):
            return {key(): value(depth + 1) for _ in range(rng.randrange(4))}
        return [value(depth + 1) for _ in range(rng.randrange(4))]

    out = []
    for _ in range(n):
        obj = {key(): value() for _ in range(rng.randrange(4))}
        out.append(json.dumps(obj, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1, "\t"]),
                              separators=rng.choice([None, (",", ":"), (" , ", " : ")])))
    return out


def test_every_prefix_of_an_object_is_accepted_and_only_the_whole_is_complete():
    for s in documents(1500):
        state = JsonPrefix()
        for i, ch in enumerate(s):
            assert state.feed(ch), (s, i)
            assert state.complete == (i == len(s) - 1), (s, i)
        assert not state.copy().feed("x") and state.copy().feed(" \n") and state.complete


def test_mutated_documents_get_json_loads_verdict():
    rng = random.Random(1)
    checked = rejected = 0
    for s in documents(1500, seed=2):
        for _ in range(6):
            i = rng.randrange(len(s))
            ch = rng.choice('{}[]",:-0123456789.eE+ tfnrulas\\xu\u00e9\x00')
            m = rng.choice([s[:i] + ch + s[i + 1:], s[:i] + ch + s[i:], s[:i] + s[i + 1:]])
            assert accepted(m) == is_object(m), repr(m)
            checked += 1
            rejected += not is_object(m)
    assert checked == 9000 and rejected > 4000  # the mutations do break documents


@pytest.mark.parametrize("text", ['{"a": 01}', '{"a": 1.}', '{"a": -}', '{"a": 1e}', '{"a": 1e+}', '{"a": .5}',
                                  '{"a": tru}', '{"a": "\\x"}', '{"a": "\\u12g4"}', '[1]', '"x"', '1', '{} {}',
                                  '{"a":1,}', '{,}', '{"a" 1}', '{"a": NaN}', '{"a": Infinity}', '{"a": [1,]}',
                                  '{"a": "tab\there"}', '{"a": 1} ', ' {"a":[1,-2.5E+3,{"b":null}]}\n', '{}'])
def test_edge_cases_agree_with_json_loads(text):
    assert accepted(text) == is_object(text)


def test_the_engines_options_bound_whitespace():
    assert accepted(' {}') and not accepted(' {}', leading_ws=False) and accepted('{ }', leading_ws=False)
    assert accepted('{' + ' ' * 64 + '}', max_ws=64) and not accepted('{' + ' ' * 65 + '}', max_ws=64)
    assert accepted('{"a":' + ' ' * 40 + '1,' + '\n' * 40 + '"b": 2}', max_ws=64)  # runs, not the total
    assert accepted('{"' + ' ' * 100 + '": 1}', max_ws=64)  # inside strings any amount


def test_regex_prefix_accepts_prefixes_of_full_matches_only():
    from moelora.structured import RegexPrefix

    g = RegexPrefix(r"\d{3}-\d{2}")
    assert g.copy().feed("12") and g.copy().feed("123-4") and not g.copy().feed("12a")
    assert not g.complete
    done = g.copy()
    assert done.feed("123-45") and done.complete and not done.copy().feed("6")
    grow = RegexPrefix(r"\d+")
    assert grow.feed("7") and grow.complete and grow.copy().feed("89") and not grow.final


def test_guides_are_checked_and_built():
    from moelora.structured import JsonPrefix, RegexPrefix, check_guides, guide_for

    check_guides(False, None, None)
    for args, msg in [((True, "a", None), "at most one"), ((False, "(", None), "does not compile"),
                      ((False, "", None), "non-empty"), ((False, None, []), "1-256"),
                      ((False, None, ["a", ""]), "non-empty"), ((False, None, ["x" * 70000]), "characters")]:
        with pytest.raises(ValueError, match=msg):
            check_guides(*args)
    assert isinstance(guide_for(True, None, None), JsonPrefix) and guide_for(False, None, None) is None
    choice = guide_for(False, None, ["yes", "no (.*)"])  # choices are literal text, not patterns
    assert isinstance(choice, RegexPrefix)
    assert choice.copy().feed("no (") and not choice.copy().feed("no x") and not choice.copy().feed("maybe")
    full = choice.copy()
    assert full.feed("no (.*)") and full.complete and not choice.complete


SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 8}, "age": {"type": "integer"},
    "score": {"type": "number"}, "ok": {"type": "boolean"}, "kind": {"enum": ["cat", "dog", 3]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "minItems": 1, "maxItems": 3},
    "pet": {"$ref": "#/$defs/Pet"}, "nick": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    "unit": {"const": "kg"}, "multi": {"type": ["integer", "null"]}},
    "required": ["name"], "$defs": {"Pet": {"type": "object", "properties": {"legs": {"type": "integer"}}}}}


def instances(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        obj = {"name": "".join(rng.choice('ab"é\\\n') for _ in range(rng.randint(1, 8))),
               "age": rng.choice([0, -3, 17, 10**12]), "score": rng.choice([0.5, -1, 2e-3, 7, 1.25e10]),
               "ok": rng.random() < 0.5, "kind": rng.choice(["cat", "dog", 3]),
               "tags": [rng.choice(["a", "bc", "", "xyz"]) for _ in range(rng.randint(1, 3))],
               "pet": {"legs": rng.randint(0, 8)}, "nick": rng.choice([None, "Bo", ""]), "unit": "kg",
               "multi": rng.choice([None, 4])}
        out.append(json.dumps(obj, ensure_ascii=rng.random() < 0.5, separators=rng.choice([None, (",", ":")]),
                              indent=rng.choice([None, 1])))
    return out


def test_schema_regex_matches_valid_instances_and_only_valid_ones():
    """Every instance with the schema's property order matches; every mutated text that still matches
    is JSON that validates (soundness: what the guide lets through is valid)."""
    import regex

    from moelora.structured import schema_regex

    jsonschema = pytest.importorskip("jsonschema")
    pattern = regex.compile(schema_regex(SCHEMA))
    rng, still = random.Random(4), 0
    for s in instances(400):
        assert pattern.fullmatch(s), s
        jsonschema.validate(json.loads(s), SCHEMA)
        for _ in range(10):
            i = rng.randrange(len(s))
            m = s[:i] + rng.choice('{}[]",:-0123456789.eE tfnaluxk\\') + s[i + rng.randint(0, 1):]
            if pattern.fullmatch(m):
                still += 1
                jsonschema.validate(strict_loads(m), SCHEMA)
    assert still > 100  # the mutations that keep a match were checked too


def test_schema_regex_takes_pydantic_schemas_and_names_what_it_refuses():
    import regex

    from moelora.structured import SchemaError, schema_regex

    pydantic = pytest.importorskip("pydantic")

    class Pet(pydantic.BaseModel):
        kind: str
        legs: int

    class Person(pydantic.BaseModel):
        name: str
        pets: list[Pet]
        nick: str | None = None

    pattern = schema_regex(Person.model_json_schema())
    text = Person(name="Ada", pets=[Pet(kind="cat", legs=4)]).model_dump_json()
    assert regex.fullmatch(pattern, text) and Person.model_validate_json(text).name == "Ada"
    for bad, word in [({"type": "integer", "minimum": 0}, "minimum"), ({"oneOf": []}, "oneOf"),
                      ({"$ref": "#/$defs/Nope"}, "$ref"), ({"type": "array"}, "items"), ({}, "unconstrained"),
                      ({"type": "string", "pattern": "a+"}, "pattern"), ({"type": "object", "properties": []}, "properties"),
                      ({"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 1}, "maximum")]:
        with pytest.raises(SchemaError, match=re.escape(word)):
            schema_regex({"type": "object", "properties": {"x": bad}})
    loop = {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}},
            "$defs": {"Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}}}}
    with pytest.raises(SchemaError, match="recursive"):
        schema_regex(loop)


# ------------------------------------------------------------------------------------------ grammars
REGULAR = [  # (GBNF, the same language as a regular expression): the regex package is the oracle
    ('root ::= ("ab" | "a")* "b"?', r"(?:ab|a)*b?"),
    ('root ::= [a-c]{2,4} ("x" [ab]+)?', r"[a-c]{2,4}(?:x[ab]+)?"),
    ('root ::= ("a" | "b" "c"*){0,3} "."', r"(?:a|bc*){0,3}\."),
    ("root ::= [^a]+ 'a'  # a comment\n", r"[^a]+a"),
    ('root ::= x y\nx ::= "a"{2,}\ny ::=\n  "" | "b" x?', r"a{2,}(?:|ba{2,}|b)"),
    (r'root ::= "\x41" [\-\]]* . "\n"', r"A[\-\]]*.\n"),
]


@pytest.mark.parametrize(("gbnf", "pattern"), REGULAR)
def test_grammar_prefixes_and_sentences_agree_with_the_regex_oracle(gbnf, pattern):
    """Every string over a small alphabet (up to 6 characters, and random longer ones): a viable prefix
    exactly when the regex's partial match says so, a sentence exactly when it fully matches."""
    import itertools

    import regex

    from moelora.grammar import GrammarPrefix, compile_grammar

    g, rx = compile_grammar(gbnf), regex.compile(pattern, regex.DOTALL)
    alphabet = "abcx.-]A\n"
    rng = random.Random(0)
    texts = ["".join(t) for n in range(5) for t in itertools.product(alphabet, repeat=n)]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(5, 30))) for _ in range(300)]
    texts += ["a" * 9 + "b" + "a" * 3, "ababab.", "bcccab."]
    for text in texts:
        state = GrammarPrefix(g)
        viable = state.feed(text)
        assert viable == (rx.fullmatch(text, partial=True) is not None), (gbnf, text)
        assert (viable and state.complete) == (rx.fullmatch(text) is not None), (gbnf, text)


def test_grammar_recognizes_a_context_free_language_incrementally():
    """Balanced brackets of two kinds (not regular): each prefix is viable exactly when no bracket is
    closed wrongly; a sentence exactly when every bracket is closed. copy() shares the chart."""
    from moelora.grammar import GrammarPrefix, compile_grammar

    g = compile_grammar('root ::= ( "(" root ")" | "[" root "]" | [a-b] )*')

    def oracle(text):
        stack = []
        for ch in text:
            if ch in "([":
                stack.append(ch)
            elif ch in ")]":
                if not stack or stack.pop() != {")": "(", "]": "["}[ch]:
                    return False, False
        return True, not stack

    rng = random.Random(1)
    for _ in range(400):
        text = "".join(rng.choice("()[]ab") for _ in range(rng.randint(0, 14)))
        state = GrammarPrefix(g)
        ok = state.feed(text)
        assert (ok, ok and state.complete) == oracle(text), text
    state = GrammarPrefix(g)
    assert state.feed("([a") and not state.complete
    fork = state.copy()
    assert fork.feed("])") and fork.complete and state.feed("]") and not state.complete
    assert not state.copy().feed("]") and state.feed(")") and state.complete


@pytest.mark.parametrize(("text", "msg"), [
    ("root ::= foo", "line 1: unknown rule 'foo'"),
    ('x ::= "a"', "no 'root' rule"),
    ("  # only a comment\n", "the grammar is empty"),
    ("", "a non-empty string of at most 65536 characters"),
    ('root ::= ("a"', "line 1: '.' without '.'"),
    ('root ::= "a")', "line 1: '.' without '.'"),
    ('root ::= a\na ::= "b" a', "line 1: rule.s. 'root', 'a' can derive no finite text"),
    ("root ::= [z-a]", "character range 'z'-'a' is reversed"),
    ('root ::= "abc', "unterminated string literal"),
    ("root ::= []", "empty character class"),
    ('root ::= "a"{3,1}', r"bad repetition \{3,1\}"),
    ('root ::= "a"\n\nroot ::= "b"', "line 3: rule 'root' is defined twice .first on line 1."),
    (r'root ::= "\q"', r"bad escape \\q"),
    ('root ::= "a" @', "line 1: unexpected '@'"),
    ("root = 'a'", "line 1: expected a rule: name ::= ..."),
])
def test_grammar_errors_name_the_line_and_the_problem(text, msg):
    from moelora.grammar import GrammarError, compile_grammar
    from moelora.structured import check_guides

    with pytest.raises(GrammarError, match=msg):
        compile_grammar(text)
    with pytest.raises(ValueError, match=msg):
        check_guides(False, None, None, text)
    with pytest.raises(ValueError, match="at most one of json_object, guided_regex, guided_choice and guided_grammar"):
        check_guides(True, None, None, "root ::= 'a'")


def test_fuzzed_grammars_compile_or_name_the_problem():
    """Random grammar texts (pieces of the syntax, shuffled): a ``GrammarError`` or a grammar whose
    recognizer takes any text; never another exception."""
    from moelora.grammar import GrammarError, GrammarPrefix, compile_grammar

    pieces = ["root", " ::= ", "a", "b", '"x"', "'y'", "[a-c]", '[^"]', ".", "(", ")", "|", "*", "+", "?", "{2}",
              "{1,3}", "{2,}", "{", "}", "\n", "#c\n", "\\", '"\\n"', "[\\]]", "-", " ", "a ::= ", '"', "[", "]",
              "{x}", "::=", '"\\x4', '"\\u00e9"']
    rng = random.Random(0)
    texts = ['root ::= b [a"\\u00e9"\n*\n) ::= \n{x}"x"-']  # once an IndexError: a class ending in "-"
    texts += ["root ::= " + "".join(rng.choice(pieces) for _ in range(rng.randint(1, 14))) for _ in range(3000)]
    compiled = 0
    for text in texts:
        try:
            g = compile_grammar(text)
        except GrammarError:
            continue
        compiled += 1
        state = GrammarPrefix(g)
        for _ in range(3):
            state.feed("".join(rng.choice('xyabc"\n') for _ in range(rng.randint(0, 5))))
            assert isinstance(state.complete, bool)
    assert compiled > 100
