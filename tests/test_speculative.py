"""N-gram speculative decoding in the engine: the output is the one without speculation.

The oracle is the same engine without speculation (itself checked against ``model.generate`` in
``test_engine.py``). ``Planted`` drafts the known answer, wrong at chosen places, so that long runs
of accepted drafts, rejections in the middle of a draft and requests finishing inside a draft all
happen on purpose; the n-gram proposer runs on the tiny random models' natural loops.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_engine import METHODS, ByteTokenizer, prompts, run_aborting_the_second, sharp_engine

from moelora.engine import Engine, SamplingParams
from moelora.speculative import NgramProposer, SpeculativeConfig

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def test_ngram_proposer_drafts_the_longest_most_recent_match():
    cfg = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=1)
    p = NgramProposer([1, 2, 3, 4, 5, 1, 2, 3], 3)
    assert p.propose(cfg, 10) == [4, 5, 1]  # suffix [1, 2, 3] seen at 0
    p.extend([9, 2, 3])
    assert p.propose(cfg, 10) == [9, 2, 3]  # [9, 2, 3] never seen before; [2, 3] most recently at 6
    p = NgramProposer([1, 2, 3, 4, 5, 1, 2, 3], 3)
    p.extend([4, 7, 2, 3])
    assert p.propose(cfg, 10) == [4, 7, 2]  # [7, 2, 3] no; [2, 3] most recently followed by 4, 7
    assert p.propose(cfg, 2) == [4, 7]  # the limit
    assert p.propose(cfg, 0) == []
    assert NgramProposer([5, 5, 5, 5], 3).propose(cfg, 10) == [5, 5, 5]  # the loop goes on past the end
    assert NgramProposer([8, 1, 9, 8, 1], 3).propose(cfg, 10) == [9, 8, 1]  # period 3, continued
    assert NgramProposer([1, 2, 3], 3).propose(cfg, 10) == []
    # 256 and 1 share bytes: a match across token boundaries is skipped, not taken
    assert NgramProposer([1, 256, 0, 7, 65536, 1], 3).propose(cfg, 10) == [256, 0, 7]
    assert NgramProposer([0, 1, 0, 0, 7, 1], 3).propose(cfg, 10) == [0, 0, 7]
    # the adaptive draft length: +2 when every draft was accepted (capped), -1 on a rejection (at least 1)
    # and when a one-token draft fails, no drafts for 1, 2, 4, ... 16 steps (reset by an accepted draft)
    p = NgramProposer([5, 5, 5, 5], 3)
    for proposed, accepted, k in [(3, 1, 2), (2, 0, 1), (1, 1, 3), (3, 3, 3), (3, 2, 2)]:
        p.accepted(cfg, proposed, accepted)
        assert p.k == k and p.pause == 0
    assert p.propose(cfg, 10) == [5, 5]
    p.accepted(cfg, 2, 0)
    for pause in (1, 2, 4, 8, 16, 16):
        p.accepted(cfg, 1, 0)
        assert [p.propose(cfg, 10) for _ in range(pause + 1)] == [[]] * pause + [[5]]
    p.accepted(cfg, 1, 1)
    p.accepted(cfg, 3, 0)
    p.accepted(cfg, 2, 0)
    p.accepted(cfg, 1, 0)
    assert (p.k, p.pause) == (1, 1)  # the backoff starts again from 1
    fixed = SpeculativeConfig(num_speculative_tokens=3, adaptive=False)
    p.accepted(fixed, 1, 0)
    assert (p.k, p.pause) == (1, 1)  # not moved
    strict = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=2)
    assert NgramProposer([4, 1, 2, 6, 2], 3).propose(strict, 10) == []  # only a 1-token match
    assert NgramProposer([4, 1, 2, 6, 1, 2], 3).propose(strict, 10) == [6, 1, 2]


def test_speculative_config_errors_name_the_problem():
    cfg = SpeculativeConfig.from_dict(SPEC)
    assert (cfg.num_speculative_tokens, cfg.prompt_lookup_max, cfg.prompt_lookup_min) == (4, 3, 1)
    for spec, lookup in [({}, (5, 5)), ({"prompt_lookup_min": 2}, (2, 2)), ({"prompt_lookup_max": 6}, (6, 6)),
                         ({"prompt_lookup_min": 1, "prompt_lookup_max": 4}, (4, 1))]:  # vLLM's defaults
        cfg = SpeculativeConfig.from_dict({"num_speculative_tokens": 3, **spec})
        assert (cfg.prompt_lookup_max, cfg.prompt_lookup_min) == lookup
    for spec, msg in [({"method": "eagle", "num_speculative_tokens": 2}, "only 'ngram'"),
                      ({"method": "ngram"}, "needs num_speculative_tokens"),
                      ({"num_speculative_tokens": 0}, "num_speculative_tokens must be an integer in"),
                      ({"num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 3}, "prompt_lookup_min .5. must be <="),
                      ({"num_speculative_tokens": 2, "prompt_lookup_max": 0}, "prompt_lookup_max must be an integer"),
                      ({"num_speculative_tokens": 2, "model": "x"}, r"unknown speculative config key\(s\) \['model'\]"),
                      ({"num_speculative_tokens": True}, "integer"),
                      ({"num_speculative_tokens": 2, "disable_by_batch_size": 0}, "disable_by_batch_size"),
                      ([2], "JSON object")]:
        with pytest.raises(ValueError, match=msg):
            SpeculativeConfig.from_dict(spec)
    with pytest.raises(ValueError, match="only 'ngram'"):
        Engine(tiny_model("llama"), ByteTokenizer(), speculative={"method": "draft_model", "num_speculative_tokens": 2})


def collect(eng, ps, adapters, params):
    """Run requests added at once, streaming: per request the tokens, text, logprobs and finish reason."""
    for i, (p, a, sp) in enumerate(zip(ps, adapters, params)):
        eng.add_request(str(i), p, a, sp)
    got = {str(i): {"token_ids": [], "text": "", "logprobs": [], "finish_reason": None} for i in range(len(ps))}
    while eng.has_work():
        for o in eng.step():
            g = got[o.request_id]
            assert g["finish_reason"] is None
            g["token_ids"] += o.token_ids
            g["text"] += o.text
            g["logprobs"] += o.logprobs or []
            assert o.completion_tokens == len(g["token_ids"])
            if o.finished:
                g["finish_reason"] = o.finish_reason
    assert eng.store.rows == 0
    return [got[str(i)] for i in range(len(ps))]


def assert_same(plain, spec):
    for a, b in zip(plain, spec):
        assert (b["token_ids"], b["text"], b["finish_reason"]) == (a["token_ids"], a["text"], a["finish_reason"])
        assert len(b["logprobs"]) == len(a["logprobs"])
        for x, y in zip(a["logprobs"], b["logprobs"]):
            assert (y.token_id, y.token, y.offset) == (x.token_id, x.token, x.offset)
            assert y.logprob == pytest.approx(x.logprob, abs=1e-4)
            assert [t for t, _, _ in y.top] == [t for t, _, _ in x.top]


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
def test_ngram_speculation_gives_the_plain_output(arch, adapter_dirs):
    """Mixed adapters in a continuous batch (10 requests through 4 slots) on the tiny models' own
    repetitive outputs: every request's tokens, streamed text and finish reason are those without
    speculation; drafts were both accepted and rejected."""
    ps = prompts(10)
    adapters = ["lora", "mixlora", None, "milora", "dora", "mixlora", "milora", "lora", None, "dora"]
    params = [SamplingParams(max_tokens=18 + i) for i in range(10)]
    plain = collect(sharp_engine(arch, adapter_dirs, max_batch=4), ps, adapters, params)
    eng = sharp_engine(arch, adapter_dirs, max_batch=4, speculative=SPEC)
    assert_same(plain, collect(eng, ps, adapters, params))
    st = eng.spec_stats
    assert 0 < st["accepted"] < st["proposed"], st


class Planted(Engine):
    """Drafts each request's known answer (by prompt), wrong at every output index ``i`` with
    ``i % wrong == wrong - 1``, up to ``num_speculative_tokens`` (past the answer: token 5s)."""

    answers: dict[tuple, list[int]]
    wrong = 5

    def _drafts(self, reqs):
        out = []
        for r in reqs:
            ans, n = self.answers[tuple(r.prompt)], len(r.output)
            d = [ans[i] if i < len(ans) else 5 for i in range(n, n + self.speculative.num_speculative_tokens)]
            out.append([t if (n + j) % self.wrong != self.wrong - 1 else (t + 1) % 100 + 3 for j, t in enumerate(d)])
        return out


def planted(arch, adapter_dirs, answers, wrong=5, k=6, tokenizer=None, **kw):
    eng = sharp_engine(arch, adapter_dirs, speculative={"num_speculative_tokens": k}, **kw)
    eng.__class__ = Planted
    eng.answers, eng.wrong = {tuple(p): a for p, a in answers}, wrong
    if tokenizer is not None:
        eng.tokenizer = tokenizer
    return eng


def test_long_accepted_runs_rejections_and_finishing_inside_a_draft(adapter_dirs):
    """With drafts that are the answer but for every 5th token: a step accepts up to 4 drafts, a
    rejection leaves holes in the store, and requests end inside a draft on EOS, ``max_tokens``, a
    stop sequence or a stop token; logprobs and streamed text are those without speculation."""
    ps = prompts(7, seed=4)
    adapters = ["lora", "mixlora", "milora", "dora", None, "lora", "mixlora"]
    base = [SamplingParams(max_tokens=25, logprobs=3, ignore_eos=True) for _ in ps]
    plain0 = collect(sharp_engine("llama", adapter_dirs, max_batch=8), ps, adapters, base)
    toks = [r["token_ids"] for r in plain0]
    params = [
        SamplingParams(max_tokens=25, logprobs=3, ignore_eos=True),
        SamplingParams(max_tokens=11, logprobs=3),  # max_tokens inside a draft
        SamplingParams(max_tokens=25, logprobs=3, stop=[f" {toks[2][7]} {toks[2][8]}"]),  # a stop sequence
        SamplingParams(max_tokens=25, logprobs=3, stop_token_ids=[toks[3][9]]),
        SamplingParams(max_tokens=25, logprobs=3, include_stop_str_in_output=True, stop=[f" {toks[4][12]}"]),
        SamplingParams(max_tokens=25, logprobs=3, min_tokens=20),
        SamplingParams(max_tokens=25, logprobs=3, min_tokens=6, logit_bias={2: 100.0}),  # EOS at the 7th token
    ]
    plain = collect(sharp_engine("llama", adapter_dirs, max_batch=8), ps, adapters, params)
    assert plain[1]["finish_reason"] == "length" and plain[3]["finish_reason"] == "stop"
    assert plain[6]["token_ids"][-1] == 2 and len(plain[6]["token_ids"]) == 7
    eng = planted("llama", adapter_dirs, [(p, r["token_ids"]) for p, r in zip(ps, plain)], max_batch=8)
    assert_same(plain, collect(eng, ps, adapters, params))
    assert eng.spec_stats["accepted"] > 2 * eng.spec_stats["steps"]  # long runs were accepted


def test_holes_are_aligned_away_and_sliding_windows_see_true_distances(adapter_dirs):
    """Every draft wrong (each step keeps one of 7 columns): the store's holes are removed before they
    take more than about twice the room of the tokens, and on Gemma-2 (64-token sliding window) after
    every step; outputs past the window equal those without speculation."""
    g = torch.Generator().manual_seed(9)
    ps = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (50, 20, 35)]
    adapters = ["mixlora", "lora", None]
    sp = SamplingParams(max_tokens=60, ignore_eos=True)
    for arch in ("llama", "gemma2"):
        plain = collect(sharp_engine(arch, adapter_dirs), ps, adapters, [sp] * 3)
        eng = planted(arch, adapter_dirs, [(p, r["token_ids"]) for p, r in zip(ps, plain)], wrong=1)
        widths = []
        store = eng.store
        real = store.align

        def align(real=real, store=store, widths=widths):
            real()
            widths.append(store.length)
        store.align = align
        assert_same(plain, collect(eng, ps, adapters, [sp] * 3))
        assert eng.spec_stats["accepted"] == 0 and eng.spec_stats["proposed"] > 100
        if arch == "gemma2":
            assert len(widths) == eng.spec_stats["steps"]
        else:
            assert 1 <= len(widths) < eng.spec_stats["steps"] // 4  # now and then, not every step


def test_seeded_sampling_with_filters_and_penalties_is_unchanged(adapter_dirs):
    """Sampling position by position with the request's generator draws it as plain decoding does:
    the same seeded output, with temperature, top-p/k, min-p and penalties (drafts planted from
    the plain output, wrong now and then, so both acceptance and rejection happen)."""
    ps = prompts(4, seed=8)
    adapters = ["mixlora", "milora", "lora", None]
    params = [SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=1, logprobs=2),
              SamplingParams(max_tokens=24, temperature=1.3, top_k=20, seed=2, frequency_penalty=0.5),
              SamplingParams(max_tokens=24, temperature=0.7, min_p=0.05, seed=3, repetition_penalty=1.3,
                             presence_penalty=0.3, logit_bias={7: 5.0}),
              SamplingParams(max_tokens=24, temperature=1.0, seed=4)]
    plain = collect(sharp_engine("llama", adapter_dirs), ps, adapters, params)
    eng = planted("llama", adapter_dirs, [(p, r["token_ids"]) for p, r in zip(ps, plain)], wrong=4)
    assert_same(plain, collect(eng, ps, adapters, params))
    assert eng.spec_stats["accepted"] > 0
    natural = sharp_engine("llama", adapter_dirs, speculative=SPEC)
    assert_same(plain, collect(natural, ps, adapters, params))


def test_guided_json_with_speculation_is_unchanged(adapter_dirs):
    ps = [list(b'{"name": "Ada", "age": '), list(b"Answer in JSON: "), list(b"x")]
    sp = [SamplingParams(max_tokens=60, json_object=True), SamplingParams(max_tokens=40, json_object=True),
          SamplingParams(max_tokens=30, guided_regex=r"(ab|cd){3,9}")]
    adapters = ["mixlora", "lora", "milora"]

    def build(**kw):
        eng = Engine(tiny_model("llama"), ByteTokenizer(), max_batch=4, **kw)
        for n in METHODS:
            eng.load_adapter(n, str(adapter_dirs["llama", n]))
        return eng

    plain = collect(build(), ps, adapters, sp)
    eng = build(speculative=SPEC)
    assert_same(plain, collect(eng, ps, adapters, sp))
    assert eng.spec_stats["accepted"] > 0


def test_prefix_cache_keeps_a_speculative_reply_for_the_next_turn(adapter_dirs):
    """A finished request's keys and values are read around the store's holes: the next turn reuses
    them and still equals the request run without any cache or speculation."""
    turn1 = list(range(3, 23))
    plain_engine = sharp_engine("llama", adapter_dirs, prefix_cache_bytes=0)
    first = plain_engine.generate([turn1], ["mixlora"], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    eng = planted("llama", adapter_dirs, [(turn1, first["token_ids"])], wrong=3)
    got = eng.generate([turn1], ["mixlora"], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    assert got["token_ids"] == first["token_ids"]
    turn2 = turn1 + first["token_ids"] + [7, 8, 9]
    eng.answers[tuple(turn2)] = []
    res = eng.generate([turn2], ["mixlora"], SamplingParams(max_tokens=5))[0]
    assert res["cached_tokens"] == 48
    assert res["token_ids"] == plain_engine.generate([turn2], ["mixlora"], SamplingParams(max_tokens=5))[0]["token_ids"]


def test_abort_and_disable_by_batch_size(adapter_dirs):
    ps = prompts(3, seed=11)
    sp = SamplingParams(max_tokens=20, ignore_eos=True)
    plain = collect(sharp_engine("llama", adapter_dirs), ps, ["lora", "mixlora", "milora"], [sp] * 3)
    eng = planted("llama", adapter_dirs, [(p, r["token_ids"]) for p, r in zip(ps, plain)], wrong=3)
    tokens, reasons = run_aborting_the_second(eng, ps, ["lora", "mixlora", "milora"], sp)
    assert reasons == {"0": "length", "1": "abort", "2": "length"}
    assert tokens["0"] == plain[0]["token_ids"] and tokens["2"] == plain[2]["token_ids"]
    # vLLM's disable_by_batch_size: no speculation while more requests run
    eng = sharp_engine("llama", adapter_dirs, speculative={**SPEC, "disable_by_batch_size": 2})
    assert_same(plain, collect(eng, ps, ["lora", "mixlora", "milora"], [sp] * 3))
    busy = eng.spec_stats["steps"]
    collect(eng, ps[:2], ["lora", "mixlora"], [sp] * 2)
    assert busy == 0 and eng.spec_stats["steps"] > 0
