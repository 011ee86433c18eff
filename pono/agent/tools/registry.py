"""Tools the LLM may call: typed Python callables whose JSON schema comes from their signature.

Arguments are validated before the call. A validation error, an exception or a timeout becomes the tool's
result (`{"error": ...}`) so the LLM can recover; none of them fails the turn.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from pydantic import BaseModel, ValidationError, create_model


@dataclass
class ToolContext:
    """What a tool may know about the call it runs in."""

    call_id: str
    persona: str
    timezone: str = "UTC"
    actions: dict[str, Callable[..., Awaitable[None]]] = field(default_factory=dict)  # end_call, transfer, cite
    knowledge: Any = None  # a KnowledgeBase, when the persona has collections
    collections: list[str] = field(default_factory=list)


@dataclass
class ToolOutcome:
    call_id: str  # the LLM's id for this tool call
    name: str
    arguments: dict[str, Any] | str
    result: Any
    error: str | None
    duration_ms: float

    def message(self) -> dict[str, Any]:
        content = {"error": self.error} if self.error else self.result
        return {"role": "tool", "tool_call_id": self.call_id, "content": json.dumps(content, default=str)}


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[[dict[str, Any], ToolContext], Awaitable[Any]]
    timeout_s: float = 10.0
    validator: type[BaseModel] | None = None

    def schema(self) -> dict[str, Any]:
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


def python_tool(fn: Callable[..., Awaitable[Any]], *, name: str | None = None, timeout_s: float = 10.0) -> Tool:
    """A Tool from an async function. Its parameters (except `ctx`) become the JSON schema."""
    hints = get_type_hints(fn)
    fields: dict[str, Any] = {}
    for param in inspect.signature(fn).parameters.values():
        if param.name == "ctx":
            continue
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (hints.get(param.name, Any), default)
    model = create_model(f"{fn.__name__}_args", **fields)  # type: ignore[call-overload]
    schema = model.model_json_schema()
    schema.pop("title", None)
    wants_ctx = "ctx" in inspect.signature(fn).parameters

    async def run(args: dict[str, Any], ctx: ToolContext) -> Any:
        values = model.model_validate(args).model_dump()
        return await (fn(ctx=ctx, **values) if wants_ctx else fn(**values))

    return Tool(name or fn.__name__, inspect.getdoc(fn) or fn.__name__, schema, run, timeout_s, model)


class ToolRegistry:
    def __init__(self, tools: list[Tool] | None = None) -> None:
        self.tools: dict[str, Tool] = {t.name: t for t in tools or []}

    def add(self, tool: Tool) -> None:
        self.tools[tool.name] = tool

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self.tools.values()]

    async def call(self, call_id: str, name: str, raw_arguments: str, ctx: ToolContext) -> ToolOutcome:
        started = time.perf_counter()
        tool = self.tools.get(name)

        def outcome(result: Any = None, error: str | None = None, args: dict[str, Any] | str = raw_arguments) -> \
                ToolOutcome:
            return ToolOutcome(call_id, name, args, result, error, round((time.perf_counter() - started) * 1000, 1))

        if tool is None:
            return outcome(error=f"unknown tool {name!r}; available: {', '.join(self.tools) or 'none'}")
        try:
            args = json.loads(raw_arguments or "{}")
            if not isinstance(args, dict):
                raise ValueError("arguments must be a JSON object")
        except ValueError as exc:
            return outcome(error=f"arguments are not valid JSON: {exc}")
        except RecursionError:
            return outcome(error="arguments are not valid JSON: nested too deeply")
        try:
            async with asyncio.timeout(tool.timeout_s):
                result = await tool.run(args, ctx)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in exc.errors())
            return outcome(error=f"invalid arguments: {problems}", args=args)
        except TimeoutError:
            return outcome(error=f"{name} timed out after {tool.timeout_s:g} s", args=args)
        except Exception as exc:  # a broken tool must not break the turn
            return outcome(error=f"{name} failed: {type(exc).__name__}: {exc}", args=args)
        return outcome(result=result, args=args)


@dataclass
class ToolBox:
    """What a call's replies may use: the tools, their context, and the limits of a turn."""

    registry: ToolRegistry
    context: ToolContext
    max_rounds: int = 3
    slow_after_s: float = 1.5  # a round slower than this gets a spoken filler first
    filler: str = "Let me check that."
    # Tool rounds still running (shielded from a barge-in); the next reply waits for them to commit.
    in_flight: set[asyncio.Future[None]] = field(default_factory=set)
