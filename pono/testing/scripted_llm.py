"""A scripted OpenAI-compatible chat server: the stand-in for an external LLM API in tests and benchmarks.

It streams a configured reply with a fixed time to first token, or fails in a configured way, and
records every request it got so a test can check what the agent sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

Failure = Literal["none", "http_500", "hang", "drop", "http_429", "truncate"]


@dataclass
class Script:
    reply: str = "Sure, a table for two is booked for seven tonight. Anything else?"
    first_token_s: float = 0.1
    token_interval_s: float = 0.01
    failure: Failure = "none"
    # Answers for the next requests, in order: {"text": ...} or {"tool_calls": [{"name", "arguments"}]}.
    # When they run out, every request gets `reply`.
    responses: list[dict[str, Any]] = field(default_factory=list)
    embedding_size: int | None = None  # answer embeddings of this size whatever was asked (a bad endpoint)
    requests: list[dict[str, Any]] = field(default_factory=list)


class ScriptedLLM:
    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.app = web.Application()
        self.app.add_routes([
            web.get("/v1/models", self._models),
            web.post("/v1/chat/completions", self._chat),
            web.post("/v1/embeddings", self._embeddings),
        ])
        self._runner: web.AppRunner | None = None
        self.port = 0
        # Chat requests in progress, and those the client dropped (closed the connection) before the end.
        self.chats_open = 0
        self.chats_dropped = 0
        self.app.middlewares.append(self._track_chats)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self, port: int = 0) -> str:
        # handler_cancellation: a caller that gives up (timeout, barge-in) ends the scripted stream too.
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _track_chats(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != "/v1/chat/completions":
            return await handler(request)
        self.chats_open += 1
        try:
            return await handler(request)
        except asyncio.CancelledError:  # handler_cancellation: the client closed the connection
            self.chats_dropped += 1
            raise
        finally:
            self.chats_open -= 1

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

    async def _embeddings(self, request: web.Request) -> web.Response:
        """Hashed bag-of-words vectors: lexical, deterministic, and enough to tell documents apart."""
        body = await request.json()
        self.script.requests.append(body)
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        size = self.script.embedding_size or int(body.get("dimensions") or 1536)
        data = []
        for i, text in enumerate(texts):
            vector = [0.0] * size
            for word in re.findall(r"[a-z]+", text.lower()):
                vector[int(hashlib.md5(word.encode()).hexdigest(), 16) % size] += 1.0
            data.append({"object": "embedding", "index": i, "embedding": vector})
        return web.json_response({"object": "list", "data": data, "model": body.get("model", "scripted"),
                                  "usage": {"prompt_tokens": 0, "total_tokens": 0}})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        script = self.script
        script.requests.append(body)
        if script.failure == "http_500":
            return web.json_response({"error": {"message": "scripted failure"}}, status=500)
        if script.failure == "http_429":
            return web.json_response({"error": {"message": "scripted rate limit"}}, status=429)
        if script.failure == "hang":
            await asyncio.sleep(3600)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            await self._stream(request, response, script)
        except ConnectionResetError:
            pass  # the agent cancelled the reply (barge-in, hang-up): that is expected
        return response

    async def _stream(self, request: web.Request, response: web.StreamResponse, script: Script) -> None:
        await response.prepare(request)
        await asyncio.sleep(script.first_token_s)
        created = int(time.time())
        planned = script.responses.pop(0) if script.responses else {"text": script.reply}
        if "tool_calls" in planned:
            await self._stream_tool_calls(response, planned["tool_calls"], created)
            return
        for i, token in enumerate(_tokens(planned["text"])):
            if script.failure == "drop" and i == 3:
                request.transport.close()  # type: ignore[union-attr]
                return
            if script.failure == "truncate" and i == 4:
                await response.write_eof()  # the body just ends: no finish_reason, no [DONE]
                return
            chunk = {"id": "scripted", "object": "chat.completion.chunk", "created": created, "model": "scripted",
                     "choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if i and script.token_interval_s:
                await asyncio.sleep(script.token_interval_s)
        done = {"id": "scripted", "object": "chat.completion.chunk", "created": created, "model": "scripted",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await response.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())
        await response.write_eof()


    async def _stream_tool_calls(self, response: web.StreamResponse, calls: list[dict[str, Any]],
                                 created: int) -> None:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            body = {"id": "scripted", "object": "chat.completion.chunk", "created": created, "model": "scripted",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(body)}\n\n".encode()

        for index, call in enumerate(calls):
            arguments = call["arguments"] if isinstance(call["arguments"], str) else json.dumps(call["arguments"])
            half = len(arguments) // 2  # arguments arrive in fragments, as real servers send them
            first = {"index": index, "id": call.get("id", f"call_{index}_{created}"), "type": "function",
                     "function": {"name": call["name"], "arguments": arguments[:half]}}
            await response.write(chunk({"tool_calls": [first]}))
            await response.write(chunk({"tool_calls": [{"index": index, "function": {"arguments": arguments[half:]}}]}))
        await response.write(chunk({}, "tool_calls"))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()


def _tokens(text: str) -> list[str]:
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]
