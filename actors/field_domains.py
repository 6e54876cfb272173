"""The domain of each typed config field, declared next to the field, and the one walk that checks them all.

A domain is data in the field's metadata, declared with the field's default:

    lr: float = bounded(1e-6, gt=0)
    top_p: float = bounded(1.0, gt=0, le=1)
    num_gpus: float = resource(0.0)
    mode: str = one_of("sync", "async")  # the first choice is the default
    retries: dict[str, int] = bounded(factory=lambda: {"generator": 3}, ge=0)  # each value of a dict or list

`domain_errors(cfg)` walks a dataclass tree (nested dataclasses, and the values of typed dicts and lists) and names
each value outside its field's domain: `generator.temperature=-1.0: expected a number > 0`. Every float must be
finite, declared or not. Fields typed Any (plug-in parameters, Python objects) are left to the code that reads
them. Standard library only: the actors' configs declare with it, and cluster/config/checks.py runs the walk.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from functools import cache
from typing import Any

DOMAIN = "domain"  # the metadata key


@dataclass(frozen=True)
class Domain:
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple = ()
    whole_above: float | None = None  # values above this must be whole numbers (Ray's rule for resources)

    def expected(self, value) -> str | None:
        """What `value` should have been, or None when it lies in the domain."""
        if self.choices:
            if any(value == c and type(value) is type(c) for c in self.choices):
                return None
            return "expected one of " + ", ".join(sorted(map(str, self.choices)))
        if not isinstance(value, int | float):  # e.g. an interpolation left unresolved outside OmegaConf
            return f"expected a number {self.describe()}"
        inside = (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )
        whole = self.whole_above is None or value <= self.whole_above or float(value).is_integer()
        if inside and whole:
            return None
        kind = "an integer" if isinstance(value, int) else "a number"
        return f"expected {kind} {self.describe()}"

    def describe(self) -> str:
        """The bounds as text: `> 0`, `in [0, 1)`, `>= 0, whole above 1`."""
        low = next(
            ((op, b, x) for op, b, x in ((">=", "[", self.ge), (">", "(", self.gt)) if x is not None), None
        )
        high = next(
            ((op, b, x) for op, b, x in (("<=", "]", self.le), ("<", ")", self.lt)) if x is not None), None
        )
        if low and high:
            text = f"in {low[1]}{low[2]:g}, {high[2]:g}{high[1]}"
        elif low or high:
            op, _, x = low or high
            text = f"{op} {x:g}"
        else:
            text = "of any size"
        if self.whole_above is not None:
            text += f", whole above {self.whole_above:g}"
        return text


def _declare(default, factory, domain: Domain):
    if factory is not MISSING:
        return field(default_factory=factory, metadata={DOMAIN: domain})
    return field(default=default, metadata={DOMAIN: domain})


def bounded(default=MISSING, *, factory=MISSING, ge=None, gt=None, le=None, lt=None):
    """A number (or each number of a dict or list) within the given bounds; None, where the field allows it,
    means unset and is not checked."""
    return _declare(default, factory, Domain(ge=ge, gt=gt, le=le, lt=lt))


def resource(default: float):
    """A Ray resource amount (num_cpus, num_gpus): >= 0, fractional only up to 1."""
    return _declare(default, MISSING, Domain(ge=0, whole_above=1))


def one_of(*choices, default=MISSING):
    """One value of `choices`; the default is the first unless given."""
    return _declare(choices[0] if default is MISSING else default, MISSING, Domain(choices=choices))


def domain_errors(obj, prefix: str = "") -> list[str]:
    """`key=value: expected ...` for every value of the dataclass tree `obj` outside its field's domain."""
    hints = _hints(type(obj))
    errors = []
    for f in fields(obj):
        errors += _errors(getattr(obj, f.name), hints[f.name], f.metadata.get(DOMAIN), prefix + f.name)
    return errors


def _errors(value, hint, domain: Domain | None, key: str) -> list[str]:
    if value is None or hint is Any or isinstance(value, bool):
        return []
    if isinstance(value, str) and value.startswith(
        "${"
    ):  # a config built in Python, before OmegaConf resolves it
        return []
    if is_dataclass(value):
        return domain_errors(value, key + ".")
    if isinstance(value, dict):
        item = _item_hint(hint, 1)
        return [e for k, v in value.items() for e in _errors(v, item, domain, f"{key}.{k}")]
    if isinstance(value, list | tuple):
        item = _item_hint(hint, 0)
        return [e for i, v in enumerate(value) for e in _errors(v, item, domain, f"{key}.{i}")]
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{key}={value!r}: expected a finite number"]
    problem = domain.expected(value) if domain is not None else None
    return [f"{key}={value!r}: {problem}"] if problem else []


def _item_hint(hint, index: int):
    """The type of a container's items (index 1: a dict's values, 0: a list's items); Any when the hint does
    not say."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # dict[str, float] | None
        inner = [a for a in args if a is not type(None)]
        return _item_hint(inner[0], index) if len(inner) == 1 else Any
    if origin in (dict, list, tuple) and args:
        return args[min(index, len(args) - 1)]
    return Any


@cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)
