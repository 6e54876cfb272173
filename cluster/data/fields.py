"""A row's fields as the loaders need them (text, chat messages, a prompt); anything else is a `SkipRow` whose
message names the field and what it holds instead."""

from __future__ import annotations

import math

from troupe.cluster.data.records import SkipRow

ROLES = ("system", "user", "assistant", "tool")


def required(row: dict, key: str):
    """row[key]; an absent or null field is a skipped row ("missing_key")."""
    if key not in row:
        raise SkipRow("missing_key", f"no field {key!r} (has {sorted(map(str, row))})")
    if row[key] is None:
        raise SkipRow("missing_key", f"field {key!r} is null")
    return row[key]


def text(value, field: str, reason: str) -> str:
    """A string; a finite JSON number as Python writes it (GSM8K-style numeric answers). Null, booleans, lists
    and objects are refused: written as Python text ("None", "[...]") they would be scored as if they were text."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    raise SkipRow(reason, f"{field} holds {_kind(value)}, not a string")


def messages(value, field: str, reason: str) -> list[dict]:
    """A non-empty list of {role, content} chat messages, each role one of ROLES and each content a string."""
    if not isinstance(value, list) or not value:
        raise SkipRow(
            reason, f"{field} holds {_kind(value)}, not a string or a list of {{role, content}} messages"
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise SkipRow(reason, f"{field}[{i}] holds {_kind(m)}, not a {{role, content}} message")
        if m.get("role") not in ROLES:
            raise SkipRow(reason, f"{field}[{i}] has role {m.get('role')!r}, not one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise SkipRow(reason, f"{field}[{i}] content holds {_kind(m.get('content'))}, not a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def prompt(value, field: str) -> list[dict]:
    """A prompt as chat messages: a string is one user turn. It must hold a non-empty user turn."""
    out = (
        [{"role": "user", "content": value}]
        if isinstance(value, str)
        else messages(value, field, "bad_prompt")
    )
    require_user_turn(out, field)
    return out


def require_user_turn(msgs: list[dict], field: str) -> None:
    if not any(m["role"] == "user" and m["content"].strip() for m in msgs):
        raise SkipRow("empty_prompt", f"{field} has no non-empty user turn")


def _kind(value) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"[:80]
