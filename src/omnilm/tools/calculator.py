"""A calculator tool: arithmetic expressions evaluated from their syntax tree (never ``eval``), and its OpenAI
function definition.

Allowed: integer and decimal literals, ``+ - * / // %``, unary ``+``/``-``, ``**`` with a small exponent, and
parentheses. Anything else (names, calls, attributes, strings, huge powers) is refused with a message that the
model receives as the tool's result.
"""

from __future__ import annotations

import ast
import json
import operator
from collections.abc import Callable
from typing import Any

NAME = "calculator"
#: The function definition sent with a request (``tools=[CALCULATOR_TOOL]``).
CALCULATOR_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": NAME, "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
MAX_EXPRESSION = 200  # characters
MAX_EXPONENT = 64
MAX_MAGNITUDE = 10 ** 30  # results beyond this are refused (a power tower must not run the machine out of memory)

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    """The expression is not plain arithmetic, or its value cannot be computed."""


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponent {right} is too large (at most {MAX_EXPONENT})")
        try:
            result = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError as err:
            raise CalculatorError("division by zero") from err
        if isinstance(result, complex) or abs(result) > MAX_MAGNITUDE:
            raise CalculatorError("the result is out of range")
        return result
    raise CalculatorError(f"not allowed in an arithmetic expression: {type(node).__name__}")


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic ``expression`` (a float that is whole comes back as an int)."""
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("the expression is empty")
    if len(expression) > MAX_EXPRESSION:
        raise CalculatorError(f"the expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise CalculatorError(f"not an arithmetic expression: {err.msg}") from err
    value = _value(tree.body)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return round(value, 6) if isinstance(value, float) else value


def run_calculator(arguments: str | dict[str, Any]) -> str:
    """The tool's result for a call's ``arguments`` (JSON text or object): the value, or ``error: ...``."""
    try:
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        if not isinstance(arguments, dict) or not isinstance(arguments.get("expression"), str):
            raise CalculatorError('arguments must be {"expression": "..."}')
        return str(evaluate(arguments["expression"]))
    except (CalculatorError, json.JSONDecodeError, RecursionError) as err:
        return f"error: {err}"
