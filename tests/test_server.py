"""``moelora serve``: real HTTP (httpx) against a server on 127.0.0.1, over a deterministic fake engine
(benchmarks/load_test.py's FakeEngine: output = "{adapter}:" + reversed prompt) and, when
moelora/engine.py provides it, the real engine on a tiny random Llama."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import re
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("aiohttp")
httpx = pytest.importorskip("httpx")

from moelora.server import ADAPTER_NAME_RE, serve_in_thread  # noqa: E402

LOAD_TEST = Path(__file__).resolve().parent.parent / "benchmarks" / "load_test.py"


def _load_test_module():
    name = "moelora_load_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, LOAD_TEST)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules[name]


lt = _load_test_module()
FakeEngine = lt.FakeEngine
ADAPTERS = ["alpha", "beta", "gamma-1", "delta_v2"]
ERROR_KEYS = {"message", "type", "param", "code"}


def expected(name: str, prompt: str | bytes, max_tokens: int, stop=()):
    ids = list(prompt.encode() if isinstance(prompt, str) else prompt)
    return FakeEngine.expected(name, ids, max_tokens, stop)


@pytest.fixture
def start():
    """start(engine=None, **kw) -> (url, engine); every server is stopped at teardown."""
    stops = []

    def _start(engine=None, **kw):
        engine = engine or FakeEngine(ADAPTERS, max_batch=4, max_queue=16)
        url, stop = serve_in_thread(engine, "127.0.0.1", 0, **kw)
        stops.append(stop)
        return url, engine

    yield _start
    for s in stops:
        s()


@pytest.fixture
def server(start):
    return start()


def post(url, path, body=None, **kw):
    kw.setdefault("timeout", 30)
    if body is not None and not isinstance(body, (bytes, str)):
        return httpx.post(url + path, json=body, **kw)
    return httpx.post(url + path, content=body, **kw)


def assert_error(r, status, code=None, param=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def sse_events(lines) -> list:
    """Parse ``data: ...`` events; the stream must end with ``[DONE]``."""
    events = []
    buf = "".join(lines)
    assert buf.endswith("data: [DONE]\n\n"), buf[-200:]
    for block in buf.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


def stream(url, path, body, **kw):
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=30, **kw) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(list(r.iter_text()))


# ------------------------------------------------------------------------------------------ happy paths
def test_completion_shape_and_text(server):
    url, _ = server
    r = post(url, "/v1/completions", {"model": "alpha", "prompt": "hello", "max_tokens": 32, "temperature": 0})
    assert r.status_code == 200, r.text
    d = r.json()
    text, reason, n = expected("alpha", "hello", 32)
    assert text == "alpha:olleh" and reason == "stop"
    assert d["id"].startswith("cmpl-") and d["object"] == "text_completion" and d["model"] == "alpha"
    assert isinstance(d["created"], int) and abs(d["created"] - time.time()) < 60
    assert d["choices"] == [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}]
    assert d["usage"] == {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n,
                          "prompt_tokens_details": {"cached_tokens": 0}}


def test_completion_length_token_ids_base_and_stop(server):
    url, engine = server
    d = post(url, "/v1/completions", {"model": "beta", "prompt": "hello", "max_tokens": 3}).json()
    assert d["choices"][0]["text"] == "bet" and d["choices"][0]["finish_reason"] == "length"
    assert d["usage"]["completion_tokens"] == 3
    d = post(url, "/v1/completions", {"model": "alpha", "prompt": [104, 105], "max_tokens": 20}).json()
    assert d["choices"][0]["text"] == "alpha:ih" and d["usage"]["prompt_tokens"] == 2
    d = post(url, "/v1/completions", {"model": "alpha", "prompt": [[104, 105]], "max_tokens": 20}).json()
    assert d["choices"][0]["text"] == "alpha:ih"
    d = post(url, "/v1/completions", {"model": engine.base_name, "prompt": ["abc"], "max_tokens": 40}).json()
    assert d["choices"][0]["text"] == f"{engine.base_name}:cba" and d["model"] == engine.base_name
    for stop in ("ll", ["zz", "ll"]):
        d = post(url, "/v1/completions", {"model": "alpha", "prompt": "hello", "max_tokens": 32, "stop": stop}).json()
        assert d["choices"][0]["text"] == "alpha:o" and d["choices"][0]["finish_reason"] == "stop"


def test_chat_completion(server):
    url, _ = server
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    r = post(url, "/v1/chat/completions", {"model": "gamma-1", "messages": msgs, "max_tokens": 100, "temperature": 0})
    assert r.status_code == 200, r.text
    d = r.json()
    rendered = "<system>be brief\n<user>hi\n<assistant>"
    text, reason, n = expected("gamma-1", rendered, 100)
    assert d["id"].startswith("chatcmpl-") and d["object"] == "chat.completion" and d["model"] == "gamma-1"
    assert d["choices"] == [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": reason}]
    assert d["usage"] == {"prompt_tokens": len(rendered), "completion_tokens": n, "total_tokens": len(rendered) + n,
                          "prompt_tokens_details": {"cached_tokens": 0}}
    # no max_tokens in chat: up to the context
    d = post(url, "/v1/chat/completions", {"model": "alpha", "messages": msgs}).json()
    assert d["choices"][0]["message"]["content"] == expected("alpha", rendered, 10_000)[0]


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("max_tokens", [4, 64])
def test_streaming_reassembles_to_non_streaming(server, chat, max_tokens):
    url, _ = server
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": "delta_v2", "max_tokens": max_tokens, "temperature": 0}
    body.update({"messages": [{"role": "user", "content": "stream me"}]} if chat else {"prompt": "stream me"})
    full = post(url, path, body).json()
    events = stream(url, path, {**body, "stream_options": {"include_usage": True}})
    *chunks, usage_chunk = events
    assert len({e["id"] for e in events}) == 1 and events[0]["id"].startswith("chatcmpl-" if chat else "cmpl-")
    assert all(e["object"] == ("chat.completion.chunk" if chat else "text_completion") for e in events)
    assert all(e["model"] == "delta_v2" and isinstance(e["created"], int) for e in events)
    assert all(e["usage"] is None for e in chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == full["usage"]
    assert all(c["finish_reason"] is None for e in chunks[:-1] for c in e["choices"])
    # vLLM's continuous_usage_stats: every chunk carries the usage so far (completion tokens growing)
    live = stream(url, path, {**body, "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    used = [e["usage"]["completion_tokens"] for e in live]
    assert all(e["usage"]["prompt_tokens"] == full["usage"]["prompt_tokens"] for e in live)
    assert used == sorted(used) and used[-1] == full["usage"]["completion_tokens"] and live[-1]["usage"] == full["usage"]
    final = chunks[-1]["choices"][0]
    if chat:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in chunks)
        assert final["delta"] == {} and final["finish_reason"] == full["choices"][0]["finish_reason"]
        assert text == full["choices"][0]["message"]["content"]
    else:
        text = "".join(e["choices"][0]["text"] for e in chunks)
        assert final["finish_reason"] == full["choices"][0]["finish_reason"]
        assert text == full["choices"][0]["text"]
    assert len(chunks) > 2  # really incremental
    # without stream_options there is no usage key and no usage chunk
    plain = stream(url, path, body)
    assert all("usage" not in e for e in plain) and all(e["choices"] for e in plain)


def test_concurrent_streams_for_different_adapters_get_their_own_outputs(start):
    url, engine = start(FakeEngine(ADAPTERS, max_batch=8, max_queue=64, step_delay=0.002))
    jobs = [(ADAPTERS[i % len(ADAPTERS)], f"request number {i:03d}", bool(i % 3)) for i in range(24)]

    def run(job):
        name, prompt, streaming = job
        body = {"model": name, "prompt": prompt, "max_tokens": 24, "temperature": 0}
        if streaming:
            events = stream(url, "/v1/completions", body)
            assert len({e["id"] for e in events}) == 1 and {e["model"] for e in events} == {name}
            return "".join(e["choices"][0]["text"] for e in events), events[0]["id"]
        d = post(url, "/v1/completions", body).json()
        return d["choices"][0]["text"], d["id"]

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(run, jobs))
    for (name, prompt, _), (text, _) in zip(jobs, results):
        assert text == expected(name, prompt, 24)[0]
    assert len({rid for _, rid in results}) == len(jobs)
    assert engine.max_running_seen > 1  # requests really were decoded together
    assert len(engine.threads) == 1 and threading.get_ident() not in engine.threads  # one engine thread


def test_batched_prompts_and_n_choices(server):
    """A list of prompts and ``n`` > 1 (as OpenAI and vLLM): one choice per prompt and copy, indexed prompt by
    prompt; usage counts each prompt once and every choice's tokens."""
    url, _ = server
    prompts = ["hello", [104, 105], "abc"]
    d = post(url, "/v1/completions", {"model": "alpha", "prompt": prompts, "max_tokens": 7, "temperature": 0}).json()
    want = [expected("alpha", p if isinstance(p, str) else bytes(p), 7) for p in prompts]
    assert [c["index"] for c in d["choices"]] == [0, 1, 2]
    assert [(c["text"], c["finish_reason"]) for c in d["choices"]] == [(t, r) for t, r, _ in want]
    assert d["usage"] == {"prompt_tokens": 5 + 2 + 3, "completion_tokens": sum(n for *_, n in want),
                          "total_tokens": 10 + sum(n for *_, n in want), "prompt_tokens_details": {"cached_tokens": 0}}
    d = post(url, "/v1/completions", {"model": "beta", "prompt": ["xy", "z"], "n": 2, "max_tokens": 32}).json()
    assert [(c["index"], c["text"]) for c in d["choices"]] == [(0, "beta:yx"), (1, "beta:yx"), (2, "beta:z"),
                                                               (3, "beta:z")]
    assert d["usage"]["prompt_tokens"] == 3 and d["usage"]["completion_tokens"] == 2 * 7 + 2 * 6
    c = post(url, "/v1/chat/completions", {**CHAT, "n": 3, "max_tokens": 100}).json()
    text = expected("alpha", "<user>hi\n<assistant>", 100)[0]
    assert [(ch["index"], ch["message"]["content"]) for ch in c["choices"]] == [(i, text) for i in range(3)]
    assert c["usage"]["prompt_tokens"] == len("<user>hi\n<assistant>")


@pytest.mark.parametrize("chat", [False, True])
def test_streaming_several_choices_reassembles_per_index(server, chat):
    url, _ = server
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": "gamma-1", "max_tokens": 40, "temperature": 0, "n": 2}
    body.update({"messages": [{"role": "user", "content": "two of them"}]} if chat else {"prompt": ["first one", "2nd"]})
    full = post(url, path, body).json()
    events = stream(url, path, {**body, "stream_options": {"include_usage": True}})
    *chunks, usage_chunk = events
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == full["usage"]
    assert all(len(e["choices"]) == 1 for e in chunks) and len({e["id"] for e in events}) == 1
    k = len(full["choices"])
    assert k == (2 if chat else 4)
    for i in range(k):
        mine = [e["choices"][0] for e in chunks if e["choices"][0]["index"] == i]
        assert [c["finish_reason"] for c in mine[:-1]] == [None] * (len(mine) - 1)
        assert mine[-1]["finish_reason"] == full["choices"][i]["finish_reason"]
        if chat:
            assert mine[0]["delta"] == {"role": "assistant", "content": ""}
            assert "".join(c["delta"].get("content", "") for c in mine) == full["choices"][i]["message"]["content"]
        else:
            assert "".join(c["text"] for c in mine) == full["choices"][i]["text"]
    assert len({e["choices"][0]["index"] for e in chunks[: len(chunks) // 2]}) > 1  # the choices interleave


@pytest.mark.parametrize("streaming", [False, True])
def test_echo_puts_the_prompt_before_the_completion(server, streaming):
    url, _ = server
    body = {"model": "alpha", "prompt": ["hello", [104, 105]], "max_tokens": 32, "temperature": 0, "echo": True}
    if streaming:
        events = stream(url, "/v1/completions", body)
        texts = ["".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == i) for i in range(2)]
    else:
        texts = [c["text"] for c in post(url, "/v1/completions", body).json()["choices"]]
    assert texts == ["hello" + expected("alpha", "hello", 32)[0], "hi" + expected("alpha", "hi", 32)[0]]
    assert_error(post(url, "/v1/chat/completions", {**CHAT, "echo": True}), 400, code="unsupported_parameter",
                 param="echo")


def test_metrics_count_tokens_and_finished_requests(start):
    url, engine = start(api_key="k")
    auth = {"Authorization": "Bearer k"}
    d = post(url, "/v1/completions", {**GOOD, "prompt": ["hello", "abc"], "max_tokens": 32, "temperature": 0},
             headers=auth).json()
    cut = post(url, "/v1/completions", {**GOOD, "prompt": "hello", "max_tokens": 3}, headers=auth).json()
    r = httpx.get(url + "/metrics")  # open, like /health
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in r.text.splitlines()
         if line and not line.startswith("#")}
    assert m["moelora_up"] == 1 and m["moelora_requests_running"] == 0 and m["moelora_requests_waiting"] == 0
    assert m["moelora_adapters_loaded"] == len(ADAPTERS)
    assert m["moelora_generation_tokens_total"] == d["usage"]["completion_tokens"] + cut["usage"]["completion_tokens"]
    assert m["moelora_prompt_tokens_total"] == d["usage"]["prompt_tokens"] + cut["usage"]["prompt_tokens"]
    assert m['moelora_requests_finished_total{finish_reason="stop"}'] == 2
    assert m['moelora_requests_finished_total{finish_reason="length"}'] == 1
    assert m["moelora_engine_steps_total"] >= 1 and m["moelora_engine_step_errors_total"] == 0
    # vLLM's latency histograms: every finished request once (per token after the first: those with more)
    for name, n in [("moelora_time_to_first_token_seconds", 3), ("moelora_e2e_request_latency_seconds", 3),
                    ("moelora_time_per_output_token_seconds", 3)]:
        buckets = [v for k, v in m.items() if k.startswith(name + "_bucket")]
        assert m[name + "_count"] == n == m[f'{name}_bucket{{le="+Inf"}}'] and m[name + "_sum"] > 0, name
        assert buckets == sorted(buckets) and len(buckets) > 10, name  # cumulative
    assert m["moelora_e2e_request_latency_seconds_sum"] >= m["moelora_time_to_first_token_seconds_sum"]


def test_batch_is_all_or_nothing_when_the_queue_fills(start):
    url, engine = start(FakeEngine(ADAPTERS, max_batch=1, max_queue=2))
    r = post(url, "/v1/completions", {**GOOD, "prompt": ["a", "b", "c", "d"]})
    assert_error(r, 429, code="queue_full")
    assert len(engine.aborted) == 2 and not engine.running and not engine.waiting  # the first two were undone
    assert post(url, "/v1/completions", {**GOOD, "prompt": ["a", "b"]}).status_code == 200


def test_batched_stream_disconnect_aborts_every_choice(start):
    url, engine = start(FakeEngine(ADAPTERS, max_batch=4, max_queue=16, step_delay=0.01))
    body = {"model": "alpha", "prompt": ["y" * 300, "z" * 300], "n": 2, "max_tokens": 200, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        rid = json.loads(next(r.iter_lines())[len("data: "):])["id"]
    assert _wait_for(lambda: sorted(engine.aborted) == [f"{rid}-{i}" for i in range(4)]), engine.aborted
    assert _wait_for(lambda: not engine.running and not engine.waiting)


def test_models_and_health(server):
    url, engine = server
    d = httpx.get(url + "/v1/models").json()
    assert d["object"] == "list"
    assert [m["id"] for m in d["data"]] == [engine.base_name, *ADAPTERS]
    for m in d["data"]:
        assert m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"] == "moelora"
        assert m["max_model_len"] == engine.max_model_len == 512  # vLLM's field
    assert httpx.get(url + "/v1/models/alpha").json()["id"] == "alpha"
    assert httpx.get(url + "/v1/models/alpha").json()["max_model_len"] == 512
    assert_error(httpx.get(url + "/v1/models/nope"), 404, code="model_not_found")
    h = httpx.get(url + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    import moelora

    assert httpx.get(url + "/version").json() == {"version": moelora.__version__}


# ------------------------------------------------------------------------------------------------ errors
GOOD = {"model": "alpha", "prompt": "hi", "max_tokens": 4}
CHAT = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("path,body,status,code,param", [
    ("/v1/completions", b"{not json", 400, "invalid_json", None),
    ("/v1/completions", b"", 400, "invalid_json", None),
    ("/v1/completions", b"\xff\xfe", 400, "invalid_json", None),
    ("/v1/completions", [1, 2], 400, "invalid_json", None),
    ("/v1/completions", {"prompt": "hi"}, 400, "missing_required_parameter", "model"),
    ("/v1/completions", {**GOOD, "model": 7}, 400, "invalid_type", "model"),
    ("/v1/completions", {**GOOD, "model": "nope"}, 404, "model_not_found", "model"),
    ("/v1/completions", {**GOOD, "model": "../../etc/passwd"}, 404, "model_not_found", "model"),
    ("/v1/completions", {**GOOD, "n": 0}, 400, "invalid_value", "n"),
    ("/v1/completions", {**GOOD, "n": 65}, 400, "invalid_value", "n"),
    ("/v1/completions", {**GOOD, "n": "2"}, 400, "invalid_type", "n"),
    ("/v1/completions", {**GOOD, "max_tokens": -1}, 400, "invalid_value", "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": "5"}, 400, "invalid_type", "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": 2.5}, 400, "invalid_type", "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": True}, 400, "invalid_type", "max_tokens"),
    ("/v1/completions", {**GOOD, "temperature": "hot"}, 400, "invalid_type", "temperature"),
    ("/v1/completions", {**GOOD, "temperature": 3}, 400, "invalid_value", "temperature"),
    ("/v1/completions", {**GOOD, "top_p": 0}, 400, "invalid_value", "top_p"),
    ("/v1/completions", {**GOOD, "top_k": -2}, 400, "invalid_value", "top_k"),
    ("/v1/completions", {**GOOD, "logit_bias": [1]}, 400, "invalid_type", "logit_bias"),
    ("/v1/completions", {**GOOD, "logit_bias": {"x": 1}}, 400, "invalid_value", "logit_bias"),
    ("/v1/completions", {**GOOD, "logit_bias": {"-1": 1}}, 400, "invalid_value", "logit_bias"),
    ("/v1/completions", {**GOOD, "logit_bias": {"5": 101}}, 400, "invalid_value", "logit_bias"),
    ("/v1/completions", {**GOOD, "logit_bias": {"999": 1}}, 400, "invalid_value", "logit_bias"),
    ("/v1/completions", {**GOOD, "top_k": 1.5}, 400, "invalid_type", "top_k"),
    ("/v1/completions", {**GOOD, "presence_penalty": 2.5}, 400, "invalid_value", "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "frequency_penalty": "x"}, 400, "invalid_type", "frequency_penalty"),
    ("/v1/completions", {**GOOD, "seed": "x"}, 400, "invalid_type", "seed"),
    ("/v1/completions", {**GOOD, "stop": 5}, 400, "invalid_type", "stop"),
    ("/v1/completions", {**GOOD, "stop": [""]}, 400, "invalid_value", "stop"),
    ("/v1/completions", {**GOOD, "stream": "yes"}, 400, "invalid_type", "stream"),
    ("/v1/completions", {**GOOD, "stream_options": {"include_usage": True}}, 400, "invalid_value",
     "stream_options"),
    ("/v1/completions", {**GOOD, "logprobs": 21}, 400, "invalid_value", "logprobs"),
    ("/v1/completions", {**GOOD, "logprobs": -1}, 400, "invalid_value", "logprobs"),
    ("/v1/completions", {**GOOD, "logprobs": True}, 400, "invalid_type", "logprobs"),
    ("/v1/completions", {**GOOD, "logprobs": "2"}, 400, "invalid_type", "logprobs"),
    ("/v1/completions", {**GOOD, "echo": 1}, 400, "invalid_type", "echo"),
    ("/v1/completions", {"model": "alpha"}, 400, "missing_required_parameter", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": {}}, 400, "invalid_type", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": []}, 400, "invalid_type", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ""}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ["a", ""]}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ["a", [-1]]}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ["a", [999]]}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ["a", ["b"]]}, 400, "invalid_type", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ["a", []]}, 400, "invalid_type", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ["a"] * 65}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ["a", "b"], "n": 33}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ["a", "x" * 600]}, 400, "context_length_exceeded", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [1, "a"]}, 400, "invalid_type", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [-1]}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [999]}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": "x" * 600}, 400, "context_length_exceeded", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": "x" * 500, "max_tokens": 100}, 400, "context_length_exceeded", "prompt"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "invalid_type", "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "invalid_type", "messages"),
    ("/v1/chat/completions", {"model": "alpha"}, 400, "missing_required_parameter", "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value",
     "messages[0].role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400, "invalid_type",
     "messages[0].content"),
    ("/v1/chat/completions", {**CHAT, "messages": ["hi"]}, 400, "invalid_type", "messages[0]"),
    ("/v1/chat/completions", {**CHAT, "n": 0}, 400, "invalid_value", "n"),
    ("/v1/chat/completions", {**CHAT, "logprobs": 2}, 400, "invalid_type", "logprobs"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "invalid_value", "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, 400, "invalid_value", "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "model": "nope"}, 404, "model_not_found", "model"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 600}]}, 400,
     "context_length_exceeded", "messages"),
    # vLLM's extra sampling parameters
    ("/v1/completions", {**GOOD, "repetition_penalty": 0}, 400, "invalid_value", "repetition_penalty"),
    ("/v1/completions", {**GOOD, "repetition_penalty": "2"}, 400, "invalid_type", "repetition_penalty"),
    ("/v1/completions", {**GOOD, "min_p": 1.5}, 400, "invalid_value", "min_p"),
    ("/v1/completions", {**GOOD, "min_tokens": -1}, 400, "invalid_value", "min_tokens"),
    ("/v1/completions", {**GOOD, "min_tokens": 5}, 400, "invalid_value", "min_tokens"),  # > max_tokens 4
    ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "min_tokens": 600},
     400, "invalid_value", "min_tokens"),  # more than the context leaves
    ("/v1/completions", {**GOOD, "stop_token_ids": [-1]}, 400, "invalid_value", "stop_token_ids"),
    ("/v1/completions", {**GOOD, "stop_token_ids": "3"}, 400, "invalid_value", "stop_token_ids"),
    ("/v1/completions", {**GOOD, "stop_token_ids": [999]}, 400, "invalid_value", "stop_token_ids"),
    ("/v1/completions", {**GOOD, "ignore_eos": "yes"}, 400, "invalid_type", "ignore_eos"),
    ("/v1/completions", {**GOOD, "include_stop_str_in_output": 1}, 400, "invalid_type", "include_stop_str_in_output"),
    ("/v1/chat/completions", {**CHAT, "continue_final_message": True}, 400, "invalid_value",
     "continue_final_message"),  # needs add_generation_prompt false
    ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": [1]}, 400, "invalid_type", "chat_template_kwargs"),
    ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"tokenize": True}}, 400, "invalid_value",
     "chat_template_kwargs"),
    ("/v1/chat/completions", {**CHAT, "add_generation_prompt": "no"}, 400, "invalid_type", "add_generation_prompt"),
    # vLLM's tokenizer endpoints
    ("/tokenize", b"{", 400, "invalid_json", None),
    ("/tokenize", {}, 400, "missing_required_parameter", "prompt"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, 400,
     "missing_required_parameter", "prompt"),
    ("/tokenize", {"prompt": 5}, 400, "invalid_type", "prompt"),
    ("/tokenize", {"messages": "hi"}, 400, "invalid_type", "messages"),
    ("/tokenize", {"prompt": "a", "model": "nope"}, 404, "model_not_found", "model"),
    ("/tokenize", {"prompt": "a", "model": 7}, 400, "invalid_type", "model"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "no"}, 400, "invalid_type", "add_special_tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "invalid_type", "tokens"),
    ("/detokenize", {"tokens": [1, -2]}, 400, "invalid_type", "tokens"),
    ("/detokenize", {"tokens": [999]}, 400, "invalid_value", "tokens"),
    ("/detokenize", {"tokens": [1], "model": "../x"}, 404, "model_not_found", "model"),
])
def test_bad_requests_get_openai_errors(server, path, body, status, code, param):
    url, engine = server
    assert_error(post(url, path, body), status, code=code, param=param)
    assert not engine.running and not engine.waiting  # nothing leaked into the engine
    assert post(url, "/v1/completions", GOOD).status_code == 200  # and the server still serves


def test_unknown_routes_and_methods(server):
    url, _ = server
    assert_error(httpx.get(url + "/v1/nope"), 404, code="not_found")
    assert_error(httpx.get(url + "/nope"), 404, code="not_found")
    assert_error(httpx.get(url + "/v1/completions"), 405, code="method_not_allowed")
    assert_error(post(url, "/v1/completions", b"x" * (9 * 1024 * 1024)), 413)


def test_queue_full_is_429(start):
    url, engine = start(FakeEngine(ADAPTERS, max_batch=1, max_queue=1, step_delay=0.01))
    body = {"model": "alpha", "prompt": "x" * 250, "max_tokens": 200, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as first:
        lines = first.iter_lines()  # (keep the iterator: a collected one closes the connection)
        next(lines)  # running (admitted to the batch) ...
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as second:
            assert second.status_code == 200  # ... this one waits in the queue ...
            r = post(url, "/v1/completions", GOOD)  # ... and this one does not fit
            assert_error(r, 429, code="queue_full")
            assert r.headers.get("retry-after") == "1"
    # the two streams were dropped by the client: both are aborted, the server serves again
    deadline = time.time() + 10
    while (engine.running or engine.waiting) and time.time() < deadline:
        time.sleep(0.02)
    assert post(url, "/v1/completions", GOOD).status_code == 200


def test_api_key(start):
    url, _ = start(api_key="s3cret")
    assert_error(post(url, "/v1/completions", GOOD), 401, code="invalid_api_key")
    assert_error(post(url, "/v1/completions", GOOD, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(post(url, "/v1/completions", GOOD, headers={"Authorization": "s3cret"}), 401)
    assert_error(httpx.get(url + "/v1/models"), 401)
    assert_error(httpx.get(url + "/v1/does-not-exist"), 401)  # no route probing without the key
    ok = {"Authorization": "Bearer s3cret"}
    assert post(url, "/v1/completions", GOOD, headers=ok).status_code == 200
    assert httpx.get(url + "/v1/models", headers=ok).status_code == 200
    assert httpx.get(url + "/health").status_code == 200  # open


def test_admin_disabled_by_default(server, tmp_path):
    url, engine = server
    assert_error(post(url, "/v1/admin/adapters", {"name": "new", "path": str(tmp_path)}), 403, code="admin_disabled")
    assert_error(httpx.delete(url + "/v1/admin/adapters/alpha"), 403, code="admin_disabled")
    assert_error(post(url, "/v1/load_lora_adapter", {"lora_name": "new", "lora_path": str(tmp_path)}), 403,
                 code="admin_disabled")
    assert_error(post(url, "/v1/unload_lora_adapter", {"lora_name": "alpha"}), 403, code="admin_disabled")
    assert "alpha" in engine.adapters and "new" not in engine.adapters


def test_vllm_lora_adapter_endpoints(start, tmp_path):
    """vLLM's runtime adapter endpoints (its names and shapes), behind --admin and the API key like ours."""
    url, engine = start(api_key="k", admin=True)
    h = {"Authorization": "Bearer k"}
    body = {"lora_name": "new", "lora_path": str(tmp_path)}
    assert_error(post(url, "/v1/load_lora_adapter", body), 401)
    r = post(url, "/v1/load_lora_adapter", body, headers=h)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'new' added successfully."
    assert engine.adapters["new"] == str(tmp_path)
    assert post(url, "/v1/completions", {**GOOD, "model": "new"}, headers=h).json()["choices"][0]["text"] == "new:"
    assert_error(post(url, "/v1/load_lora_adapter", body, headers=h), 409, code="adapter_exists", param="lora_name")
    for bad, param in (({"lora_name": "../x", "lora_path": str(tmp_path)}, "lora_name"),
                       ({"lora_name": "ok", "lora_path": str(tmp_path / "missing")}, "lora_path"),
                       ({"lora_name": "ok"}, "lora_path")):
        assert_error(post(url, "/v1/load_lora_adapter", bad, headers=h), 400, param=param)
    r = post(url, "/v1/unload_lora_adapter", {"lora_name": "new"}, headers=h)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'new' removed successfully."
    assert "new" not in engine.adapters
    assert_error(post(url, "/v1/unload_lora_adapter", {"lora_name": "new"}, headers=h), 404, code="model_not_found")
    assert_error(post(url, "/v1/unload_lora_adapter", {"lora_name": engine.base_name}, headers=h), 400)
    assert_error(post(url, "/v1/unload_lora_adapter", {}, headers=h), 400, param="lora_name")


def test_admin_load_unload(start, tmp_path):
    url, engine = start(api_key="k", admin=True)
    h = {"Authorization": "Bearer k"}
    assert_error(post(url, "/v1/admin/adapters", {"name": "new", "path": str(tmp_path)}), 401)
    r = post(url, "/v1/admin/adapters", {"name": "new", "path": str(tmp_path)}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "new" and r.json()["object"] == "model"
    assert engine.adapters["new"] == str(tmp_path)
    assert "new" in [m["id"] for m in httpx.get(url + "/v1/models", headers=h).json()["data"]]
    d = post(url, "/v1/completions", {**GOOD, "model": "new"}, headers=h).json()
    assert d["choices"][0]["text"] == "new:"
    assert_error(post(url, "/v1/admin/adapters", {"name": "new", "path": str(tmp_path)}, headers=h), 409,
                 code="adapter_exists")
    assert_error(post(url, "/v1/admin/adapters", {"name": engine.base_name, "path": str(tmp_path)}, headers=h),
                 409)
    r = httpx.delete(url + "/v1/admin/adapters/new", headers=h)
    assert r.status_code == 200 and r.json() == {"id": "new", "object": "model", "deleted": True}
    assert "new" not in engine.adapters
    assert_error(post(url, "/v1/completions", {**GOOD, "model": "new"}, headers=h), 404, code="model_not_found")
    assert_error(httpx.delete(url + "/v1/admin/adapters/new", headers=h), 404, code="model_not_found")
    assert_error(httpx.delete(url + "/v1/admin/adapters/" + engine.base_name, headers=h), 400)


@pytest.mark.parametrize("name", ["../../etc/passwd", "..", ".hidden", "a.b", "a/b", "a\\b", "", " x", "x" * 65,
                                  "-dash", "a\x00b", "ünï", 5, None, ["a"]])
def test_admin_rejects_bad_names(start, tmp_path, name):
    url, engine = start(admin=True)
    before = dict(engine.adapters)
    err = assert_error(post(url, "/v1/admin/adapters", {"name": name, "path": str(tmp_path)}), 400)
    assert err["param"] == "name"
    assert engine.adapters == before


def test_admin_bad_paths_and_delete_names(start, tmp_path):
    url, engine = start(admin=True)
    before = dict(engine.adapters)
    (tmp_path / "file").write_text("x")
    for body in ({"name": "ok", "path": str(tmp_path / "missing")}, {"name": "ok", "path": str(tmp_path / "file")},
                 {"name": "ok", "path": 3}, {"name": "ok"}, {"name": "ok", "path": ""}):
        assert_error(post(url, "/v1/admin/adapters", body), 400, param="path")
    assert_error(post(url, "/v1/admin/adapters", b"nope"), 400, code="invalid_json")
    for name in ("..evil", "%2E%2E%2Fetc", "a%00b", "-x"):
        r = httpx.delete(url + "/v1/admin/adapters/" + name)
        assert r.status_code in (400, 404), r.text
        assert_error(r, r.status_code)
    assert engine.adapters == before
    assert ADAPTER_NAME_RE.match("delta_v2") and not ADAPTER_NAME_RE.match("../x") and not ADAPTER_NAME_RE.match("a.b")


# -------------------------------------------------------------------------------- robustness and aborts
def _wait_for(cond, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_stream_disconnect_aborts(start):
    url, engine = start(FakeEngine(ADAPTERS, max_batch=4, max_queue=16, step_delay=0.01))
    body = {"model": "alpha", "prompt": "y" * 300, "max_tokens": 200, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        first = json.loads(next(lines)[len("data: "):])
        rid = first["id"]
    assert _wait_for(lambda: rid in engine.aborted), engine.aborted
    assert _wait_for(lambda: not engine.running and not engine.waiting)
    assert post(url, "/v1/completions", GOOD).status_code == 200


def test_non_streaming_disconnect_aborts(start):
    url, engine = start(FakeEngine(ADAPTERS, max_batch=4, max_queue=16, step_delay=0.01))
    with pytest.raises(httpx.TimeoutException):
        post(url, "/v1/completions", {"model": "beta", "prompt": "z" * 300, "max_tokens": 200}, timeout=0.3)
    assert _wait_for(lambda: len(engine.aborted) == 1), engine.aborted
    assert _wait_for(lambda: not engine.running and not engine.waiting)


def test_engine_step_exception_is_500_and_server_survives(server):
    url, engine = server
    engine.fail_steps = 1
    err = assert_error(post(url, "/v1/completions", GOOD), 500)
    assert err["type"] == "server_error"
    h = httpx.get(url + "/health").json()
    assert h["status"] == "ok" and h["step_errors"] == 1
    assert post(url, "/v1/completions", GOOD).json()["choices"][0]["text"] == expected("alpha", "hi", 4)[0]


def test_engine_exception_mid_stream(start):
    url, engine = start(FakeEngine(ADAPTERS, max_batch=4, max_queue=16, step_delay=0.01))
    body = {"model": "alpha", "prompt": "q" * 50, "max_tokens": 100, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        chunks = []
        for chunk in r.iter_text():
            if not chunks:
                engine.fail_steps = 1  # after the first chunk
            chunks.append(chunk)
        events = sse_events(chunks)
    assert len(events) >= 2 and "error" not in events[0]
    assert "error" in events[-1] and events[-1]["error"]["type"] == "server_error"
    assert httpx.get(url + "/health").status_code == 200
    assert post(url, "/v1/completions", GOOD).status_code == 200


def test_add_request_unexpected_exception_is_500(server, monkeypatch):
    url, engine = server

    def boom(*a, **k):
        raise RuntimeError("kaput")

    monkeypatch.setattr(engine, "add_request", boom)
    assert_error(post(url, "/v1/completions", GOOD), 500)
    monkeypatch.undo()
    assert post(url, "/v1/completions", GOOD).status_code == 200


@pytest.mark.parametrize("streaming", [False, True])
def test_engine_failed_request_is_500(server, streaming):
    url, engine = server
    engine.broken_adapters.add("beta")
    body = {**GOOD, "model": "beta"}
    if streaming:
        events = stream(url, "/v1/completions", body)
        assert events[-1]["error"]["code"] == "engine_error" and "cannot load beta" in events[-1]["error"]["message"]
    else:
        assert "cannot load beta" in assert_error(post(url, "/v1/completions", body), 500, code="engine_error")["message"]
    assert post(url, "/v1/completions", GOOD).status_code == 200


def test_admin_unload_in_use_is_409(start):
    url, engine = start(FakeEngine(ADAPTERS, step_delay=0.01), admin=True)
    body = {"model": "alpha", "prompt": "x" * 250, "max_tokens": 200, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        next(lines)
        assert_error(httpx.delete(url + "/v1/admin/adapters/alpha"), 409, code="adapter_in_use")
    assert _wait_for(lambda: not engine.running)
    assert httpx.delete(url + "/v1/admin/adapters/alpha").status_code == 200


def test_stop_function_fails_pending_and_returns(start):
    engine = FakeEngine(ADAPTERS, step_delay=0.01)
    url, stop = serve_in_thread(engine, "127.0.0.1", 0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(post, url, "/v1/completions", {**GOOD, "max_tokens": 200, "prompt": "p" * 300})
        assert _wait_for(lambda: engine.running)
        t0 = time.time()
        stop()
        assert time.time() - t0 < 10
        try:
            r = fut.result(timeout=10)
            assert r.status_code >= 500
        except httpx.HTTPError:
            pass  # the connection was closed under it: fine too


def test_openai_client(start):
    openai = pytest.importorskip("openai")
    url, _ = start(api_key="k")
    client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
    assert [m.id for m in client.models.list()][1:] == ADAPTERS
    c = client.completions.create(model="alpha", prompt="hello", max_tokens=32, temperature=0)
    assert c.choices[0].text == "alpha:olleh" and c.usage.completion_tokens == 11
    msgs = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="beta", messages=msgs, max_tokens=50, temperature=0)
    assert r.choices[0].message.content == expected("beta", "<user>hi\n<assistant>", 50)[0]
    s = client.chat.completions.create(model="beta", messages=msgs, max_tokens=50, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices) == r.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    c = client.completions.create(model="alpha", prompt=["ab", "cd"], n=2, max_tokens=32, temperature=0)
    assert [(ch.index, ch.text) for ch in c.choices] == [(0, "alpha:ba"), (1, "alpha:ba"), (2, "alpha:dc"),
                                                        (3, "alpha:dc")]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="alpha", prompt="x", n=0)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="bad", max_retries=0).models.list()


# ------------------------------------------------------------------------------------ load test and CLI
def test_load_test_fake_mode(capsys):
    rc = lt.main(["--fake", "--requests", "48", "--clients", "16", "--adapters", "4", "--max-seconds", "60"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "48/48 requests" in out and "p99" in out and "PASS" in out


def test_cli_serve_rejects_bad_adapter_specs(tmp_path, capsys):
    from moelora.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--adapter", f"a={tmp_path}", "--port", "0", "--admin"])
    assert args.adapter == [f"a={tmp_path}"] and args.admin and args.host == "127.0.0.1"
    assert main(["serve", "--adapter", f"../x={tmp_path}"]) == 2
    assert main(["serve", "--adapter", "noequals"]) == 2
    assert main(["serve", "--adapter", f"a={tmp_path / 'missing'}"]) == 2
    assert main(["serve", "--adapter", f"a={tmp_path}", "--adapter", f"a={tmp_path}"]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["serve", "--adapter-budget-mb", "0"]) == 2
    assert "--adapter-budget-mb must be positive" in capsys.readouterr().err
    assert main(["serve", "--served-model-name", "a b"]) == 2
    assert main(["serve", "--adapter", f"a={tmp_path}", "--served-model-name", "a"]) == 2
    assert "also an --adapter name" in capsys.readouterr().err


def test_cli_serve_options_reach_the_engine(tiny_model_dir, real_adapters, monkeypatch, capsys):
    """--dtype, --max-model-len and --served-model-name (vLLM's flags) configure the engine it serves."""
    import moelora.server
    from moelora.cli import main

    served = []
    monkeypatch.setattr(moelora.server, "run_server", lambda engine, **kw: served.append((engine, kw)))
    assert main(["serve", "--model", str(tiny_model_dir), "--adapter", f"a={real_adapters['lora-a']}",
                 "--device", "cpu", "--dtype", "bfloat16", "--max-model-len", "100",
                 "--served-model-name", "org/tiny-llama", "--port", "0"]) == 0
    engine, kw = served[0]
    assert (engine.max_model_len, engine.base_name, engine.adapter_names()) == (100, "org/tiny-llama", ["a"])
    assert next(engine.model.parameters()).dtype == torch.bfloat16 and kw["port"] == 0
    assert engine.prefix.budget == 256 * 2**20 and engine.max_prefill_tokens == 8192  # vLLM-like defaults
    limit = engine.model.config.max_position_embeddings
    assert main(["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--max-model-len", str(limit + 1)]) == 2
    assert f"between 2 and the model's {limit} positions" in capsys.readouterr().err
    assert len(served) == 1
    assert main(["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--max-num-batched-tokens", "0"]) == 2
    assert "--max-num-batched-tokens must be positive" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--prefix-cache-mb", "-1"]) == 2
    assert "--prefix-cache-mb must be >= 0" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--prefix-cache-mb", "0.5"]) == 0
    assert main(["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--prefix-cache-mb", "0",
                 "--max-num-batched-tokens", "512"]) == 0
    assert served[1][0].prefix.budget == 2**19 and served[2][0].prefix is None
    assert served[2][0].max_prefill_tokens == 512
    assert served[0][0].speculative is None  # off by default
    assert main(["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--speculative-config",
                 '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}']) == 0
    spec = served[3][0].speculative
    assert (spec.num_speculative_tokens, spec.prompt_lookup_max, spec.prompt_lookup_min) == (3, 4, 4)
    for bad, msg in [("{nope", "--speculative-config is not valid JSON"),
                     ('{"method": "eagle", "num_speculative_tokens": 3}', "only 'ngram'"),
                     ('{"num_speculative_tokens": 3, "draft_tensor_parallel_size": 1}', "unknown speculative config")]:
        assert main(["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--speculative-config", bad]) == 2
        assert msg in capsys.readouterr().err
    assert len(served) == 4
    assert main(["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--kv-cache-mb", "2",
                 "--scheduling-policy", "priority"]) == 0
    assert served[4][0].scheduling_policy == "priority" and served[3][0].scheduling_policy == "fcfs"
    assert main(["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--kv-cache-memory-bytes", "65536",
                 "--no-preemption"]) == 0
    assert served[4][0].kv_slots == 2 * 2**20 // served[4][0].kv_bytes_per_token and served[3][0].kv_slots is None
    assert served[5][0].kv_slots == 65536 // served[5][0].kv_bytes_per_token
    assert served[4][0].preemption is True and served[5][0].preemption is False
    for bad, msg in [(["--kv-cache-mb", "0"], "--kv-cache-mb must be positive"),
                     (["--kv-cache-mb", "1", "--kv-cache-memory-bytes", "9"], "not both"),
                     (["--kv-cache-memory-bytes", "1"], "kv_cache_bytes must be an integer of at least one token")]:
        assert main(["serve", "--model", str(tiny_model_dir), "--device", "cpu", *bad]) == 2
        assert msg in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- real engine
def _real_engine_cls():
    try:
        from moelora.engine import Engine
    except ImportError:
        return None
    return Engine if hasattr(Engine, "from_pretrained") else None


@pytest.fixture(scope="module")
def real_adapters(tmp_path_factory, tiny_model_dir):
    if _real_engine_cls() is None:
        pytest.skip("engine not available")
    import transformers
    from conftest import randomize_adapters

    import moelora

    out = {}
    for i, name in enumerate(["lora-a", "lora-b"]):
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        moelora.attach(model, moelora.LoraConfig(r=4, lora_alpha=8))
        randomize_adapters(model, seed=10 + i, scale=0.5)
        path = tmp_path_factory.mktemp("adapters") / name
        moelora.save_adapter(model, path)
        out[name] = str(path)
    return out


@pytest.fixture
def real_server(start, tiny_model_dir, real_adapters):
    Engine = _real_engine_cls()
    engine = Engine.from_pretrained(str(tiny_model_dir), adapters=real_adapters, max_batch=4, max_queue=16,
                                    device="cpu")
    return start(engine, admin=True)


@pytest.mark.slow
def test_real_engine_completion_chat_and_stream(real_server):
    url, engine = real_server
    names = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
    assert names[0] == engine.base_name and set(names[1:]) == {"lora-a", "lora-b"}
    body = {"model": "lora-a", "prompt": "Below is an instruction", "max_tokens": 8, "temperature": 0}
    d = post(url, "/v1/completions", body).json()
    assert d["usage"]["completion_tokens"] <= 8 and d["choices"][0]["finish_reason"] in ("stop", "length")
    events = stream(url, "/v1/completions", body)
    assert "".join(e["choices"][0]["text"] for e in events) == d["choices"][0]["text"]
    c = post(url, "/v1/chat/completions", {"model": "lora-b", "messages": [{"role": "user", "content": "hi"}],
                                            "max_tokens": 6, "temperature": 0})
    assert c.status_code == 200, c.text
    assert c.json()["choices"][0]["message"]["role"] == "assistant"
    assert_error(post(url, "/v1/completions", {**body, "model": "nope"}), 404)
    assert_error(post(url, "/v1/completions", {**body, "max_tokens": 10_000}), 400, code="context_length_exceeded")


@pytest.mark.slow
def test_real_engine_prefix_cache_reports_cached_tokens(real_server):
    """A prompt sent again reuses its cached blocks (all but the last token's), says so in
    ``usage.prompt_tokens_details.cached_tokens`` (streamed or not) and in /metrics, and answers the same."""
    url, engine = real_server
    prompt = "Below is an instruction that describes a task. Write a response that completes the request. " * 2
    body = {"model": "lora-a", "prompt": prompt, "max_tokens": 6, "temperature": 0}
    first = post(url, "/v1/completions", body).json()
    n = first["usage"]["prompt_tokens"]
    assert n > 32 and first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    again = post(url, "/v1/completions", body).json()
    assert again["choices"] == first["choices"]
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": (n - 1) // 16 * 16}
    last = stream(url, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})[-1]
    assert last["usage"]["prompt_tokens_details"] == {"cached_tokens": (n - 1) // 16 * 16}
    metrics = httpx.get(url + "/metrics").text
    assert f"moelora_prefix_cache_hits_total {2 * ((n - 1) // 16 * 16)}" in metrics
    assert f"moelora_prefix_cache_queries_total {3 * n}" in metrics


@pytest.mark.slow
def test_real_engine_speculative_decoding_answers_as_without_it(start, real_server, tiny_model_dir, real_adapters):
    """A server started with n-gram speculation answers what the plain server answers (greedy and
    seeded sampling, streamed or not), and /metrics counts the drafts and accepted tokens."""
    url_plain, _ = real_server
    engine = _real_engine_cls().from_pretrained(
        str(tiny_model_dir), adapters=real_adapters, max_batch=4, device="cpu",
        speculative={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1})
    url, _ = start(engine)
    bodies = [{"model": "lora-a", "prompt": "Below is an instruction " * 4, "max_tokens": 40, "temperature": 0},
              {"model": "lora-b", "prompt": "Write a response", "max_tokens": 30, "temperature": 0.8, "seed": 3},
              {"model": engine.base_name, "prompt": "a b c a b c a b", "max_tokens": 30, "temperature": 0,
               "ignore_eos": True}]
    for body in bodies:
        want = post(url_plain, "/v1/completions", body).json()["choices"]
        assert post(url, "/v1/completions", body).json()["choices"] == want
        events = stream(url, "/v1/completions", {**body, "stream": True})
        assert "".join(e["choices"][0]["text"] for e in events) == want[0]["text"]
    m = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in httpx.get(url + "/metrics").text.splitlines()
         if line and not line.startswith("#")}
    assert 0 < m["moelora_spec_decode_num_accepted_tokens_total"] <= m["moelora_spec_decode_num_draft_tokens_total"]
    assert m["moelora_spec_decode_num_drafts_total"] > 0
    rows, cols = engine.store.capacity  # buffers kept after the requests finished; no budget: usage 0
    assert m["moelora_kv_cache_bytes"] == rows * cols * engine.kv_bytes_per_token > 0
    assert m["moelora_kv_cache_usage_perc"] == 0


@pytest.mark.slow
def test_real_engine_kv_cache_budget_queues_and_refuses_what_never_fits(start, real_server, tiny_model_dir,
                                                                       real_adapters):
    """With ``kv_cache_bytes`` for 80 tokens, four concurrent requests of about 25 (prompt + max_tokens)
    cannot all run to their ends at once: some are preempted and recomputed (counted in /metrics);
    all finish with the plain server's answers, and one that could never fit is a 400 naming the
    budget."""
    url_plain, _ = real_server
    Engine = _real_engine_cls()
    per_token = Engine.from_pretrained(str(tiny_model_dir), device="cpu").kv_bytes_per_token
    engine = Engine.from_pretrained(str(tiny_model_dir), adapters=real_adapters, max_batch=4, device="cpu",
                                    kv_cache_bytes=2 * 40 * per_token)
    url, _ = start(engine)
    bodies = [{"model": m, "prompt": p, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
              for m, p in [("lora-a", "Below is"), ("lora-b", "an instruction"), ("lora-a", "that"), ("lora-b", "a b")]]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda b: post(url, "/v1/completions", b).json()["choices"], bodies))
    assert got == [post(url_plain, "/v1/completions", b).json()["choices"] for b in bodies]
    m = httpx.get(url + "/metrics").text
    rows, cols = engine.store.capacity
    assert f"moelora_kv_cache_usage_perc {round(rows * cols / engine.kv_slots, 6)}" in m and 0 < rows * cols <= 80
    assert f"moelora_num_preemptions_total {engine.num_preemptions}" in m and engine.num_preemptions > 0
    r = post(url, "/v1/completions", {**bodies[0], "priority": 2})  # fcfs: a priority is refused, not ignored
    assert_error(r, 400, code="invalid_value")
    assert "scheduling_policy 'priority'" in r.json()["error"]["message"]
    r = post(url, "/v1/completions", {**bodies[0], "max_tokens": 90})
    assert_error(r, 400, code="invalid_value")
    assert "token slots of KV cache" in r.json()["error"]["message"]


@pytest.mark.slow
def test_real_engine_concurrent_adapters_match_sequential(real_server):
    url, engine = real_server
    jobs = [(name, f"Below is an instruction {i}") for i in range(3) for name in ("lora-a", "lora-b",
                                                                                   engine.base_name)]

    def run(job):
        body = {"model": job[0], "prompt": job[1], "max_tokens": 8, "temperature": 0}
        return post(url, "/v1/completions", body).json()["choices"][0]["text"]

    sequential = [run(j) for j in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        concurrent_ = list(pool.map(run, jobs))
    assert concurrent_ == sequential
    assert sequential[0::3] != sequential[1::3]  # the two adapters really differ


@pytest.mark.slow
def test_real_engine_admin_load_and_unload(real_server, real_adapters):
    url, engine = real_server
    body = {"prompt": "Below is an instruction", "max_tokens": 6, "temperature": 0}
    ref = post(url, "/v1/completions", {**body, "model": "lora-a"}).json()["choices"][0]["text"]
    r = post(url, "/v1/admin/adapters", {"name": "copy-of-a", "path": real_adapters["lora-a"]})
    assert r.status_code == 200, r.text
    assert post(url, "/v1/completions", {**body, "model": "copy-of-a"}).json()["choices"][0]["text"] == ref
    assert_error(post(url, "/v1/admin/adapters", {"name": "bad.name", "path": real_adapters["lora-a"]}), 400)
    assert httpx.delete(url + "/v1/admin/adapters/copy-of-a").status_code == 200
    assert_error(post(url, "/v1/completions", {**body, "model": "copy-of-a"}), 404)


@pytest.mark.slow
def test_real_engine_batched_prompts_and_seeded_n_equal_single_requests(real_server):
    """A batch of prompts gives each prompt's own greedy completion; ``n`` seeded copies sample with
    ``seed``, ``seed + 1``, ..., each equal to a single request with that seed."""
    url, _ = real_server
    prompts = ["Below is an instruction", "Write a response", "hi"]
    body = {"model": "lora-a", "max_tokens": 6, "temperature": 0}
    alone = [post(url, "/v1/completions", {**body, "prompt": p}).json()["choices"][0]["text"] for p in prompts]
    d = post(url, "/v1/completions", {**body, "prompt": prompts}).json()
    assert [c["text"] for c in d["choices"]] == alone
    sample = {"model": "lora-b", "prompt": "Below is an instruction", "max_tokens": 8, "temperature": 1.5}
    d = post(url, "/v1/completions", {**sample, "n": 3, "seed": 7}).json()
    seeded = [post(url, "/v1/completions", {**sample, "seed": 7 + j}).json()["choices"][0]["text"] for j in range(3)]
    assert [c["text"] for c in d["choices"]] == seeded
    assert len(set(seeded)) > 1  # the copies really sample differently


@pytest.mark.slow
def test_real_engine_best_of_returns_the_best_candidates_per_token(real_server):
    """``best_of`` (completions): best_of seeded candidates per prompt (the ``n`` copies' seeds), the
    ``n`` with the highest mean log-probability per token returned, in that order; usage counts every
    candidate's tokens; logprobs only when asked."""
    url, _ = real_server
    sample = {"model": "lora-b", "max_tokens": 8, "temperature": 1.5, "seed": 11}
    prompts = ["Below is an instruction", "hi"]
    cands = post(url, "/v1/completions", {**sample, "prompt": prompts, "n": 4, "logprobs": 0}).json()

    def mean(c):
        lp = c["logprobs"]["token_logprobs"]
        return sum(lp) / len(lp) if lp else float("-inf")

    want = []
    for p in range(2):
        group = sorted(cands["choices"][4 * p : 4 * p + 4], key=lambda c: -mean(c))[:2]
        want += [c["text"] for c in group]
    d = post(url, "/v1/completions", {**sample, "prompt": prompts, "n": 2, "best_of": 4}).json()
    assert [c["text"] for c in d["choices"]] == want and [c["index"] for c in d["choices"]] == [0, 1, 2, 3]
    assert all(c["logprobs"] is None for c in d["choices"])
    assert d["usage"]["completion_tokens"] == cands["usage"]["completion_tokens"]
    one = post(url, "/v1/completions", {**sample, "prompt": prompts[0], "best_of": 4, "logprobs": 1}).json()
    assert [c["text"] for c in one["choices"]] == want[:1] and one["choices"][0]["logprobs"]["top_logprobs"]
    for body, msg in [({"n": 3, "best_of": 2}, "best_of .2. must be >= n .3."),
                      ({"best_of": 2, "stream": True}, "cannot be streamed"),
                      ({"prompt": ["a"] * 17, "best_of": 4}, "at most 64 completions")]:
        r = post(url, "/v1/completions", {**sample, "prompt": "hi", **body})
        assert_error(r, 400, code="invalid_value")
        assert re.search(msg, r.json()["error"]["message"]), r.json()
    r = post(url, "/v1/chat/completions", {"model": "lora-b", "messages": [{"role": "user", "content": "hi"}],
                                           "best_of": 2})
    assert_error(r, 400, code="unsupported_parameter")


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True])
def test_real_engine_logprobs_in_openai_shape_streamed_or_not(real_server, chat):
    url, _ = real_server
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": "lora-a", "max_tokens": 8, "temperature": 0}
    if chat:
        body.update(messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=2)
    else:
        body.update(prompt="Below is an instruction", logprobs=2)
    d = post(url, path, body).json()
    lp = d["choices"][0]["logprobs"]
    events = stream(url, path, body)
    if chat:
        text = d["choices"][0]["message"]["content"]
        entries = lp["content"]
        assert set(lp) == {"content", "refusal"} and entries
        assert "".join(e["token"] for e in entries) == text
        for e in entries:  # greedy: the chosen token is the most likely one
            assert e["bytes"] == list(e["token"].encode()) and len(e["top_logprobs"]) == 2
            assert e["logprob"] == pytest.approx(max(t["logprob"] for t in e["top_logprobs"]), abs=1e-5)
            assert all(t["logprob"] <= 0 and t["bytes"] == list(t["token"].encode()) for t in e["top_logprobs"])
        streamed = [x for ev in events for c in ev["choices"] if c["logprobs"] for x in c["logprobs"]["content"]]
        assert events[0]["choices"][0]["logprobs"] is None  # the role chunk
    else:
        text = d["choices"][0]["text"]
        assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"} and lp["tokens"]
        assert "".join(lp["tokens"]) == text
        assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
        for v, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
            # greedy: the chosen token is the most likely (two tokens with the same text share one key)
            assert v <= 0 and 1 <= len(top) <= 2 and v >= max(top.values()) - 1e-5
        streamed = [c["logprobs"] for ev in events for c in ev["choices"]]
        streamed = [dict(zip(("token", "logprob"), x)) for s in streamed for x in zip(s["tokens"], s["token_logprobs"])]
        entries = [{"token": t, "logprob": v} for t, v in zip(lp["tokens"], lp["token_logprobs"])]
    assert [(e["token"], e["logprob"]) for e in streamed] == [(e["token"], e["logprob"]) for e in entries]
    plain = post(url, path, {k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")}).json()
    assert plain["choices"][0]["logprobs"] is None


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True])
def test_real_engine_echo_logprobs_score_the_prompt_like_a_forward(real_server, real_adapters, tiny_model_dir,
                                                                   streaming):
    """lm-evaluation-harness' ``local-completions`` scoring request (token ids, ``echo``, ``logprobs=1``,
    ``max_tokens=1``, a batch): each prompt token's logprob equals log_softmax of the adapted model's own
    forward, the first token has none, and the text is the prompt's followed by the completion's."""
    import transformers

    import moelora

    url, engine = real_server
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tok("Below is an instruction")["input_ids"], tok("Write a short response")["input_ids"]]
    body = {"model": "lora-b", "prompt": prompts, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
    if streaming:
        events = stream(url, "/v1/completions", body)
        choices = []
        for i in range(2):
            mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
            lps = [c["logprobs"] for c in mine]
            choices.append({"text": "".join(c["text"] for c in mine),
                            "logprobs": {k: [x for lp in lps for x in lp[k]] for k in lps[0]}})
    else:
        choices = post(url, "/v1/completions", body).json()["choices"]
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    moelora.load_adapter(model, real_adapters["lora-b"])
    for ids, c in zip(prompts, choices):
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        want = [float(ref[j - 1, ids[j]]) for j in range(1, len(ids))]
        assert lp["token_logprobs"][1:len(ids)] == pytest.approx(want, abs=1e-4)
        greedy = [int(ref[j - 1].argmax()) == ids[j] for j in range(1, len(ids))]  # lm-eval's is_greedy
        assert [v >= max(t.values()) - 1e-6 for v, t in zip(lp["token_logprobs"][1:len(ids)],
                                                             lp["top_logprobs"][1:len(ids)])] == greedy
        prompt_text = tok.decode(ids, skip_special_tokens=True)
        assert c["text"].startswith(prompt_text)
        assert "".join(lp["tokens"]) == c["text"]
        assert lp["text_offset"][len(ids)] == len(prompt_text)


@pytest.mark.slow
def test_lm_eval_local_completions_scores_a_served_adapter(real_server, real_adapters, tiny_model_dir):
    """lm-evaluation-harness' own ``local-completions`` client against the server: its loglikelihoods of
    (context, continuation) pairs equal the adapted model's own, its greedy flags too."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval's API clients need it (the lm-eval extra installs it)
    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    import moelora

    url, _ = real_server
    lm = LocalCompletionsAPI(base_url=url + "/v1/completions", model="lora-a", tokenizer_backend="huggingface",
                             tokenizer=str(tiny_model_dir), batch_size=3, max_retries=1, num_concurrent=1)
    pairs = [("Below is an instruction", " that describes a task"), ("Write a", " response"), ("hi", " there")]
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(reqs)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    moelora.load_adapter(model, real_adapters["lora-a"])
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        c, w = lm.tok_encode(ctx), lm.tok_encode(cont)  # lm-eval's own split of the tokens
        ids = c + w
        with torch.no_grad():
            lsm = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        want = sum(float(lsm[j - 1, ids[j]]) for j in range(len(c), len(ids)))
        assert ll == pytest.approx(want, abs=1e-3)
        assert greedy == all(int(lsm[j - 1].argmax()) == ids[j] for j in range(len(c), len(ids)))


@pytest.mark.slow
def test_real_engine_penalties_and_top_k_reach_the_engine(real_server):
    """``presence_penalty``/``frequency_penalty`` change a greedy completion as the engine's own (tested in
    test_engine); ``top_k`` 1 makes hot sampling greedy; ``top_k`` -1 is off, as in vLLM."""
    url, _ = real_server
    body = {"model": "lora-a", "prompt": "Below is an instruction", "max_tokens": 12, "temperature": 0}
    plain = post(url, "/v1/completions", body).json()["choices"][0]["text"]
    pen = post(url, "/v1/completions", {**body, "presence_penalty": 2, "frequency_penalty": 2}).json()
    assert pen["choices"][0]["text"] != plain
    forced = post(url, "/v1/completions", {**body, "max_tokens": 5, "logprobs": 0, "logit_bias": {"65": 100}}).json()
    lp = forced["choices"][0]["logprobs"]
    assert forced["usage"]["completion_tokens"] == 5 and set(lp["tokens"]) == {lp["tokens"][0]}  # token 65 x 5
    hot = {**body, "temperature": 2, "seed": 3}
    assert post(url, "/v1/completions", {**hot, "top_k": 1}).json()["choices"][0]["text"] == plain
    assert post(url, "/v1/completions", {**hot, "top_k": -1}).json()["choices"][0]["text"] == post(
        url, "/v1/completions", hot).json()["choices"][0]["text"]


def test_tokenize_and_detokenize_fake(server):
    """vLLM's /tokenize and /detokenize over the fake engine's byte tokenizer; the base or any adapter may be named."""
    url, _ = server
    d = post(url, "/tokenize", {"prompt": "héllo", "model": "beta"}).json()
    assert d == {"count": 6, "max_model_len": 512, "tokens": list("héllo".encode()), "token_strs": None}
    chat = post(url, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert bytes(chat["tokens"]).decode() == "<user>hi\n<assistant>"
    bare = post(url, "/tokenize", {"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": False})
    assert bytes(bare.json()["tokens"]).decode() == "<user>hi\n"
    assert post(url, "/detokenize", {"tokens": list(b"abc"), "model": "fake-base"}).json() == {"prompt": "abc"}
    assert_error(post(url, "/tokenize", {"prompt": "a", "return_token_strs": True}), 400, "unsupported_parameter",
                 "return_token_strs")  # the fake tokenizer has no token strings


@pytest.mark.slow
def test_real_engine_vllm_extras_reach_the_engine(real_server):
    """ignore_eos, min_tokens, stop_token_ids, repetition_penalty and min_p act as in the engine (whose
    definitions test_engine checks); /tokenize counts the prompt tokens a completion's usage reports."""
    url, engine = real_server
    eos = min(engine.eos)
    body = {"model": "lora-a", "prompt": "Below is an instruction", "max_tokens": 6, "temperature": 0}
    forced = {**body, "logit_bias": {str(eos): 100}}
    d = post(url, "/v1/completions", forced).json()
    assert (d["usage"]["completion_tokens"], d["choices"][0]["finish_reason"]) == (1, "stop")
    d = post(url, "/v1/completions", {**forced, "ignore_eos": True}).json()
    assert (d["usage"]["completion_tokens"], d["choices"][0]["finish_reason"]) == (6, "length")
    d = post(url, "/v1/completions", {**forced, "min_tokens": 3}).json()
    assert (d["usage"]["completion_tokens"], d["choices"][0]["finish_reason"]) == (4, "stop")
    d = post(url, "/v1/completions", {**body, "stop_token_ids": [65], "logit_bias": {"65": 100}}).json()
    assert (d["usage"]["completion_tokens"], d["choices"][0]["text"], d["choices"][0]["finish_reason"]) == (1, "", "stop")
    plain = post(url, "/v1/completions", {**body, "max_tokens": 12}).json()["choices"][0]["text"]
    stop = plain.strip()[:3]
    for include in (False, True):
        c = post(url, "/v1/completions", {**body, "max_tokens": 12, "stop": [stop],
                                          "include_stop_str_in_output": include}).json()["choices"][0]
        cut = plain.index(stop)
        assert (c["text"], c["finish_reason"]) == (plain[:cut + len(stop) * include], "stop")
    rep = post(url, "/v1/completions", {**body, "max_tokens": 12, "repetition_penalty": 5.0}).json()["choices"][0]
    assert rep["text"] != plain
    hot = {**body, "max_tokens": 12, "temperature": 2, "seed": 5}
    assert post(url, "/v1/completions", {**hot, "min_p": 1.0}).json()["choices"][0]["text"] == plain
    # the tokenizer endpoints agree with what completions count and decode
    tok = post(url, "/tokenize", {"prompt": body["prompt"], "model": "lora-b", "return_token_strs": True}).json()
    assert tok["count"] == post(url, "/v1/completions", body).json()["usage"]["prompt_tokens"] == len(tok["tokens"])
    assert tok["max_model_len"] == engine.max_model_len and len(tok["token_strs"]) == tok["count"]
    assert post(url, "/detokenize", {"tokens": tok["tokens"]}).json()["prompt"].endswith(body["prompt"])
    msgs = [{"role": "user", "content": "hi"}]
    chat = post(url, "/v1/chat/completions", {"model": "lora-a", "messages": msgs, "max_tokens": 2}).json()
    assert post(url, "/tokenize", {"messages": msgs}).json()["count"] == chat["usage"]["prompt_tokens"]


@pytest.mark.slow
def test_real_engine_chat_template_options(real_server):
    """add_generation_prompt, continue_final_message and chat_template_kwargs reach the tokenizer's chat
    template, in chat completions and /tokenize alike."""
    url, engine = real_server
    tok = engine.tokenizer
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "The answer is"}]

    def count(**kw):
        return post(url, "/v1/chat/completions", {"model": "lora-a", "messages": msgs, "max_tokens": 1, **kw}
                    ).json()["usage"]["prompt_tokens"]

    def ids(**kw):
        return post(url, "/tokenize", {"messages": msgs, **kw}).json()["tokens"]

    for kw, ref in (({}, dict(add_generation_prompt=True)),
                    ({"add_generation_prompt": False}, dict(add_generation_prompt=False)),
                    ({"add_generation_prompt": False, "continue_final_message": True},
                     dict(add_generation_prompt=False, continue_final_message=True))):
        expect = tok(tok.apply_chat_template(msgs, tokenize=False, **ref), add_special_tokens=False)["input_ids"]
        assert ids(**kw) == expect and count(**kw) == len(expect)
    cont = post(url, "/detokenize", {"tokens": ids(add_generation_prompt=False, continue_final_message=True)})
    assert cont.json()["prompt"].endswith("The answer is")  # the assistant's turn is left open
    tok.chat_template = "{% for m in messages %}{{ m.content }}|{% endfor %}{% if shout %}!!{% endif %}"
    plain = post(url, "/detokenize", {"tokens": ids()}).json()["prompt"]
    loud = post(url, "/detokenize", {"tokens": ids(chat_template_kwargs={"shout": True})}).json()["prompt"]
    assert (plain, loud) == ("What is 2+2?|The answer is|", "What is 2+2?|The answer is|!!")
    assert count(chat_template_kwargs={"shout": True}) == count() + len(tok("!!", add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------- fuzzing
FUZZ_KEYS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
             "n", "stop", "stream", "stream_options", "logprobs", "top_logprobs", "echo", "seed", "presence_penalty",
             "frequency_penalty", "logit_bias", "repetition_penalty", "min_p", "min_tokens", "stop_token_ids",
             "ignore_eos", "include_stop_str_in_output", "add_generation_prompt", "continue_final_message",
             "chat_template_kwargs", "response_format", "best_of", "suffix", "user", "tools"]
FUZZ_VALUES = [None, True, False, 0, 1, 2, -1, 3, 2**70, -2**70, 0.5, 1e308, -0.0, "", "x", "alpha", "beta",
               "fake-base", "../alpha", "\x00", "é" * 3, [], [1], [0, 255], [-1], [2**40], ["a"], ["a", "b"], [[1, 2]],
               [[]], ["a"] * 70, {}, {"a": 1}, {"1": 5}, {"include_usage": True}, {"type": "text"},
               {"type": "json_object"}, [{"role": "user", "content": "hi"}], [{"role": "assistant"}],
               [{"role": "user", "content": [{"type": "text", "text": "yo"}]}], [{"content": "x"}], "x" * 700]


def _fuzz_bodies(seed: int, count: int):
    import random

    rnd = random.Random(seed)
    for _ in range(count):
        chat = rnd.random() < 0.5
        body = dict(CHAT if chat else GOOD)
        for key in rnd.sample(FUZZ_KEYS, rnd.randint(1, 4)):
            if rnd.random() < 0.1:
                body.pop(key, None)
            else:
                body[key] = rnd.choice(FUZZ_VALUES)
        yield ("/v1/chat/completions" if chat else "/v1/completions"), body


def _check_fuzz_answer(r, body):
    assert r.status_code in (200, 400, 404, 429), (r.status_code, body, r.text[:300])
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) == ERROR_KEYS and err["message"], (body, err)
    elif body.get("stream") is True:
        assert r.text.rstrip().endswith("data: [DONE]"), (body, r.text[-300:])
        assert '"error"' not in r.text, (body, r.text[-300:])
    else:
        assert r.json()["choices"], body


def test_fuzzed_requests_get_an_answer_or_an_openai_error(server):
    """400 random mutations of good requests (wrong types, extremes, junk, conflicting options): every one
    gets a well-formed answer or a 4xx error in the OpenAI shape, never a 500; nothing stays queued and
    the server keeps serving."""
    url, engine = server
    statuses = {}
    with httpx.Client(timeout=30) as client:
        for path, body in _fuzz_bodies(0, 400):
            r = client.post(url + path, content=json.dumps(body))
            _check_fuzz_answer(r, body)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert _wait_for(lambda: not engine.running and not engine.waiting)
        assert client.post(url + "/v1/completions", json=GOOD).status_code == 200
    assert statuses.get(200, 0) >= 40 and statuses.get(400, 0) >= 100  # both paths were exercised
    import random

    rnd, answered = random.Random(2), set()
    keys = ["prompt", "messages", "model", "tokens", "add_special_tokens", "add_generation_prompt",
            "return_token_strs", "continue_final_message", "chat_template_kwargs"]
    client = httpx.Client(timeout=30)
    for i in range(200):
        body = {k: rnd.choice(FUZZ_VALUES) for k in rnd.sample(keys, rnd.randint(1, 4))}
        r = client.post(url + ("/tokenize" if i % 2 else "/detokenize"), content=json.dumps(body))
        assert r.status_code in (200, 400, 404), (r.status_code, body, r.text[:300])
        assert r.status_code == 200 or set(r.json()["error"]) == ERROR_KEYS
        answered.add((i % 2, r.status_code))
    client.close()
    assert {(0, 200), (1, 200), (0, 400), (1, 400)} <= answered


@pytest.mark.slow
def test_fuzzed_requests_on_the_real_engine(real_server):
    """The same on the real engine and tokenizer (fewer requests): no 500 whatever the combination."""
    url, engine = real_server
    with httpx.Client(timeout=60) as client:
        for path, body in _fuzz_bodies(1, 80):
            body["model"] = body["model"].replace("alpha", "lora-a").replace("beta", "lora-b") \
                if isinstance(body.get("model"), str) else body.get("model")
            if _is_int_like(body.get("max_tokens")) and body["max_tokens"] > 8:
                body["max_tokens"] = 8  # keep the CPU time bounded; the context errors are covered above
            _check_fuzz_answer(client.post(url + path, content=json.dumps(body)), body)
        assert _wait_for(lambda: not engine.running and not engine.waiting)
        assert client.post(url + "/v1/completions", json={**GOOD, "model": "lora-a"}).status_code == 200


def _is_int_like(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ------------------------------------------------------------------------------------------- tool calls
class ToolTokenizer(lt.FakeTokenizer):
    """The fake tokenizer with a template that takes ``tools`` (recorded, with the messages)."""

    def __init__(self):
        self.seen = []

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True, tools=None, **kw):
        self.seen.append({"messages": messages, "tools": tools})
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return ("<tools>" + json.dumps(tools) + "</tools>" if tools else "") + text + "<assistant>"


class ScriptEngine(FakeEngine):
    """Answers every request with ``script`` (then EOS), one character per step."""

    script = ""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.tokenizer = ToolTokenizer()

    def expected(self, name, prompt_ids, max_tokens, stop=()):
        text = self.script[:max_tokens]
        return text, ("stop" if len(self.script) <= max_tokens else "length"), len(text)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TWO_CALLS = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>{"name": "get_time", "parameters": {"tz": "CET"}}')  # the last one unclosed (EOS)


def test_chat_tool_calls_are_parsed_streamed_or_not(start):
    engine = ScriptEngine(ADAPTERS, max_batch=4, max_queue=16)
    engine.script = TWO_CALLS
    url, _ = start(engine, tool_parser="hermes")
    body = {"model": "alpha", "messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER],
            "max_tokens": 200}
    d = post(url, "/v1/chat/completions", body).json()
    choice = d["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Let me check."
    calls = choice["message"]["tool_calls"]
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("function", "get_weather", {"city": "Paris"}), ("function", "get_time", {"tz": "CET"})]
    assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]
    assert engine.tokenizer.seen[-1]["tools"] == [WEATHER]  # the template showed the model its tools
    events = stream(url, "/v1/chat/completions", body)
    deltas = [e["choices"][0]["delta"] for e in events]
    content = [dl["content"] for dl in deltas if dl.get("content")]
    assert "".join(content) == "Let me check." and not any("<" in c for c in content)  # no tag fragment leaks
    streamed = [dl["tool_calls"] for dl in deltas if "tool_calls" in dl]
    assert len(streamed) == 1 and [(c["index"], c["function"]["name"]) for c in streamed[0]] == [
        (0, "get_weather"), (1, "get_time")]
    assert json.loads(streamed[0][1]["function"]["arguments"]) == {"tz": "CET"}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


FORMAT_SCRIPTS = {  # two calls in each format, and what may come before them as content
    "llama3_json": ("", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                        '{"name": "get_time", "parameters": {"tz": "CET"}}'),
    "mistral": ("Let me check.", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                                 '{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}]'),
    "pythonic": ("", "[get_weather(city='Paris'), get_time(tz=\"CET\")]"),
}


@pytest.mark.parametrize("fmt", sorted(FORMAT_SCRIPTS))
def test_chat_tool_calls_in_each_format(start, fmt):
    """``--tool-call-parser llama3_json / mistral / pythonic``: the reply's calls, streamed or not, with
    no call text leaking into the streamed content; text that is not a call stays content."""
    engine = ScriptEngine(ADAPTERS, max_batch=4, max_queue=16)
    content, calls_text = FORMAT_SCRIPTS[fmt]
    engine.script = content + calls_text
    url, _ = start(engine, tool_parser=fmt)
    body = {"model": "alpha", "messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER],
            "max_tokens": 200}
    choice = post(url, "/v1/chat/completions", body).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and (choice["message"]["content"] or "") == content
    calls = choice["message"]["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    if fmt == "mistral":  # Mistral's template wants 9-character ids
        assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in calls)
    events = stream(url, "/v1/chat/completions", body)
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(dl.get("content") or "" for dl in deltas) == content
    streamed = [dl["tool_calls"] for dl in deltas if "tool_calls" in dl]
    assert [c["function"]["name"] for c in streamed[0]] == ["get_weather", "get_time"]
    r = post(url, "/v1/chat/completions", {**body, "tool_choice": "required"})
    if fmt == "pythonic":  # no forced calls in this format: said, not ignored
        assert_error(r, 400, code="invalid_value", param="tool_choice")
        assert "not available with the pythonic tool call format" in r.json()["error"]["message"]
    else:
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "tool_calls"
    engine.script = "It is sunny {in Paris} [really]."
    for d in (post(url, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"],
              "".join(e["choices"][0]["delta"].get("content") or "" for e in stream(url, "/v1/chat/completions", body))):
        assert d == engine.script


@pytest.mark.parametrize("script", ["No tools needed <tool", 'Hmm <tool_call>{"name": broken}</tool_call> ok'])
def test_chat_text_that_is_not_a_tool_call_stays_content(start, script):
    engine = ScriptEngine(ADAPTERS, max_batch=4, max_queue=16)
    engine.script = script
    url, _ = start(engine, tool_parser="hermes")
    body = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], "max_tokens": 200}
    d = post(url, "/v1/chat/completions", body).json()["choices"][0]
    assert d["message"] == {"role": "assistant", "content": script} and d["finish_reason"] == "stop"
    events = stream(url, "/v1/chat/completions", body)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == script
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    d = post(url, "/v1/chat/completions", {**body, "tool_choice": "none"}).json()["choices"][0]
    assert engine.tokenizer.seen[-1]["tools"] is None and d["message"]["content"] == script


def test_chat_tool_history_reaches_the_template(start):
    engine = ScriptEngine(ADAPTERS, max_batch=4, max_queue=16)
    engine.script = "It is sunny."
    url, _ = start(engine, tool_parser="hermes")
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    d = post(url, "/v1/chat/completions", {"model": "alpha", "messages": messages, "tools": [WEATHER],
                                           "max_tokens": 50}).json()
    assert d["choices"][0]["message"]["content"] == "It is sunny."
    seen = engine.tokenizer.seen[-1]["messages"]
    assert seen[1]["tool_calls"] == [{"type": "function", "id": "call_1",
                                      "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert seen[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


def test_tool_requests_that_cannot_be_served_are_clear_errors(start):
    url, _ = start(ScriptEngine(ADAPTERS, max_batch=4, max_queue=16))  # no parser
    base = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    assert_error(post(url, "/v1/chat/completions", {**base, "tools": [WEATHER]}), 400, code="unsupported_parameter",
                 param="tools")
    url, _ = start(ScriptEngine(ADAPTERS, max_batch=4, max_queue=16), tool_parser="hermes")
    for extra, code, param in [
        ({"tool_choice": "required"}, "invalid_value", "tool_choice"),  # no tools
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "invalid_value", "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "invalid_value", "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "n": {"type": "integer", "minimum": 1}}}}}], "tool_choice": "required"}, "invalid_value", "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "invalid_value", "tool_choice"),
        ({"tools": {"a": 1}}, "invalid_type", "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "invalid_value", "tools[0].function.name"),
        ({"tools": [{"type": "retrieval"}]}, "invalid_type", "tools[0]"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "invalid_type",
         "tools[0].function.parameters"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "invalid_type", "parallel_tool_calls"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "not json"}}]}]}, "invalid_value",
         "messages[0].tool_calls[0].function.arguments"),
        ({"messages": [{"role": "assistant", "tool_calls": {"x": 1}}]}, "invalid_type", "messages[0].tool_calls"),
        ({"messages": [{"role": "tool", "tool_call_id": 5, "content": "x"}]}, "invalid_type", "messages[0].tool_call_id"),
    ]:
        assert_error(post(url, "/v1/chat/completions", {**base, **extra}), 400, code=code, param=param)
    assert_error(post(url, "/v1/completions", {"model": "alpha", "prompt": "x", "tools": [WEATHER]}), 400,
                 code="unsupported_parameter", param="tools")
    with pytest.raises(ValueError, match="unknown tool call parser"):
        from moelora.server import create_app

        create_app(ScriptEngine(ADAPTERS), tool_parser="granite")


def test_cli_serve_takes_vllm_spellings(tiny_model_dir, real_adapters, monkeypatch, capsys):
    """A vLLM command line works: --enable-lora --lora-modules (name=path and the JSON form),
    --max-num-seqs, --no-enable-prefix-caching, --no-enable-chunked-prefill."""
    import moelora.server
    from moelora.cli import main

    served = []
    monkeypatch.setattr(moelora.server, "run_server", lambda engine, **kw: served.append(engine))
    assert main(["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--enable-lora", "--lora-modules",
                 f"a={real_adapters['lora-a']}", json.dumps({"name": "b", "path": real_adapters["lora-b"]}),
                 "--max-num-seqs", "3", "--no-enable-prefix-caching", "--no-enable-chunked-prefill"]) == 0
    engine = served[0]
    assert sorted(engine.adapter_names()) == ["a", "b"] and engine.max_batch == 3 and engine.prefix is None
    assert not engine.chunked_prefill
    assert main(["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--enable-prefix-caching"]) == 0
    assert served[1].prefix is not None and served[1].max_batch == 32 and served[1].chunked_prefill
    assert main(["serve", "--model", str(tiny_model_dir), "--lora-modules", '{"name": "a"}']) == 2
    assert "--lora-modules" in capsys.readouterr().err


def test_cli_serve_tool_call_parser_reaches_the_server(tiny_model_dir, monkeypatch):
    import moelora.server
    from moelora.cli import main

    served = []
    monkeypatch.setattr(moelora.server, "run_server", lambda engine, **kw: served.append(kw))
    assert main(["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--enable-auto-tool-choice",
                 "--tool-call-parser", "hermes"]) == 0
    assert main(["serve", "--model", str(tiny_model_dir), "--device", "cpu"]) == 0
    assert [kw["tool_parser"] for kw in served] == ["hermes", None]


TINY_TOOL = {"type": "function", "function": {"name": "w"}}  # the tiny tokenizer spends many tokens on JSON
QWEN_LIKE_TOOLS_TEMPLATE = (  # the tool parts of Qwen2.5's template, compacted
    "{%- if tools %}<|im_start|>system\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n"
    "</tools><|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}\n<tool_call>\n"
    '{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.slow
def test_real_tokenizer_template_gets_tools_and_history_as_objects(start, tiny_model_dir):
    """Through a real tokenizer's Jinja template (Qwen2.5's tool parts): the prompt the engine gets is
    the template rendered with the tools and with earlier calls' arguments as objects (a JSON string
    would be encoded twice by ``tojson``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moelora.engine import Engine

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.max_position_embeddings = 1024  # (rotary positions: no table to outgrow)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = QWEN_LIKE_TOOLS_TEMPLATE
    engine = Engine(model, tok, max_batch=2)
    url, _ = start(engine, tool_parser="hermes")
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": '{"c": 1}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = post(url, "/v1/chat/completions", {"model": engine.base_name, "messages": history, "tools": [TINY_TOOL],
                                           "max_tokens": 2})
    assert r.status_code == 200, r.text
    d = r.json()

    def rendered(arguments):
        msgs = [history[0], {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "id": "call_1", "function": {"name": "w", "arguments": arguments}}]},
                history[2]]
        text = engine.tokenizer.apply_chat_template(msgs, tools=[TINY_TOOL], add_generation_prompt=True, tokenize=False)
        return text, len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])

    text, n = rendered({"c": 1})
    assert '"arguments": {"c": 1}' in text and '"name": "w"' in text.split("</tools>")[0]
    assert d["usage"]["prompt_tokens"] == n != rendered('{"c": 1}')[1]


@pytest.mark.slow
def test_real_engine_json_mode_returns_json_objects(real_server):
    """``response_format: {"type": "json_object"}``: through a real byte-level BPE tokenizer (tokens of
    several characters) the reply is one JSON object when it finishes, and always a valid prefix of
    one; streamed the same. JSON schemas are refused."""
    from moelora.structured import JsonPrefix

    url, engine = real_server
    finished = 0
    for i, model in enumerate(["lora-a", "lora-b", engine.base_name] * 2):
        body = {"model": model, "messages": [{"role": "user", "content": f"Give JSON {i}"}], "max_tokens": 48,
                "response_format": {"type": "json_object"}, "temperature": 0.9 if i >= 3 else 0, "seed": i}
        c = post(url, "/v1/chat/completions", body).json()["choices"][0]
        text = c["message"]["content"]
        assert JsonPrefix().feed(text) and text.startswith("{"), text
        if c["finish_reason"] == "stop":
            finished += 1
            assert isinstance(json.loads(text), dict)
        events = stream(url, "/v1/chat/completions", body)
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == text
    assert finished >= 1
    assert_error(post(url, "/v1/chat/completions", {**body, "response_format": {"type": "json_schema", "json_schema": {}}}),
                 400, code="invalid_value", param="response_format")
    assert_error(post(url, "/v1/chat/completions", {**body, "response_format": {"type": "xml"}}),
                 400, code="unsupported_parameter", param="response_format")


@pytest.mark.slow
def test_real_engine_guided_choice_and_regex(real_server):
    """vLLM's ``guided_choice`` and ``guided_regex`` (completions and chat) through a real BPE tokenizer;
    malformed guides, two guides at once and the guides we do not implement are 400s naming the field."""
    import regex

    url, engine = real_server
    for i in range(3):
        body = {"model": "lora-a", "prompt": f"Is it so {i}?", "max_tokens": 12, "temperature": 0.8 * i, "seed": i,
                "guided_choice": ["yes", "no", "it depends"]}
        c = post(url, "/v1/completions", body).json()["choices"][0]
        assert c["text"] in ("yes", "no", "it depends") and c["finish_reason"] == "stop", c
    chat = {"model": "lora-b", "messages": [{"role": "user", "content": "a code"}], "max_tokens": 12, "temperature": 0,
            "guided_regex": r"[A-Z]{2}-\d{3}"}
    d = post(url, "/v1/chat/completions", chat).json()["choices"][0]
    assert regex.fullmatch(r"[A-Z]{2}-\d{3}", d["message"]["content"]) and d["finish_reason"] == "stop", d
    events = stream(url, "/v1/chat/completions", chat)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == d["message"]["content"]
    for extra, param in [({"guided_regex": "(unclosed"}, "guided_regex"), ({"guided_choice": "yes"}, "guided_choice"),
                         ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
                         ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex")]:
        assert_error(post(url, "/v1/chat/completions", {**chat, "guided_regex": None, **extra}), 400,
                     code="invalid_value", param=param)
    assert_error(post(url, "/v1/chat/completions", {**chat, "structured_outputs": {"type": "object"}}), 400,
                 code="unsupported_parameter", param="structured_outputs")
    assert_error(post(url, "/v1/chat/completions", {**chat, "guided_regex": None, "guided_grammar": {"type": "x"}}),
                 400, code="invalid_value", param="guided_grammar")
    r = post(url, "/v1/chat/completions", {**chat, "guided_regex": None, "guided_grammar": "root ::= (\n"})
    assert_error(r, 400, code="invalid_value", param="guided_grammar")
    assert "guided_grammar line 2: '(' without ')'" in r.json()["error"]["message"]


@pytest.mark.slow
def test_real_engine_guided_grammar(real_server):
    """vLLM's ``guided_grammar`` (GBNF, the start rule ``root``), greedy and sampled, completions and chat,
    streamed too: every reply that stops is a sentence of the grammar, one cut by max_tokens a prefix."""
    from moelora.grammar import GrammarPrefix, compile_grammar

    url, engine = real_server
    grammar = ('root ::= answer (" because " reason)?\nanswer ::= "yes" | "no"\n'
               'reason ::= [a-z]+ (" " [a-z]+){0,3}')
    for i in range(3):
        body = {"model": "lora-a", "prompt": f"Is it so {i}?", "max_tokens": 16, "temperature": 0.7 * i, "seed": i,
                "guided_grammar": grammar}
        c = post(url, "/v1/completions", body).json()["choices"][0]
        state = GrammarPrefix(compile_grammar(grammar))
        assert state.feed(c["text"]) and (state.complete or c["finish_reason"] == "length"), c
        assert c["text"].startswith(("yes", "no")), c
    chat = {"model": "lora-b", "messages": [{"role": "user", "content": "is it?"}], "max_tokens": 16,
            "temperature": 0, "structured_outputs": {"grammar": grammar}}
    d = post(url, "/v1/chat/completions", chat).json()["choices"][0]
    assert GrammarPrefix(compile_grammar(grammar)).feed(d["message"]["content"]), d
    events = stream(url, "/v1/chat/completions", chat)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == d["message"]["content"]



def test_fuzzed_guides_and_tools_get_an_answer_or_an_openai_error(start):
    """Guided decoding and tool fields, mutated (a server with the tool parser, the fake engine):
    never a 500, every error in the OpenAI shape, both paths exercised."""
    import random

    url, engine = start(FakeEngine(ADAPTERS, max_batch=4, max_queue=16), tool_parser="hermes")
    values = FUZZ_VALUES + [r"\d+", "(", "a{2,3}", ["yes", "no"], [""], ["x"] * 300, {"type": "json_object"},
                            {"type": "json_schema"}, "auto", "none", "required", [{"type": "function"}],
                            [{"type": "function", "function": {"name": "f"}}], {"type": "function"}]
    keys = ["guided_regex", "guided_choice", "guided_json", "guided_grammar", "response_format", "tools",
            "tool_choice", "parallel_tool_calls"]
    rnd, statuses = random.Random(3), {}
    with httpx.Client(timeout=30) as client:
        for i in range(200):
            chat = i % 2 == 0
            body = dict(CHAT if chat else GOOD)
            body.update({k: rnd.choice(values) for k in rnd.sample(keys, rnd.randint(1, 3))})
            r = client.post(url + ("/v1/chat/completions" if chat else "/v1/completions"), content=json.dumps(body))
            _check_fuzz_answer(r, body)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    assert statuses.get(200, 0) >= 10 and statuses.get(400, 0) >= 100, statuses



@pytest.mark.slow
def test_real_engine_json_schema_outputs_validate(real_server):
    """OpenAI's ``response_format: {"type": "json_schema"}`` (and vLLM's ``guided_json``): the reply
    validates against the schema (a Pydantic-like one: nested object, enum, array, optional field);
    schemas with keywords we do not implement are 400s naming them."""
    jsonschema = pytest.importorskip("jsonschema")
    from moelora.structured import RegexPrefix, schema_regex

    url, engine = real_server
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
        "pet": {"$ref": "#/$defs/Pet"}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 5},
                                                "maxItems": 2},
        "nick": {"anyOf": [{"type": "string", "maxLength": 6}, {"type": "null"}], "default": None}},
        "required": ["name", "age", "pet", "tags"],
        "$defs": {"Pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]},
                                                             "ok": {"type": "boolean"}}}}}
    done = 0
    for i, how in enumerate([{"response_format": {"type": "json_schema", "json_schema": {"name": "P", "schema": schema}}},
                             {"guided_json": schema}, {"guided_json": json.dumps(schema)}]):
        body = {"model": ["lora-a", "lora-b", engine.base_name][i], "messages": [{"role": "user", "content": f"person {i}"}],
                "max_tokens": 200, "temperature": 0, **how}
        c = post(url, "/v1/chat/completions", body).json()["choices"][0]
        assert RegexPrefix(schema_regex(schema)).feed(c["message"]["content"]), c  # a valid prefix, always
        if c["finish_reason"] == "stop":
            done += 1
            jsonschema.validate(json.loads(c["message"]["content"]), schema)
    assert done >= 1
    for bad, word in [({"type": "integer", "minimum": 0}, "minimum"), ({"oneOf": [{"type": "string"}]}, "oneOf"),
                      ({"$ref": "#/$defs/Nope"}, "$ref"), ({"type": "array"}, "items")]:
        e = assert_error(post(url, "/v1/chat/completions", {**body, "guided_json": {"type": "object", "properties": {"x": bad}}}),
                         400, code="invalid_value", param="guided_json")
        assert word in e["message"], e



@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "mistral"])
def test_real_engine_forced_tool_calls(start, tiny_model_dir, fmt):
    """``tool_choice: "required"`` or a named function: guided decoding makes the reply tool calls in
    the server's format whose arguments fit the tool's schema, parsed into ``tool_calls`` (a random
    model, so only the guide can make it call a tool)."""
    from moelora.engine import Engine

    engine = Engine.from_pretrained(str(tiny_model_dir), device="cpu", max_batch=2)
    url, _ = start(engine, tool_parser=fmt)
    city = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 6}, "days": {"enum": [1, 2, 3]}}}}}
    clock = {"type": "function", "function": {"name": "get_time"}}
    base = {"model": engine.base_name, "messages": [{"role": "user", "content": "weather?"}], "tools": [city, clock],
            "max_tokens": 120, "temperature": 0, "parallel_tool_calls": False}
    for choice, names in [("required", {"get_weather", "get_time"}),
                          ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"})]:
        c = post(url, "/v1/chat/completions", {**base, "tool_choice": choice}).json()["choices"][0]
        assert c["finish_reason"] == "tool_calls", c
        (call,) = c["message"]["tool_calls"]
        assert call["function"]["name"] in names
        args = json.loads(call["function"]["arguments"])
        if call["function"]["name"] == "get_weather":
            assert set(args) == {"city", "days"} and len(args["city"]) <= 6 and args["days"] in (1, 2, 3)
        else:
            assert args == {}


@pytest.mark.slow
def test_real_engine_structured_outputs_field(real_server):
    """vLLM's newer ``structured_outputs`` object maps onto the same guides."""
    import regex

    url, engine = real_server
    base = {"model": "lora-a", "prompt": "Q?", "max_tokens": 40, "temperature": 0}
    for so, check in [({"choice": ["alpha", "beta"]}, lambda t: t in ("alpha", "beta")),
                      ({"regex": r"[0-9]{4}"}, lambda t: regex.fullmatch(r"[0-9]{4}", t)),
                      ({"json": {"type": "object", "properties": {"k": {"enum": [1, 2]}}}},
                       lambda t: json.loads(t)["k"] in (1, 2)),
                      ({"json_object": True}, lambda t: t.startswith("{"))]:
        c = post(url, "/v1/completions", {**base, "structured_outputs": so}).json()["choices"][0]
        assert check(c["text"]), (so, c)
    r = post(url, "/v1/completions", {**base, "structured_outputs": {"grammar": "root ::= x"}})
    assert_error(r, 400, code="invalid_value")
    assert "unknown rule 'x'" in r.json()["error"]["message"]
    assert_error(post(url, "/v1/completions", {**base, "structured_outputs": {"regex": "a"}, "guided_regex": "b"}), 400,
                 code="invalid_value", param="structured_outputs")
    assert_error(post(url, "/v1/completions", {**base, "structured_outputs": {"regex": "a", "choice": ["b"]}}), 400,
                 code="invalid_value")
    assert_error(post(url, "/v1/completions", {**base, "structured_outputs": "x"}), 400, code="invalid_type")


# ------------------------------------------------------------------------------------ web: CORS, TLS, templates
def test_cors_lets_allowed_browser_origins_in_and_answers_preflights(start):
    """``--allowed-origins`` (vLLM's flags): an allowed origin gets ``Access-Control-Allow-Origin`` on
    every response, streamed ones too, and its preflight is answered before authentication; another
    origin, or a server without CORS, gets no CORS header (browsers then keep it out)."""
    from moelora.server import Cors

    url, _ = start(api_key="k", cors=Cors(["https://app.example"], ["POST", "GET"], ["authorization", "content-type"],
                                          credentials=True))
    ok = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
          "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(url + "/v1/chat/completions", headers=ok)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert r.headers["access-control-allow-methods"] == "POST, GET"
    assert r.headers["access-control-allow-headers"] == "authorization, content-type"
    assert r.headers["access-control-allow-credentials"] == "true" and r.headers["vary"] == "Origin"
    assert httpx.options(url + "/v1/models", headers={**ok, "Access-Control-Request-Method": "PUT"}).status_code == 403
    assert httpx.options(url + "/v1/models", headers={**ok, "Origin": "https://evil.example"}).status_code == 403
    auth = {"Authorization": "Bearer k", "Origin": "https://app.example"}
    r = httpx.get(url + "/v1/models", headers=auth)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.get(url + "/v1/models", headers={"Origin": "https://app.example"})  # errors carry it too
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"
    body = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=auth) as s:
        assert s.headers["access-control-allow-origin"] == "https://app.example" and "data:" in s.read().decode()
    assert "access-control-allow-origin" not in httpx.get(url + "/v1/models", headers={
        "Authorization": "Bearer k", "Origin": "https://evil.example"}).headers
    plain, _ = start()
    r = httpx.get(plain + "/v1/models", headers={"Origin": "https://app.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    anyone, _ = start(cors=Cors(["*"]))
    assert httpx.get(anyone + "/v1/models", headers={"Origin": "https://x.example"}).headers[
        "access-control-allow-origin"] == "*"


def self_signed(tmp_path):
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


def test_https_with_a_certificate(start, tmp_path):
    import shutil
    import ssl

    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a certificate")
    cert, key = self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    url, _ = start(ssl_context=ctx)
    assert url.startswith("https://")
    body = {"model": "alpha", "prompt": "hi", "max_tokens": 3}
    r = httpx.post(url + "/v1/completions", json=body, verify=ssl.create_default_context(cafile=str(cert)))
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected("alpha", "hi", 3)[0]
    with pytest.raises(httpx.HTTPError):
        httpx.post(url.replace("https://", "http://") + "/v1/completions", json=body, timeout=5)


def test_cli_serve_web_flags(tiny_model_dir, monkeypatch, capsys, tmp_path):
    """``--chat-template`` (a file or the template), ``--ssl-*`` and ``--allowed-*`` reach the server;
    bad ones are errors naming the flag, before the model loads."""
    import shutil
    import ssl

    import moelora.server
    from moelora.cli import main

    served = []
    monkeypatch.setattr(moelora.server, "run_server", lambda engine, **kw: served.append((engine, kw)))
    serve = ["serve", "--model", str(tiny_model_dir), "--device", "cpu"]
    (tmp_path / "t.jinja").write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                                      "{% if add_generation_prompt %}[assistant] {% endif %}")
    assert main([*serve, "--chat-template", str(tmp_path / "t.jinja"), "--allowed-origins", '["https://a.example"]',
                 "--allowed-methods", "POST,GET", "--allow-credentials"]) == 0
    engine, kw = served[-1]
    assert engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                add_generation_prompt=True) == "[user] hi\n[assistant] "
    cors = kw["cors"]
    assert (cors.origins, cors.methods, cors.headers, cors.credentials) == (["https://a.example"], ["POST", "GET"],
                                                                            ["*"], True)
    assert kw["ssl_context"] is None
    assert main([*serve, "--chat-template", "{{ messages[0].content }}!"]) == 0
    assert served[-1][0].tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "x!"
    assert served[-1][1]["cors"] is None
    if shutil.which("openssl"):
        cert, key = self_signed(tmp_path)
        assert main([*serve, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]) == 0
        assert isinstance(served[-1][1]["ssl_context"], ssl.SSLContext)
    n = len(served)
    for bad, msg in [(["--chat-template", "no-such-file.jinja"], "neither a file nor a Jinja template"),
                     (["--chat-template", "{% for %}"], "--chat-template: line 1"),
                     (["--chat-template", "{{ raise_exception('no') }}"], "fails on a one-message chat"),
                     (["--ssl-keyfile", "k.pem"], "--ssl-keyfile needs --ssl-certfile"),
                     (["--ssl-certfile", str(tmp_path / "none.pem")], "--ssl-certfile/--ssl-keyfile"),
                     (["--allowed-origins", "[1]"], "--allowed-origins: expected a JSON list of strings"),
                     (["--allowed-origins", "[oops"], "--allowed-origins: not a JSON list"),
                     (["--allow-credentials"], "need --allowed-origins")]:
        assert main([*serve, *bad]) == 2, bad
        assert msg in capsys.readouterr().err, bad
    assert len(served) == n


class RecordingEngine(FakeEngine):
    """The fake engine, keeping every request's SamplingParams in ``seen``."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen = []

    def add_request(self, request_id, prompt_ids, adapter, params):
        self.seen.append(params)
        return super().add_request(request_id, prompt_ids, adapter, params)


def test_sampling_defaults_fill_what_a_request_omits(start):
    """vLLM's ``--generation-config``: requests that omit temperature, top_p, top_k, min_p,
    repetition_penalty or max_tokens get the server's defaults; what a request gives wins."""
    from transformers import GenerationConfig

    from moelora.server import create_app, generation_defaults

    engine = RecordingEngine(ADAPTERS, max_batch=4, max_queue=16)
    defaults = {"temperature": 0.0, "top_p": 0.8, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                "max_tokens": 4}
    url, _ = start(engine, sampling_defaults=defaults)
    post(url, "/v1/completions", {"model": "alpha", "prompt": "hi"})
    post(url, "/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "hi"}],
                                       "temperature": 0.5, "top_k": -1, "max_tokens": 2})
    post(url, "/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]})
    got = [(p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty, p.max_tokens) for p in engine.seen]
    assert got == [(0.0, 0.8, 20, 0.05, 1.1, 16),  # completions: max_tokens stays OpenAI's 16, as vLLM
                   (0.5, 0.8, 0, 0.05, 1.1, 2), (0.0, 0.8, 20, 0.05, 1.1, 4)]
    config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05,
                              max_new_tokens=100, eos_token_id=2)
    assert generation_defaults(config) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
                                           "max_tokens": 100}
    assert generation_defaults(GenerationConfig(eos_token_id=2)) == {}  # transformers' own defaults are not taken
    for bad, msg in [({"temperature": 3}, "temperature=3 is out of the range"), ({"seed": 1}, "unknown field"),
                     ({"max_tokens": 0}, "max_tokens=0")]:
        with pytest.raises(ValueError, match=msg):
            create_app(FakeEngine(ADAPTERS), sampling_defaults=bad)


def test_cli_serve_generation_config(tiny_model_dir, monkeypatch, capsys, tmp_path):
    import shutil

    import moelora.server
    from moelora.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9, "do_sample": True,
                                                              "eos_token_id": 2}))
    served = []
    monkeypatch.setattr(moelora.server, "run_server", lambda engine, **kw: served.append(kw))
    serve = ["serve", "--model", str(model), "--device", "cpu"]
    assert main(serve) == 0
    assert served[-1]["sampling_defaults"] == {"temperature": 0.6, "top_p": 0.9}
    assert "sampling defaults {'temperature': 0.6, 'top_p': 0.9}" in capsys.readouterr().out
    assert main([*serve, "--generation-config", "vllm"]) == 0 and served[-1]["sampling_defaults"] == {}
    assert main([*serve, "--generation-config", "vllm", "--override-generation-config",
                 '{"temperature": 0.2, "max_new_tokens": 64}']) == 0
    assert served[-1]["sampling_defaults"] == {"temperature": 0.2, "max_tokens": 64}
    n = len(served)
    for bad, msg in [(["--override-generation-config", "{x"], "not valid JSON"),
                     (["--override-generation-config", '{"temperature": 9}'], "temperature=9 is out of the range"),
                     (["--generation-config", str(tmp_path / "nowhere")], "no generation_config.json there")]:
        assert main([*serve, *bad]) == 2, bad
        assert msg in capsys.readouterr().err, bad
    assert len(served) == n


def test_request_chat_templates_only_when_trusted(start, tiny_model_dir):
    """A chat request's own ``chat_template`` (vLLM's field): rendered instead of the tokenizer's when
    the server trusts request templates (``--trust-request-chat-template``), a 400 otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moelora.engine import Engine

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = Engine(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok, max_batch=2)
    template = "{% for m in messages %}<<{{ m.content }}>>{% endfor %}"
    body = {"messages": [{"role": "user", "content": "a b"}], "chat_template": template}
    url, _ = start(engine, trust_request_chat_template=True)
    r = post(url, "/tokenize", body)
    assert r.status_code == 200 and tok.decode(r.json()["tokens"]) == "<<a b>>"
    c = post(url, "/v1/chat/completions", {"model": engine.base_name, **body, "max_tokens": 2})
    assert c.status_code == 200 and c.json()["usage"]["prompt_tokens"] == r.json()["count"]
    assert_error(post(url, "/tokenize", {**body, "chat_template": 5}), 400, code="invalid_value", param="chat_template")
    plain, _ = start(Engine(engine.model, tok, max_batch=2))  # an engine per server: one thread each
    r = post(plain, "/v1/chat/completions", {"model": engine.base_name, **body})
    assert_error(r, 400, code="unsupported_parameter", param="chat_template")
    assert "--trust-request-chat-template" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------------------- run-batch
def test_run_batch_answers_every_line_in_order(tmp_path):
    """``moelora run-batch`` (vLLM's run_batch, OpenAI's batch files): every line gets a result in the
    input's order, the server's answer (200) or its refusal (status and error body), and lines that
    are not requests an error record; an existing output is kept unless overwrite."""
    from moelora.batch import run_batch

    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    lines = [json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": chat}),
             json.dumps({"custom_id": "b", "url": "/v1/completions", "body": {"model": "beta", "prompt": "yo",
                                                                                "max_tokens": 3}}),
             "{not json",
             json.dumps({"custom_id": "a", "url": "/v1/completions", "body": {}}),
             "",
             json.dumps({"custom_id": "c", "url": "/v1/embeddings", "body": {}}),
             json.dumps({"custom_id": "d", "url": "/v1/completions", "body": {"model": "nope", "prompt": "x"}}),
             json.dumps({"custom_id": "e", "url": "/v1/completions", "body": {"model": "alpha", "prompt": "x",
                                                                                "stream": True}})]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    engine = FakeEngine(ADAPTERS, max_batch=4, max_queue=16)
    counts = run_batch(engine, src, dst)
    out = [json.loads(x) for x in dst.read_text().splitlines()]
    assert counts == {"total": 7, "ok": 2, "failed": 5}
    assert [r["custom_id"] for r in out] == ["a", "b", None, "a", "c", "d", "e"]
    a, b = out[0]["response"], out[1]["response"]
    assert a["status_code"] == 200 and a["body"]["choices"][0]["message"]["content"] == expected("alpha", "hi", 4)[0]
    assert a["request_id"] == a["body"]["id"] and out[0]["error"] is None
    assert b["body"]["choices"][0]["text"] == expected("beta", "yo", 3)[0]
    assert out[2]["error"]["message"].startswith("line 3: not JSON") and out[2]["response"] is None
    assert "custom_id 'a' is used by an earlier line" in out[3]["error"]["message"]
    assert "url must be one of" in out[4]["error"]["message"]
    assert out[5]["response"]["status_code"] == 404 and out[5]["response"]["body"]["error"]["code"] == "model_not_found"
    assert "stream is not supported" in out[6]["error"]["message"]
    with pytest.raises(ValueError, match="exists: pass --overwrite"):
        run_batch(engine, src, dst)
    assert len(dst.read_text().splitlines()) == 7  # kept


def test_cli_run_batch_with_a_real_model(tmp_path, tiny_model_dir, real_adapters, capsys):
    from moelora.cli import main

    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"custom_id": f"r{i}", "url": "/v1/completions",
                                       "body": {"model": m, "prompt": "Below is", "max_tokens": 4, "temperature": 0}})
                           + "\n" for i, m in enumerate(["lora-a", "lora-b", "tiny"])))
    args = ["run-batch", "-i", str(src), "-o", str(dst), "--model", str(tiny_model_dir), "--device", "cpu",
            "--served-model-name", "tiny", "--adapter", f"lora-a={real_adapters['lora-a']}",
            "--adapter", f"lora-b={real_adapters['lora-b']}"]
    assert main(args) == 0
    assert "3 requests, 3 answered (200), 0 not" in capsys.readouterr().out
    out = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [r["response"]["body"]["model"] for r in out] == ["lora-a", "lora-b", "tiny"]
    assert main(args) == 2 and "exists: pass --overwrite" in capsys.readouterr().err
    assert main([*args[:1], "-i", str(tmp_path / "none.jsonl"), *args[3:]]) == 2
    assert "no such file" in capsys.readouterr().err


def test_request_log_lines_only_when_enabled(start, caplog):
    """``--enable-log-requests`` (vLLM's): one INFO line per finished request with its id, model, finish
    reason, token counts and latency, never its text; nothing without the flag."""
    import logging

    url, _ = start(log_requests=True)
    with caplog.at_level(logging.INFO, logger="moelora.server"):
        d = post(url, "/v1/completions", {**GOOD, "prompt": "secret words", "max_tokens": 3}).json()
        assert _wait_for(lambda: any(d["id"] in r.getMessage() for r in caplog.records))
    (line,) = [r.getMessage() for r in caplog.records if d["id"] in r.getMessage()]
    assert f"(model {GOOD['model']}): length, " in line and "+ 3 completion tokens in " in line
    assert "secret" not in line
    quiet, _ = start()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="moelora.server"):
        post(quiet, "/v1/completions", {**GOOD, "max_tokens": 2})
    assert not [r for r in caplog.records if "request " in r.getMessage()]


@pytest.mark.slow
def test_real_engine_allowed_token_ids_and_bad_words(real_server):
    """vLLM's ``allowed_token_ids`` and ``bad_words`` through a real tokenizer: the output stays inside
    the allowed ids; a banned word (alone or after a space) never appears; bad values are 400s."""
    url, engine = real_server
    tok = engine.tokenizer
    body = {"model": "lora-a", "prompt": "Below is an instruction", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}
    allowed = tok(" a b c the", add_special_tokens=False)["input_ids"]
    c = post(url, "/v1/completions", {**body, "allowed_token_ids": allowed}).json()["choices"][0]
    assert set(tok(c["text"], add_special_tokens=False)["input_ids"]) <= set(allowed), c
    word = c["text"].split()[0]  # what it says first, among the allowed words: banned, it never comes
    banned = post(url, "/v1/completions", {**body, "allowed_token_ids": allowed, "bad_words": [word]}).json()
    text = banned["choices"][0]["text"]
    assert word not in text.split() and set(tok(text, add_special_tokens=False)["input_ids"]) <= set(allowed), text
    for extra, param in [({"allowed_token_ids": []}, "allowed_token_ids"), ({"allowed_token_ids": [-1]},
                         "allowed_token_ids"), ({"bad_words": ["  "]}, "bad_words"), ({"bad_words": "x"}, "bad_words")]:
        assert_error(post(url, "/v1/completions", {**body, **extra}), 400, code="invalid_value", param=param)


@pytest.mark.parametrize("kind", ["deepseek_r1", "qwen3"])
def test_reasoning_goes_to_reasoning_content_streamed_or_not(start, kind):
    """``--reasoning-parser`` (vLLM's): ``<think>...</think>`` of a chat reply in ``reasoning_content``,
    the rest in ``content`` (and read for tool calls); streamed as ``reasoning_content`` deltas, with
    no tag fragment in either; completions untouched. Without a ``<think>`` opening: all reasoning for
    deepseek_r1 (its template opens it in the prompt), all content for qwen3."""
    engine = ScriptEngine(ADAPTERS, max_batch=4, max_queue=16)
    engine.script = "<think>\\nLet me see.</think>\\n\\nIt is 4." + TWO_CALLS[len("Let me check."):]
    url, _ = start(engine, reasoning_parser=kind, tool_parser="hermes")
    body = {"model": "alpha", "messages": [{"role": "user", "content": "2+2?"}], "tools": [WEATHER], "max_tokens": 300}
    m = post(url, "/v1/chat/completions", body).json()["choices"][0]["message"]
    assert m["reasoning_content"] == "\\nLet me see." and m["content"] == "\\n\\nIt is 4."
    assert [c["function"]["name"] for c in m["tool_calls"]] == ["get_weather", "get_time"]
    deltas = [e["choices"][0]["delta"] for e in stream(url, "/v1/chat/completions", body)]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "\\nLet me see."
    assert "".join(d.get("content") or "" for d in deltas) == "\\n\\nIt is 4."
    engine.script = "Plain answer."
    m = post(url, "/v1/chat/completions", {**body, "tools": None}).json()["choices"][0]["message"]
    want = ("Plain answer.", None) if kind == "deepseek_r1" else (None, "Plain answer.")
    assert (m["reasoning_content"], m["content"]) == want
    assert post(url, "/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": 40}).json()[
        "choices"][0]["text"] == "Plain answer."
    from moelora.server import create_app

    with pytest.raises(ValueError, match="unknown reasoning parser 'granite'"):
        create_app(FakeEngine(ADAPTERS), reasoning_parser="granite")


def test_truncate_prompt_tokens_keeps_the_prompts_end(start):
    """vLLM's ``truncate_prompt_tokens``: only the prompt's last k tokens reach the engine (-1: as many
    as the context holds); 0 or a non-integer is a 400."""
    url, engine = start()
    long_prompt = "abcdefghij" * 3  # 30 byte tokens for the fake tokenizer
    d = post(url, "/v1/completions", {**GOOD, "prompt": long_prompt, "truncate_prompt_tokens": 5}).json()
    assert d["usage"]["prompt_tokens"] == 5
    assert d["choices"][0]["text"] == expected("alpha", long_prompt[-5:], GOOD["max_tokens"])[0]
    whole = post(url, "/v1/completions", {**GOOD, "prompt": long_prompt, "truncate_prompt_tokens": -1}).json()
    assert whole["usage"]["prompt_tokens"] == 30
    for bad in (0, "5", -2):
        assert_error(post(url, "/v1/completions", {**GOOD, "truncate_prompt_tokens": bad}), 400,
                     param="truncate_prompt_tokens")


def test_skip_special_tokens_reaches_the_engine(start):
    engine = RecordingEngine(ADAPTERS, max_batch=4, max_queue=16)
    url, _ = start(engine)
    post(url, "/v1/completions", {**GOOD, "skip_special_tokens": False})
    post(url, "/v1/completions", GOOD)
    assert [p.skip_special_tokens for p in engine.seen] == [False, True]
    assert_error(post(url, "/v1/completions", {**GOOD, "skip_special_tokens": "no"}), 400, code="invalid_type",
                 param="skip_special_tokens")
