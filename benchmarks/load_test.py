"""Bounded load test of ``moelora serve``: many concurrent clients across many adapters, loopback only.

    python benchmarks/load_test.py --fake                                   # in-process fake engine
    python benchmarks/load_test.py --model DIR --adapter a=PATH --adapter b=PATH ...   # in-process real engine
    python benchmarks/load_test.py --url http://127.0.0.1:8000 [--api-key K]           # a running server

Every request is checked: status 200, the right ``model`` echoed, a unique id, and the exact expected text.
With ``--fake`` the expected text is known in advance (the fake engine's output is a function of the adapter
and the prompt); otherwise a sequential greedy reference pass is run first and the concurrent pass must
reproduce it (``--allow-mismatch`` tolerates batch-dependent numerics of a real model). Half the requests
stream (SSE, reassembled). Prints p50/p90/p99 latency and throughput; exits 1 if anything was lost or mixed.
The request count and the total time are bounded (``--requests``, ``--max-seconds``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

# ------------------------------------------------------------------------------------------ fake engine


class FakeTokenizer:
    """Bytes in (UTF-8), one token per byte, latin-1 out; a tiny chat template."""

    chat_template = "<{role}>{content}\n ... <assistant>"
    eos_token_id = 0

    def __len__(self) -> int:
        return 256

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("latin-1")

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = True):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<assistant>"
        return list(text.encode("utf-8")) if tokenize else text


@dataclass
class FakeStep:  # the engine's StepOutput shape
    request_id: str
    token_ids: list
    text: str
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class FakeQueueFull(Exception):
    pass


class FakeEngine:
    """Implements the Engine interface deterministically: one byte of ``"{adapter}:" + reversed(prompt)``
    per step, then EOS (finish "stop"), or "length" at max_tokens, or "stop" at a stop sequence (trimmed).

    ``step_delay`` slows each step; ``fail_steps`` makes the next N ``step()`` calls raise;
    requests for ``broken_adapters`` finish with finish_reason "error" (a failed adapter load); ``threads``
    records the threads that called it (the server must use exactly one); ``aborted`` lists aborted ids.
    """

    def __init__(self, adapters=(), max_batch: int = 8, max_queue: int = 64, max_model_len: int = 512,
                 step_delay: float = 0.0, base_name: str = "fake-base"):
        self.tokenizer = FakeTokenizer()
        self.max_model_len = max_model_len
        self.base_name = base_name
        self.max_batch, self.max_queue, self.step_delay = max_batch, max_queue, step_delay
        self.adapters: dict[str, str] = {a: f"/fake/{a}" for a in adapters}
        self.waiting: deque = deque()
        self.running: OrderedDict = OrderedDict()
        self.aborted: list[str] = []
        self.threads: set[int] = set()
        self.fail_steps = 0
        self.broken_adapters: set[str] = set()
        self.steps = 0
        self.max_running_seen = 0
        try:
            from moelora.server import QueueFull  # the engine's own exception when it exists
        except ImportError:
            QueueFull = FakeQueueFull  # noqa: N806
        self._queue_full = QueueFull

    def _t(self) -> None:
        self.threads.add(threading.get_ident())

    @staticmethod
    def expected(name: str, prompt_ids: list[int], max_tokens: int, stop=()) -> tuple[str, str, int]:
        """(text, finish_reason, completion_tokens) the fake produces."""
        target = f"{name}:".encode() + bytes(reversed(prompt_ids))
        full = target[:max_tokens].decode("latin-1")
        cut = min(((full.find(s), s) for s in stop if s and s in full), default=None)
        if cut is not None:
            return full[: cut[0]], "stop", cut[0] + len(cut[1])
        if len(target) <= max_tokens:
            return full, "stop", len(target)
        return full, "length", max_tokens

    def adapter_names(self) -> list[str]:
        self._t()
        return list(self.adapters)

    def load_adapter(self, name: str, path: str) -> None:
        import os

        self._t()
        if name in self.adapters or name == self.base_name:
            raise ValueError(f"adapter {name!r} already loaded")
        if not os.path.isdir(path):
            raise FileNotFoundError(path)
        self.adapters[name] = path

    def unload_adapter(self, name: str) -> None:
        self._t()
        if name not in self.adapters:
            raise KeyError(name)
        if any(st["adapter"] == name for st in [*self.running.values(), *(w[1] for w in self.waiting)]):
            raise ValueError(f"adapter {name!r} is in use")
        del self.adapters[name]

    def add_request(self, request_id, prompt_ids, adapter, params) -> None:
        self._t()
        if adapter is not None and adapter not in self.adapters:
            raise KeyError(adapter)
        if params.max_tokens < 1 or not 0 <= params.temperature or not 0 < params.top_p <= 1:
            raise ValueError("bad sampling params")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError("prompt too long")
        if len(self.waiting) >= self.max_queue:
            raise self._queue_full("queue full")
        text, reason, n = self.expected(adapter or self.base_name, list(prompt_ids), params.max_tokens, params.stop)
        self.waiting.append((request_id, {"text": text, "reason": reason, "n": n, "pos": 0,
                                          "prompt": len(prompt_ids), "adapter": adapter}))

    def abort(self, request_id: str) -> None:
        self._t()
        self.aborted.append(request_id)
        self.running.pop(request_id, None)
        self.waiting = deque(w for w in self.waiting if w[0] != request_id)

    def has_work(self) -> bool:
        self._t()
        return bool(self.running or self.waiting)

    def step(self) -> list[FakeStep]:
        self._t()
        self.steps += 1
        if self.fail_steps > 0:
            self.fail_steps -= 1
            raise RuntimeError("injected engine failure")
        if self.step_delay:
            time.sleep(self.step_delay)
        while self.waiting and len(self.running) < self.max_batch:
            rid, st = self.waiting.popleft()
            self.running[rid] = st
        self.max_running_seen = max(self.max_running_seen, len(self.running))
        outs = []
        for rid, st in list(self.running.items()):
            if st["adapter"] in self.broken_adapters:  # like the engine when an adapter fails to load
                del self.running[rid]
                outs.append(FakeStep(rid, [], f"[error: cannot load {st['adapter']}]", True, "error", st["prompt"], 0))
                continue
            pos = st["pos"]
            piece = st["text"][pos : pos + 1]
            st["pos"] = pos + 1
            done = st["pos"] >= len(st["text"])
            produced = st["n"] if done else st["pos"]
            outs.append(FakeStep(rid, list(piece.encode("latin-1")), piece, done, st["reason"] if done else None,
                                 st["prompt"], produced))
            if done:
                del self.running[rid]
        return outs


# ------------------------------------------------------------------------------------------- the client


async def _one(session, url: str, headers: dict, model: str, prompt: str, max_tokens: int, stream: bool):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    t0 = time.perf_counter()
    ttft = None
    async with session.post(f"{url}/v1/completions", json=body, headers=headers) as r:
        if r.status != 200:
            return {"ok": False, "status": r.status, "error": (await r.text())[:300], "latency": 0.0}
        if not stream:
            d = await r.json()
            return {"ok": True, "id": d["id"], "model": d["model"], "text": d["choices"][0]["text"],
                    "finish_reason": d["choices"][0]["finish_reason"], "tokens": d["usage"]["completion_tokens"],
                    "latency": time.perf_counter() - t0, "ttft": None}
        text, ids, models, reason, done = [], set(), set(), None, False
        buf = b""
        async for chunk in r.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                data = event.decode().removeprefix("data: ")
                if data == "[DONE]":
                    done = True
                    continue
                d = json.loads(data)
                if "error" in d:
                    return {"ok": False, "status": 200, "error": json.dumps(d)[:300], "latency": 0.0}
                if ttft is None:
                    ttft = time.perf_counter() - t0
                ids.add(d["id"])
                models.add(d["model"])
                text.append(d["choices"][0]["text"])
                reason = d["choices"][0]["finish_reason"] or reason
        if not done or len(ids) != 1 or len(models) != 1:
            return {"ok": False, "status": 200, "error": f"bad stream: done={done} ids={len(ids)}", "latency": 0.0}
        return {"ok": True, "id": ids.pop(), "model": models.pop(), "text": "".join(text), "finish_reason": reason,
                "tokens": None, "latency": time.perf_counter() - t0, "ttft": ttft}


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[max(0, math.ceil(q * len(xs)) - 1)]


async def _drive(url: str, api_key: str | None, jobs: list[dict], clients: int, max_seconds: float):
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results: list[dict | None] = [None] * len(jobs)
    pending = deque(range(len(jobs)))
    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=max_seconds)) as session:

        async def client():
            while pending:
                i = pending.popleft()
                j = jobs[i]
                try:
                    results[i] = await _one(session, url, headers, j["model"], j["prompt"], j["max_tokens"],
                                            j["stream"])
                except Exception as e:  # noqa: BLE001 - reported as a lost request
                    results[i] = {"ok": False, "status": None, "error": repr(e)[:300], "latency": 0.0}

        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), max_seconds)
        except asyncio.TimeoutError:
            pass
        wall = time.perf_counter() - t0
    return results, wall


SYSTEM = "You are a helpful assistant. Answer briefly and precisely, and never invent facts. "


def _jobs(adapters: list[str], n: int, max_tokens: int, distinct: int | None, shared: int = 0) -> list[dict]:
    """``shared`` characters of one system prompt before every prompt (the engine's prefix cache then
    serves them across tenants' concurrent requests)."""
    head = (SYSTEM * (shared // len(SYSTEM) + 1))[:shared]
    jobs = []
    for i in range(n):
        a = adapters[i % len(adapters)]
        k = i if distinct is None else (i // len(adapters)) % distinct
        # the unique part comes last so that the fake's reversed echo starts with it
        jobs.append({"model": a, "prompt": f"{head}{a} says hello #{k:05d}", "max_tokens": max_tokens,
                     "stream": bool(i % 2)})
    return jobs


def run_load_test(url: str, adapters: list[str], requests: int, clients: int, max_tokens: int, max_seconds: float,
                  api_key: str | None = None, fake: bool = False, allow_mismatch: bool = False,
                  shared_prefix: int = 0) -> dict:
    distinct = None if fake else 4
    jobs = _jobs(adapters, requests, max_tokens, distinct, shared_prefix)
    expected: dict[tuple[str, str], str] = {}
    if fake:
        for j in jobs:
            expected[(j["model"], j["prompt"])] = FakeEngine.expected(j["model"], list(j["prompt"].encode()),
                                                                      max_tokens)[0]
    else:  # sequential greedy reference, non-streaming
        ref_jobs = list({(j["model"], j["prompt"]): dict(j, stream=False) for j in jobs}.values())
        ref, _ = asyncio.run(_drive(url, api_key, ref_jobs, 1, max_seconds))
        for j, r in zip(ref_jobs, ref):
            if not r or not r["ok"]:
                raise RuntimeError(f"reference request failed: {r}")
            expected[(j["model"], j["prompt"])] = r["text"]
    results, wall = asyncio.run(_drive(url, api_key, jobs, clients, max_seconds))
    lost = [i for i, r in enumerate(results) if r is None or not r["ok"]]
    ok = [(j, r) for j, r in zip(jobs, results) if r is not None and r["ok"]]
    ids = [r["id"] for _, r in ok]
    wrong_model = [r["id"] for j, r in ok if r["model"] != j["model"]]
    mismatched = [r["id"] for j, r in ok if r["text"] != expected[(j["model"], j["prompt"])]]
    lat = [r["latency"] for _, r in ok]
    ttft = [r["ttft"] for _, r in ok if r.get("ttft") is not None]
    report = {
        "requests": requests, "clients": clients, "adapters": len(adapters), "max_tokens": max_tokens,
        "completed": len(ok), "lost": len(lost), "duplicate_ids": len(ids) - len(set(ids)),
        "wrong_model": len(wrong_model), "mismatched": len(mismatched), "wall_s": round(wall, 3),
        "throughput_rps": round(len(ok) / wall, 2) if wall > 0 else None,
        "throughput_chars_per_s": round(sum(len(r["text"]) for _, r in ok) / wall, 1) if wall > 0 else None,
        "latency_s": {f"p{q}": round(_percentile(lat, q / 100), 4) for q in (50, 90, 99)},
        "ttft_stream_s": {f"p{q}": round(_percentile(ttft, q / 100), 4) for q in (50, 90, 99)},
        "first_errors": [results[i]["error"] if results[i] else "not run (time limit)" for i in lost[:5]],
    }
    report["passed"] = (report["lost"] == 0 and report["duplicate_ids"] == 0 and report["wrong_model"] == 0
                        and (report["mismatched"] == 0 or (allow_mismatch and not fake)))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--fake", action="store_true", help="in-process fake engine (exact output checks)")
    src.add_argument("--model", help="in-process real engine on this base model directory")
    src.add_argument("--url", help="an already running server (adapters taken from /v1/models)")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="with --model")
    ap.add_argument("--adapters", type=int, default=16, help="--fake: number of fake adapters")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=512, help="total requests (bounded)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--shared-prefix", type=int, default=0,
                    help="characters of one system prompt before every prompt (exercises the prefix cache)")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="hard limit on each pass")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-queue", type=int, default=1024)
    ap.add_argument("--step-delay", type=float, default=0.0, help="--fake: seconds per engine step")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--allow-mismatch", action="store_true", help="real engine: report, but do not fail on, "
                    "greedy outputs that differ from the sequential reference")
    ap.add_argument("--output", default=None, help="also write the report as JSON")
    args = ap.parse_args(argv)

    stop = None
    try:
        engine = None
        if args.url:
            import urllib.request

            url = args.url.rstrip("/")
            req = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": f"Bearer {args.api_key}"}
                                         if args.api_key else {})
            with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 - loopback/user-given url
                models = [m["id"] for m in json.load(r)["data"]]
            adapters = models[1:] or models
        else:
            from moelora.server import serve_in_thread

            if args.fake:
                adapters = [f"tenant{j:02d}" for j in range(args.adapters)]
                engine = FakeEngine(adapters, max_batch=args.max_batch, max_queue=args.max_queue,
                                    step_delay=args.step_delay)
            else:
                from moelora.engine import Engine

                pairs = dict(a.split("=", 1) for a in args.adapter)
                engine = Engine.from_pretrained(args.model, adapters=pairs, max_batch=args.max_batch,
                                                max_queue=args.max_queue, device=None)
                adapters = list(pairs) or [engine.base_name]
            url, stop = serve_in_thread(engine, "127.0.0.1", 0, api_key=args.api_key)
        report = run_load_test(url, adapters, args.requests, args.clients, args.max_tokens, args.max_seconds,
                               api_key=args.api_key, fake=args.fake, allow_mismatch=args.allow_mismatch,
                               shared_prefix=args.shared_prefix)
        prefix = getattr(engine, "prefix", None)
        if prefix is not None:
            print(f"prefix cache: {prefix.hits} of {prefix.queries} prompt tokens reused")
    finally:
        if stop is not None:
            stop()
    lat, tt = report["latency_s"], report["ttft_stream_s"]
    print(f"{report['completed']}/{report['requests']} requests, {report['clients']} clients, "
          f"{report['adapters']} adapters in {report['wall_s']:.2f}s: {report['throughput_rps']} req/s, "
          f"{report['throughput_chars_per_s']} chars/s")
    print(f"latency p50 {lat['p50']:.4f}s  p90 {lat['p90']:.4f}s  p99 {lat['p99']:.4f}s   "
          f"stream TTFT p50 {tt['p50']:.4f}s  p99 {tt['p99']:.4f}s")
    print(f"lost {report['lost']}  duplicate ids {report['duplicate_ids']}  wrong model {report['wrong_model']}  "
          f"mismatched {report['mismatched']}  -> {'PASS' if report['passed'] else 'FAIL'}")
    for e in report["first_errors"]:
        print(f"  error: {e}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
