"""Workflow templates: Jinja2 in its immutable sandbox, over the run's context (`{{call.id}}`, `{{summary}}`...).

The sandbox refuses private and internal attributes (`__class__`, `mro`, `func_globals`...) and anything that
would change the context; an undefined name is an error, not an empty string. A template is checked when the
workflow is saved (syntax, and any reach for an attribute starting with "_"), and again at render time.
"""

from __future__ import annotations

from typing import Any

from jinja2 import StrictUndefined, TemplateError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


class TemplateFailed(Exception):
    """A template could not be rendered: a name it uses is undefined, or it tried to leave the sandbox.
    Never retried (the same template fails the same way)."""


def check_template(source: str) -> None:
    """Raise ValueError when `source` is not a template, or reaches for private attributes (the sandbox
    would refuse them when rendering anyway: saying so at save time is kinder)."""
    try:
        tree = _ENV.parse(source)
    except TemplateError as exc:
        raise ValueError(f"not a valid template: {exc}") from None
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        name = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
        if isinstance(name, str) and name.startswith("_"):
            raise ValueError(f"a template may not reach the attribute {name!r} (the sandbox refuses it)")


def render(source: str, context: dict[str, Any]) -> str:
    """`source` rendered over `context`. Raises TemplateFailed naming the problem."""
    try:
        return _ENV.from_string(source).render(context)
    except SecurityError as exc:
        raise TemplateFailed(f"template refused by the sandbox: {exc}") from None
    except TemplateError as exc:
        raise TemplateFailed(f"template failed: {exc}") from None


def render_json(value: Any, context: dict[str, Any]) -> Any:
    """A JSON value with every string in it rendered as a template."""
    if isinstance(value, str):
        return render(value, context)
    if isinstance(value, list):
        return [render_json(v, context) for v in value]
    if isinstance(value, dict):
        return {k: render_json(v, context) for k, v in value.items()}
    return value
