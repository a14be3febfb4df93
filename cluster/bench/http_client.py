"""`kvrelay bench serve --protocol http`: the load-test client over the OpenAI-compatible HTTP API.

Every request is `POST /v1/completions` with `stream: true` and the prompt as token ids (or text
with `--prompt-kind text`), over one `httpx.AsyncClient` (HTTP/1.1 keep-alive, as many
connections as streams may be open). Token counts per server-sent event come from
`stream_options.continuous_usage_stats` (vLLM's extension, which kvrelay's HTTP API implements):
every chunk carries the cumulative `completion_tokens`, so a chunk's tokens are the difference.
A server that ignores it is counted one token per chunk, and the final usage chunk corrects the
last content chunk to the server's total.

A request answered with an HTTP error status is recorded as `HTTP_<status>`; an error event after
the stream started as `HTTP_STREAM_<code>` (OpenAI's error code, e.g. `rate_limit_exceeded`); the
client's own deadline (`--request-timeout`) as `DEADLINE_EXCEEDED`, as the gRPC client reports it.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from .metrics import RequestRecord
from .workloads import BenchRequest

_DATA = "data: "


def base_url(server: str) -> str:
    """`HOST:PORT` or a URL (`http://HOST:PORT`, with or without a trailing `/v1`) -> the URL
    the API's paths hang off."""
    url = server.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--server: expected HOST:PORT or an http(s):// URL, got {server!r}")
    return url.removesuffix("/v1")


@dataclass(frozen=True)
class HttpModelInfo:
    """What `GET /v1/models` says of the served model (the fields gRPC's ModelInfo has)."""

    model: str
    max_model_len: int
    vocab_size: int
    accepts_text: bool = True  # a tokenizer-less server refuses text with 400, counted as errors


@dataclass(frozen=True)
class _Usage:
    prompt_tokens: int


@dataclass(frozen=True)
class _Completed:
    usage: _Usage


class HttpBenchClient:
    """The harness's client over HTTP: `wait_ready`, `model_info`, `generate` (non-streaming, for
    the text calibration) and `send` (one timed streaming request). Use as an async context."""

    def __init__(self, server: str, max_connections: int | None) -> None:
        self.url = base_url(server)
        self.model = ""  # the served model's id, known after model_info
        # None: no limit. Keep-alive connections as many as the streams, so none is reopened.
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        # No read timeout of httpx's own: the per-request deadline is --request-timeout.
        timeout = httpx.Timeout(None, connect=30.0)
        self._http = httpx.AsyncClient(base_url=self.url, limits=limits, timeout=timeout)

    async def __aenter__(self) -> HttpBenchClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._http.aclose()

    async def wait_ready(self, timeout_s: float) -> None:
        """Until `GET /health` answers 200; ValueError naming --server after timeout_s."""
        deadline = time.monotonic() + timeout_s
        why = "no answer"
        while time.monotonic() < deadline:
            try:
                r = await self._http.get("/health", timeout=5.0)
                if r.status_code == 200:
                    return
                why = f"GET /health answered {r.status_code}"
            except httpx.HTTPError as e:
                why = f"{type(e).__name__}: {e}"
            await asyncio.sleep(0.2)
        raise ValueError(f"--server {self.url}: not ready in {timeout_s:g} s ({why})")

    async def model_info(self, timeout: float) -> HttpModelInfo:
        try:
            r = await self._http.get("/v1/models", timeout=timeout)
        except httpx.HTTPError as e:
            raise ValueError(f"--server {self.url}: GET /v1/models: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise ValueError(f"--server {self.url}: GET /v1/models answered {r.status_code}: {r.text[:200]}")
        card = r.json()["data"][0]
        missing = [k for k in ("max_model_len", "vocab_size") if k not in card]
        if missing:
            raise ValueError(
                f"--server {self.url}: GET /v1/models lacks {', '.join(missing)} (kvrelay's model card "
                "carries them): cannot size the requests"
            )
        self.model = str(card["id"])
        return HttpModelInfo(self.model, int(card["max_model_len"]), int(card["vocab_size"]))

    async def generate(self, prompt: str | list[int], max_tokens: int, timeout: float) -> _Completed:
        """One non-streaming completion (the text calibration): its usage."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        r = await self._http.post("/v1/completions", json=body, timeout=timeout)
        if r.status_code != 200:
            raise ValueError(
                f"--server {self.url}: POST /v1/completions answered {r.status_code}: {r.text[:200]}"
            )
        return _Completed(_Usage(int(r.json()["usage"]["prompt_tokens"])))

    async def send(
        self, req: BenchRequest, temperature: float, ignore_eos: bool, timeout_s: float
    ) -> RequestRecord:
        """Streams one request, timing every event; a failure is recorded, never raised."""
        body = {
            "model": self.model,
            "prompt": req.prompt,
            "max_tokens": req.output_len,
            "temperature": temperature,
            "ignore_eos": ignore_eos,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        rec = RequestRecord(sent=time.perf_counter(), prompt_tokens=req.prompt_len)

        async def stream() -> None:
            async with self._http.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    rec.error = f"HTTP_{resp.status_code}"
                else:
                    await _read_events(resp, rec)

        try:
            await asyncio.wait_for(stream(), timeout_s)  # (asyncio.timeout is Python 3.11+)
        except asyncio.TimeoutError:
            rec.error = "DEADLINE_EXCEEDED"
        except Exception as e:  # a client-side failure of one request must not end the run
            rec.error = f"CLIENT_{type(e).__name__}"
        rec.ended = time.perf_counter()
        return rec


async def _read_events(resp: httpx.Response, rec: RequestRecord) -> None:
    """Fills rec from the server-sent events of one completion stream."""
    seen = 0  # completion tokens counted so far
    async for line in resp.aiter_lines():
        if not line.startswith(_DATA):
            continue
        now = time.perf_counter()
        data = line[len(_DATA) :]
        if data == "[DONE]":
            return
        chunk: dict[str, Any] = json.loads(data)
        error = chunk.get("error")
        if error is not None:
            rec.error = f"HTTP_STREAM_{error.get('code') or error.get('type') or 'error'}"
            return
        usage = chunk.get("usage")
        if chunk.get("choices"):
            total = usage["completion_tokens"] if usage else seen + 1
            rec.messages.append((now, total - seen))
            seen = total
        elif usage:  # include_usage's last chunk: the server's counts
            rec.prompt_tokens = int(usage["prompt_tokens"])
            rec.cached_prompt_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
            extra = int(usage["completion_tokens"]) - seen
            if extra and rec.messages:  # counted one per chunk: the last chunk takes the remainder
                t, n = rec.messages[-1]
                rec.messages[-1] = (t, n + extra)
                seen += extra
    rec.error = "HTTP_STREAM_NO_DONE"  # the stream ended without its [DONE]
