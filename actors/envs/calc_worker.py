"""The calculator's evaluator, run as its own process: `python -I -S calc_worker.py` (isolated: no site, no user
paths, no environment variables), with address-space, file and CPU limits set before it reads a line.

One JSON request per line on stdin ({"expression": str}), one JSON reply per line on stdout ({"value": str} or
{"error": str}). Stdlib only, no troupe imports: the parent (calculator.py) imports `evaluate` for its tests, the
worker runs this file by path.

An expression is parsed, never executed: only numbers, + - * / // % ** and unary +/- are walked, every
intermediate result is bounded (integer bits, finite floats), and powers are checked before they are computed.
Names, calls, attributes, subscripts, strings, comprehensions and lambdas are refused by the walk itself, so
there is nothing to reach builtins through.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import sys

MAX_CHARS = 256  # Python's parser refuses deep nesting well before this many characters
MAX_NODES = 64
MAX_INT_BITS = 256  # about 77 decimal digits
MAX_EXPONENT = 256
CPU_SECONDS_PER_REQUEST = 1
ADDRESS_SPACE_BYTES = 512 * 2**20

BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalcError(ValueError):
    """An expression the calculator refuses or cannot compute; the message is shown to the model."""


def _bounded(value):
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalcError(f"result too large (over {MAX_INT_BITS} bits)")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalcError("result is not a finite number")
    return value


def _power(base, exponent):
    if isinstance(exponent, int) and abs(exponent) > MAX_EXPONENT:
        raise CalcError(f"exponent {exponent} too large (at most {MAX_EXPONENT})")
    if isinstance(exponent, float) and abs(exponent) > MAX_EXPONENT:
        raise CalcError(f"exponent {exponent} too large (at most {MAX_EXPONENT})")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if (abs(base).bit_length() - 1) * exponent > MAX_INT_BITS:  # checked before the number is built
            raise CalcError(f"result too large (over {MAX_INT_BITS} bits)")
    if base == 0 and exponent < 0:
        raise CalcError("zero to a negative power")
    try:
        value = base**exponent
    except OverflowError:
        raise CalcError("result too large") from None
    if isinstance(value, complex):
        raise CalcError("result is not a real number")
    return value


def _walk(node):
    if isinstance(node, ast.Expression):
        return _walk(node.body)
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):  # bool, str, bytes, complex, None, Ellipsis
            raise CalcError(f"only numbers are allowed, got {type(node.value).__name__}")
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_walk(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Pow):
            return _bounded(_power(left, right))
        try:
            return _bounded(BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalcError("division by zero") from None
        except OverflowError:
            raise CalcError("result too large") from None
    raise CalcError(f"not allowed: {type(node).__name__} (only numbers and + - * / // % ** are)")


def evaluate(expression: str) -> str:
    """The value of an arithmetic expression as text, or CalcError naming why not."""
    if not isinstance(expression, str):
        raise CalcError(f"expected the expression as a string, got {type(expression).__name__}")
    text = expression.strip().replace("×", "*").replace("^", "**")
    if not text:
        raise CalcError("empty expression")
    if len(text) > MAX_CHARS:
        raise CalcError(f"expression over {MAX_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CalcError(f"not an arithmetic expression ({type(e).__name__})") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalcError(f"expression over {MAX_NODES} parts")
    value = _walk(tree)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)
    return str(round(value, 10) if isinstance(value, float) else value)


def _limit_self() -> None:
    import resource
    import signal

    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_BYTES, ADDRESS_SPACE_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    def _too_long(signum, frame):
        raise CalcError("timed out")

    signal.signal(signal.SIGPROF, _too_long)  # CPU time per request; the parent's wall clock is the backstop


def serve(lines, write) -> None:
    import signal

    for line in lines:
        try:
            request = json.loads(line)
            signal.setitimer(signal.ITIMER_PROF, CPU_SECONDS_PER_REQUEST)
            try:
                reply = {"value": evaluate(request.get("expression") if isinstance(request, dict) else None)}
            finally:
                signal.setitimer(signal.ITIMER_PROF, 0)
        except CalcError as e:
            reply = {"error": str(e)}
        except MemoryError:
            reply = {"error": "out of memory"}
        except Exception as e:  # noqa: BLE001 - the worker answers every line; the parent counts errors
            reply = {"error": f"calculator failed ({type(e).__name__})"}
        write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    _limit_self()
    serve(sys.stdin, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
