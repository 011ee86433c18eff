"""Templates and conditions evaluated in helper processes, never on the event loop, each under a hard limit.

A workflow's templates and conditions are an admin's code run over call data: CPU-bound work that an asyncio
timeout cannot interrupt, so run in-process it would freeze every call and request of the server. Here they
run in small helper processes (`python -m pono.jobs.sandbox`, at most `size` at once, started on first use and
kept), one request at a time each. A request that takes longer than `limit_s`, or whose caller is cancelled
(the step's timeout, a cancelled run), kills its helper: the next request starts a fresh one. A helper's
address space is capped (`memory_bytes`, RLIMIT_AS: building a gigabyte string is a MemoryError, not a swapped
machine), its environment holds no secrets, and it exits when the worker's end of its pipe closes.

Protocol: one JSON line per request, {"op": "render" | "render_json" | "eval", "items": [...], "context": {...}},
answered by one JSON line, {"ok": [one result per item]} or {"error": "..."}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from pono.jobs.conditions import ConditionFailed
from pono.jobs.templates import TemplateFailed

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_READ_LIMIT = 64 << 20  # the longest answer line (renders are capped at 1 M characters each)


class Sandbox:
    """A pool of up to `size` helper processes; `limit_s`: the most one request may take; `memory_bytes`: each
    helper's address-space cap."""

    def __init__(self, *, size: int = 2, limit_s: float = 5.0, memory_bytes: int = 768 << 20) -> None:
        self.size = size
        self.limit_s = limit_s
        self.memory_bytes = memory_bytes
        self._slots: asyncio.Semaphore | None = None
        self._idle: list[asyncio.subprocess.Process] = []
        self._live: set[asyncio.subprocess.Process] = set()
        self._reaping: set[asyncio.Task[Any]] = set()

    async def render(self, sources: list[str], context: dict[str, Any]) -> list[str]:
        """Each template in `sources` rendered over `context`. Raises TemplateFailed (a template's error, a
        limit, the time limit)."""
        return await self._ask("render", sources, context, TemplateFailed)

    async def render_json(self, value: Any, context: dict[str, Any]) -> Any:
        """A JSON value with every string in it rendered. Raises TemplateFailed."""
        return (await self._ask("render_json", [value], context, TemplateFailed))[0]

    async def holds(self, expression: str, context: dict[str, Any]) -> bool:
        """Whether a condition's expression holds. Raises ConditionFailed (its error, a limit, the time limit)."""
        return bool((await self._ask("eval", [expression], context, ConditionFailed))[0])

    async def _ask(self, op: str, items: list[Any], context: dict[str, Any],
                   failure: type[Exception]) -> list[Any]:
        what = "condition" if op == "eval" else "template"
        request = (json.dumps({"op": op, "items": items, "context": context}, default=str) + "\n").encode()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        async with self._slots:
            helper = self._idle.pop() if self._idle else await self._spawn()
            line, healthy = b"", False
            try:
                async with asyncio.timeout(self.limit_s):
                    assert helper.stdin is not None and helper.stdout is not None
                    helper.stdin.write(request)
                    await helper.stdin.drain()
                    line = await helper.stdout.readline()
                healthy = line.endswith(b"\n")
            except TimeoutError:
                raise failure(f"the {what} was stopped after {self.limit_s:g} s (the limit for one "
                              "evaluation)") from None
            except (ConnectionError, asyncio.LimitOverrunError, ValueError):
                pass  # a helper that died or answered too much: reported below
            finally:
                if healthy:
                    self._idle.append(helper)
                else:
                    self._kill(helper)
        if not healthy:
            raise failure(f"the {what} stopped its evaluation process (out of memory or too large an answer)")
        answer = json.loads(line)
        if "error" in answer:
            raise failure(answer["error"])
        return list(answer["ok"])

    async def _spawn(self) -> asyncio.subprocess.Process:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": _PACKAGE_ROOT, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}  # nothing else: no secrets reach the helper
        helper = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pono.jobs.sandbox", str(self.memory_bytes), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env, limit=_READ_LIMIT)
        self._live.add(helper)
        return helper

    def _kill(self, helper: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            helper.kill()
        self._live.discard(helper)
        task = asyncio.ensure_future(helper.wait())  # reaped in the background: no zombie, no wait here
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    async def close(self) -> None:
        """Stop every helper."""
        for helper in list(self._live):
            self._kill(helper)
        self._idle.clear()
        if self._reaping:
            await asyncio.gather(*self._reaping, return_exceptions=True)


def _answer(request: dict[str, Any]) -> dict[str, Any]:
    from pono.jobs import conditions, templates

    op, items, context = request["op"], request["items"], request["context"]
    try:
        if op == "render":
            return {"ok": [templates.render(source, context) for source in items]}
        if op == "render_json":
            return {"ok": [templates.render_json(value, context) for value in items]}
        if op == "eval":
            return {"ok": [conditions.evaluate(source, context) for source in items]}
        return {"error": f"unknown operation {op!r}"}
    except (TemplateFailed, ConditionFailed) as exc:
        return {"error": str(exc)}
    except MemoryError:
        return {"error": "the evaluation ran out of memory"}
    except RecursionError:
        return {"error": "the evaluation nested too deeply"}
    except Exception as exc:  # whatever else the template or expression raised is its own error
        return {"error": f"{type(exc).__name__}: {exc}"}


def serve(memory_bytes: int) -> None:
    """A helper: answer requests from stdin on stdout until stdin closes."""
    import resource

    from pono.jobs import conditions, templates  # noqa: F401 (imported before the cap, and once)

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    while line := sys.stdin.buffer.readline():
        try:
            answer = _answer(json.loads(line))
            out = json.dumps(answer)
        except MemoryError:
            out = json.dumps({"error": "the evaluation ran out of memory"})
        except ValueError as exc:
            out = json.dumps({"error": f"a request the helper could not read: {exc}"})
        sys.stdout.write(out + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
