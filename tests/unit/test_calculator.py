"""The sandboxed calculator (actors/envs/calc_worker.py, calculator.py): arithmetic is computed, hostile input is
refused with a reason, and a worker that hangs or dies is killed and replaced."""

import sys
from pathlib import Path

import pytest

from troupe.actors.envs.calc_worker import MAX_CHARS, CalcError, evaluate
from troupe.actors.envs.calculator import Calculator


@pytest.mark.parametrize(
    "expression, value",
    [
        ("127 * 48", "6096"),
        ("(12 + 30) / 4", "10.5"),
        ("10 / 2", "5"),
        ("2 ** 10", "1024"),
        ("-7 // 2", "-4"),
        ("17 % 5", "2"),
        ("3 × 4", "12"),
        ("2^8", "256"),
        ("1 / 3", "0.3333333333"),
        (" 999*999 ", "998001"),
    ],
)
def test_arithmetic(expression, value):
    assert evaluate(expression) == value


HOSTILE = [  # (input, what the refusal says)
    ("__import__('os').system('id')", "not allowed: Call"),
    ("().__class__.__bases__[0].__subclasses__()", "not allowed: (Call|Attribute|Subscript)"),
    ("open('/etc/passwd').read()", "not allowed: (Call|Attribute)"),
    ("x", "not allowed: Name"),
    ("lambda: 1", "not allowed: Lambda"),
    ("[i for i in range(10**9)]", "not allowed: ListComp"),
    ("'a' * 10**9", "only numbers"),
    ("b'x'", "only numbers"),
    ("True + 1", "only numbers"),
    ("1j * 1j", "only numbers"),
    ("9 ** 9 ** 9", "exponent .* too large"),
    ("2 ** 100000", "exponent .* too large"),
    ("10 ** 200", "result too large"),
    ("(10 ** 40) * (10 ** 40)", "result too large"),
    ("1e308 * 10", "not a finite number"),
    ("10.0 ** 200 * 10.0 ** 200", "not a finite number|too large"),
    ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("0 ** -1", "zero to a negative power"),
    ("(-8) ** 0.5", "not a real number"),
    ("1 +", "not an arithmetic expression"),
    ("1; import os", "not an arithmetic expression"),
    ("", "empty expression"),
    ("1+" * 200 + "1", f"over {MAX_CHARS} characters"),
    ("-" * 200 + "1", "over 64 parts"),
    ("+".join(["1"] * 60), "over 64 parts"),
    ("9" * 200, "result too large"),
]


@pytest.mark.parametrize("expression, message", HOSTILE)
def test_hostile_input_is_refused_naming_why(expression, message):
    with pytest.raises(CalcError, match=message):
        evaluate(expression)


def test_not_a_string():
    with pytest.raises(CalcError, match="expected the expression as a string, got int"):
        evaluate(12)


@pytest.fixture
def calculator():
    calc = Calculator(timeout_s=5)
    yield calc
    calc.close()


def test_the_worker_process_computes_and_refuses(calculator):
    assert calculator.evaluate("127 * 48") == "6096"
    for expression, message in HOSTILE[:3]:
        with pytest.raises(CalcError, match=message):
            calculator.evaluate(expression)
    assert calculator.evaluate("1 + 1") == "2" and calculator.restarts == 0  # refusals do not cost the worker


def test_the_worker_is_isolated_and_limited(calculator):
    calculator.evaluate("1")
    pid = calculator._proc.pid
    limits = Path(f"/proc/{pid}/limits").read_text()
    address_space = next(line for line in limits.splitlines() if line.startswith("Max address space"))
    assert address_space.split()[3] == str(512 * 2**20)
    file_size = next(line for line in limits.splitlines() if line.startswith("Max file size"))
    assert file_size.split()[3] == "0"
    assert Path(f"/proc/{pid}/environ").read_bytes() == b""  # nothing of the parent's environment
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1:3] == [b"-I", b"-S"]


def test_a_hung_worker_is_killed_and_replaced(tmp_path):
    hangs = tmp_path / "hangs.py"
    hangs.write_text("import time\nwhile True:\n    time.sleep(1)\n")
    calc = Calculator(timeout_s=0.5, worker=hangs)
    try:
        with pytest.raises(CalcError, match="timed out"):
            calc.evaluate("1 + 1")
        assert calc.restarts == 1 and calc._proc is None
        calc.worker = Path(sys.modules[evaluate.__module__].__file__)  # the real worker again
        assert calc.evaluate("1 + 1") == "2"
    finally:
        calc.close()


def test_a_worker_that_dies_is_an_error_not_a_hang(tmp_path):
    dies = tmp_path / "dies.py"
    dies.write_text("import sys\nsys.exit(3)\n")
    calc = Calculator(timeout_s=5, worker=dies)
    try:
        with pytest.raises(CalcError, match="worker exited|unavailable"):
            calc.evaluate("1 + 1")
        with pytest.raises(
            CalcError, match="worker exited|unavailable"
        ):  # and again: a fresh worker each time
            calc.evaluate("1 + 1")
    finally:
        calc.close()
