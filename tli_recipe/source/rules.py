"""Rule expressions of the architecture definitions: shapes, conditions and per-layer rules over
config.json values, evaluated by a small safe evaluator (a definition file cannot run code)."""

from __future__ import annotations

import ast
import operator
from functools import lru_cache
from typing import Any, Mapping

from tli_recipe.errors import TliError


class ArchError(TliError):
    """No definition fits a checkpoint, or a definition file is broken."""


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}
_COMPARE = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_BINOPS[ast.Mod] = operator.mod


def evaluate(expr: Any, names: Mapping[str, Any]) -> Any:
    """Evaluate a shape or condition expression over config values.

    Allowed: numbers, quoted strings, config key names, ``+ - * // %``, comparisons (``in`` too),
    ``and``/``or``/``not``, ``x if cond else y`` and parentheses. Nothing else, so a
    definition file cannot run code.
    """
    if isinstance(expr, (int, float, bool)) or expr is None:
        return expr

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bool, str)):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in names:
                raise KeyError(node.id)
            return names[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return not walk(node.operand)
        if isinstance(node, ast.BoolOp):
            values = [walk(v) for v in node.values]
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
            return _COMPARE[type(node.ops[0])](walk(node.left), walk(node.comparators[0]))
        if isinstance(node, ast.IfExp):
            return walk(node.body) if walk(node.test) else walk(node.orelse)
        raise ValueError(f"unsupported expression {ast.dump(node)}")

    return walk(_parse(str(expr)))


@lru_cache(maxsize=1024)
def _parse(expr: str) -> ast.Expression:
    # Parsed once per expression: a rule is evaluated once per layer (and per tensor).
    return ast.parse(expr, mode="eval")


def _names_in(expr: Any) -> list[str]:
    if not isinstance(expr, str):
        return []
    return sorted({node.id for node in ast.walk(_parse(expr)) if isinstance(node, ast.Name)} - {"layer"})


def config_value(value: Any) -> str:
    """A config value for a message: numbers and short strings as they are, anything else by its type."""
    if isinstance(value, (bool, int, float)) or value is None:
        return repr(value)
    if isinstance(value, str) and len(value) <= 40 and value.isprintable():
        return repr(value)
    return f"a {type(value).__name__}"


def evaluate_rule(expr: Any, names: Mapping[str, Any], what: str) -> Any:
    """``evaluate`` for a rule over config values; a value the rule cannot use (a period of 0,
    a string where a number belongs) is an ArchError naming the config keys the rule reads."""
    try:
        return evaluate(expr, names)
    except KeyError:
        raise
    except (ArithmeticError, TypeError, ValueError):
        keys = _names_in(expr)
        shown = ", ".join(f"{k}={config_value(names.get(k))}" for k in keys) or "its values"
        raise ArchError(
            f"config.json {shown}: cannot compute {what} from it; expected values that the rule "
            f"{expr!r} can use (positive integers for periods and counts)"
        ) from None
