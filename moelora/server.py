"""``moelora serve``: an OpenAI-compatible HTTP server over the multi-tenant :class:`moelora.engine.Engine`.

    from moelora.server import create_app, serve_in_thread
    url, stop = serve_in_thread(engine, "127.0.0.1", 0, api_key=None)   # port 0 = any free port
    ...
    stop()

Endpoints (OpenAI / vLLM shapes): ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models``, ``GET /v1/models/{name}``, ``GET /health``, ``GET /metrics`` (Prometheus), vLLM's
``POST /tokenize``, ``POST /detokenize`` and ``GET /version`` and, only with ``admin=True``
(``moelora serve --admin``), ``POST /v1/admin/adapters`` and ``DELETE /v1/admin/adapters/{name}`` (and
vLLM's names for them, ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``).
With ``tool_parser`` (``moelora.tools``: hermes, llama3_json, mistral, pythonic) chat requests may
pass ``tools`` and replies are parsed for calls in that format into ``tool_calls``. See docs/serve.md.

Threading: the engine is not thread-safe, so one engine thread (:class:`EngineWorker`) owns it and is
the only caller of its methods (and of its tokenizer). The asyncio handlers hand it work through a
thread-safe queue and get answers back through futures; per-request outputs are routed strictly by
request id into that request's ``asyncio.Queue`` with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hmac
import json
import logging
import math
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

try:
    from aiohttp import web
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("moelora serve needs aiohttp: pip install 'moelora[serve]'") from e

from .engine import MAX_LOGPROBS, QueueFull, SamplingParams
from .structured import SchemaError, check_guides, schema_regex
from .tools import REASONING_PARSERS, ReasoningSplitter, ToolFormat, tool_format

__all__ = ["create_app", "serve_in_thread", "run_server", "EngineWorker", "APIError", "ADAPTER_NAME_RE",
           "SamplingParams", "QueueFull"]

log = logging.getLogger("moelora.server")

# the engine's rule (no dots or slashes: a name is never a path)
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_STOP = 16  # stop sequences per request (OpenAI allows 4; vLLM has no limit)
MAX_STOP_LEN = 256
MAX_BODY = 8 * 1024 * 1024  # request body bytes
MAX_CHAT_TEMPLATE = 65536  # characters of a request's own chat_template
MAX_ALLOWED_TOKENS = 65536  # allowed_token_ids of a request
MAX_CHOICES = 64  # prompts x n of one request: each choice is one engine request
MAX_LOGIT_BIAS = 1024  # token ids in logit_bias (OpenAI allows 300)
MAX_STOP_TOKEN_IDS = 256  # vLLM's stop_token_ids per request


# ----------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered in the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return web.json_response(self.body(), status=self.status, headers=headers)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}


# ----------------------------------------------------------------------------------------- engine thread
@dataclass
class _Stream:
    """Where one engine request's outputs go: ``(index, output)`` into an asyncio queue living on ``loop``.
    The choices of one HTTP request (batched prompts, ``n`` > 1) share the queue, each with its index."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int = 0

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, item))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


# vLLM's buckets for its latency histograms (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)


class _Histogram:
    """A Prometheus histogram: cumulative bucket counts, a sum and a count."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1

    def lines(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class EngineWorker:
    """The one thread that calls engine methods. Loops ``step()`` while ``has_work()``, else blocks on its queue.

    ``call(fn, *args)`` runs ``fn(engine, *args)`` on the engine thread and returns a
    ``concurrent.futures.Future``; ``register``/``abort`` manage the request-id -> stream routing table.
    An exception in ``step()`` fails every running request (they get a 500) and the thread keeps serving.
    """

    def __init__(self, engine: Any):
        self.engine = engine
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # touched only on the engine thread
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self.step_errors = 0
        # counters for /metrics (written on the engine thread only)
        self.steps = 0
        self.prompt_tokens = 0  # of finished requests
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}  # finish_reason -> requests
        # latency histograms (vLLM's): from registration to the first token, to the end, and per token after the first
        self.ttft = _Histogram(TTFT_BUCKETS)
        self.e2e = _Histogram(E2E_BUCKETS)
        self.tpot = _Histogram(TPOT_BUCKETS)
        self._times: dict[str, list] = {}  # request id -> [registered, first token time, model name]
        self.log_requests = False  # one log line per finished or aborted request (serve --enable-log-requests)

    # -- called from any thread
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="moelora-engine", daemon=True)
            self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopped.is_set()

    def call(self, fn: Callable, *args: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._stopped.is_set():
            fut.set_exception(APIError(503, "the server is shutting down", type="server_error", code="unavailable"))
        else:
            self._cmds.put(("call", fn, args, fut))
        return fut

    async def run(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.wrap_future(self.call(fn, *args))

    def abort(self, request_id: str) -> None:
        if not self._stopped.is_set():
            self._cmds.put(("abort", request_id))

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self._cmds.put(("stop",))
        self._thread.join(timeout)

    # -- engine thread only
    def register(self, request_id: str, stream: _Stream, model: str | None = None) -> None:
        self._streams[request_id] = stream
        self._times[request_id] = [time.monotonic(), None, model]

    def _timed(self, out: Any) -> None:
        """Latency histograms from one output of a registered request."""
        times = self._times.get(out.request_id)
        if times is None:
            return
        now = time.monotonic()
        if times[1] is None and getattr(out, "token_ids", None):
            times[1] = now
            self.ttft.observe(now - times[0])
        if out.finished:
            del self._times[out.request_id]
            self.e2e.observe(now - times[0])
            n = int(getattr(out, "completion_tokens", 0) or 0)
            if times[1] is not None and n > 1:
                self.tpot.observe((now - times[1]) / (n - 1))
            if self.log_requests:
                first = f", first token {times[1] - times[0]:.3f} s" if times[1] is not None else ""
                log.info("request %s (model %s): %s, %s prompt + %d completion tokens in %.3f s%s", out.request_id,
                         times[2], out.finish_reason, getattr(out, "prompt_tokens", "?"), n, now - times[0], first)

    def _run(self) -> None:
        try:
            while True:
                busy = self._has_work()
                try:
                    cmd = self._cmds.get_nowait() if busy else self._cmds.get()
                except queue.Empty:
                    cmd = None
                while cmd is not None:  # drain everything queued, in order, before the next step
                    if cmd[0] == "stop":
                        self._shutdown()
                        return
                    self._handle(cmd)
                    try:
                        cmd = self._cmds.get_nowait()
                    except queue.Empty:
                        cmd = None
                if self._has_work():
                    self._step()
                elif self._streams:  # the engine is idle but requests wait: they were lost, never hang them
                    self._fail_all("the engine dropped the request")
        except BaseException:  # pragma: no cover - a bug in this loop; leave /health reporting it
            log.exception("engine thread crashed")
            self._stopped.set()
            self._fail_all("the engine thread crashed")
            raise

    def _handle(self, cmd: tuple) -> None:
        if cmd[0] == "call":
            _, fn, args, fut = cmd
            if not fut.set_running_or_notify_cancel():
                return
            try:
                result = fn(self.engine, *args)
            except BaseException as e:  # delivered to the caller, never kills the thread
                fut.set_exception(e)
            else:
                fut.set_result(result)
        elif cmd[0] == "abort":
            rid = cmd[1]
            self._streams.pop(rid, None)
            times = self._times.pop(rid, None)
            if times is not None and self.log_requests:
                log.info("request %s (model %s): aborted after %.3f s (the client left)", rid, times[2],
                         time.monotonic() - times[0])
            try:
                self.engine.abort(rid)
            except Exception:  # unknown or already finished
                pass

    def _has_work(self) -> bool:
        try:
            return bool(self.engine.has_work())
        except Exception:
            log.exception("engine.has_work() raised")
            self.step_errors += 1
            self._fail_all("internal engine error")
            return False

    def _step(self) -> None:
        try:
            outputs = list(self.engine.step())
        except Exception as e:
            log.exception("engine.step() raised; failing %d running request(s)", len(self._streams))
            self.step_errors += 1
            self._fail_all(f"internal engine error: {type(e).__name__}")
            time.sleep(0.01)  # no hot loop if the engine keeps failing
            return
        self.steps += 1
        for out in outputs:
            self.generation_tokens += len(getattr(out, "token_ids", ()) or ())
            if getattr(out, "finished", False):
                reason = str(out.finish_reason)
                self.finished[reason] = self.finished.get(reason, 0) + 1
                self.prompt_tokens += int(getattr(out, "prompt_tokens", 0) or 0)
            rid = getattr(out, "request_id", None)
            stream = self._streams.get(rid) if isinstance(rid, str) else None
            if stream is None:  # aborted, already finished or foreign: dropped, never delivered elsewhere
                self._times.pop(rid, None)
                continue
            self._timed(out)
            if out.finished:
                del self._streams[rid]
            stream.put(out)

    def _fail_all(self, message: str, status: int = 500, code: str = "internal_error") -> None:
        streams, self._streams = self._streams, {}
        self._times.clear()
        for rid, stream in streams.items():
            stream.put(APIError(status, message, type="server_error", code=code))
            try:
                self.engine.abort(rid)
            except Exception:
                pass

    def _shutdown(self) -> None:
        self._stopped.set()
        self._fail_all("the server is shutting down", status=503, code="unavailable")
        while True:  # answer whatever is still queued
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "call" and cmd[3].set_running_or_notify_cancel():
                cmd[3].set_exception(APIError(503, "the server is shutting down", type="server_error",
                                              code="unavailable"))


# ------------------------------------------------------------------------------------------- validation
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _opt_int(body: dict, key: str, lo: int | None = None, hi: int | None = None) -> int | None:
    x = body.get(key)
    if x is None:
        return None
    if not _is_int(x):
        raise _bad(f"'{key}' must be an integer, got {type(x).__name__}", param=key, code="invalid_type")
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise _bad(f"'{key}' must be {rng}, got {x}", param=key, code="invalid_value")
    return x


def _opt_num(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    x = body.get(key)
    if x is None:
        return default
    if not _is_num(x):
        raise _bad(f"'{key}' must be a number, got {type(x).__name__}", param=key, code="invalid_type")
    if x > hi or x < lo or (lo_open and x == lo):
        raise _bad(f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {x}", param=key,
                   code="invalid_value")
    return float(x)


def _opt_bool(body: dict, key: str) -> bool:
    x = body.get(key, False)
    if x is None:
        return False
    if not isinstance(x, bool):
        raise _bad(f"'{key}' must be a boolean, got {type(x).__name__}", param=key, code="invalid_type")
    return x


def _unsupported(body: dict, chat: bool) -> None:
    """Fields we do not implement are refused when set to anything but their neutral value."""
    neutral = {"echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
               "tools": (None, []), "functions": (None, [])}
    for key, ok in neutral.items():
        if (key in ("echo", "best_of") and not chat) or (key == "tools" and chat):  # implemented there
            continue
        if key in body and not any(body[key] == v and type(body[key]) is type(v) for v in ok):
            raise _bad(f"'{key}' is not supported by this server", param=key, code="unsupported_parameter")
    rf = body.get("response_format")
    if rf is not None and rf not in ({"type": "text"}, {"type": "json_object"}) and not (
            isinstance(rf, dict) and rf.get("type") == "json_schema"):
        raise _bad("response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                   "{\"type\": \"json_schema\", \"json_schema\": {\"schema\": {...}}}", param="response_format",
                   code="unsupported_parameter")


def _structured_outputs(body: dict) -> dict:
    """vLLM's newer ``structured_outputs: {"json" | "regex" | "choice" | "json_object": ...}`` -> the same
    request with the matching ``guided_*`` field (one guide; ``grammar`` and the rest are refused)."""
    so = body.get("structured_outputs")
    if so is None:
        return body
    fields = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice",
              "json_object": "guided_json_object", "grammar": "guided_grammar"}
    if not isinstance(so, dict):
        raise _bad("'structured_outputs' must be an object", param="structured_outputs", code="invalid_type")
    other = sorted(k for k, v in so.items() if k not in fields and v not in (None, False))
    if other:
        raise _bad(f"structured_outputs {other} are not supported (json, regex, choice, json_object, grammar are)",
                   param="structured_outputs", code="unsupported_parameter")
    out = dict(body)
    for k, v in so.items():
        if k in fields and v is not None:
            if body.get(fields[k]) is not None:
                raise _bad(f"'{fields[k]}' is also given in structured_outputs", param="structured_outputs",
                           code="invalid_value")
            out[fields[k]] = v
    return out


def _schema_guide(body: dict) -> tuple[str, str] | None:
    """A JSON schema (OpenAI's ``response_format`` ``json_schema``, or vLLM's ``guided_json``) -> (the
    field that gave it, the regular expression of its valid texts); None without one."""
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
            raise _bad("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                       param="response_format", code="invalid_value")
        key, schema = "response_format", js["schema"]
    elif body.get("guided_json") is not None:
        key, schema = "guided_json", body["guided_json"]
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError:
                raise _bad("'guided_json' must be a JSON schema (an object, or its JSON text)", param=key,
                           code="invalid_value") from None
    else:
        return None
    try:
        return key, schema_regex(schema)
    except SchemaError as e:
        raise _bad(f"unsupported JSON schema: {e}", param=key, code="invalid_value") from None


@dataclass
class _Req:
    model: str
    params: SamplingParams
    max_tokens: int | None  # None: up to the context (chat default)
    stream: bool
    include_usage: bool
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats: usage so far in every chunk
    n: int = 1  # choices per prompt (engine requests: with best_of, the candidates)
    keep: int | None = None  # completions' best_of: the n choices returned per prompt out of the n above
    hide_logprobs: bool = False  # best_of ranks by log-probabilities the client did not ask for
    echo: bool = False  # completions: the prompt's text (and with logprobs its tokens') before the completion
    echo_texts: list[str] | None = None  # per choice, set by _submit
    prompts: list[str | list[int]] | None = None  # completions: one or more prompts (a batch)
    messages: list[dict] | None = None
    template: dict | None = None  # chat: the chat template's options (_chat_options)
    tools: list[dict] | None = None  # chat: function tools for the template; the output is parsed for calls
    tool_format: ToolFormat | None = None  # ... in the server's --tool-call-parser format (moelora.tools)
    bad_words: list[str] = dataclasses.field(default_factory=list)  # vLLM's: tokenized on the engine thread
    reasoning: str | None = None  # chat: the server's --reasoning-parser (moelora.tools.ReasoningSplitter)
    truncate: int | None = None  # vLLM's truncate_prompt_tokens: keep the prompt's last k tokens (-1: the context)

    @property
    def num_choices(self) -> int:
        return self.n * (len(self.prompts) if self.prompts is not None else 1)


SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens")


def _parse_common(body: dict, chat: bool, defaults: dict | None = None) -> _Req:
    """The fields both endpoints share; ``defaults``: what an omitted sampling field takes instead of
    OpenAI's default (vLLM's ``--generation-config``: the model's generation config)."""
    defaults = defaults or {}
    model = body.get("model")
    if model is None:
        raise _bad("you must provide a model parameter", param="model", code="missing_required_parameter")
    if not isinstance(model, str) or not model or len(model) > 256:
        raise _bad("'model' must be a non-empty string", param="model", code="invalid_type")
    n = _opt_int(body, "n", lo=1, hi=MAX_CHOICES) or 1
    _unsupported(body, chat)
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens = _opt_int(body, "max_completion_tokens", lo=1)
    else:
        max_tokens = _opt_int(body, "max_tokens", lo=1)
    if max_tokens is None:  # completions: OpenAI's (and vLLM's) 16; chat: the default's, else to the context
        max_tokens = defaults.get("max_tokens") if chat else 16
    temperature = _opt_num(body, "temperature", defaults.get("temperature", 1.0), 0.0, 2.0)  # OpenAI's; 0 = greedy
    top_p = _opt_num(body, "top_p", defaults.get("top_p", 1.0), 0.0, 1.0, lo_open=True)
    top_k = _opt_int(body, "top_k", lo=-1)  # vLLM's extension: -1 or 0 = off
    if top_k is None:
        top_k = defaults.get("top_k")
    presence = _opt_num(body, "presence_penalty", 0.0, -2.0, 2.0)
    frequency = _opt_num(body, "frequency_penalty", 0.0, -2.0, 2.0)
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise _bad(f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} token ids", param="logit_bias",
                   code="invalid_type")
    logit_bias = {}
    for key, v in bias.items():
        if not (isinstance(key, str) and key.isdigit() and key.isascii()) or not _is_num(v) or not -100 <= v <= 100:
            raise _bad("'logit_bias' maps token ids (as strings) to numbers in [-100, 100]", param="logit_bias",
                       code="invalid_value")
        logit_bias[int(key)] = float(v)
    seed = _opt_int(body, "seed", lo=-(2**63), hi=2**64 - 1)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad("'stop' must be a string or a list of strings", param="stop", code="invalid_type")
    if len(stop) > MAX_STOP or any(not s or len(s) > MAX_STOP_LEN for s in stop):
        raise _bad(f"'stop' takes at most {MAX_STOP} non-empty strings of up to {MAX_STOP_LEN} characters",
                   param="stop", code="invalid_value")
    if chat:  # chat: logprobs true/false and top_logprobs k; completions: logprobs k
        logprobs = _opt_int(body, "top_logprobs", lo=0, hi=MAX_LOGPROBS)
        if _opt_bool(body, "logprobs"):
            logprobs = logprobs or 0
        elif logprobs:
            raise _bad("'top_logprobs' needs logprobs=true", param="top_logprobs", code="invalid_value")
        else:
            logprobs = None
    else:
        if isinstance(body.get("logprobs"), bool) and not body["logprobs"]:
            logprobs = None  # false: off (some clients send it)
        else:
            logprobs = _opt_int(body, "logprobs", lo=0, hi=MAX_LOGPROBS)
    stream = _opt_bool(body, "stream")
    so = body.get("stream_options")
    include_usage = continuous = False
    if so is not None:
        if not isinstance(so, dict):
            raise _bad("'stream_options' must be an object", param="stream_options", code="invalid_type")
        if not stream:
            raise _bad("'stream_options' is only allowed with stream=true", param="stream_options",
                       code="invalid_value")
        include_usage = _opt_bool(so, "include_usage")
        continuous = _opt_bool(so, "continuous_usage_stats")
    # vLLM's extra sampling parameters
    repetition = _opt_num(body, "repetition_penalty", defaults.get("repetition_penalty", 1.0), 0.0, 10.0, lo_open=True)
    min_p = _opt_num(body, "min_p", defaults.get("min_p", 0.0), 0.0, 1.0)
    min_tokens = _opt_int(body, "min_tokens", lo=0) or 0
    if max_tokens is not None and min_tokens > max_tokens:
        raise _bad(f"'min_tokens' ({min_tokens}) must not exceed max_tokens ({max_tokens})", param="min_tokens",
                   code="invalid_value")
    stop_ids = body.get("stop_token_ids")
    if stop_ids is None:
        stop_ids = []
    if not isinstance(stop_ids, list) or len(stop_ids) > MAX_STOP_TOKEN_IDS or not all(
            _is_int(t) and t >= 0 for t in stop_ids):
        raise _bad(f"'stop_token_ids' must be a list of at most {MAX_STOP_TOKEN_IDS} token ids >= 0",
                   param="stop_token_ids", code="invalid_value")
    ignore_eos = _opt_bool(body, "ignore_eos")
    skip_special = _opt_bool(body, "skip_special_tokens") if body.get("skip_special_tokens") is not None else True
    allowed = body.get("allowed_token_ids")
    if allowed is not None and (not isinstance(allowed, list) or not 0 < len(allowed) <= MAX_ALLOWED_TOKENS
                                or not all(_is_int(t) and t >= 0 for t in allowed)):
        raise _bad(f"'allowed_token_ids' must be a list of 1-{MAX_ALLOWED_TOKENS} token ids >= 0",
                   param="allowed_token_ids", code="invalid_value")
    bad_words = body.get("bad_words")
    if bad_words is None:
        bad_words = []
    if not isinstance(bad_words, list) or len(bad_words) > MAX_STOP or not all(
            isinstance(w, str) and w.strip() and len(w) <= MAX_STOP_LEN for w in bad_words):
        raise _bad(f"'bad_words' must be a list of at most {MAX_STOP} non-blank strings of up to {MAX_STOP_LEN} "
                   "characters", param="bad_words", code="invalid_value")
    priority = _opt_int(body, "priority", lo=-(2**31), hi=2**31) or 0
    include_stop = _opt_bool(body, "include_stop_str_in_output")
    params = SamplingParams(max_tokens=max_tokens or 1, temperature=temperature, top_p=top_p, seed=seed,
                            stop=list(stop), logprobs=logprobs, top_k=max(top_k or 0, 0),
                            presence_penalty=presence, frequency_penalty=frequency, logit_bias=logit_bias,
                            repetition_penalty=repetition, min_p=min_p, min_tokens=min_tokens,
                            stop_token_ids=list(stop_ids), ignore_eos=ignore_eos,
                            include_stop_str_in_output=include_stop, priority=priority,
                            allowed_token_ids=None if allowed is None else list(allowed),
                            skip_special_tokens=skip_special,
                            json_object=body.get("response_format") == {"type": "json_object"},
                            guided_regex=body.get("guided_regex"), guided_choice=body.get("guided_choice"))
    body = _structured_outputs(body)
    if body.get("guided_json_object") is not None:  # (from structured_outputs)
        params.json_object = _opt_bool(body, "guided_json_object")
    params.guided_regex, params.guided_choice = body.get("guided_regex"), body.get("guided_choice")
    params.guided_grammar = body.get("guided_grammar")
    given = [k for k in ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_json_object",
                         "guided_grammar") if (body.get(k) not in (None, {"type": "text"}))]
    schema = _schema_guide(body)
    if schema is not None:
        if len(given) > 1:
            raise _bad(f"use at most one of {given}", param=given[-1], code="invalid_value")
        params.guided_regex = schema[1]
    try:
        check_guides(params.json_object, params.guided_regex, params.guided_choice, params.guided_grammar)
    except ValueError as e:  # named by the last guide the request sets
        raise _bad(str(e), param=given[-1], code="invalid_value") from None
    truncate = _opt_int(body, "truncate_prompt_tokens", lo=-1)
    if truncate == 0:
        raise _bad("'truncate_prompt_tokens' must be -1 (the context) or >= 1", param="truncate_prompt_tokens",
                   code="invalid_value")
    return _Req(model=model, params=params, max_tokens=max_tokens, stream=stream, include_usage=include_usage, n=n,
                continuous_usage=continuous, bad_words=list(bad_words), truncate=truncate)


def _check_prompt(prompt: Any) -> str | list[int]:
    """One prompt: a non-empty string or a non-empty list of token ids >= 0."""
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("'prompt' must not be empty", param="prompt", code="invalid_value")
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if any(t < 0 for t in prompt):
            raise _bad("token ids in 'prompt' must be >= 0", param="prompt", code="invalid_value")
    else:
        raise _bad("'prompt' must be a non-empty string, a non-empty list of token ids, or a list of those",
                   param="prompt", code="invalid_type")
    return prompt


def _parse_completion(body: dict, defaults: dict | None = None) -> _Req:
    req = _parse_common(body, chat=False, defaults=defaults)
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("you must provide a prompt parameter", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        req.prompts = [_check_prompt(p) for p in prompt]  # a batch: one choice per prompt (times n)
    else:
        req.prompts = [_check_prompt(prompt)]
    req.echo = _opt_bool(body, "echo")
    best_of = _opt_int(body, "best_of", lo=1, hi=MAX_CHOICES)
    if best_of is not None and best_of > 1:  # best_of candidates per prompt, the n best returned
        if best_of < req.n:
            raise _bad(f"best_of ({best_of}) must be >= n ({req.n})", param="best_of", code="invalid_value")
        if req.stream:
            raise _bad("best_of > 1 cannot be streamed (the best are known at the end)", param="best_of",
                       code="invalid_value")
        req.keep, req.n = req.n, best_of
        if req.params.logprobs is None:
            req.params.logprobs, req.hide_logprobs = 0, True
    if req.echo:
        req.params.prompt_logprobs = None if req.hide_logprobs else req.params.logprobs
    if req.num_choices > MAX_CHOICES:
        raise _bad(f"a request may ask for at most {MAX_CHOICES} completions (prompts x n, or x best_of), got "
                   f"{len(req.prompts)} x {req.n}", param="n" if len(req.prompts) == 1 else "prompt",
                   code="invalid_value")
    return req


_ROLES = {"system", "developer", "user", "assistant", "tool"}


def _parse_chat(body: dict, fmt: ToolFormat | None = None, defaults: dict | None = None,
                trust_template: bool = False) -> _Req:
    """A chat request; ``fmt``: the server's tool-call format (None: ``tools`` are refused);
    ``trust_template``: whether a request may bring its own ``chat_template``."""
    req = _parse_common(body, chat=True, defaults=defaults)
    req.messages = _check_messages(body.get("messages"))
    req.template = _chat_options(body, trust_template)
    req.tools = _check_tools(body)
    if req.tools is not None:
        if fmt is None:
            raise _bad("tool calls need the server started with --tool-call-parser (hermes, llama3_json, mistral "
                       "or pythonic, as the model writes calls)", param="tools", code="unsupported_parameter")
        req.template["tools"], req.tool_format = req.tools, fmt
        forced = _forced_calls(body, req.tools, fmt)
        if forced is not None:
            if (req.params.json_object or req.params.guided_regex or req.params.guided_choice
                    or req.params.guided_grammar):
                raise _bad("tool_choice 'required' or a named function cannot be combined with another guide "
                           "(response_format, guided_*)", param="tool_choice", code="invalid_value")
            req.params.guided_regex = forced
    return req


def _forced_calls(body: dict, tools: list[dict], fmt: ToolFormat) -> str | None:
    """``tool_choice`` ``"required"`` or ``{"type": "function", "function": {"name": ...}}`` -> the
    pattern of the calls allowed in the server's format (guided decoding: the reply is one call, or
    several unless ``parallel_tool_calls`` is false, each with arguments valid under its tool's
    ``parameters`` schema); None for ``"auto"``."""
    choice = body.get("tool_choice")
    if choice in (None, "auto", "none"):
        return None
    if not fmt.forced_ok:
        raise _bad(f"tool_choice 'required' or a named function is not available with the {fmt.name} tool call "
                   "format", param="tool_choice", code="invalid_value")
    if choice == "required":
        chosen = tools
    else:
        f = choice.get("function") if choice.get("type") == "function" else None
        name = f.get("name") if isinstance(f, dict) else None
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise _bad(f"tool_choice names no tool in 'tools': {name!r}", param="tool_choice", code="invalid_value")
    calls = []
    for t in chosen:
        params = t["function"].get("parameters") or {"type": "object", "properties": {}}
        try:
            args = schema_regex(params)
        except SchemaError as e:
            raise _bad(f"tool {t['function']['name']!r}: unsupported parameters schema for a forced call: {e}",
                       param="tool_choice", code="invalid_value") from None
        calls.append((t["function"]["name"], args))
    return fmt.forced(calls, parallel=body.get("parallel_tool_calls") is not False)


TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


def _check_tools(body: dict) -> list[dict] | None:
    """``tools`` (OpenAI's function tools) and ``tool_choice``: the tools the template shows the model
    (None: none, or ``tool_choice: "none"``). ``"required"`` and a named function are enforced by
    guided decoding (``_forced_calls``)."""
    choice = body.get("tool_choice")
    if choice not in (None, "none", "auto", "required") and not isinstance(choice, dict):
        raise _bad("'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                   "\"function\": {\"name\": ...}}", param="tool_choice", code="invalid_value")
    if body.get("parallel_tool_calls") is not None:
        _opt_bool(body, "parallel_tool_calls")  # checked; the parser returns every call the model writes
    tools = body.get("tools")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise _bad("tool_choice 'required' or a named function needs 'tools'", param="tool_choice",
                       code="invalid_value")
        return None
    if not isinstance(tools, list) or len(tools) > 128:
        raise _bad("'tools' must be a list of at most 128 tools", param="tools", code="invalid_type")
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(f, dict):
            raise _bad(f"'{where}' must be {{\"type\": \"function\", \"function\": {{...}}}}", param=where,
                       code="invalid_type")
        if not isinstance(f.get("name"), str) or not TOOL_NAME_RE.match(f["name"]):
            raise _bad(f"'{where}.function.name' must be 1-64 letters, digits, '_' or '-'",
                       param=f"{where}.function.name", code="invalid_value")
        for key, kind in (("description", str), ("parameters", dict), ("strict", bool)):
            if f.get(key) is not None and not isinstance(f[key], kind):
                raise _bad(f"'{where}.function.{key}' must be a {kind.__name__}", param=f"{where}.function.{key}",
                           code="invalid_type")
    return None if choice == "none" else tools


_TEMPLATE_RESERVED = {"conversation", "messages", "tokenize", "add_generation_prompt", "continue_final_message",
                      "tools", "documents", "chat_template", "return_tensors", "return_dict", "tokenizer_kwargs"}


def _chat_options(body: dict, trust_template: bool = False) -> dict:
    """vLLM's chat-template fields: ``add_generation_prompt`` (default true), ``continue_final_message``
    (default false: true continues the last, assistant, message instead of opening a new one) and
    ``chat_template_kwargs`` (extra variables for the template, e.g. Qwen3's ``enable_thinking``)."""
    gen = _opt_bool(body, "add_generation_prompt") if body.get("add_generation_prompt") is not None else True
    cont = _opt_bool(body, "continue_final_message")
    if gen and cont:
        raise _bad("'continue_final_message' needs add_generation_prompt=false", param="continue_final_message",
                   code="invalid_value")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict) or any(not isinstance(k, str) for k in kwargs):
        raise _bad("'chat_template_kwargs' must be an object", param="chat_template_kwargs", code="invalid_type")
    bad = sorted(set(kwargs) & _TEMPLATE_RESERVED)
    if bad:
        raise _bad(f"'chat_template_kwargs' may not set {bad}", param="chat_template_kwargs", code="invalid_value")
    template = body.get("chat_template")
    if template is not None:
        if not trust_template:
            raise _bad("this server does not take request chat templates (start it with --trust-request-chat-"
                       "template to allow them)", param="chat_template", code="unsupported_parameter")
        if not isinstance(template, str) or not template.strip() or len(template) > MAX_CHAT_TEMPLATE:
            raise _bad(f"'chat_template' must be a non-empty Jinja template of at most {MAX_CHAT_TEMPLATE} characters",
                       param="chat_template", code="invalid_value")
    return {"add_generation_prompt": gen, "continue_final_message": cont, "kwargs": kwargs, "chat_template": template}


def _check_messages(messages: Any) -> list[dict]:
    """Chat messages -> ``[{"role", "content"(, "name")}]`` for the chat template (text content only)."""
    if messages is None:
        raise _bad("you must provide a messages parameter", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", param="messages", code="invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"'{where}' must be an object", param=where, code="invalid_type")
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"'{where}.role' must be one of {sorted(_ROLES)}", param=f"{where}.role",
                       code="invalid_value")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"'{where}.content' parts must be {{\"type\": \"text\", \"text\": str}}",
                               param=f"{where}.content", code="invalid_type")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise _bad(f"'{where}.content' must be a string", param=f"{where}.content", code="invalid_type")
        msg = {"role": "system" if role == "developer" else role, "content": content}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        if role == "assistant" and m.get("tool_calls") is not None:
            msg["tool_calls"] = _check_history_calls(m["tool_calls"], f"{where}.tool_calls")
        if role == "tool" and m.get("tool_call_id") is not None:
            if not isinstance(m["tool_call_id"], str):
                raise _bad(f"'{where}.tool_call_id' must be a string", param=f"{where}.tool_call_id",
                           code="invalid_type")
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def _check_history_calls(calls: Any, where: str) -> list[dict]:
    """An assistant message's earlier ``tool_calls``, for the template: ``arguments`` (a JSON string in
    OpenAI's API) becomes the object templates expect (as vLLM does)."""
    if not isinstance(calls, list):
        raise _bad(f"'{where}' must be a list", param=where, code="invalid_type")
    out = []
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("arguments"), str):
            raise _bad(f"'{where}[{j}]' must be {{\"type\": \"function\", \"function\": {{\"name\": str, "
                       f"\"arguments\": str}}}}", param=f"{where}[{j}]", code="invalid_type")
        try:
            args = json.loads(f["arguments"])
        except ValueError:
            args = None
        if not isinstance(args, dict):
            raise _bad(f"'{where}[{j}].function.arguments' must be a JSON object (as a string)",
                       param=f"{where}[{j}].function.arguments", code="invalid_value")
        call = {"type": "function", "function": {"name": f["name"], "arguments": args}}
        if isinstance(c.get("id"), str):
            call["id"] = c["id"]
        out.append(call)
    return out


# ------------------------------------------------------------------------- engine-thread request setup
def _resolve_adapter(engine: Any, model: str) -> str | None:
    if model == engine.base_name:
        return None
    if model not in engine.adapter_names():
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
    return model


def _best_of(choices: list[dict], lps: list[list], req: _Req) -> list[dict]:
    """``best_of``: for each prompt, the ``req.keep`` candidates with the highest mean log-probability
    per token (OpenAI's "highest log probability per token"; EOS is not counted, an empty completion
    ranks last; ties keep the candidates' order), indexed ``prompt x keep + j``."""
    def score(i: int) -> float:
        return sum(e.logprob for e in lps[i]) / len(lps[i]) if lps[i] else float("-inf")

    out = []
    for p in range(len(choices) // req.n):
        group = sorted(range(p * req.n, (p + 1) * req.n), key=lambda i: -score(i))[: req.keep]
        for j, i in enumerate(group):
            out.append({**choices[i], "index": p * req.keep + j,
                        "logprobs": None if req.hide_logprobs else choices[i]["logprobs"]})
    return out


def _choice_ids(rid: str, req: _Req) -> list[str]:
    """The engine request id of each choice: the response id itself when there is one choice."""
    k = req.num_choices
    return [rid] if k == 1 else [f"{rid}-{i}" for i in range(k)]


def _choice_seed(seed: int | None, j: int) -> int | None:
    """Copy ``j`` of a prompt samples with ``seed + j`` (wrapped into the 64-bit range), so ``n`` copies differ."""
    if seed is None or j == 0:
        return seed
    s = seed + j
    return s - 2**64 if s > 2**64 - 1 else s


def _chat_ids(engine: Any, messages: list[dict], template: dict | None = None,
              add_special_tokens: bool = False) -> list[int]:
    """Runs on the engine thread: chat messages through the tokenizer's chat template -> token ids."""
    tok = engine.tokenizer
    t = template or {"add_generation_prompt": True, "continue_final_message": False, "kwargs": {}}
    if not getattr(tok, "chat_template", None) and not t.get("chat_template"):
        raise _bad(f"the model `{engine.base_name}` has no chat template: use /v1/completions (or start the "
                   "server with --chat-template)", param="messages", code="no_chat_template")
    opts = {"continue_final_message": True} if t["continue_final_message"] else {}  # (only when asked)
    if t.get("tools"):
        opts["tools"] = t["tools"]
    if t.get("chat_template"):
        opts["chat_template"] = t["chat_template"]
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=t["add_generation_prompt"], tokenize=False,
                                       **opts, **t["kwargs"])
    except Exception as e:  # template errors (roles must alternate, ...) are the caller's
        raise _bad(f"the chat template rejected the messages: {e}", param="messages", code="invalid_value") from e
    return list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])


def _prompt_ids(engine: Any, req: _Req, prompt: str | list[int] | None) -> tuple[list[int], str]:
    """Runs on the engine thread: one prompt (or the chat messages) -> token ids, checked against the vocabulary."""
    tok = engine.tokenizer
    if req.messages is not None:
        ids, param = _chat_ids(engine, req.messages, req.template), "messages"
    elif isinstance(prompt, str):
        ids, param = list(tok(prompt)["input_ids"]), "prompt"
    else:
        ids, param = list(prompt), "prompt"
        vocab = len(tok) if tok is not None else None
        if vocab is not None and any(t >= vocab for t in ids):
            raise _bad(f"token ids in 'prompt' must be < {vocab}", param="prompt", code="invalid_value")
    if not ids:
        raise _bad("the prompt is empty after tokenization", param=param, code="invalid_value")
    return ids, param


def _submit(engine: Any, worker: EngineWorker, rids: list[str], req: _Req, streams: list[_Stream]) -> list[int]:
    """Runs on the engine thread: tokenize and check every prompt, then add one engine request per choice and
    route its outputs. All or nothing: if any prompt is refused, or the engine refuses any choice, none stays
    queued. -> the prompt length of each choice."""
    adapter = _resolve_adapter(engine, req.model)
    if req.bad_words:  # vLLM's: each word alone and after a space (at the start of the text and inside it)
        seqs = {tuple(engine.tokenizer(prefix + w.lstrip(), add_special_tokens=False)["input_ids"])
                for w in req.bad_words for prefix in ("", " ")}
        req.params.bad_words_ids = [list(s) for s in sorted(seqs) if s]
    limit = int(engine.max_model_len)
    vocab = len(engine.tokenizer) if engine.tokenizer is not None else None
    if vocab is not None and any(t >= vocab for t in req.params.logit_bias):
        raise _bad(f"token ids in 'logit_bias' must be < {vocab}", param="logit_bias", code="invalid_value")
    if vocab is not None and any(t >= vocab for t in req.params.stop_token_ids):
        raise _bad(f"token ids in 'stop_token_ids' must be < {vocab}", param="stop_token_ids", code="invalid_value")
    jobs = []  # (ids, params) per choice, in choice order: prompt by prompt, n copies each
    req.echo_texts = []
    for prompt in (req.prompts if req.prompts is not None else [None]):
        ids, param = _prompt_ids(engine, req, prompt)
        cut = False
        if req.truncate is not None:  # vLLM's truncate_prompt_tokens: the last k tokens (-1: the context)
            keep = limit if req.truncate == -1 else req.truncate
            cut = len(ids) > keep
            ids = ids[-keep:] if cut else ids
        if req.echo:  # a text prompt is echoed as sent; token ids as the tokenizer decodes them
            text = prompt if isinstance(prompt, str) and not cut else engine.tokenizer.decode(ids, skip_special_tokens=True)
            req.echo_texts += [text] * req.n
        max_tokens = req.max_tokens if req.max_tokens is not None else limit - len(ids)
        if max_tokens < 1 or len(ids) + max_tokens > limit:
            raise _bad(f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{len(ids) + max(max_tokens, 0)} tokens ({len(ids)} in the {param}, {max(max_tokens, 0)} in "
                       f"the completion). Please reduce the length of the {param} or completion.",
                       param=param, code="context_length_exceeded")
        if req.params.min_tokens > max_tokens:  # chat without max_tokens: the room left in the context
            raise _bad(f"'min_tokens' ({req.params.min_tokens}) exceeds the {max_tokens} tokens left in the "
                       f"model's context after the {param}", param="min_tokens", code="invalid_value")
        for j in range(req.n):
            jobs.append((ids, dataclasses.replace(req.params, max_tokens=max_tokens, stop=list(req.params.stop),
                                                  stop_token_ids=list(req.params.stop_token_ids),
                                                  seed=_choice_seed(req.params.seed, j)), param))
    added = []
    try:
        for rid, (ids, params, param) in zip(rids, jobs):
            try:
                engine.add_request(rid, ids, adapter, params)
            except KeyError as e:
                raise APIError(404, f"The model `{req.model}` does not exist.", param="model",
                               code="model_not_found") from e
            except QueueFull as e:
                raise APIError(429, "the server is overloaded: too many requests waiting, retry later",
                               type="rate_limit_error", code="queue_full") from e
            except ValueError as e:
                raise _bad(str(e) or "invalid request", param=param, code="invalid_value") from e
            except Exception as e:
                if type(e).__name__ == "QueueFull":
                    raise APIError(429, "the server is overloaded: too many requests waiting, retry later",
                                   type="rate_limit_error", code="queue_full") from e
                raise
            added.append(rid)
    except BaseException:
        for rid in added:  # all or nothing
            try:
                engine.abort(rid)
            except Exception:
                pass
        raise
    for rid, stream in zip(rids, streams):
        worker.register(rid, stream, req.model)
    return [len(ids) for ids, _, _ in jobs]


# ---------------------------------------------------------------------------------------------- the app
WORKER = web.AppKey("moelora_worker", EngineWorker)
CONFIG = web.AppKey("moelora_config", dict)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _json_body(request: web.Request) -> dict:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(f"the request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", code="invalid_json")
    return body


def _as_error(item: Any) -> Any:
    """A request the engine failed by itself (finish_reason "error", e.g. its adapter would not load) -> 500."""
    if isinstance(item, BaseException) or not (item.finished and item.finish_reason == "error"):
        return item
    return APIError(500, item.text or "the engine failed the request", type="server_error", code="engine_error")


def _usage(prompt_tokens: int, completion_tokens: int, cached: list[int], n: int) -> dict:
    """OpenAI's usage object; ``cached``: per choice, prompt tokens served from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(cached[::n])}}


def _lp(x: float) -> float:
    return max(x, -9999.0)  # -inf is not JSON (vLLM clamps the same way)


def _logprobs(entries: list | None, chat: bool, k: int | None, prompt: list | None = None,
              shift: int = 0) -> dict | None:
    """Engine ``TokenLogprob``s -> OpenAI's ``logprobs`` object: chat ``{"content": [...]}``, completions
    ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` (offsets within the returned text). With
    ``echo``, ``prompt`` holds the prompt's entries (the first without a log-probability: null) and the
    completion's offsets move by ``shift``, the echoed prompt's length."""
    if k is None:
        return None
    entries = entries or []
    if not chat and prompt:
        head = _logprobs(prompt, chat, k)
        tail = _logprobs(entries, chat, k, shift=shift)
        for key in ("tokens", "token_logprobs", "text_offset"):
            head[key] += tail[key]
        if k:
            head["top_logprobs"] = [None if e.logprob is None else t for e, t in zip(prompt, head["top_logprobs"])]
            head["top_logprobs"] += tail["top_logprobs"]
        return head
    if chat:
        return {"content": [{"token": e.token, "logprob": _lp(e.logprob), "bytes": list(e.token.encode()),
                             "top_logprobs": [{"token": t, "logprob": _lp(v), "bytes": list(t.encode())}
                                              for _, t, v in e.top]} for e in entries], "refusal": None}
    return {"tokens": [e.token for e in entries],
            "token_logprobs": [None if e.logprob is None else _lp(e.logprob) for e in entries],
            "top_logprobs": [{t: _lp(v) for _, t, v in e.top} for e in entries] if k else None,
            "text_offset": [e.offset + shift for e in entries]}


def _prompt_tokens(plens: list[int], n: int) -> int:
    """Usage counts each prompt once, however many choices (``n``) it has."""
    return sum(plens[::n])


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    worker = request.app[WORKER]
    body = await _json_body(request)
    config = request.app[CONFIG]
    defaults = config["sampling_defaults"]
    req = (_parse_chat(body, config["tool_format"], defaults, config["trust_request_chat_template"]) if chat
           else _parse_completion(body, defaults))
    if chat:
        req.reasoning = config["reasoning_parser"]
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    rids = _choice_ids(rid, req)
    q: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    streams = [_Stream(loop, q, i) for i in range(len(rids))]
    done: set[int] = set()  # the choices the engine is finished with (or never had)
    try:
        try:
            plens = await worker.run(_submit, worker, rids, req, streams)
        except APIError:
            done.update(range(len(rids)))
            raise
        if req.stream:
            return await _stream_response(request, req, rid, created, plens, q, chat, done)
        texts: list[list[str]] = [[t] for t in req.echo_texts] if req.echo else [[] for _ in rids]
        lps: list[list] = [[] for _ in rids]
        plps: list[list] = [[] for _ in rids]  # echo: the prompt's entries
        reasons: list[str | None] = [None] * len(rids)
        completion_tokens, cached = [0] * len(rids), [0] * len(rids)
        while len(done) < len(rids):
            i, item = await q.get()
            item = _as_error(item)
            if isinstance(item, BaseException):
                done.add(i)
                raise item
            texts[i].append(item.text)
            lps[i] += getattr(item, "logprobs", None) or []
            plps[i] = getattr(item, "prompt_logprobs", None) or plps[i]
            completion_tokens[i] = item.completion_tokens
            cached[i] = getattr(item, "cached_tokens", 0) or cached[i]
            if item.finished:
                done.add(i)
                reasons[i] = item.finish_reason
                plens[i] = item.prompt_tokens or plens[i]
        usage = _usage(_prompt_tokens(plens, req.n), sum(completion_tokens), cached, req.n)
        k = req.params.logprobs
        if chat:
            choices = []
            for i, (t, lp, r) in enumerate(zip(texts, lps, reasons)):
                message = {"role": "assistant", "content": "".join(t)}
                if req.reasoning is not None:  # the thinking apart; the rest is the content tools are read from
                    thought, message["content"] = ReasoningSplitter(req.reasoning).split(message["content"])
                    message["reasoning_content"] = thought or None
                calls = []
                if req.tool_format is not None:
                    content, calls = req.tool_format.parse(message["content"])
                if calls:
                    message, r = {**message, "content": content if content.strip() else None,
                                  "tool_calls": calls}, "tool_calls"
                elif req.reasoning is not None and not message["content"]:
                    message["content"] = None
                choices.append({"index": i, "message": message, "logprobs": _logprobs(lp, chat, k), "finish_reason": r})
            obj = "chat.completion"
        else:
            shifts = [len(t) for t in req.echo_texts] if req.echo else [0] * len(rids)
            choices = [{"index": i, "text": "".join(t), "logprobs": _logprobs(lp, chat, k, plp, sh), "finish_reason": r}
                       for i, (t, lp, plp, sh, r) in enumerate(zip(texts, lps, plps, shifts, reasons))]
            if req.keep is not None:
                choices = _best_of(choices, lps, req)
            obj = "text_completion"
        return web.json_response({"id": rid, "object": obj, "created": created, "model": req.model,
                                  "system_fingerprint": None, "choices": choices, "usage": usage})
    finally:
        for i, r in enumerate(rids):  # the client went away / the handler was cancelled / a choice failed:
            if i not in done:  # free the engine slots of the others
                worker.abort(r)


async def _stream_response(request, req: _Req, rid: str, created: int, plens: list[int], q: asyncio.Queue,
                           chat: bool, done: set[int]) -> web.StreamResponse:
    """Server-sent events: ``data: {chunk}\n\n`` ... ``data: [DONE]\n\n``; with several choices, each chunk
    carries one choice, named by its ``index``, in the order the engine produced them."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    obj = "chat.completion.chunk" if chat else "text_completion"
    base = {"id": rid, "object": obj, "created": created, "model": req.model, "system_fingerprint": None}
    k = len(plens)

    def chunk(choices: list) -> bytes:
        d = {**base, "choices": choices}
        if req.continuous_usage:
            d["usage"] = _usage(_prompt_tokens(plens, req.n), sum(completion_tokens), cached, req.n)
        elif req.include_usage:
            d["usage"] = None
        return _sse(d)

    k_lp = req.params.logprobs
    pending: list[list] = [[] for _ in range(k)]  # logprobs released with no text yet: sent with the next chunk
    echo: dict[int, str] = dict(enumerate(req.echo_texts)) if req.echo else {}  # not sent yet
    pending_prompt: list[list] = [[] for _ in range(k)]
    shifts = [len(t) for t in req.echo_texts] if req.echo else [0] * k

    def choice(i: int, text: str | None, reason: str | None, role: bool = False, field: str = "content") -> dict:
        lp = None
        if k_lp is not None and not role:
            lp = _logprobs(pending[i], chat, k_lp, pending_prompt[i], shifts[i])
            pending[i], pending_prompt[i] = [], []
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {field: text})
            return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}
        return {"index": i, "text": text or "", "logprobs": lp, "finish_reason": reason}

    completion_tokens, cached = [0] * k, [0] * k
    if chat:
        await resp.write(b"".join(chunk([choice(i, None, None, role=True)]) for i in range(k)))
    thinking = [ReasoningSplitter(req.reasoning) for _ in range(k)] if req.reasoning is not None else None
    held = [""] * k  # tools: text not streamed yet (from where calls (may) begin: ToolFormat.hold)
    streamed = [False] * k  # tools: some content of the choice already sent
    while True:
        i, item = await q.get()
        item = _as_error(item)
        if isinstance(item, BaseException):  # headers are sent: the error goes into the stream
            done.add(i)
            err = item if isinstance(item, APIError) else APIError(500, str(item), type="server_error")
            await _write_quietly(resp, _sse(err.body()), b"data: [DONE]\n\n")
            return resp
        completion_tokens[i] = item.completion_tokens
        cached[i] = getattr(item, "cached_tokens", 0) or cached[i]
        pending[i] += getattr(item, "logprobs", None) or []
        text = item.text
        if i in echo:  # the first output of an echoed choice: the prompt (and its logprobs) first
            text = echo.pop(i) + text
            pending_prompt[i] = getattr(item, "prompt_logprobs", None) or []
        calls = []
        thought = ""
        if thinking is not None:  # the reasoning's deltas apart; what follows </think> goes on as content
            thought, text = thinking[i].feed(text)
            if item.finished:
                rest_thought, rest = thinking[i].finish()
                thought, text = thought + rest_thought, text + rest
            if thought:
                await resp.write(chunk([choice(i, thought, None, field="reasoning_content")]))
        if req.tool_format is not None:  # stream the text before the calls; they come parsed at the end
            acc = held[i] + text
            cut = req.tool_format.hold(acc, streamed[i])
            text, held[i] = acc[:cut], acc[cut:]
            streamed[i] = streamed[i] or bool(text)
            if item.finished:  # the calls, or (none parsed) the held text as content
                rest, calls = req.tool_format.parse(held[i])
                text += rest
        if not item.finished:
            if text:
                await resp.write(chunk([choice(i, text, None)]))
            continue
        done.add(i)  # the engine is done with it: a disconnect from now on needs no abort
        plens[i] = item.prompt_tokens or plens[i]
        parts = []
        if chat:
            if text:
                parts.append(chunk([choice(i, text, None)]))
            if calls:
                delta = {"tool_calls": [{"index": j, **c} for j, c in enumerate(calls)]}
                parts.append(chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]))
            parts.append(chunk([choice(i, None, "tool_calls" if calls else item.finish_reason)]))
        else:
            parts.append(chunk([choice(i, text, item.finish_reason)]))
        if len(done) < k:
            await resp.write(b"".join(parts))
            continue
        if req.include_usage:
            usage = _usage(_prompt_tokens(plens, req.n), sum(completion_tokens), cached, req.n)
            parts.append(_sse({**base, "choices": [], "usage": usage}))
        parts.append(b"data: [DONE]\n\n")
        await _write_quietly(resp, *parts)
        return resp


async def _write_quietly(resp: web.StreamResponse, *parts: bytes) -> None:
    try:
        for p in parts:
            await resp.write(p)
        await resp.write_eof()
    except (ConnectionError, RuntimeError):  # the client left after the request finished: nothing to abort
        pass


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


def _model_card(name: str, base: str, created: int, max_model_len: int | None = None) -> dict:
    card = {"id": name, "object": "model", "created": created, "owned_by": "moelora", "root": base,
            "parent": None if name == base else base}
    if max_model_len is not None:  # vLLM's field
        card["max_model_len"] = max_model_len
    return card


async def list_models(request: web.Request) -> web.Response:
    base, names, limit = await request.app[WORKER].run(
        lambda e: (e.base_name, list(e.adapter_names()), int(e.max_model_len)))
    created = request.app[CONFIG]["created"]
    return web.json_response({"object": "list",
                              "data": [_model_card(n, base, created, limit) for n in [base, *names]]})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    base, names, limit = await request.app[WORKER].run(
        lambda e: (e.base_name, list(e.adapter_names()), int(e.max_model_len)))
    if name != base and name not in names:
        raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
    return web.json_response(_model_card(name, base, request.app[CONFIG]["created"], limit))


def _tokenizer_model(body: dict) -> str | None:
    """The optional ``model`` of /tokenize and /detokenize (all adapters share the base's tokenizer)."""
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model or len(model) > 256):
        raise _bad("'model' must be a non-empty string", param="model", code="invalid_type")
    return model


async def tokenize(request: web.Request) -> web.Response:
    """vLLM's ``POST /tokenize``: ``{"prompt": str}`` or ``{"messages": [...]}`` -> ``{"count", "max_model_len",
    "tokens", "token_strs"}``. ``add_special_tokens`` (default: true for a prompt, false for messages, as the chat
    path adds none), ``add_generation_prompt`` (messages; default true), ``return_token_strs`` (default false)."""
    body = await _json_body(request)
    model = _tokenizer_model(body)
    if ("prompt" in body) == ("messages" in body):
        raise _bad("give exactly one of 'prompt' (a string) and 'messages'", param="prompt",
                   code="missing_required_parameter")
    messages = _check_messages(body["messages"]) if "messages" in body else None
    prompt = body.get("prompt")
    if messages is None and not isinstance(prompt, str):
        raise _bad("'prompt' must be a string", param="prompt", code="invalid_type")
    special = _opt_bool(body, "add_special_tokens") if body.get("add_special_tokens") is not None else messages is None
    template = _chat_options(body, request.app[CONFIG]["trust_request_chat_template"]) if messages is not None else None
    strs = _opt_bool(body, "return_token_strs")

    def _tokenize(engine):
        if model is not None:
            _resolve_adapter(engine, model)
        tok = engine.tokenizer
        if messages is not None:
            ids = _chat_ids(engine, messages, template, special)
        else:
            ids = list(tok(prompt, add_special_tokens=special)["input_ids"])
        to_strs = getattr(tok, "convert_ids_to_tokens", None)
        if strs and to_strs is None:
            raise _bad("this tokenizer cannot return token strings", param="return_token_strs",
                       code="unsupported_parameter")
        return ids, to_strs(ids) if strs else None, int(engine.max_model_len)

    ids, token_strs, limit = await request.app[WORKER].run(_tokenize)
    return web.json_response({"count": len(ids), "max_model_len": limit, "tokens": ids, "token_strs": token_strs})


async def detokenize(request: web.Request) -> web.Response:
    """vLLM's ``POST /detokenize``: ``{"tokens": [ids]}`` -> ``{"prompt": text}`` (special tokens kept)."""
    body = await _json_body(request)
    model = _tokenizer_model(body)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(_is_int(t) and t >= 0 for t in tokens):
        raise _bad("'tokens' must be a list of token ids >= 0", param="tokens", code="invalid_type")

    def _detokenize(engine):
        if model is not None:
            _resolve_adapter(engine, model)
        tok = engine.tokenizer
        if any(t >= len(tok) for t in tokens):
            raise _bad(f"token ids in 'tokens' must be < {len(tok)}", param="tokens", code="invalid_value")
        return tok.decode(tokens)

    return web.json_response({"prompt": await request.app[WORKER].run(_detokenize)})


async def version(request: web.Request) -> web.Response:
    """vLLM's ``GET /version``: the moelora package version."""
    from . import __version__

    return web.json_response({"version": __version__})


async def health(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    if not worker.alive():
        return web.json_response({"status": "error", "engine_thread": "dead"}, status=503)
    return web.json_response({"status": "ok", "step_errors": worker.step_errors})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format (as vLLM's ``/metrics``): queue gauges, token and request counters."""
    worker = request.app[WORKER]
    if not worker.alive():
        return web.Response(text="moelora_up 0\n", content_type="text/plain")
    running, waiting, adapters, prefix, spec, kv, preemptions, latency = await worker.run(
        lambda e: (len(e.running) + len(getattr(e, "prefilling", ())), len(e.waiting), len(list(e.adapter_names())),
                   getattr(e, "prefix", None), dict(getattr(e, "spec_stats", None) or {}), _kv_usage(e),
                   getattr(e, "num_preemptions", 0),
                   [*worker.ttft.lines("moelora_time_to_first_token_seconds", "From arrival to the first token."),
                    *worker.e2e.lines("moelora_e2e_request_latency_seconds", "From arrival to the last token."),
                    *worker.tpot.lines("moelora_time_per_output_token_seconds",
                                       "Per output token after the first (decoding).")]))
    queries, hits, cache_bytes = (prefix.queries, prefix.hits, prefix.bytes) if prefix is not None else (0, 0, 0)
    lines = [
        "# HELP moelora_up 1 while the engine thread runs.", "# TYPE moelora_up gauge", "moelora_up 1",
        "# HELP moelora_requests_running Requests decoding in the current batch or prefilling in chunks.",
        "# TYPE moelora_requests_running gauge", f"moelora_requests_running {running}",
        "# HELP moelora_requests_waiting Requests queued for admission.",
        "# TYPE moelora_requests_waiting gauge", f"moelora_requests_waiting {waiting}",
        "# HELP moelora_adapters_loaded Adapters registered with the engine.",
        "# TYPE moelora_adapters_loaded gauge", f"moelora_adapters_loaded {adapters}",
        "# HELP moelora_engine_steps_total Engine steps (one forward each).",
        "# TYPE moelora_engine_steps_total counter", f"moelora_engine_steps_total {worker.steps}",
        "# HELP moelora_engine_step_errors_total Engine steps that raised.",
        "# TYPE moelora_engine_step_errors_total counter", f"moelora_engine_step_errors_total {worker.step_errors}",
        "# HELP moelora_prompt_tokens_total Prompt tokens of finished requests.",
        "# TYPE moelora_prompt_tokens_total counter", f"moelora_prompt_tokens_total {worker.prompt_tokens}",
        "# HELP moelora_generation_tokens_total Tokens generated.",
        "# TYPE moelora_generation_tokens_total counter", f"moelora_generation_tokens_total {worker.generation_tokens}",
        "# HELP moelora_requests_finished_total Finished engine requests (one per choice), by finish reason.",
        "# TYPE moelora_requests_finished_total counter",
        *(f'moelora_requests_finished_total{{finish_reason="{r}"}} {n}' for r, n in sorted(worker.finished.items())),
        "# HELP moelora_prefix_cache_queries_total Prompt tokens looked up in the prefix cache.",
        "# TYPE moelora_prefix_cache_queries_total counter", f"moelora_prefix_cache_queries_total {queries}",
        "# HELP moelora_prefix_cache_hits_total Prompt tokens found in the prefix cache (not computed again).",
        "# TYPE moelora_prefix_cache_hits_total counter", f"moelora_prefix_cache_hits_total {hits}",
        "# HELP moelora_prefix_cache_bytes Bytes of keys and values held by the prefix cache.",
        "# TYPE moelora_prefix_cache_bytes gauge", f"moelora_prefix_cache_bytes {cache_bytes}",
        "# HELP moelora_kv_cache_bytes Bytes of the running requests' key/value buffers (allocated).",
        "# TYPE moelora_kv_cache_bytes gauge", f"moelora_kv_cache_bytes {kv[0]}",
        "# HELP moelora_kv_cache_usage_perc The KV buffers' share of --kv-cache-mb (vLLM's name; 0 without a budget).",
        "# TYPE moelora_kv_cache_usage_perc gauge", f"moelora_kv_cache_usage_perc {kv[1]}",
        "# HELP moelora_num_preemptions_total Requests preempted to stay within --kv-cache-mb (recomputed later).",
        "# TYPE moelora_num_preemptions_total counter", f"moelora_num_preemptions_total {preemptions}",
        *latency,  # vLLM's latency histograms, with its buckets
        # vLLM's spec_decode counter names: drafts (requests that proposed in a step), draft and accepted tokens
        "# HELP moelora_spec_decode_num_drafts_total Speculative drafts proposed (one per request and step).",
        "# TYPE moelora_spec_decode_num_drafts_total counter",
        f"moelora_spec_decode_num_drafts_total {spec.get('drafts', 0)}",
        "# HELP moelora_spec_decode_num_draft_tokens_total Draft tokens proposed.",
        "# TYPE moelora_spec_decode_num_draft_tokens_total counter",
        f"moelora_spec_decode_num_draft_tokens_total {spec.get('proposed', 0)}",
        "# HELP moelora_spec_decode_num_accepted_tokens_total Draft tokens accepted.",
        "# TYPE moelora_spec_decode_num_accepted_tokens_total counter",
        f"moelora_spec_decode_num_accepted_tokens_total {spec.get('accepted', 0)}",
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


def _kv_usage(engine: Any) -> tuple[int, float]:
    """The engine's KV store buffers in bytes, and their share of its ``kv_cache_bytes`` budget (0: none)."""
    store, per = getattr(engine, "store", None), getattr(engine, "kv_bytes_per_token", None)
    if store is None or per is None:
        return 0, 0.0
    rows, cols = store.capacity
    slots = getattr(engine, "kv_slots", None)
    return rows * cols * per, round(rows * cols / slots, 6) if slots else 0.0


def _check_sampling_defaults(d: dict) -> None:
    """ValueError unless every default is a field requests take, in the range a request may give."""
    unknown = sorted(set(d) - set(SAMPLING_DEFAULTS))
    if unknown:
        raise ValueError(f"sampling defaults: unknown field(s) {unknown} (known: {', '.join(SAMPLING_DEFAULTS)})")
    ranges = {"temperature": (0, 2, False), "top_p": (0, 1, True), "min_p": (0, 1, False),
              "repetition_penalty": (0, 10, True)}
    for key, v in d.items():
        if key in ("top_k", "max_tokens"):
            ok = _is_int(v) and v >= (-1 if key == "top_k" else 1)
        else:
            lo, hi, open_lo = ranges[key]
            ok = _is_num(v) and (lo < v if open_lo else lo <= v) and v <= hi
        if not ok:
            raise ValueError(f"sampling defaults: {key}={v!r} is out of the range a request may give")


def generation_defaults(generation_config: Any) -> dict:
    """vLLM's ``--generation-config``: the sampling fields a model's ``GenerationConfig`` sets (those that
    differ from transformers' defaults, ``to_diff_dict``), as request defaults (``max_new_tokens`` as
    ``max_tokens``)."""
    if generation_config is None:
        return {}
    diff = generation_config.to_diff_dict()
    out = {k: diff[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
           if isinstance(diff.get(k), (int, float)) and not isinstance(diff.get(k), bool)}
    if isinstance(diff.get("max_new_tokens"), int) and diff["max_new_tokens"] > 0:
        out["max_tokens"] = diff["max_new_tokens"]
    return out


def _check_name(name: Any, param: str = "name") -> str:
    if not isinstance(name, str):
        raise _bad(f"'{param}' must be a string", param=param, code="invalid_type")
    if not ADAPTER_NAME_RE.match(name):
        raise _bad(f"invalid adapter name {name[:80]!r}: use 1-64 letters, digits, '_' or '-', starting with a "
                   "letter or digit", param=param, code="invalid_value")
    return name


def _require_admin(request: web.Request) -> None:
    if not request.app[CONFIG]["admin"]:
        raise APIError(403, "the admin API is disabled: start the server with --admin", type="permission_error",
                       code="admin_disabled")


async def _load(request: web.Request, name: Any, path: Any, name_param: str, path_param: str) -> str:
    """Load adapter ``name`` from directory ``path`` on the engine thread -> the base model's name."""
    name = _check_name(name, name_param)
    if not isinstance(path, str) or not path:
        raise _bad(f"'{path_param}' must be a non-empty string (an adapter directory)", param=path_param,
                   code="invalid_type")
    if "\x00" in path or not os.path.isdir(path):
        raise _bad(f"'{path_param}' is not a directory: {path[:200]}", param=path_param, code="invalid_value")

    def _load_on_engine(engine):
        if name == engine.base_name or name in engine.adapter_names():
            raise APIError(409, f"the model `{name}` already exists: unload it first", param=name_param,
                           code="adapter_exists")
        try:
            engine.load_adapter(name, path)
        except (ValueError, KeyError, OSError) as e:  # FileNotFoundError included
            raise _bad(f"cannot load the adapter: {e}", param=path_param, code="invalid_value") from e
        return engine.base_name

    return await request.app[WORKER].run(_load_on_engine)


async def _unload(request: web.Request, name: Any, name_param: str) -> str:
    name = _check_name(name, name_param)

    def _unload_on_engine(engine):
        if name == engine.base_name:
            raise _bad("the base model cannot be unloaded", param=name_param, code="invalid_value")
        try:
            engine.unload_adapter(name)
        except KeyError as e:
            raise APIError(404, f"The model `{name}` does not exist.", param=name_param,
                           code="model_not_found") from e
        except ValueError as e:  # in use by running/waiting requests
            raise APIError(409, str(e), param=name_param, code="adapter_in_use") from e

    await request.app[WORKER].run(_unload_on_engine)
    return name


async def load_adapter(request: web.Request) -> web.Response:
    _require_admin(request)
    body = await _json_body(request)
    name = body.get("name")
    base = await _load(request, name, body.get("path"), "name", "path")
    return web.json_response(_model_card(name, base, int(time.time())))


async def unload_adapter(request: web.Request) -> web.Response:
    _require_admin(request)
    name = await _unload(request, request.match_info["name"], "name")
    return web.json_response({"id": name, "object": "model", "deleted": True})


async def vllm_load_lora_adapter(request: web.Request) -> web.Response:
    """vLLM's ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` (with ``--admin``): any method's adapter."""
    _require_admin(request)
    body = await _json_body(request)
    name = body.get("lora_name")
    await _load(request, name, body.get("lora_path"), "lora_name", "lora_path")
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def vllm_unload_lora_adapter(request: web.Request) -> web.Response:
    """vLLM's ``POST /v1/unload_lora_adapter`` ``{"lora_name"}`` (with ``--admin``)."""
    _require_admin(request)
    body = await _json_body(request)
    name = await _unload(request, body.get("lora_name"), "lora_name")
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


def _auth_ok(request: web.Request, api_key: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def _middleware(api_key: str | None):
    @web.middleware
    async def errors(request: web.Request, handler):
        try:
            if api_key and (request.path == "/v1" or request.path.startswith("/v1/")) and not _auth_ok(request, api_key):
                raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
            return await handler(request)
        except APIError as e:
            return e.response()
        except web.HTTPException as e:
            if e.status < 400:
                raise
            msg = {404: f"unknown route: {request.method} {request.path}",
                   405: f"method {request.method} not allowed on {request.path}"}.get(e.status, e.reason)
            return web.json_response(APIError(e.status, msg, code=_HTTP_CODES.get(e.status)).body(),
                                     status=e.status)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as e:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return APIError(500, f"internal server error: {type(e).__name__}", type="server_error",
                            code="internal_error").response()

    return errors


@dataclass
class Cors:
    """Cross-origin access for browser clients (vLLM's ``--allowed-origins``/``-methods``/``-headers``,
    ``--allow-credentials``): ``"*"`` allows any. Without a ``Cors`` no CORS header is sent."""

    origins: list[str]
    methods: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    headers: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    credentials: bool = False

    def allows(self, origin: str | None) -> bool:
        return origin is not None and ("*" in self.origins or origin in self.origins)

    def preflight(self, request: web.Request) -> web.Response:
        """The answer to a browser's ``OPTIONS`` preflight (before authentication, which it never carries)."""
        method = request.headers.get("Access-Control-Request-Method", "")
        if not self.allows(request.headers.get("Origin")) or ("*" not in self.methods and method not in self.methods):
            return web.Response(status=403, text="CORS preflight refused")
        asked = request.headers.get("Access-Control-Request-Headers", "")
        return web.Response(status=200, headers={
            "Access-Control-Allow-Methods": method if "*" in self.methods else ", ".join(self.methods),
            "Access-Control-Allow-Headers": asked if "*" in self.headers else ", ".join(self.headers),
            "Access-Control-Max-Age": "600"})

    def annotate(self, request: web.Request, response: web.StreamResponse) -> None:
        """CORS headers on every response to an allowed origin (streamed ones too: before they start)."""
        origin = request.headers.get("Origin")
        if not self.allows(origin):
            return
        any_origin = "*" in self.origins and not self.credentials
        response.headers["Access-Control-Allow-Origin"] = "*" if any_origin else origin
        if self.credentials:
            response.headers["Access-Control-Allow-Credentials"] = "true"
        if not any_origin:
            response.headers["Vary"] = "Origin"


def create_app(engine: Any, api_key: str | None = None, admin: bool = False,
               tool_parser: str | None = None, cors: Cors | None = None,
               sampling_defaults: dict | None = None, trust_request_chat_template: bool = False,
               log_requests: bool = False, reasoning_parser: str | None = None) -> web.Application:
    """The aiohttp application. Its startup starts the engine thread, its cleanup stops it.

    ``api_key``: every ``/v1`` route then needs ``Authorization: Bearer <api_key>`` (``/health`` stays open).
    ``admin``: enables ``POST /v1/admin/adapters`` and ``DELETE /v1/admin/adapters/{name}`` (403 otherwise).
    ``tool_parser``: a ``moelora.tools`` format (``"hermes"``, ``"llama3_json"``, ``"mistral"``,
    ``"pythonic"``) lets chat requests pass ``tools`` and parses the model's tool calls.
    ``cors``: which browser origins may call the API (None: no CORS headers, browsers keep other origins out).
    ``sampling_defaults``: what requests that omit ``temperature``, ``top_p``, ``top_k``, ``min_p``,
    ``repetition_penalty`` or ``max_tokens`` get (``generation_defaults``; None: OpenAI's defaults).
    ``trust_request_chat_template``: chat requests may bring their own Jinja ``chat_template`` (vLLM's
    ``--trust-request-chat-template``; rendered in transformers' sandbox either way).
    ``log_requests``: one INFO line on ``moelora.server`` per finished or aborted request (its id, model,
    finish reason, token counts and latency; never its text).
    ``reasoning_parser``: ``"deepseek_r1"`` or ``"qwen3"`` (vLLM's): chat replies' ``<think>...</think>``
    goes to ``reasoning_content`` (``moelora.tools.ReasoningSplitter``).
    """
    if reasoning_parser not in (None, *REASONING_PARSERS):
        raise ValueError(f"unknown reasoning parser {reasoning_parser!r} (available: {', '.join(REASONING_PARSERS)})")
    _check_sampling_defaults(sampling_defaults or {})
    fmt = tool_format(tool_parser) if tool_parser is not None else None  # ValueError naming the choices
    middlewares = [_middleware(api_key)]
    if cors is not None:
        @web.middleware
        async def preflight(request: web.Request, handler):
            if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
                return cors.preflight(request)
            return await handler(request)

        middlewares.insert(0, preflight)
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
    if cors is not None:
        async def _cors_headers(request: web.Request, response: web.StreamResponse) -> None:
            cors.annotate(request, response)

        app.on_response_prepare.append(_cors_headers)
    worker = EngineWorker(engine)
    worker.log_requests = bool(log_requests)
    app[WORKER] = worker
    app[CONFIG] = {"admin": bool(admin), "created": int(time.time()), "tool_parser": tool_parser, "tool_format": fmt,
                   "sampling_defaults": dict(sampling_defaults or {}),
                   "trust_request_chat_template": bool(trust_request_chat_template),
                   "reasoning_parser": reasoning_parser}

    async def _start(app):
        worker.start()

    async def _cleanup(app):
        await asyncio.get_running_loop().run_in_executor(None, worker.stop)

    app.on_startup.append(_start)
    app.on_cleanup.append(_cleanup)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{name}", get_model)
    app.router.add_post("/v1/admin/adapters", load_adapter)
    app.router.add_delete("/v1/admin/adapters/{name}", unload_adapter)
    app.router.add_post("/v1/load_lora_adapter", vllm_load_lora_adapter)
    app.router.add_post("/v1/unload_lora_adapter", vllm_unload_lora_adapter)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/metrics", metrics)
    return app


# -------------------------------------------------------------------------------------------- running it
async def _start_site(app: web.Application, host: str, port: int,
                      ssl_context: Any = None) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    sockets = site._server.sockets if site._server is not None else []  # type: ignore[union-attr]
    return runner, (sockets[0].getsockname()[1] if sockets else port)


def serve_in_thread(engine: Any, host: str = "127.0.0.1", port: int = 0, ssl_context: Any = None,
                    **options: Any) -> tuple[str, Callable[[], None]]:
    """Serve on a background thread (``port=0``: a free port; ``options``: ``create_app``'s, ``ssl_context``:
    HTTPS). -> (base url, stop function)."""
    app = create_app(engine, **options)
    loop = asyncio.new_event_loop()
    started: concurrent.futures.Future = concurrent.futures.Future()
    holder: dict[str, Any] = {}

    def _main():
        asyncio.set_event_loop(loop)
        try:
            holder["runner"], bound = loop.run_until_complete(_start_site(app, host, port, ssl_context))
        except BaseException as e:
            started.set_exception(e)
            loop.close()
            return
        started.set_result(bound)
        loop.run_forever()
        try:
            loop.run_until_complete(holder["runner"].cleanup())
        finally:
            loop.close()

    thread = threading.Thread(target=_main, name="moelora-server", daemon=True)
    thread.start()
    bound = started.result(timeout=60)
    url = f"http{'s' if ssl_context else ''}://{'[' + host + ']' if ':' in host else host}:{bound}"
    stopped = threading.Event()

    def stop() -> None:
        """Fail in-flight requests (503), close the listener, stop both threads."""
        if stopped.is_set():
            return
        stopped.set()
        app[WORKER].stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(60)

    return url, stop


def run_server(engine: Any, host: str = "127.0.0.1", port: int = 8000, ssl_context: Any = None,
               **options: Any) -> None:
    """Serve in the foreground until Ctrl-C (``moelora serve``; ``options``: ``create_app``'s)."""
    api_key, admin = options.get("api_key"), options.get("admin", False)
    if admin and not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("warning: --admin without --api-key on %s: anyone who can reach the port can load adapters",
                    host)
    app = create_app(engine, **options)
    summary = (f"moelora serve: base model {engine.base_name!r}, adapters {engine.adapter_names()}, "
               f"api key {'required' if api_key else 'off'}, admin {'on' if admin else 'off'}")  # before the thread

    def _announce(msg: str) -> None:
        print(summary, flush=True)
        print(msg.strip(), flush=True)

    web.run_app(app, host=host, port=port, handler_cancellation=True, access_log=None, print=_announce,
                ssl_context=ssl_context)
