"""Workflow conditions: simpleeval expressions over the run's context, never Python's eval.

What an expression may hold: names (the context: `call`, `input`, `steps`, `summary`...), constants,
attribute and item access (not to names starting with "_"), arithmetic (no shifts; `**` up to MAX_EXPONENT),
comparisons, `and`/`or`/`not`, `in`, `x if c else y`, list/dict literals and comprehensions, the functions
FUNCTIONS, and the string and list methods METHODS, none of which builds more than it was given (no `ljust`,
`replace`, `join`, `format`...). The same rules are checked when the workflow is saved (`check_expression`) and
enforced when it runs (`evaluate`), where any value built is also capped at MAX_SIZE characters or items.
Evaluations never run on the event loop: pono.jobs.sandbox runs them in helper processes with a hard time
limit and a memory cap, which also stop what the caps do not foresee (a comprehension that loops for long).
"""

from __future__ import annotations

import ast
from typing import Any

from simpleeval import EvalWithCompoundTypes

MAX_SIZE = 100_000  # characters or items in any value an expression builds
MAX_EXPONENT = 1_000  # the largest exponent `**` takes (as in templates)
FUNCTIONS: dict[str, Any] = {"len": len, "int": int, "float": float, "str": str, "bool": bool, "abs": abs,
                             "min": min, "max": max, "round": round}
METHODS = frozenset({"lower", "upper", "casefold", "strip", "lstrip", "rstrip", "startswith", "endswith", "count",
                     "find", "index", "isdigit", "isalpha", "isalnum", "isspace", "title", "split", "get", "keys",
                     "values", "items"})
_NODES: tuple[type[ast.AST], ...] = (
    ast.Expr, ast.Constant, ast.Name, ast.Attribute, ast.Subscript, ast.Slice, ast.BinOp, ast.BoolOp, ast.UnaryOp,
    ast.Compare, ast.IfExp, ast.Call, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.ListComp, ast.GeneratorExp,
    ast.DictComp, ast.JoinedStr, ast.FormattedValue)
_OPERATORS: tuple[type[ast.AST], ...] = (
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.BitAnd, ast.BitOr, ast.BitXor,
    ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn, ast.Is, ast.IsNot, ast.Not,
    ast.UAdd, ast.USub, ast.Invert, ast.And, ast.Or)  # no shifts: 1 << 10**9 is a 125 MB number


class ConditionFailed(Exception):
    """An expression that is refused, or failed when evaluated (its own error: never retried)."""


def _parse(source: str) -> ast.AST:
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, ValueError) as exc:
        raise ConditionFailed(f"not an expression: {getattr(exc, 'msg', exc)}") from None
    return tree.body


def _check(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.expr | ast.stmt) and not isinstance(node, _NODES):
            raise ConditionFailed(f"{type(node).__name__} is not allowed in a condition")
        if isinstance(node, ast.operator | ast.cmpop | ast.unaryop | ast.boolop) and not isinstance(node, _OPERATORS):
            raise ConditionFailed(f"the operator {type(node).__name__} is not allowed in a condition")
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            raise ConditionFailed(f"a condition may not reach the attribute {node.attr!r}")
        if isinstance(node, ast.Name) and node.id.startswith("_"):
            raise ConditionFailed(f"a condition may not use the name {node.id!r}")
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id not in FUNCTIONS:
                raise ConditionFailed(f"a condition may call only {', '.join(FUNCTIONS)}, not {func.id!r}")
            if isinstance(func, ast.Attribute) and func.attr not in METHODS:
                raise ConditionFailed(f"a condition may not call the method {func.attr!r} "
                                      f"(allowed: {', '.join(sorted(METHODS))})")
            if not isinstance(func, ast.Name | ast.Attribute):
                raise ConditionFailed("a condition may call only functions and methods by name")


def check_expression(source: str) -> None:
    """Raise ValueError naming what is wrong when `source` is not an expression a condition may hold."""
    try:
        _check(_parse(source))
    except ConditionFailed as exc:
        raise ValueError(str(exc)) from None


def _sized(value: Any) -> Any:
    if isinstance(value, str | bytes | list | tuple | dict | set) and len(value) > MAX_SIZE:
        raise ConditionFailed(f"a value of {len(value)} characters or items was built (at most {MAX_SIZE})")
    return value


def _power(base: Any, exponent: Any) -> Any:
    if isinstance(exponent, int | float) and abs(exponent) > MAX_EXPONENT:
        raise ConditionFailed(f"an exponent of {exponent} (at most {MAX_EXPONENT})")
    return base ** exponent


class _Evaluator(EvalWithCompoundTypes):
    """simpleeval with the rules above: calls checked before, and what calls and operators build measured
    after."""

    def __init__(self, names: dict[str, Any]) -> None:
        super().__init__(names=names, functions=dict(FUNCTIONS))
        for op in (ast.LShift, ast.RShift):
            self.operators.pop(op, None)
        self.operators[ast.Pow] = _power

    def _eval_call(self, node: ast.Call) -> Any:
        _check(node)  # the same rules as at save time, whatever the tree was built from
        return _sized(super()._eval_call(node))

    def _eval_binop(self, node: ast.BinOp) -> Any:
        return _sized(super()._eval_binop(node))


def evaluate(source: str, context: dict[str, Any]) -> bool:
    """Whether `source` holds over `context`. Raises ConditionFailed naming the problem: a refused construct,
    a value over the cap, or the expression's own error (a missing name, a division by zero, an overflow)."""
    tree = _parse(source)
    _check(tree)
    try:
        return bool(_Evaluator(context).eval(source.strip()))
    except ConditionFailed:
        raise
    except MemoryError:
        raise ConditionFailed("the condition ran out of memory") from None
    except Exception as exc:  # the expression's own error: simpleeval's, or Python's (OverflowError...)
        raise ConditionFailed(f"{type(exc).__name__}: {exc}") from None
