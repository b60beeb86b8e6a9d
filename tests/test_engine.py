"""The multi-tenant engine: mixed adapters per batch, continuous batching, sampling, stop, the pool.

The oracle is each request run alone: through the engine by itself and through the model's own
``generate`` with that adapter active (greedy), which must give the same tokens.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import moelora
from moelora.engine import Engine, QueueFull, SamplingParams

METHODS = ["lora", "mixlora", "milora", "dora"]


class ToyTokenizer:
    """Token ids as space-separated numbers (enough for the engine's text handling)."""

    eos_token_id, pad_token_id = 2, 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


def prompts(n: int, seed: int = 0, vocab: int = 128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(2, 10, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def engine(arch, adapter_dirs, **kw):
    eng = Engine(tiny_model(arch), ToyTokenizer(), **kw)
    for n in METHODS:
        eng.load_adapter(n, str(adapter_dirs[arch, n]))
    return eng


def hf_alone(model, prompt, adapter, max_new):
    moelora.set_adapter(model, adapter)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, pad_token_id=0, eos_token_id=2)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
def test_mixed_continuous_batch_equals_each_request_alone(arch, adapter_dirs):
    eng = engine(arch, adapter_dirs, max_batch=4)  # 10 requests through 4 slots: joins and leaves
    ps = prompts(10)
    adapters = ["lora", "mixlora", None, "milora", "dora", "mixlora", "milora", "lora", None, "dora"]
    params = [SamplingParams(max_tokens=3 + i % 5) for i in range(10)]  # different lengths
    together = eng.generate(ps, adapters, params)
    for p, a, sp, res in zip(ps, adapters, params, together):
        alone = eng.generate([p], [a], sp)[0]
        assert res["token_ids"] == alone["token_ids"], a
        hf = hf_alone(eng.model, p, a, sp.max_tokens)
        assert res["token_ids"] == hf, a
        assert res["finish_reason"] == ("stop" if 2 in hf else "length")
    assert eng.store.rows == 0 and not eng.has_work()


def test_requests_join_between_steps_and_streams_add_up(adapter_dirs):
    eng = engine("llama", adapter_dirs, max_batch=8)
    ps = prompts(6, seed=3)
    adapters = ["milora", "mixlora", "lora", "dora", None, "milora"]
    sp = SamplingParams(max_tokens=20)
    expected = [hf_alone(eng.model, p, a, 20) for p, a in zip(ps, adapters)]
    got = {i: [] for i in range(6)}
    texts = {i: "" for i in range(6)}
    finished = set()
    step = 0
    while len(finished) < 6:
        if step < 6:  # one new request per step, while the others decode
            eng.add_request(str(step), ps[step], adapters[step], sp)
        for o in eng.step():
            i = int(o.request_id)
            got[i] += o.token_ids
            texts[i] += o.text
            assert o.prompt_tokens == len(ps[i]) and o.completion_tokens == len(got[i])
            if o.finished:
                finished.add(i)
        step += 1
    for i in range(6):
        assert got[i] == expected[i]
        assert texts[i] == "".join(f" {t}" for t in expected[i] if t != 2)


def test_prefill_token_budget_admits_in_arrival_order(adapter_dirs):
    """``max_prefill_tokens`` bounds rows x longest prompt of a step's admissions; a request that does
    not fit waits for the next step, and nothing behind it overtakes it; a longer prompt is prefilled
    in chunks over several steps. Outputs stay those of each request alone."""
    eng = engine("llama", adapter_dirs, max_batch=8, max_prefill_tokens=20)
    ps = [list(range(3, 11)), list(range(11, 19)), list(range(19, 27)), list(range(30, 60)), [5, 6]]
    adapters = ["lora", "mixlora", None, "dora", "lora"]
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    for i, (p, a) in enumerate(zip(ps, adapters)):
        eng.add_request(str(i), p, a, sp)
    got = {str(i): [] for i in range(len(ps))}
    admitted = []
    while eng.has_work():
        before = set(got) - {rid for rid, t in got.items() if t}
        for o in eng.step():
            got[o.request_id] += o.token_ids
        admitted.append(sorted(rid for rid in before if got[rid]))
    # 16 | 8, and the first 12 of the 30 (it does not fit: chunked, in the budget left) | its last 18, and 2
    assert admitted[:3] == [["0", "1"], ["2"], ["3", "4"]]
    for i, (p, a) in enumerate(zip(ps, adapters)):
        assert got[str(i)] == hf_alone(eng.model, p, a, 6), a
    long = engine("llama", adapter_dirs, max_prefill_tokens=20)
    long.add_request("x", ps[3], "dora", sp)
    long.step()
    assert long.prefilling and long.prefilling[0].done == 20  # the first chunk of the 30
    with pytest.raises(ValueError, match="in use by 1 request"):  # its adapter stays while it prefills
        long.unload_adapter("dora")
    long.abort("x")
    assert [o.finish_reason for o in long.step()] == ["abort"] and not long.has_work()
    long.unload_adapter("dora")
    off = engine("llama", adapter_dirs, max_batch=8, max_prefill_tokens=20, chunked_prefill=False)
    for i, (p, a) in enumerate(zip(ps, adapters)):
        off.add_request(str(i), p, a, sp)
    firsts = []
    while off.has_work():
        firsts.append(sorted(o.request_id for o in off.step() if len(o.token_ids) and o.completion_tokens == 1))
    assert firsts[:4] == [["0", "1"], ["2"], ["3"], ["4"]]  # unchunked: the 30 goes in alone, in one step
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        engine("llama", adapter_dirs, max_prefill_tokens=0)


def test_weights_edited_between_runs_are_served_from_the_next_prefill(adapter_dirs):
    """Decoding steps reuse the packed/pooled weights checked at the last prefill; an in-place edit
    made while nothing runs is picked up by the next requests' prefill (and the steps after it)."""
    eng = engine("llama", adapter_dirs, max_batch=8)
    ps = prompts(4, seed=5)
    adapters = ["lora", "dora", "mixlora", "lora"]
    sp = SamplingParams(max_tokens=6)
    before = [r["token_ids"] for r in eng.generate(ps, adapters, sp)]
    with torch.no_grad():
        for n, p in eng.model.named_parameters():
            if (".adapters.dora." in n and "lora_B" in n) or (".mixlora." in n and "experts" in n):
                p.mul_(-4.0)
    after = [r["token_ids"] for r in eng.generate(ps, adapters, sp)]
    for p, a, got in zip(ps, adapters, after):
        assert got == hf_alone(eng.model, p, a, 6), a
    assert after[1] != before[1]


def test_kv_store_grows_compacts_and_keeps_long_generations_exact(adapter_dirs):
    eng = engine("llama", adapter_dirs, max_batch=3)
    ps = [list(range(3, 40)), [5, 6], list(range(50, 60))]
    adapters = ["mixlora", "lora", "milora"]
    params = [SamplingParams(max_tokens=n) for n in (5, 40, 25)]
    res = eng.generate(ps, adapters, params)
    for p, a, sp, r in zip(ps, adapters, params, res):
        assert r["token_ids"] == hf_alone(eng.model, p, a, sp.max_tokens)
    assert eng.store.capacity[1] >= 16 and eng.store.rows == 0


SPEC = {"num_speculative_tokens": 3, "prompt_lookup_max": 2, "prompt_lookup_min": 1}


def run_steps(eng, check=None) -> dict[str, list[int]]:
    """Step ``eng`` until it is idle: each request's tokens (``check(eng)`` after every step)."""
    got: dict[str, list[int]] = {}
    while eng.has_work():
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.token_ids)
        if check is not None:
            check(eng)
    return got


@pytest.mark.parametrize("speculative", [None, SPEC])
def test_kv_cache_budget_without_preemption_reserves_to_the_end(speculative, adapter_dirs):
    """``kv_cache_bytes`` with ``preemption=False``: requests are admitted only while every running
    request fits to its end (rows x the longest prompt + max_tokens); the others wait, in order, and
    the store's buffers never hold more slots than the budget, with speculation's extra columns too.
    Outputs equal those of an engine without a budget; a request that could never fit is refused."""
    g = torch.Generator().manual_seed(2)
    ps = [torch.randint(3, 128, (8,), generator=g).tolist() for _ in range(6)]
    adapters = ["lora", "mixlora", None, "milora", "dora", "lora"]
    params = [SamplingParams(max_tokens=20, ignore_eos=True)] * 6
    free = engine("llama", adapter_dirs, max_batch=8, speculative=speculative)
    assert free.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # 2 x layers x KV heads x head size x 4 bytes (fp32)
    expected = free.generate(ps, adapters, params)
    slots = 3 * (8 + 20 + (4 if speculative else 0))  # three requests at a time
    eng = engine("llama", adapter_dirs, max_batch=8, speculative=speculative, preemption=False,
                 kv_cache_bytes=slots * free.kv_bytes_per_token + 5)
    assert eng.kv_slots == slots
    for i, (p, a, sp) in enumerate(zip(ps, adapters, params)):
        eng.add_request(str(i), p, a, sp)
    most = []

    def check(e):
        most.append(len(e.running))
        rows, cols = e.store.capacity
        assert rows * cols <= slots
        assert e._kv_fits(e.running)

    got = run_steps(eng, check)
    assert [got[str(i)] for i in range(6)] == [r["token_ids"] for r in expected]
    assert max(most) == 3 and eng.num_preemptions == 0
    with pytest.raises(ValueError, match=r"needs \d+ token slots of KV cache, more than the engine's kv_cache_bytes"):
        eng.add_request("big", list(range(3, 40)), None, SamplingParams(max_tokens=slots))
    with pytest.raises(ValueError, match="kv_cache_bytes must be an integer of at least one token"):
        engine("llama", adapter_dirs, kv_cache_bytes=10)


@pytest.mark.parametrize(("speculative", "prefix_mb"), [(None, 1), (SPEC, 1), (None, 0)])
def test_kv_cache_budget_preempts_and_recomputes_without_changing_outputs(speculative, prefix_mb, adapter_dirs):
    """``kv_cache_bytes`` with preemption (the default, vLLM's): requests are admitted by what they
    hold now, so more run at once than a reservation to their ends allows; when the running rows
    outgrow the budget the last to arrive is preempted and later recomputed (prompt + output so far,
    MiLoRA with its prefill's gates, the others through the prefix cache). Every request, of every
    method, greedy or seeded sampling with penalties, gets the tokens of an engine without a budget,
    and the buffers never exceed the budget."""
    g = torch.Generator().manual_seed(3)
    ps = [torch.randint(3, 128, (int(torch.randint(6, 20, (1,), generator=g)),), generator=g).tolist() for _ in range(8)]
    adapters = ["lora", "mixlora", None, "milora", "dora", "milora", "mixlora", "lora"]
    params = [SamplingParams(max_tokens=24, ignore_eos=True) if i % 2 else
              SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.9, seed=i, presence_penalty=0.5)
              for i in range(8)]
    free = engine("llama", adapter_dirs, max_batch=8, speculative=speculative)
    expected = free.generate(ps, adapters, params)
    slots = 4 * 30  # four requests of 30 tokens at a time; a reservation to their ends admits 2 or 3
    eng = engine("llama", adapter_dirs, max_batch=8, speculative=speculative, prefix_cache_bytes=prefix_mb * 2**20,
                 kv_cache_bytes=slots * free.kv_bytes_per_token)
    for i, (p, a, sp) in enumerate(zip(ps, adapters, params)):
        eng.add_request(str(i), p, a, sp)
    most, preempted = [], set()

    def check(e):
        most.append(len(e.running))
        rows, cols = e.store.capacity
        assert rows * cols <= slots
        assert len(e.running) * max((len(r.prompt) + len(r.output) - 1 for r in e.running), default=0) <= slots
        preempted.update(r.id for r in e.waiting if r.output)

    got = run_steps(eng, check)
    assert [got[str(i)] for i in range(8)] == [r["token_ids"] for r in expected]
    assert max(most) >= 4 and eng.num_preemptions >= 3
    methods = {adapters[int(i)] for i in preempted}
    assert "milora" in methods and methods - {"milora"}, methods  # both resume paths ran
    assert (eng.prefix.hits > 0) if prefix_mb else eng.prefix is None
    assert not eng.waiting and eng.store.rows == 0


def test_preemption_takes_the_highest_priority_value_and_a_prefilling_request_too(adapter_dirs):
    """The victim is the request of the highest ``priority`` value (then the last to arrive), even one
    still prefilling in chunks (its partial keys and values are dropped; it starts over). Outputs
    do not change."""
    p_a, p_b, p_c = [5, 6, 7, 8], [9, 10, 11, 12], list(range(20, 44))  # c: 24 tokens
    jobs = {"a": (p_a, "lora", 0, 40), "b": (p_b, "mixlora", 7, 40), "c": (p_c, "dora", 1, 30)}
    params = {n: SamplingParams(max_tokens=m, ignore_eos=True, priority=prio) for n, (_, _, prio, m) in jobs.items()}
    free = engine("llama", adapter_dirs, scheduling_policy="priority")
    expected = {n: free.generate([p], [a], params[n])[0]["token_ids"] for n, (p, a, _, _) in jobs.items()}
    eng = engine("llama", adapter_dirs, scheduling_policy="priority", kv_cache_bytes=3 * 25 * free.kv_bytes_per_token)
    got: dict[str, list[int]] = {}

    def step():
        where = {r.id: "running" for r in eng.running} | {r.id: "prefilling" for r in eng.prefilling}
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.token_ids)
        victims.extend((r.id, where[r.id]) for r in eng.waiting if r.id in where)

    victims: list[tuple[str, str]] = []
    for n in "ab":
        eng.add_request(n, jobs[n][0], jobs[n][1], params[n])
    while len(got.get("a", [])) < 18:  # a's next step needs 4 + 18 = 22 columns; c's prefill needs 25
        step()
    eng.max_prefill_tokens = 1  # c is prefilled a token a step: a outgrows the budget meanwhile
    eng.add_request("c", p_c, "dora", params["c"])
    while eng.has_work():
        step()
    assert got == expected
    assert victims[:2] == [("b", "running"), ("c", "prefilling")], victims  # b: priority 7; c arrived last
    assert eng.num_preemptions == len(victims)


def test_priority_scheduling_admits_lower_values_first(adapter_dirs):
    """``scheduling_policy="priority"`` (vLLM's): waiting requests are admitted by their priority,
    lower first, equal ones in arrival order; running ones are not preempted. Outputs are those of
    each request alone. The default policy refuses a priority rather than ignoring it."""
    eng = engine("llama", adapter_dirs, max_batch=1, scheduling_policy="priority")
    ps = prompts(6, seed=6)
    prio = {"a": 5, "b": 0, "c": 3, "d": 0, "e": -1}
    sp = {k: SamplingParams(max_tokens=3, ignore_eos=True, priority=v) for k, v in prio.items()}
    eng.add_request("first", ps[5], "lora", SamplingParams(max_tokens=3, ignore_eos=True, priority=9))
    got = {"first": [t for o in eng.step() for t in o.token_ids]}  # running alone: the others will not preempt it
    for (k, params), p in zip(sp.items(), ps):
        eng.add_request(k, p, "mixlora", params)
    order = []
    while eng.has_work():
        for o in eng.step():
            if o.request_id not in got:
                order.append(o.request_id)
                got[o.request_id] = []
            got[o.request_id] += o.token_ids
    assert order == ["e", "b", "d", "c", "a"] and len(got["first"]) == 3
    for k, p in zip(sp, ps):
        assert got[k] == hf_alone(eng.model, p, "mixlora", 3)
    fcfs = engine("llama", adapter_dirs)
    with pytest.raises(ValueError, match="priority is only used with scheduling_policy 'priority'"):
        fcfs.add_request("x", [5, 6], None, SamplingParams(priority=1))
    with pytest.raises(ValueError, match="scheduling_policy must be"):
        engine("llama", adapter_dirs, scheduling_policy="lifo")


def test_seeded_sampling_does_not_depend_on_the_batch(adapter_dirs):
    eng = engine("llama", adapter_dirs, max_batch=8)
    ps = prompts(4, seed=5)
    sp = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.8, seed=1234)
    together = eng.generate(ps, ["mixlora", "lora", "milora", None], sp)
    alone = eng.generate([ps[2]], ["milora"], sp)[0]
    assert together[2]["token_ids"] == alone["token_ids"]
    other = eng.generate([ps[2]], ["milora"], SamplingParams(max_tokens=10, temperature=0.9, top_p=0.8, seed=1))[0]
    assert other["token_ids"] != alone["token_ids"]
    greedy = eng.generate([ps[2]], ["milora"], SamplingParams(max_tokens=10))[0]
    assert greedy["token_ids"] != alone["token_ids"]


def test_stop_sequences_are_cut_and_never_streamed(adapter_dirs):
    eng = engine("llama", adapter_dirs)
    p = prompts(1, seed=7)[0]
    full = eng.generate([p], ["lora"], SamplingParams(max_tokens=12))[0]
    tokens = full["token_ids"]
    stop = f" {tokens[4]} {tokens[5]}"  # spans two tokens: held back after the first
    first = full["text"].find(stop)
    streamed = ""
    eng.add_request("s", p, "lora", SamplingParams(max_tokens=12, stop=[stop]))
    final = None
    while eng.has_work():
        for o in eng.step():
            streamed += o.text
            assert stop not in streamed
            if o.finished:
                final = o
    assert final.finish_reason == "stop"
    assert streamed == full["text"][:first]


def test_adapter_pool_evicts_least_recently_used_and_reloads(adapter_dirs):
    eng = engine("llama", adapter_dirs)
    sizes = dict(eng.pool.resident)
    eng.pool.budget = sizes["lora"] + sizes["mixlora"]  # room for these two, not a third
    ps = prompts(4, seed=9)
    sp = SamplingParams(max_tokens=4)
    first = eng.generate(ps, ["lora", "mixlora", "lora", "mixlora"], sp)
    assert set(eng.pool.resident) == {"lora", "mixlora"}  # the two others were least recently used
    loads = eng.pool.loads
    eng.generate(ps[:2], ["milora", "milora"], sp)
    # milora + mixlora is over the budget too: both older ones went, least recently used first
    assert list(eng.pool.resident) == ["milora"]
    again = eng.generate(ps, ["lora", "mixlora", "lora", "mixlora"], sp)  # reloaded from disk
    assert eng.pool.loads == loads + 3 and list(eng.pool.resident) == ["lora", "mixlora"]
    assert [r["token_ids"] for r in again] == [r["token_ids"] for r in first]
    assert first[0]["token_ids"] == hf_alone(eng.model, ps[0], "lora", 4)


def test_adapters_in_use_are_never_evicted(adapter_dirs):
    eng = engine("llama", adapter_dirs, max_batch=8)
    eng.pool.budget = 1  # nothing fits: only what running requests need stays
    ps = prompts(4, seed=2)
    res = eng.generate(ps, METHODS, SamplingParams(max_tokens=5))
    for p, a, r in zip(ps, METHODS, res):
        assert r["token_ids"] == hf_alone(eng.model, p, a, 5)


def test_bad_requests_are_clear_errors(adapter_dirs, tmp_path):
    eng = engine("llama", adapter_dirs, max_queue=2)
    sp = SamplingParams(max_tokens=4)
    with pytest.raises(KeyError, match="unknown adapter 'nope'"):
        eng.add_request("a", [5, 6], "nope", sp)
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        eng.add_request("a", [5] * 253, None, sp)
    with pytest.raises(ValueError, match="token ids in"):
        eng.add_request("a", [5, 999], None, sp)
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add_request("a", [5], None, SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="top_p"):
        eng.add_request("a", [5], None, SamplingParams(top_p=0))
    eng.add_request("a", [5], None, sp)
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("a", [5], None, sp)
    eng.add_request("b", [5], None, sp)
    with pytest.raises(QueueFull):
        eng.add_request("c", [5], None, sp)
    for bad in ("../etc", "a/b", "", "x" * 65, ".hidden"):
        with pytest.raises(ValueError, match="invalid adapter name"):
            eng.load_adapter(bad, str(adapter_dirs["llama", "lora"]))
    with pytest.raises(FileNotFoundError):
        eng.load_adapter("new", str(tmp_path / "missing"))
    from moelora.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no adapter directory at 'someone/nope', and the hub download failed"):
        eng.load_adapter("hub", "someone/nope")  # offline (HF_HUB_OFFLINE=1): fails at once
    assert "hub" not in eng.adapter_names()
    (tmp_path / "junk").mkdir()
    with pytest.raises(Exception, match="adapter_config.json|no adapter"):
        eng.load_adapter("junk", str(tmp_path / "junk"))
    assert "junk" not in eng.adapter_names()
    eng.abort("a")  # a waiting request leaves the queue
    eng.add_request("c", [5, 6], "lora", sp)
    with pytest.raises(ValueError, match="in use"):
        eng.unload_adapter("lora")


def run_aborting_the_second(eng, ps, adapters, sp):
    """Requests "0", "1", "2" added at once, "1" aborted before the third step: the tokens of "0" and
    "2" and every request's finish reason."""
    for i, (p, a) in enumerate(zip(ps, adapters)):
        eng.add_request(str(i), p, a, sp)
    tokens, reasons, step = {"0": [], "2": []}, {}, 0
    while eng.has_work():
        if step == 2:
            eng.abort("1")
        step += 1
        for o in eng.step():
            if o.request_id in tokens:
                tokens[o.request_id] += o.token_ids
            if o.finished:
                reasons[o.request_id] = o.finish_reason
    return tokens, reasons


def test_abort_removes_a_running_request_and_the_rest_stay_exact(adapter_dirs):
    eng = engine("llama", adapter_dirs)
    ps = prompts(3, seed=11)
    tokens, reasons = run_aborting_the_second(eng, ps, ["lora", "mixlora", "milora"], SamplingParams(max_tokens=8))
    assert reasons["1"] == "abort" and reasons["0"] == reasons["2"] == "length"
    assert eng.store.rows == 0
    for i, a in ((0, "lora"), (2, "milora")):
        assert tokens[str(i)] == hf_alone(eng.model, ps[i], a, 8)


def test_streamed_text_holds_back_incomplete_characters_and_stop_prefixes():
    from moelora.engine import _held_back

    assert _held_back("abc", []) == 0
    assert _held_back("ab\ufffd\ufffd", []) == 2  # a character whose bytes are still arriving
    assert _held_back("hello wor", ["world"]) == 3  # may still become the stop sequence
    assert _held_back("hello", ["lo!", "xyz"]) == 2
    assert _held_back("x\ufffd", ["\ufffdy"]) == 1


def test_an_adapter_that_cannot_be_reloaded_fails_its_requests_only(adapter_dirs, tmp_path):
    import shutil

    eng = engine("llama", adapter_dirs)
    shutil.copytree(adapter_dirs["llama", "lora"], tmp_path / "gone")
    eng.load_adapter("gone", str(tmp_path / "gone"))
    eng.pool.budget = 1  # everything idle is evicted
    eng.generate([[5, 6]], ["mixlora"], SamplingParams(max_tokens=2))
    assert "gone" not in eng.pool.resident
    shutil.rmtree(tmp_path / "gone")  # its directory disappears while it is evicted
    ps = prompts(2, seed=4)
    res = eng.generate(ps, ["gone", "lora"], SamplingParams(max_tokens=3))
    assert res[0]["finish_reason"] == "error" and "gone" in res[0]["text"]
    assert res[1]["token_ids"] == hf_alone(eng.model, ps[1], "lora", 3)


def hf_logits(model, prompt, adapter, max_new):
    """The raw logits of each step of the model's own greedy ``generate`` with ``adapter`` active."""
    moelora.set_adapter(model, adapter)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, pad_token_id=0,
                         eos_token_id=2, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), [x[0].float() for x in out.logits]


@pytest.mark.parametrize("method", [*METHODS, None])
def test_logprobs_are_the_models_raw_log_probabilities(method, adapter_dirs):
    """Each output token's logprob and top-k equal log_softmax of the model's own logits at that step
    (greedy ``generate`` as the oracle, MiLoRA's prefill routing included), whatever the batch, and
    do not depend on the temperature; the token texts concatenate to the output text."""
    eng = engine("llama", adapter_dirs, max_batch=4)
    ps = prompts(3, seed=11)
    others = ["lora", "mixlora", "milora"]
    params = [SamplingParams(max_tokens=6, logprobs=3), SamplingParams(max_tokens=5), SamplingParams(max_tokens=4)]
    res = eng.generate(ps, [method, *others[:2]], params)[0]
    assert "logprobs" not in eng.generate([ps[1]], [others[0]], params[1])[0]  # only when asked
    tokens, logits = hf_logits(eng.model, ps[0], method, 6)
    assert res["token_ids"] == tokens
    lps = res["logprobs"]
    n = len(tokens) - (1 if res["finish_reason"] == "stop" else 0)  # an EOS token has no entry
    assert [e.token_id for e in lps] == tokens[:n] and n > 0
    assert "".join(e.token for e in lps) == res["text"]
    assert [e.offset for e in lps] == [len("".join(e.token for e in lps[:i])) for i in range(n)]
    for e, step in zip(lps, logits):
        ref = step.log_softmax(-1)
        assert e.logprob == pytest.approx(float(ref[e.token_id]), abs=1e-4)
        top = ref.topk(3)
        assert [t for t, _, _ in e.top] == top.indices.tolist()
        assert [v for _, _, v in e.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [s for _, s, _ in e.top] == [f" {t}" for t in top.indices.tolist()]
    hot = eng.generate([ps[0]], [method], SamplingParams(max_tokens=1, temperature=1.7, seed=3, logprobs=3))[0]
    first = hot["logprobs"][0]  # (seeded: not EOS) raw logits: the logprob and top-k ignore the temperature
    assert first.logprob == pytest.approx(float(logits[0].log_softmax(-1)[first.token_id]), abs=1e-4)
    assert [t for t, _, _ in first.top] == [t for t, _, _ in lps[0].top]
    assert [v for _, _, v in first.top] == pytest.approx([v for _, _, v in lps[0].top], abs=1e-5)


def test_logprobs_follow_stop_sequence_cuts_and_streaming(adapter_dirs):
    eng = engine("llama", adapter_dirs)
    p = prompts(1, seed=7)[0]
    full = eng.generate([p], ["lora"], SamplingParams(max_tokens=12, logprobs=0))[0]
    tokens = full["token_ids"]
    assert all(e.top == [] for e in full["logprobs"])
    stop = f"{tokens[3]} {tokens[4]}"  # starts inside token 3's text " {t3}": the cut keeps its leading space
    eng.add_request("s", p, "lora", SamplingParams(max_tokens=12, stop=[stop], logprobs=2))
    streamed, released = "", []
    while eng.has_work():
        for o in eng.step():
            streamed += o.text
            released += o.logprobs
            # a token's logprob is released with the last of its text (never before any of it)
            assert streamed.startswith("".join(e.token for e in released))
    assert streamed == full["text"][: full["text"].find(stop)] == "".join(e.token for e in released)
    assert [e.token_id for e in released] == tokens[:4] and released[3].token == " "
    assert [e.logprob for e in released] == [e.logprob for e in full["logprobs"][:4]]
    with pytest.raises(ValueError, match="logprobs"):
        eng.add_request("bad", p, "lora", SamplingParams(logprobs=21))


class ByteTokenizer:
    """Token ids as UTF-8 bytes: a multi-byte character spans several tokens."""

    eos_token_id, pad_token_id = 2, 0

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("max_tokens", [2, 4])
def test_logprob_tokens_split_multibyte_characters_like_the_text(max_tokens):
    """A token ending inside a UTF-8 character gets no text; the one completing it gets the character; a
    request that finishes inside one gives the replacement character to its last token, as the text has it."""
    from moelora.engine import _Request

    eng = Engine(tiny_model("llama"), ByteTokenizer())
    r = _Request("x", [65], None, SamplingParams(max_tokens=max_tokens, logprobs=0), None, 0.0)
    eng.ids.add("x")
    outs = []
    for i, tok in enumerate([0x41, 0xC3, 0xA9, 0x42][:max_tokens]):
        r.lps.append((-float(i), []))
        outs.append(eng._emit(r, tok))
    entries = [e for o in outs for e in o.logprobs]
    text = "".join(o.text for o in outs)
    assert "".join(e.token for e in entries) == text
    if max_tokens == 2:
        assert text == "A\ufffd" and [e.token for e in entries] == ["A", "\ufffd"]
    else:
        assert text == "A\u00e9B" and [e.token for e in entries] == ["A", "", "\u00e9", "B"]
        assert [e.offset for e in entries] == [0, 1, 1, 2] and [e.logprob for e in entries] == [0, -1, -2, -3]


@pytest.mark.parametrize("method", [*METHODS, None])
def test_prompt_logprobs_equal_a_forward_on_the_prompt(method, adapter_dirs):
    """``prompt_logprobs``: each prompt token's log-probability given the ones before it is log_softmax of
    the model's own forward on the prompt with that adapter (MiLoRA routes on the prompt, as at prefill),
    in a mixed batch where the other rows do not ask (left padding included)."""
    eng = engine("llama", adapter_dirs, max_batch=4)
    ps = prompts(3, seed=5)
    ps[0] = ps[0][:3]  # the shortest row: left-padded in the batch
    params = [SamplingParams(max_tokens=2, prompt_logprobs=2), SamplingParams(max_tokens=2),
              SamplingParams(max_tokens=2, logprobs=1)]
    res = eng.generate(ps, [method, "mixlora", "milora"], params)
    assert "prompt_logprobs" not in res[1] and "prompt_logprobs" not in res[2]
    plp = res[0]["prompt_logprobs"]
    moelora.set_adapter(eng.model, method)
    with torch.no_grad():
        ref = eng.model(torch.tensor([ps[0]])).logits[0].float().log_softmax(-1)
    assert [e.token_id for e in plp] == ps[0]
    assert plp[0].logprob is None and plp[0].top == []
    for j, e in enumerate(plp[1:], 1):
        assert e.logprob == pytest.approx(float(ref[j - 1, ps[0][j]]), abs=1e-4)
        assert [t for t, _, _ in e.top] == ref[j - 1].topk(2).indices.tolist()
    assert "".join(e.token for e in plp) == ToyTokenizer().decode(ps[0])
    assert [e.offset for e in plp] == [len("".join(e.token for e in plp[:i])) for i in range(len(plp))]
    assert res[0]["token_ids"] == eng.generate([ps[0]], [method], SamplingParams(max_tokens=2))[0]["token_ids"]
    one = eng.generate([[5]], [method], SamplingParams(max_tokens=1, prompt_logprobs=1))[0]["prompt_logprobs"]
    assert [(e.token_id, e.logprob, e.top) for e in one] == [(5, None, [])]  # a one-token prompt


def test_penalties_and_top_k_follow_their_definitions(adapter_dirs):
    """Greedy with OpenAI's penalties equals a reference loop over the model's own logits minus
    ``frequency * count + presence * (count > 0)`` of each token in the output so far; top_k=1 sampling
    is greedy whatever the temperature."""
    eng = engine("llama", adapter_dirs, max_batch=4)
    ps = prompts(3, seed=7)
    pen = SamplingParams(max_tokens=10, presence_penalty=-1.5, frequency_penalty=0.6)
    res = eng.generate(ps, ["lora", "mixlora", None], [pen, SamplingParams(max_tokens=10), pen])
    moelora.set_adapter(eng.model, "lora")
    out = []
    with torch.no_grad():
        for _ in range(10):
            logits = eng.model(torch.tensor([ps[0] + out])).logits[0, -1].float()
            for t in set(out):
                logits[t] -= 0.6 * out.count(t) - 1.5
            out.append(int(logits.argmax()))
            if out[-1] == 2:
                break
    assert res[0]["token_ids"] == out
    assert max(out.count(t) for t in out) >= 2  # a token repeats: the frequency term mattered
    plain = eng.generate([ps[0]], ["lora"], SamplingParams(max_tokens=10))[0]["token_ids"]
    assert plain != out  # the penalty changed the output (the tiny model repeats itself)
    assert res[1]["token_ids"] == eng.generate([ps[1]], ["mixlora"], SamplingParams(max_tokens=10))[0]["token_ids"]
    hot = SamplingParams(max_tokens=8, temperature=1.9, top_k=1, seed=4)
    assert eng.generate([ps[2]], [None], hot)[0]["token_ids"] == eng.generate(
        [ps[2]], [None], SamplingParams(max_tokens=8))[0]["token_ids"]
    first = plain[0]
    biased = eng.generate([ps[0]], ["lora"], SamplingParams(max_tokens=4, logit_bias={first: -100, 77: 5.5}, logprobs=1))[0]
    moelora.set_adapter(eng.model, "lora")
    with torch.no_grad():
        ref = eng.model(torch.tensor([ps[0]])).logits[0, -1].float()
    ref[first] -= 100
    ref[77] += 5.5
    assert biased["token_ids"][0] == int(ref.argmax()) != first
    e = biased["logprobs"][0]  # logprobs stay the raw model's: its top token is still the unbiased argmax
    assert e.top[0][0] == first and e.logprob < e.top[0][2] - 1e-3
    forced = eng.generate([ps[0]], ["lora"], SamplingParams(max_tokens=4, logit_bias={77: 100}))[0]
    assert forced["token_ids"] == [77] * 4
    for bad in (SamplingParams(top_k=-1), SamplingParams(presence_penalty=2.5), SamplingParams(frequency_penalty="1"),
                SamplingParams(logit_bias={5: 101}), SamplingParams(logit_bias={"5": 1}),
                SamplingParams(logit_bias={10**6: 1})):
        with pytest.raises(ValueError):
            eng.add_request("bad", ps[0], None, bad)


def test_vllm_sampling_extras_follow_their_definitions(adapter_dirs):
    """repetition_penalty equals transformers' own (``generate(repetition_penalty=)``, greedy, over the
    prompt's and the output's tokens); min_tokens keeps EOS, stop tokens and stop sequences from ending
    the output early; stop_token_ids end it like EOS; ignore_eos runs to max_tokens; min_p keeps only
    tokens at least min_p x as likely as the most likely one."""
    eng = engine("llama", adapter_dirs, max_batch=4)
    ps = prompts(3, seed=11)
    # repetition penalty: the model's own generate is the oracle, per adapter, in one mixed batch
    plain = eng.generate([ps[0]], ["lora"], SamplingParams(max_tokens=10))[0]["token_ids"]
    echo = ps[0] + plain[:2]  # a prompt holding the tokens the model goes on with: the prompt's part matters
    rep = SamplingParams(max_tokens=10, repetition_penalty=1.7)
    res = eng.generate([*ps, echo], ["lora", "mixlora", None, "lora"], rep)
    for prompt, adapter, r in zip([*ps, echo], ["lora", "mixlora", None, "lora"], res, strict=True):
        moelora.set_adapter(eng.model, adapter)
        out = eng.model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                                 eos_token_id=2, repetition_penalty=1.7)
        assert r["token_ids"] == out[0, len(prompt):].tolist()
    assert res[0]["token_ids"] != plain  # the penalty mattered
    # EOS forced by a logit bias: min_tokens holds it back, then it ends the output
    eos_now = SamplingParams(max_tokens=6, logit_bias={2: 100})
    assert eng.generate([ps[0]], ["lora"], eos_now)[0]["token_ids"] == [2]
    held = eng.generate([ps[0]], ["lora"], SamplingParams(max_tokens=6, logit_bias={2: 100}, min_tokens=3))[0]
    moelora.set_adapter(eng.model, "lora")
    ref = []
    with torch.no_grad():
        for _ in range(3):
            logits = eng.model(torch.tensor([ps[0] + ref])).logits[0, -1].float()
            logits[2] = float("-inf")
            ref.append(int(logits.argmax()))
    assert held["token_ids"] == ref + [2] and held["finish_reason"] == "stop"
    assert held["text"] == "".join(f" {t}" for t in ref)  # EOS's text is not in the output
    # ignore_eos: EOS after EOS up to max_tokens
    ign = eng.generate([ps[0]], ["lora"], SamplingParams(max_tokens=4, logit_bias={2: 100}, ignore_eos=True))[0]
    assert ign["token_ids"] == [2] * 4 and ign["finish_reason"] == "length"
    # stop_token_ids: the output ends at the first one, its text left out; min_tokens defers it
    stop_at = plain[2]
    first = plain.index(stop_at)
    st = eng.generate([ps[0]], ["lora"], SamplingParams(max_tokens=10, stop_token_ids=[stop_at]))[0]
    assert st["token_ids"] == plain[:first + 1] and st["finish_reason"] == "stop"
    assert st["text"] == "".join(f" {t}" for t in plain[:first])
    late = eng.generate([ps[0]], ["lora"], SamplingParams(max_tokens=10, stop_token_ids=[stop_at],
                                                          min_tokens=first + 2))[0]
    assert len(late["token_ids"]) >= first + 2 and late["token_ids"][:first + 1] != plain[:first + 1]
    # a stop sequence ending within the first min_tokens - 1 tokens does not count, a later one does
    def deferred(seq, m):  # vLLM's rule on the greedy output: (tokens, text) where the output ends
        for k in range(max(m, 1), 11):
            text, before = "".join(f" {t}" for t in plain[:k]), len("".join(f" {t}" for t in plain[:m - 1]))
            i = text.find(seq, max(0, before - len(seq) + 1))
            if i >= 0:
                return k, text[:i]
        return 10, text

    seq = f" {plain[0]}"
    assert eng.generate([ps[0]], ["lora"], SamplingParams(max_tokens=10, stop=[seq]))[0]["text"] == ""
    kept = eng.generate([ps[0]], ["lora"], SamplingParams(max_tokens=10, stop=[seq, seq + "9"],
                                                          include_stop_str_in_output=True))[0]
    assert (kept["text"], kept["finish_reason"], len(kept["token_ids"])) == (seq, "stop", 1)
    for m in (2, 3):
        r = eng.generate([ps[0]], ["lora"], SamplingParams(max_tokens=10, stop=[seq], min_tokens=m))[0]
        assert (len(r["token_ids"]), r["text"]) == deferred(seq, m)
    assert deferred(seq, 3)[0] > 3  # the case where an earlier occurrence must not end the output at once
    # min_p: every sampled token is at least min_p x as likely as the best one (temperature applied);
    # min_p = 1 keeps the best token only (greedy)
    def min_ratio(out):  # of each sampled token's probability to the best one's, over the output
        moelora.set_adapter(eng.model, None)
        with torch.no_grad():
            logits = eng.model(torch.tensor([ps[1] + out[:-1]])).logits[0, len(ps[1]) - 1:].float()
        probs = (logits / 1.5).softmax(-1)
        return float((probs.gather(1, torch.tensor(out).unsqueeze(1)).squeeze(1) / probs.max(-1).values).min())

    out = eng.generate([ps[1]], [None], SamplingParams(max_tokens=12, temperature=1.5, min_p=0.6, seed=3))[0]
    assert min_ratio(out["token_ids"]) >= 0.6 - 1e-5
    free = eng.generate([ps[1]], [None], SamplingParams(max_tokens=12, temperature=1.5, seed=3))[0]["token_ids"]
    assert min_ratio(free) < 0.6  # without min_p the same seed samples tokens that min_p excludes
    greedy = eng.generate([ps[1]], [None], SamplingParams(max_tokens=12))[0]["token_ids"]
    assert eng.generate([ps[1]], [None], SamplingParams(max_tokens=12, temperature=1.5, min_p=1.0, seed=3))[0][
        "token_ids"] == greedy
    for bad in (SamplingParams(repetition_penalty=0), SamplingParams(min_p=1.5), SamplingParams(min_tokens=5, max_tokens=4),
                SamplingParams(stop_token_ids=[-1]), SamplingParams(stop_token_ids=[10**6]),
                SamplingParams(ignore_eos=1), SamplingParams(include_stop_str_in_output="yes")):
        with pytest.raises(ValueError):
            eng.add_request("bad", ps[0], None, bad)


# ---------------------------------------------------------------------------------------------
# Prefix caching


def shared_prefix_prompts(n: int, seed: int = 0, head: int = 40, step: int = 7):
    """``n`` prompts that start with 40, 47, 54, ... tokens of one shared "system prompt"."""
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(3, 128, (head + step * n,), generator=g).tolist()
    return [system[: head + step * i] + torch.randint(3, 128, (3 + 5 * i,), generator=g).tolist() for i in range(n)]


def sharp_engine(arch, adapter_dirs, **kw):
    """An engine whose base attends sharply (query/key weights x 8): a random tiny model's attention
    is nearly uniform, so keys at wrong positions would hardly change its outputs."""
    eng = engine(arch, adapter_dirs, **kw)
    with torch.no_grad():
        for n, q in eng.model.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")) and ".adapters." not in n:
                q.mul_(8.0)
    return eng


def assert_alone(eng, prompt, adapter, res, max_new):
    """``res`` (asked with logprobs=20) equals the model's own greedy generate: tokens and logprobs."""
    tokens, logits = hf_logits(eng.model, prompt, adapter, max_new)
    assert res["token_ids"] == tokens, adapter
    for e, step in zip(res["logprobs"], logits):
        ref = step.log_softmax(-1)
        assert e.logprob == pytest.approx(float(ref[e.token_id]), abs=2e-4), adapter
        assert [v for _, _, v in e.top] == pytest.approx(ref.topk(20).values.tolist(), abs=2e-4), adapter


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
def test_prefix_cache_hits_give_each_request_alone(arch, adapter_dirs):
    """Prompts sharing a prefix with earlier ones prefill only their rest, in batches that mix cached
    and uncached rows with different cached and uncached lengths (gemma2: past its 64-token sliding
    window), and every output equals the request run alone without a cache. MiLoRA never hits."""
    eng = sharp_engine(arch, adapter_dirs, max_batch=8)
    ps = shared_prefix_prompts(6)
    adapters = ["lora", "mixlora", None, "dora", "milora", "lora"]
    sp = SamplingParams(max_tokens=5, logprobs=20)
    first = eng.generate(ps[:1] + ps[2:4], ["lora", None, "dora"], sp)  # fills the cache: 2, 4 and 4 blocks
    for o, p, a in zip(first, ps[:1] + ps[2:4], ["lora", None, "dora"]):
        assert_alone(eng, p, a, o, 5)
    cached, got = {}, {i: {"token_ids": [], "logprobs": []} for i in range(len(ps))}
    for i, (p, a) in enumerate(zip(ps, adapters)):
        eng.add_request(str(i), p, a, sp)
    while eng.has_work():
        for o in eng.step():
            res = got[int(o.request_id)]
            if not res["token_ids"]:
                cached[int(o.request_id)] = o.cached_tokens
            res["token_ids"] += o.token_ids
            res["logprobs"] += o.logprobs or []
    for i, (p, a) in enumerate(zip(ps, adapters)):
        assert_alone(eng, p, a, got[i], 5)
    # lora: its own 2 blocks (ps[5] shares them too); base: 4; dora: the 4 full blocks of ps[3];
    # mixlora and milora: nothing cached before
    assert cached == {0: 32, 1: 0, 2: 64, 3: 64, 4: 0, 5: 32}
    assert all(b.scope[0] != "milora" for b in eng.prefix.entries.values())
    assert eng.prefix.hits == 32 + 64 + 64 + 32


def test_prefix_cache_shares_a_burst_of_one_system_prompt(adapter_dirs):
    """Requests admitted together with the same system prompt (or the same prompt twice, as ``n``
    copies) compute its blocks once: the first in the step's first round, the others on top of them
    in a second round. MiLoRA rows never wait. Outputs equal each request alone."""
    eng = sharp_engine("llama", adapter_dirs, max_batch=8)
    system = list(range(3, 43))  # 40 tokens: 2 full blocks
    ps = [system + [50 + i] * (3 + i) for i in range(3)] + [system + [50, 50, 50], system + [99]]
    adapters = ["lora", "lora", "dora", "lora", "milora"]
    sp = SamplingParams(max_tokens=3, logprobs=20)
    for i, (p, a) in enumerate(zip(ps, adapters)):
        eng.add_request(str(i), p, a, sp)
    got = {str(i): {"token_ids": [], "logprobs": []} for i in range(len(ps))}
    cached = {}
    while eng.has_work():
        for o in eng.step():
            if not got[o.request_id]["token_ids"]:
                cached[o.request_id] = (o.cached_tokens, eng.steps)
            got[o.request_id]["token_ids"] += o.token_ids
            got[o.request_id]["logprobs"] += o.logprobs or []
    assert {step for _, step in cached.values()} == {1}  # both rounds in the first step
    cached = {rid: n for rid, (n, _) in cached.items()}
    assert cached == {"0": 0, "1": 32, "2": 0, "3": 32, "4": 0}  # dora: another scope; 3 repeats 0
    for i, (p, a) in enumerate(zip(ps, adapters)):
        assert_alone(eng, p, a, got[str(i)], 3)


@pytest.mark.parametrize("adapter", ["mixlora", None])
def test_prefix_cache_keeps_the_reply_for_the_next_turn(adapter, adapter_dirs):
    """A finished request's prompt and output are cached (but the last token, never fed): a next
    turn that repeats them reuses them and still equals the request run alone. Aborted: not cached."""
    eng = sharp_engine("llama", adapter_dirs)
    turn1 = list(range(3, 23))  # 20 tokens: one full block
    sp = SamplingParams(max_tokens=30, logprobs=20, ignore_eos=True)
    first = eng.generate([turn1], [adapter], sp)[0]
    assert_alone(eng, turn1, adapter, first, 30)
    turn2 = turn1 + first["token_ids"] + [7, 8, 9]  # 53 tokens
    eng.add_request("t2", turn2, adapter, SamplingParams(max_tokens=4, logprobs=20))
    got = {"token_ids": [], "logprobs": []}
    cached = []
    while eng.has_work():
        for o in eng.step():
            cached.append(o.cached_tokens)
            got["token_ids"] += o.token_ids
            got["logprobs"] += o.logprobs or []
    assert cached[0] == 48  # blocks 1-3 of 20 + 29 fed tokens
    assert_alone(eng, turn2, adapter, got, 4)
    before = len(eng.prefix.entries)
    eng.add_request("a", list(range(30, 50)), adapter, SamplingParams(max_tokens=40, ignore_eos=True))
    for _ in range(25):
        eng.step()
    eng.abort("a")
    eng.step()
    assert len(eng.prefix.entries) == before + 1  # the prompt's block only


def test_prefix_cache_follows_adapter_edits_and_reloads(adapter_dirs, tmp_path):
    """An adapter's weights edited in place, or another adapter loaded under the same name, is a new
    scope: no stale keys/values are reused."""
    eng = engine("llama", adapter_dirs)
    p = shared_prefix_prompts(1)[0]
    sp = SamplingParams(max_tokens=5)
    eng.generate([p], ["lora"], sp)
    assert eng.generate([p], ["lora"], sp)[0]["token_ids"] == hf_alone(eng.model, p, "lora", 5)
    assert eng.prefix.hits == 32
    with torch.no_grad():
        for n, q in eng.model.named_parameters():
            if ".adapters.lora." in n and "lora_B" in n:
                q.mul_(-3.0)
    edited = eng.generate([p], ["lora"], sp)[0]["token_ids"]
    assert eng.prefix.hits == 32 and edited == hf_alone(eng.model, p, "lora", 5)
    eng.unload_adapter("lora")
    assert not any(b.scope[0] == "lora" for b in eng.prefix.entries.values())
    eng.load_adapter("lora", str(adapter_dirs["llama", "dora"]))  # another adapter, the same name
    assert eng.generate([p], ["lora"], sp)[0]["token_ids"] == hf_alone(eng.model, p, "lora", 5)
    assert eng.prefix.hits == 32


def test_prefix_cache_off_and_prompt_logprobs_compute_everything(adapter_dirs):
    eng = engine("llama", adapter_dirs)
    p = list(range(3, 51))  # 3 full blocks: the last token is computed again, so 2 blocks hit
    first = eng.generate([p], [None], SamplingParams(max_tokens=4))[0]
    again = eng.generate([p], [None], SamplingParams(max_tokens=4))[0]
    assert eng.prefix.hits == 32 and again["token_ids"] == first["token_ids"] == hf_alone(eng.model, p, None, 4)
    assert (first["cached_tokens"], again["cached_tokens"]) == (0, 32)
    p = shared_prefix_prompts(1)[0]
    off = engine("llama", adapter_dirs, prefix_cache_bytes=0)
    assert off.prefix is None
    a = off.generate([p, p], ["lora", "lora"], SamplingParams(max_tokens=4))
    eng = engine("llama", adapter_dirs)
    eng.generate([p], ["lora"], SamplingParams(max_tokens=4))
    res = eng.generate([p], ["lora"], SamplingParams(max_tokens=4, prompt_logprobs=0))[0]
    assert eng.prefix.hits == 0 and len(res["prompt_logprobs"]) == len(p)
    assert res["token_ids"] == a[0]["token_ids"] == a[1]["token_ids"]


def test_prefix_cache_evicts_least_recent_chains_from_their_end():
    from moelora.engine import PrefixCache

    def kv(n=1):
        return [torch.zeros(1, 4, 2)], [torch.zeros(1, 4, 2)]  # 64 bytes per block

    cache = PrefixCache(budget_bytes=5 * 64, block=4)
    a, b = list(range(12)), list(range(100, 112))
    chain: list = []
    for _ in range(3):
        assert cache.add(("", 0), a, chain, *kv())
    other: list = []
    for _ in range(2):
        assert cache.add(("x", 1), b, other, *kv())
    assert cache.bytes == 5 * 64 and len(cache.lookup(("", 0), a, 12)) == 3
    assert cache.lookup(("", 0), b, 12) == []  # another scope: nothing
    # a new block evicts the least recent chain's last block first, never leaving an unreachable tail
    assert cache.add(("y", 1), list(range(4)), [], *kv())
    assert len(cache.lookup(("x", 1), b, 12)) == 1 and len(cache.lookup(("", 0), a, 12)) == 3
    assert cache.lookup(("", 0), a, 7) == cache.lookup(("", 0), a, 12)[:1]  # at most `limit` tokens
    assert not cache.add(("z", 1), a, [], [torch.zeros(1, 40, 2)], [torch.zeros(1, 40, 2)])  # over the budget
    cache.drop("x")
    assert cache.lookup(("x", 1), b, 12) == [] and cache.bytes == 4 * 64


@pytest.mark.parametrize("arch,budget", [("llama", 400), ("gemma2", 400), ("llama", 24), ("gemma2", 24)])
def test_prefix_cache_random_traffic_equals_each_request_alone(arch, budget, adapter_dirs):
    """Seeded random traffic: bursts of prompts drawn from a few shared heads, chats' next turns
    (an earlier prompt + its reply), every method and the base, aborts, a prefix cache small enough
    to evict all the time and a small prefill budget (gemma2: prompts past its sliding window;
    budget 24: most prompts prefilled in chunks, from cached blocks or not, while others decode).
    Every request that was not aborted equals itself run alone with no cache (tokens and
    log-probabilities)."""
    eng = sharp_engine(arch, adapter_dirs, max_batch=8, prefix_cache_bytes=400_000, max_prefill_tokens=budget)
    ref = sharp_engine(arch, adapter_dirs, prefix_cache_bytes=0)
    g = torch.Generator().manual_seed(7)

    def rand(n):
        return torch.randint(3, 128, (n,), generator=g).tolist()

    def pick(seq):
        return seq[int(torch.randint(0, len(seq), (1,), generator=g))]

    heads = [rand(n) for n in (40, 70, 90)]
    choices = ["lora", "lora", "mixlora", None, None, "dora", "milora"]
    sent, got, lps, aborted, chunks = {}, {}, {}, set(), 0
    while len(sent) < 40 or eng.has_work():
        for _ in range(int(torch.randint(0, 6, (1,), generator=g))):
            if len(sent) == 40:
                break
            head = pick(heads)
            prompt = head[: int(torch.randint(30, len(head) + 1, (1,), generator=g))] + rand(pick(range(1, 20)))
            adapter = pick(choices)
            done = [rid for rid in sent if rid not in aborted and rid not in eng.ids]
            if done and torch.rand(1, generator=g) < 0.4:  # a chat's next turn: an earlier prompt + reply
                old = sent[pick(done)]
                prompt, adapter = old[0] + got[old[2]] + rand(3), old[1]
            rid = str(len(sent))
            sent[rid], got[rid], lps[rid] = (prompt, adapter, rid), [], []
            eng.add_request(rid, prompt, adapter, SamplingParams(max_tokens=pick(range(1, 24)), ignore_eos=True,
                                                                 logprobs=0))
        if torch.rand(1, generator=g) < 0.1 and eng.running + eng.prefilling:
            victim = pick(eng.running + eng.prefilling).id
            eng.abort(victim)
            aborted.add(victim)
        chunks += bool(eng.prefilling)
        for o in eng.step():
            got[o.request_id] += o.token_ids
            lps[o.request_id] += [e.logprob for e in o.logprobs or []]
    assert eng.prefix.hits >= 300 and len(aborted) >= 2
    assert (chunks > 20) == (budget < 40)  # steps that began with a prompt part-prefilled
    assert eng.prefix.bytes <= 400_000 and eng.prefix._ids * 8192 > 400_000  # blocks were evicted
    for rid, (prompt, adapter, _) in sent.items():
        if rid not in aborted:
            alone = ref.generate([prompt], [adapter], SamplingParams(max_tokens=len(got[rid]), ignore_eos=True,
                                                                     logprobs=0))[0]
            assert got[rid] == alone["token_ids"], (rid, adapter)
            assert lps[rid] == pytest.approx([e.logprob for e in alone["logprobs"]], abs=1e-4), (rid, adapter)


# ---------------------------------------------------------------------------------------------
# JSON mode


def json_oracle(model, prompt, adapter, n, eos=2):
    """Constrained greedy by hand for JSON mode (``guided_oracle`` with the engine's JSON guide)."""
    from moelora.structured import JsonPrefix

    return guided_oracle(model, prompt, adapter, n, JsonPrefix(max_ws=64, leading_ws=False), eos)


@pytest.mark.parametrize("adapter", ["mixlora", "milora", None])
def test_json_mode_greedy_is_the_constrained_argmax(adapter, adapter_dirs):
    eng = Engine(tiny_model("llama"), ByteTokenizer(), max_batch=4)
    for n in METHODS:
        eng.load_adapter(n, str(adapter_dirs["llama", n]))
    ps = [list(b'{"name": "Ada", "age": '), list(b"Answer in JSON: "), list(b"x")]
    sp = SamplingParams(max_tokens=60, json_object=True)
    adapters = [adapter, "lora", "dora"]
    res = eng.generate(ps, adapters, sp)  # batched with others
    for p, a, r in zip(ps, adapters, res):
        assert r["token_ids"] == json_oracle(eng.model, p, a, 60), a
    for r in res:
        from moelora.structured import JsonPrefix

        state = JsonPrefix()
        assert state.feed(r["text"]), r["text"]  # always a valid prefix
        if r["finish_reason"] == "stop":
            assert state.complete and isinstance(__import__("json").loads(r["text"]), dict)


def test_json_mode_sampling_is_valid_seeded_and_ends_the_object(adapter_dirs):
    import json

    from moelora.structured import JsonPrefix

    eng = Engine(tiny_model("llama"), ByteTokenizer(), max_batch=4)
    eng.load_adapter("lora", str(adapter_dirs["llama", "lora"]))
    sp = SamplingParams(max_tokens=120, temperature=1.0, seed=5, json_object=True)
    first = eng.generate([[5, 6, 7]], ["lora"], sp)[0]
    again = eng.generate([[5, 6, 7], [9, 9]], ["lora", None], [sp, SamplingParams(max_tokens=3)])[0]
    assert first["token_ids"] == again["token_ids"]  # seeded: not the batch
    finished = 0
    for seed in range(8):
        r = eng.generate([[5, 6, 7]], ["lora"], SamplingParams(max_tokens=120, temperature=1.0, seed=seed,
                                                                json_object=True, top_p=0.95))[0]
        state = JsonPrefix()
        assert state.feed(r["text"]), r["text"]
        if r["finish_reason"] == "stop":
            finished += 1
            assert isinstance(json.loads(r["text"]), dict) and r["token_ids"][-1] == 2
    assert finished >= 1
    with pytest.raises(ValueError, match="json_object"):
        eng.add_request("bad", [5], None, SamplingParams(json_object=1))


def guided_oracle(model, prompt, adapter, n, guide, eos=2):
    """Greedy under a guide by hand, through the model's own ``generate`` (MiLoRA routes at its
    prefill): a logits processor keeps only the most likely byte that keeps the guide's prefix valid,
    or EOS where the text is complete and EOS scores higher (at once for a closed JSON object)."""
    from transformers import LogitsProcessor

    class OnlyValid(LogitsProcessor):
        def __call__(self, input_ids, scores):
            state = guide.copy()
            assert state.feed(bytes(input_ids[0, len(prompt):].tolist()).decode("latin-1"))
            keep = eos if state.final else next(  # a closed JSON object ends at once
                t for t in scores[0].argsort(descending=True).tolist()
                if (t == eos and state.complete) or (t != eos and state.copy().feed(bytes([t]).decode("latin-1"))))
            out = torch.full_like(scores, float("-inf"))
            out[0, keep] = 0.0
            return out

    moelora.set_adapter(model, adapter)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=eos,
                         logits_processor=[OnlyValid()])
    return out[0, len(prompt):].tolist()


def test_guided_regex_choice_and_grammar_are_the_constrained_argmax(adapter_dirs):
    from moelora.structured import guide_for

    eng = Engine(tiny_model("llama"), ByteTokenizer(), max_batch=4)
    for n in METHODS:
        eng.load_adapter(n, str(adapter_dirs["llama", n]))
    grammar = 'root ::= item ("," item)?\nitem ::= [a-d]{1,3} | "(" item ")"'  # context-free: nested brackets
    cases = [("mixlora", SamplingParams(max_tokens=20, guided_regex=r"[a-f]{2,5}-\d{2}")),
             ("milora", SamplingParams(max_tokens=20, guided_choice=["positive", "negative", "neutral"])),
             ("lora", SamplingParams(max_tokens=20, guided_regex=r"(true|false)")),
             ("dora", SamplingParams(max_tokens=20, guided_grammar=grammar)),
             (None, SamplingParams(max_tokens=6))]  # unguided, in the same batch
    ps = [list(b"id: "), list(b"Sentiment: "), list(b"Q: is it? A: "), list(b"list: "), list(b"x")]
    res = eng.generate(ps, [a for a, _ in cases], [sp for _, sp in cases])
    for p, (a, sp), r in zip(ps[:4], cases, res):
        guide = guide_for(False, sp.guided_regex, sp.guided_choice, guided_grammar=sp.guided_grammar)
        assert r["token_ids"] == guided_oracle(eng.model, p, a, 20, guide), a
        assert guide.feed(r["text"]) and (guide.complete if r["finish_reason"] == "stop" else len(r["token_ids"]) == 20)
        assert r["finish_reason"] == "stop" or sp.guided_grammar, r["text"]
    assert res[1]["text"] in ("positive", "negative", "neutral") and res[2]["text"] in ("true", "false")
    for seed in range(4):  # sampling: always one of the choices
        s = eng.generate([ps[1]], ["lora"], SamplingParams(max_tokens=20, temperature=1.5, seed=seed,
                                                          guided_choice=["positive", "negative", "neutral"]))[0]
        assert s["text"] in ("positive", "negative", "neutral") and s["finish_reason"] == "stop"
    for seed in range(4):  # sampling under the grammar: a prefix of a sentence, a sentence when it stops
        s = eng.generate([ps[3]], ["mixlora"], SamplingParams(max_tokens=20, temperature=1.5, seed=seed,
                                                              guided_grammar=grammar))[0]
        guide = guide_for(False, None, None, guided_grammar=grammar)
        assert guide.feed(s["text"]) and (s["finish_reason"] == "length" or guide.complete), s
    for bad, msg in [(dict(guided_regex="("), "does not compile"), (dict(guided_choice=[]), "guided_choice"),
                     (dict(json_object=True, guided_choice=["a"]), "at most one"),
                     (dict(guided_grammar="root ::= x"), "unknown rule 'x'"),
                     (dict(guided_grammar="root ::= 'a'", guided_regex="a"), "at most one")]:
        with pytest.raises(ValueError, match=msg):
            eng.add_request("bad", [5], None, SamplingParams(**bad))


def test_adapters_by_hub_id_are_downloaded_once_and_reloaded_from_that_copy(adapter_dirs, monkeypatch):
    """``load_adapter(name, "owner/repo")`` (``serve --adapter name=owner/repo``): the hub's snapshot of
    the adapter's files is fetched once; evicted and needed again, it is read from that copy."""
    import huggingface_hub

    calls = []

    def fake_download(repo_id, allow_patterns):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(adapter_dirs["llama", "lora"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    eng = Engine(tiny_model("llama"), ToyTokenizer(), adapter_budget_bytes=1)  # one resident adapter at a time
    eng.load_adapter("hub", "someone/lora")
    eng.load_adapter("local", str(adapter_dirs["llama", "mixlora"]))
    assert eng.pool.paths["hub"] == adapter_dirs["llama", "lora"] and calls[0][0] == "someone/lora"
    assert "adapter_model.safetensors" in calls[0][1]
    out = eng.generate([[5, 6, 7]] * 2, ["hub", "local"], SamplingParams(max_tokens=3))
    eng.generate([[5, 6, 7]], ["local"], SamplingParams(max_tokens=3))  # evicts "hub"
    assert "hub" not in eng.pool.resident
    loads = eng.pool.loads
    again = eng.generate([[5, 6, 7]], ["hub"], SamplingParams(max_tokens=3))
    assert eng.pool.loads == loads + 1 and again[0]["token_ids"] == out[0]["token_ids"] and len(calls) == 1


def test_an_adapter_with_per_module_ranks_batches_with_the_others(adapter_dirs, tmp_path):
    """An adapter whose modules have their own ranks (``rank_pattern``) in a mixed batch: the packed
    path pads ranks per module; each request's tokens are those it gets alone."""
    from conftest import randomize_adapters

    model = tiny_model("llama")
    moelora.attach(model, moelora.LoraConfig(r=4, rank_pattern={"q_proj": 8, "layers.1.mlp.up_proj": 2}), "p")
    randomize_adapters(model)
    moelora.save_adapter(model, tmp_path / "p", "p")
    eng = engine("llama", adapter_dirs, max_batch=8)
    eng.load_adapter("pattern", str(tmp_path / "p"))
    ps = prompts(6, seed=12)
    adapters = ["pattern", "lora", "pattern", "mixlora", None, "dora"]
    together = eng.generate(ps, adapters, SamplingParams(max_tokens=6, ignore_eos=True))
    for p, a, res in zip(ps, adapters, together):
        assert res["token_ids"] == eng.generate([p], [a], SamplingParams(max_tokens=6, ignore_eos=True))[0]["token_ids"]


def test_allowed_token_ids_and_bad_words_match_transformers(adapter_dirs):
    """vLLM's ``allowed_token_ids`` (every other token masked, EOS included) and bad words (a banned
    sequence's last token masked where the output ends with the rest): greedy equals ``generate`` with
    ``suppress_tokens`` (the complement) / ``bad_words_ids``; sampling stays inside the allowed set."""
    eng = engine("llama", adapter_dirs, max_batch=4)
    p = prompts(1, seed=13)[0]
    free = eng.generate([p], ["mixlora"], SamplingParams(max_tokens=8, ignore_eos=True))[0]["token_ids"]
    allowed = sorted(set(free[1:5]) | {7, 9, 11})
    vocab = eng.model.config.vocab_size
    moelora.set_adapter(eng.model, "mixlora")
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = eng.generate([p], ["mixlora"], SamplingParams(max_tokens=8, allowed_token_ids=allowed))[0]["token_ids"]
    want = eng.model.generate(torch.tensor([p]), suppress_tokens=[t for t in range(vocab) if t not in allowed], **kw)
    assert got == want[0, len(p):].tolist() and set(got) <= set(allowed)
    bad = [[free[0]], free[2:4]]  # the first token, and a two-token sequence of the free output
    got = eng.generate([p], ["mixlora"], SamplingParams(max_tokens=8, ignore_eos=True, bad_words_ids=bad))[0]
    want = eng.model.generate(torch.tensor([p]), bad_words_ids=bad, **kw)[0, len(p):].tolist()
    assert got["token_ids"] == want and got["token_ids"][0] != free[0]
    for seed in range(3):
        s = eng.generate([p], ["lora"], SamplingParams(max_tokens=8, temperature=1.5, seed=seed,
                                                      allowed_token_ids=allowed))[0]["token_ids"]
        assert set(s) <= set(allowed)
    for bad_params, msg in [(dict(allowed_token_ids=[]), "non-empty list"), (dict(bad_words_ids=[[]]), "non-empty"),
                            (dict(allowed_token_ids=[vocab]), f"token ids < {vocab}")]:
        with pytest.raises(ValueError, match=msg):
            eng.add_request("bad", [5], None, SamplingParams(**bad_params))


def test_skip_special_tokens_false_keeps_their_text(adapter_dirs):
    """vLLM's ``skip_special_tokens``: False keeps the text of special tokens the output contains (not of
    the EOS that ends it); the default drops it, as before."""

    class SpecialTokenizer(ToyTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            return "".join("" if (t < 10 and skip_special_tokens) else f" {t}" for t in ids)

    eng = Engine(tiny_model("llama"), SpecialTokenizer())
    p = prompts(1, seed=14)[0]
    bias = {3: 100.0}  # token 3, "special" for this tokenizer (not the EOS, 2), made certain at every step
    kept = eng.generate([p], [None], SamplingParams(max_tokens=3, logit_bias=bias, skip_special_tokens=False))[0]
    dropped = eng.generate([p], [None], SamplingParams(max_tokens=3, logit_bias=bias))[0]
    assert kept["token_ids"] == dropped["token_ids"] == [3] * 3
    assert kept["text"] == " 3" * 3 and dropped["text"] == ""
    with pytest.raises(ValueError, match="skip_special_tokens must be true or false"):
        eng.add_request("bad", [5], None, SamplingParams(skip_special_tokens="no"))
