"""Guided decoding on a real model: its cost per token, and whether the outputs obey their guide.

The embedded SmolLM2-135M-Instruct (or ``--model DIR``) answers a few chat prompts greedily through
the engine, unguided and then with each guide: JSON mode (``json_object``), a JSON schema (as a
``guided_regex`` through ``moelora.structured.schema_regex``), ``guided_choice``, a
``guided_regex``, and ``guided_grammar`` (a JSON grammar in GBNF, and a small SQL grammar). For each: decode ms per generated token (the whole ``generate`` call / tokens,
prefill included; each request alone, median of ``--repeats``), how many outputs finished
(``stop``), and whether every finished output obeys its guide (JSON parses to an object, validates
the schema's shape, is one of the choices, matches the pattern). Prints the outputs too.

Usage: ``python benchmarks/guided_bench.py [--model DIR] [--threads 1] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import regex  # noqa: E402
import torch  # noqa: E402

from moelora.engine import Engine, SamplingParams  # noqa: E402
from moelora.grammar import GrammarPrefix, compile_grammar  # noqa: E402
from moelora.structured import schema_regex  # noqa: E402

JSON_GBNF = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= "-"? ([0-9] | [1-9] [0-9]{0,15}) ("." [0-9]+)? ([eE] [-+]? [0-9]{1,3})? ws
ws     ::= ([ \t\n] ws)?
"""  # JSON in the style of llama.cpp's json.gbnf (whitespace unbounded: the grammar, not the engine, decides)
SQL_GBNF = r"""
root      ::= "SELECT " columns " FROM " name (" WHERE " condition)? ";"
columns   ::= "*" | name (", " name)*
condition ::= name " " op " " value (" AND " condition)?
op        ::= "=" | ">" | "<" | ">=" | "<="
value     ::= [0-9]+ | "'" [a-zA-Z ]* "'"
name      ::= [a-z_]+
"""
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
                                           "color": {"enum": ["black", "white", "orange", "grey"]}}}
CASES = [  # (name, prompt, sampling options, check of a finished output)
    ("unguided", "Describe a cat as JSON with keys name, age and color.", {}, None),
    ("json_object", "Describe a cat as JSON with keys name, age and color.", {"json_object": True},
     lambda t: isinstance(json.loads(t), dict)),
    ("json_schema", "Describe a cat as JSON with keys name, age and color.", {"guided_regex": schema_regex(SCHEMA)},
     lambda t: set(json.loads(t)) == {"name", "age", "color"} and json.loads(t)["color"] in SCHEMA["properties"]["color"]["enum"]),
    ("guided_choice", "Is the sky blue on a clear day? Answer yes or no.", {"guided_choice": ["yes", "no"]},
     lambda t: t in ("yes", "no")),
    ("guided_regex", "Give a US phone number.", {"guided_regex": r"\(\d{3}\) \d{3}-\d{4}"},
     lambda t: regex.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", t) is not None),
    ("grammar_json", "Describe a cat as JSON with keys name, age and color.", {"guided_grammar": JSON_GBNF},
     lambda t: isinstance(json.loads(t), dict)),
    ("grammar_sql", "Write an SQL query that lists the names of users older than 30.", {"guided_grammar": SQL_GBNF},
     lambda t: GrammarPrefix(compile_grammar(SQL_GBNF)).feed(t)),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="base model directory (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    eng = Engine.from_pretrained(args.model, device="cpu", max_batch=1)
    tok = eng.tokenizer
    print(f"model {eng.base_name}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"greedy, max_tokens {args.max_tokens}")
    failed = 0
    for name, prompt, opts, check in CASES:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        times, res = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = eng.generate([ids], [None], SamplingParams(max_tokens=args.max_tokens, **opts))[0]
            times.append((time.perf_counter() - t0) * 1e3 / max(len(res["token_ids"]), 1))
        ok = "n/a" if check is None or res["finish_reason"] != "stop" else str(bool(check(res["text"])))
        failed += ok == "False"
        print(f"{name:14s} {statistics.median(times):7.1f} ms/token  {len(res['token_ids']):3d} tokens  "
              f"finish {res['finish_reason']:6s} obeys guide: {ok:5s} {res['text']!r}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
