"""``moelora run-batch``: a file of OpenAI batch requests through the server, offline (vLLM's
``run_batch``, OpenAI's Batch API file format).

Input: JSONL, one request per line::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "math", "messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 16}}

``url`` is ``/v1/chat/completions`` or ``/v1/completions``; ``body`` is what the server takes there
(any adapter as ``model``, guides, tools, ``n``, logprobs...; not ``stream``). Output: JSONL, one line
per input line, in the same order::

    {"id": "batch_req_...", "custom_id": "q1",
     "response": {"status_code": 200, "request_id": "chatcmpl-...", "body": {...}}, "error": null}

A request the server refuses keeps its status and the server's error body in ``response``; a line
that is not a request (bad JSON, no ``custom_id``, a ``custom_id`` seen before, another method or
url, ``stream``) gets ``"response": null`` and ``"error": {"code", "message"}``. The requests run
concurrently through :func:`moelora.server.serve_in_thread` on a loopback port (the engine batches
them; the server's code decides every answer, exactly as over HTTP). The output is written to a
temporary file and renamed at the end: an existing file is replaced only with ``overwrite``.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

__all__ = ["run_batch", "check_paths"]

URLS = ("/v1/chat/completions", "/v1/completions")


def check_paths(input_file: str | os.PathLike, output_file: str | os.PathLike, overwrite: bool) -> None:
    """``FileNotFoundError`` / ``ValueError`` naming the problem with the files, before any work."""
    src, dst = Path(input_file), Path(output_file)
    if not src.is_file():
        raise FileNotFoundError(f"--input-file {src}: no such file")
    if dst.exists() and not overwrite:
        raise ValueError(f"--output-file {dst} exists: pass --overwrite to replace it")
    if dst.resolve() == src.resolve():
        raise ValueError("--output-file is the input file")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"--output-file {dst}: no directory {dst.parent}")


def _requests(path: Path) -> list[tuple[str | None, dict | None, str | None]]:
    """Each non-blank line: ``(custom_id, request or None, error message or None)``."""
    out: list[tuple[str | None, dict | None, str | None]] = []
    seen: set[str] = set()
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--input-file {path}: not UTF-8 text ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            out.append((None, None, f"line {n}: not JSON ({e})"))
            continue
        cid = item.get("custom_id") if isinstance(item, dict) else None
        if not isinstance(cid, str) or not cid:
            out.append((None, None, f"line {n}: a request needs a non-empty string 'custom_id'"))
        elif cid in seen:
            out.append((cid, None, f"line {n}: custom_id {cid!r} is used by an earlier line"))
        elif item.get("method", "POST") != "POST":
            out.append((cid, None, f"line {n}: method must be POST, got {item.get('method')!r}"))
        elif item.get("url") not in URLS:
            out.append((cid, None, f"line {n}: url must be one of {', '.join(URLS)}, got {item.get('url')!r}"))
        elif not isinstance(item.get("body"), dict):
            out.append((cid, None, f"line {n}: 'body' must be an object (the request)"))
        elif item["body"].get("stream"):
            out.append((cid, None, f"line {n}: stream is not supported in a batch"))
        else:
            out.append((cid, item, None))
        if isinstance(cid, str):
            seen.add(cid)
    return out


async def _send_all(url: str, requests: list[tuple[str | None, dict | None, str | None]], concurrency: int) -> list[dict]:
    import aiohttp

    gate = asyncio.Semaphore(concurrency)

    async def one(session, cid, item, error) -> dict:
        record = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": cid, "response": None, "error": None}
        if item is None:
            record["error"] = {"code": "invalid_request", "message": error}
            return record
        async with gate, session.post(url + item["url"], json=item["body"]) as resp:
            try:
                body = await resp.json(content_type=None)
            except (json.JSONDecodeError, aiohttp.ContentTypeError):
                body = {"error": {"message": (await resp.text())[:1000]}}
        rid = body.get("id") if isinstance(body, dict) and resp.status == 200 else None
        record["response"] = {"status_code": resp.status, "request_id": rid or f"req_{uuid.uuid4().hex}",
                              "body": body}
        return record

    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return list(await asyncio.gather(*(one(session, *r) for r in requests)))


def run_batch(engine: Any, input_file: str | os.PathLike, output_file: str | os.PathLike, *, overwrite: bool = False,
              concurrency: int | None = None, **options: Any) -> dict[str, int]:
    """Answer every request of ``input_file`` into ``output_file`` (see the module docstring); ``options``:
    ``moelora.server.create_app``'s. Returns ``{"total", "ok", "failed"}`` (ok: status 200)."""
    from .server import serve_in_thread

    check_paths(input_file, output_file, overwrite)
    requests = _requests(Path(input_file))
    if concurrency is None:
        concurrency = 2 * getattr(engine, "max_batch", 16)
    if not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"--max-concurrency must be a positive integer, got {concurrency!r}")
    concurrency = min(concurrency, getattr(engine, "max_batch", 16) + getattr(engine, "max_queue", 256))
    url, stop = serve_in_thread(engine, "127.0.0.1", 0, **options)
    try:
        records = asyncio.run(_send_all(url, requests, concurrency))
    finally:
        stop()
    dst = Path(output_file)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    ok = sum(1 for r in records if r["response"] is not None and r["response"]["status_code"] == 200)
    return {"total": len(records), "ok": ok, "failed": len(records) - ok}
