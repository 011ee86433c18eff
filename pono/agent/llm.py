"""The agent's LLM: any OpenAI-compatible chat endpoint, streamed through the `openai` client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import openai

log = logging.getLogger(__name__)


class LLMError(Exception):
    """The LLM could not produce a reply (down, timed out, refused)."""


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
                     temperature: float | None = None, max_tokens: int | None = None) -> AsyncIterator[str]:
        """Yield text deltas. Raises LLMError if the first token does not come within the timeout."""
        try:
            async with asyncio.timeout(self.timeout_s):
                stream = await self.client.chat.completions.create(
                    model=model or self.model,
                    messages=messages,  # type: ignore[arg-type]
                    stream=True,
                    max_tokens=max_tokens or self.max_tokens,
                    temperature=self.temperature if temperature is None else temperature,
                )
                iterator = aiter(stream)
                first = await anext(iterator, None)
        except (TimeoutError, openai.OpenAIError) as exc:
            raise LLMError(f"{type(exc).__name__}: {exc}") from exc
        try:
            if first is not None:
                yield _delta_text(first)
            # Between tokens, a stall as long as the whole timeout means the server is gone.
            while True:
                async with asyncio.timeout(self.timeout_s):
                    chunk = await anext(iterator, None)
                if chunk is None:
                    return
                yield _delta_text(chunk)
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


def _delta_text(chunk: Any) -> str:
    if not chunk.choices:
        return ""
    return chunk.choices[0].delta.content or ""
