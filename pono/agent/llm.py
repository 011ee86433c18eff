"""The agent's LLM: any OpenAI-compatible chat endpoint, streamed through the `openai` client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import openai

log = logging.getLogger(__name__)


class LLMError(Exception):
    """The LLM could not produce a reply (down, timed out, refused)."""


@dataclass(frozen=True, slots=True)
class ToolCallPart:
    """A fragment of a streamed tool call; fragments with the same index make one call."""

    index: int
    id: str | None
    name: str | None
    arguments: str


class LLMClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        model: str,
        *,
        timeout_s: float = 15.0,
        max_tokens: int = 160,
        temperature: float = 0.6,
    ) -> None:
        self.base_url = base_url
        self.model = model
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)

    async def stream(self, messages: list[dict[str, Any]], *, model: str | None = None,
                     temperature: float | None = None, max_tokens: int | None = None,
                     tools: list[dict[str, Any]] | None = None) -> AsyncIterator[str | ToolCallPart]:
        """Yield text deltas and tool-call fragments. Raises LLMError if the first token does not come
        within the timeout, or the stream stalls that long between tokens."""
        extra: dict[str, Any] = {"tools": tools, "parallel_tool_calls": True} if tools else {}
        try:
            async with asyncio.timeout(self.timeout_s):
                stream = await self.client.chat.completions.create(
                    model=model or self.model,
                    messages=messages,  # type: ignore[arg-type]
                    stream=True,
                    max_tokens=max_tokens or self.max_tokens,
                    temperature=self.temperature if temperature is None else temperature,
                    **extra,
                )
                iterator = aiter(stream)
                first = await anext(iterator, None)
        except (TimeoutError, openai.OpenAIError) as exc:
            raise LLMError(f"{type(exc).__name__}: {exc}") from exc
        try:
            chunk = first
            # Between tokens, a stall as long as the whole timeout means the server is gone.
            while chunk is not None:
                for part in _parts(chunk):
                    yield part
                async with asyncio.timeout(self.timeout_s):
                    chunk = await anext(iterator, None)
        except (TimeoutError, openai.OpenAIError) as exc:
            raise LLMError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            await stream.close()

    async def reachable(self) -> bool:
        try:
            async with asyncio.timeout(3):
                await self.client.models.list()
            return True
        except Exception:
            return False

    async def close(self) -> None:
        await self.client.close()


def _parts(chunk: Any) -> list[str | ToolCallPart]:
    if not chunk.choices:
        return []
    delta = chunk.choices[0].delta
    parts: list[str | ToolCallPart] = []
    if delta.content:
        parts.append(delta.content)
    for call in delta.tool_calls or []:
        function = call.function
        parts.append(ToolCallPart(call.index, call.id, function.name if function else None,
                                  (function.arguments or "") if function else ""))
    return parts
