"""Workflow templates: Jinja2 in its immutable sandbox, over the run's context (`{{call.id}}`, `{{summary}}`...).

The sandbox refuses private and internal attributes (`__class__`, `mro`, `gi_frame`...) and anything that
would change the context; an undefined name is an error, not an empty string; None renders as "". A template is
checked when the workflow is saved (syntax, and any reach for an attribute starting with "_" or internal to
Python, also through `attr`, `map(attribute=...)` and their kin), and again by the sandbox at render time.

Rendering is bounded: `range()` gives at most MAX_RANGE items, one operation (`*`, a padding method, the
`center`/`indent`/`format` filters) builds at most MAX_SIZE characters, `**` takes small exponents, and a
template renders at most MAX_OUTPUT characters. Renders never run on the event loop: pono.jobs.sandbox runs them
in helper processes with a hard time limit and a memory cap, which also stop what these caps do not foresee.
"""

from __future__ import annotations

import functools
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateError, nodes
from jinja2.runtime import Context
from jinja2.sandbox import (
    UNSAFE_ASYNC_GENERATOR_ATTRIBUTES,
    UNSAFE_COROUTINE_ATTRIBUTES,
    UNSAFE_GENERATOR_ATTRIBUTES,
    ImmutableSandboxedEnvironment,
    SecurityError,
)

MAX_RANGE = 10_000  # items in one range()
MAX_SIZE = 100_000  # characters (or items) one operation may build
MAX_OUTPUT = 1_000_000  # characters one template may render
MAX_EXPONENT = 1_000  # the largest exponent `**` takes
_PADDING = frozenset({"ljust", "rjust", "center", "zfill", "expandtabs"})
_UNSAFE = frozenset({"mro", "func_globals", "func_code", *UNSAFE_GENERATOR_ATTRIBUTES,
                     *UNSAFE_COROUTINE_ATTRIBUTES, *UNSAFE_ASYNC_GENERATOR_ATTRIBUTES})
# Filters and tests whose string arguments name attributes (attr("x"), map(attribute="x"), sort(attribute=...)).
_ATTRIBUTE_FILTERS = frozenset({"attr", "map", "selectattr", "rejectattr", "sort", "groupby", "sum", "unique",
                                "min", "max", "join", "dictsort"})


class TemplateFailed(Exception):
    """A template could not be rendered: a name it uses is undefined, it tried to leave the sandbox, or it went
    over a limit. Never retried (the same template fails the same way)."""


def _limit(what: str) -> TemplateFailed:
    return TemplateFailed(f"template over a limit: {what}")


def _check_size(value: Any) -> Any:
    if isinstance(value, str | bytes | list | tuple) and len(value) > MAX_SIZE:
        raise _limit(f"one operation built {len(value)} characters or items (at most {MAX_SIZE})")
    return value


def _check_width(width: Any) -> None:
    if isinstance(width, int) and width > MAX_SIZE:
        raise _limit(f"a width of {width} (at most {MAX_SIZE})")


def _range(*args: int) -> range:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise _limit(f"range() of {len(rng)} items (at most {MAX_RANGE})")
    return rng


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox with caps on what one call or operator may build."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
            raise _limit(f"an exponent of {right} (at most {MAX_EXPONENT})")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int) and len(seq) * times > MAX_SIZE:
                    raise _limit(f"repeating {len(seq)} characters or items {times} times (at most {MAX_SIZE})")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(getattr(__obj, "__self__", None), str | bytes) and getattr(__obj, "__name__", "") in _PADDING:
            for width in (*args, *kwargs.values()):
                _check_width(width)
        return _check_size(super().call(__context, __obj, *args, **kwargs))


def _bounded_filter(env: _BoundedEnvironment, name: str) -> None:
    original = env.filters[name]

    def bounded(*args: Any, **kwargs: Any) -> Any:
        if name == "format":  # "%999999999s"|format(x): the widths are in the format string
            for spec in str(args[0] if args else "").split("%")[1:]:
                _check_width(int("".join(c for c in spec[:12] if c.isdigit()) or 0))
        else:  # center(width), indent(width)
            for width in (*args[1:], *kwargs.values()):
                _check_width(width)
        return _check_size(original(*args, **kwargs))

    env.filters[name] = bounded


def _finalize(value: Any) -> Any:
    return "" if value is None else value


_ENV = _BoundedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True,
                           finalize=_finalize)
_ENV.globals["range"] = _range
for _name in ("center", "indent", "format"):
    _bounded_filter(_ENV, _name)


def _unsafe_name(name: str) -> bool:
    return any(part.startswith("_") or part in _UNSAFE for part in name.split("."))


def check_template(source: str) -> None:
    """Raise ValueError when `source` is not a template, or reaches for private or internal attributes (the
    sandbox would refuse them when rendering anyway: saying so at save time is kinder)."""
    try:
        tree = _ENV.parse(source)
    except TemplateError as exc:
        raise ValueError(f"not a valid template: {exc}") from None
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        name = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
        if isinstance(name, str) and _unsafe_name(name):
            raise ValueError(f"a template may not reach the attribute {name!r} (the sandbox refuses it)")
    for node in tree.find_all((nodes.Filter, nodes.Test)):
        if node.name not in _ATTRIBUTE_FILTERS:
            continue
        arguments = [*node.args, *(kw.value for kw in node.kwargs)]
        if node.name == "attr" and not (arguments and isinstance(arguments[0], nodes.Const)):
            raise ValueError("a template's attr() needs a constant attribute name")
        for arg in arguments:
            if isinstance(arg, nodes.Const) and isinstance(arg.value, str) and _unsafe_name(arg.value):
                raise ValueError(f"a template may not reach the attribute {arg.value!r} (the sandbox refuses it)")


def literal_parts(source: str) -> list[str]:
    """The text of a template written as it is (outside `{{ }}` and `{% %}`): what the workflow's author typed,
    not what a call filled in. [] when it does not parse."""
    try:
        tree = _ENV.parse(source)
    except TemplateError:
        return []
    return [node.data for node in tree.find_all(nodes.TemplateData) if node.data.strip()]


@functools.lru_cache(maxsize=256)
def _compiled(source: str) -> Template:
    return _ENV.from_string(source)


def render(source: str, context: dict[str, Any]) -> str:
    """`source` rendered over `context`, in this process (pono.jobs.sandbox calls it in a helper process).
    Raises TemplateFailed naming the problem."""
    try:
        out, size = [], 0
        for piece in _compiled(source).generate(context):
            size += len(piece)
            if size > MAX_OUTPUT:
                raise _limit(f"the output passed {MAX_OUTPUT} characters")
            out.append(piece)
        return "".join(out)
    except SecurityError as exc:
        raise TemplateFailed(f"template refused by the sandbox: {exc}") from None
    except TemplateError as exc:
        raise TemplateFailed(f"template failed: {exc}") from None
    except (ArithmeticError, TypeError, ValueError, LookupError, RecursionError) as exc:
        raise TemplateFailed(f"template failed: {type(exc).__name__}: {exc}") from None


def render_json(value: Any, context: dict[str, Any]) -> Any:
    """A JSON value with every string in it rendered as a template."""
    if isinstance(value, str):
        return render(value, context)
    if isinstance(value, list):
        return [render_json(v, context) for v in value]
    if isinstance(value, dict):
        return {k: render_json(v, context) for k, v in value.items()}
    return value
