"""The OpenAI HTTP API beside the gRPC router, on loopback, for the HTTP tests: over a `FakePool`
(`start_http`) or over the Ray pool of `serve_helpers.start_served` (`add_http`).

A chat-capable copy of the tiny model (`chat_model_dir`) carries a `chat_template` in its
tokenizer_config.json; transformers renders the same template as the independent reference.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
from ray_helpers import LoopThread

from kvrelay.cluster.auth import ServerSecurity, TokenSet
from kvrelay.cluster.config import load_config
from kvrelay.cluster.grpc_server import build_server
from kvrelay.cluster.http_server import HttpServer
from kvrelay.cluster.router import GenerationRouter
from kvrelay.worker.model.tiny import tiny_model_dir

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def chat_model_dir(root: Path) -> Path:
    """The tiny model with this module's chat template (a copy: the cached model stays as it is)."""
    return _tiny_copy(root / "tiny-chat", CHAT_TEMPLATE)


def plain_model_dir(root: Path) -> Path:
    """The tiny model without a chat template."""
    return _tiny_copy(root / "tiny-plain", None)


def _tiny_copy(d: Path, chat_template: str | None) -> Path:
    if not d.exists():
        shutil.copytree(tiny_model_dir(), d)
        cfg_file = d / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg.pop("chat_template", None)
        if chat_template is not None:
            cfg["chat_template"] = chat_template
        cfg_file.write_text(json.dumps(cfg))
    return d


def reference_chat_ids(model_dir: Path, messages: list[dict[str, str]]) -> list[int]:
    """transformers' own rendering and tokenizing of the template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return [int(i) for i in out["input_ids"]]


@dataclass
class HttpServed:
    lt: LoopThread
    router: GenerationRouter | None  # None (and http None): router processes serve base_url
    http: HttpServer | None
    base_url: str
    grpc_server: Any = None  # present when start_http built one
    grpc_address: str = ""

    def openai(self, api_key: str = "unused", timeout: float = 60.0) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, timeout=timeout)

    def httpx(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout)

    def stop_http(self) -> None:
        if self.http is not None:
            self.lt.run(self.http.stop())


def add_http(lt: LoopThread, router: GenerationRouter, tokens: TokenSet | None = None) -> HttpServed:
    """An HTTP server (any free port) over a started router."""

    async def start() -> HttpServed:
        http = HttpServer(router, router.config, ServerSecurity(None, tokens), port=0)
        port = await http.start()
        return HttpServed(lt, router, http, f"http://127.0.0.1:{port}")

    return lt.run(start())


def start_http(lt: LoopThread, pool: Any, tokens: TokenSet | None = None, **overrides: Any) -> HttpServed:
    """Router + gRPC + HTTP servers over pool (e.g. a FakePool) on lt's loop."""
    config = load_config(None, {"port": 0, **overrides})

    async def start() -> tuple[GenerationRouter, Any, int]:
        router = GenerationRouter(pool, config)
        await router.start()
        server, port = build_server(router, config)
        await server.start()
        return router, server, port

    router, server, port = lt.run(start())
    served = add_http(lt, router, tokens)
    served.grpc_server, served.grpc_address = server, f"127.0.0.1:{port}"
    return served


def stop_http(s: HttpServed) -> None:
    s.stop_http()
    if s.grpc_server is not None:
        s.lt.run(s.grpc_server.stop(0))
    s.lt.run(s.router.stop())
