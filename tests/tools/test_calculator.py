"""The calculator tool: equal to Python's own arithmetic on generated expressions, and refusing anything else."""

import ast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omnilm.tools.calculator import CalculatorError, evaluate, run_calculator

numbers = st.integers(0, 10**6).map(str) | st.decimals(0, 1000, places=2).map(str)
expressions = st.recursive(numbers, lambda inner: st.one_of(
    st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "//", "%"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
    inner.map(lambda e: f"-{e}")), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(expressions)
def test_equals_python_arithmetic(expression):
    try:
        expected = eval(compile(ast.parse(expression, mode="eval"), "<test>", "eval"))  # noqa: S307 (generated)
    except ZeroDivisionError:
        with pytest.raises(CalculatorError, match="division by zero"):
            evaluate(expression)
        return
    if abs(expected) > 10**30:
        return
    value = evaluate(expression)
    assert value == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert isinstance(value, int) == (float(expected).is_integer())


@pytest.mark.parametrize("expression", ["__import__('os')", "x + 1", "'a' * 3", "(1).real", "[1, 2]", "2 ** 999",
                                        "9 ** 9 ** 9", "1e308 * 1e308", "", "1 +", "a" * 300, "lambda: 1"])
def test_anything_but_arithmetic_is_refused(expression):
    with pytest.raises(CalculatorError):
        evaluate(expression)
    assert run_calculator({"expression": expression}).startswith("error: ")


def test_arguments_forms():
    assert run_calculator('{"expression": "(437 + 28) * 3 - 152"}') == "1243"
    assert run_calculator({"expression": "85 / 5"}) == "17"
    assert run_calculator({"expression": "7 / 2"}) == "3.5"
    assert run_calculator("{oops").startswith("error: ")
    assert run_calculator({"expr": "1"}).startswith("error: ")
