"""Final-answer checking for math replies: find the answer a reply commits to, find the reference's answer, and
compare them exactly.

Reply forms, most explicit first: the last `\\boxed{...}`, the last `#### <ans>` line (GSM8K), the last
`Answer: <ans>` / `answer is <ans>`, else the last number anywhere. References may be bare ("72"), GSM8K
solutions ("... #### 72") or MATH solutions ("... \\boxed{72}").

Numbers compare as exact rationals (fractions.Fraction), so 3/4 == 0.75 == \\frac{3}{4} and 18 == 18.00, while
0.333 != 1/3: no float tolerance to tune (GSM8K-style answers). Everything else - LaTeX and expressions such as
\\frac12, 2\\sqrt{3}, \\{1,2\\}, 3^{2}, \\text{(B)} - goes to math-verify (the checker TRL and verl use), which
compares them symbolically; normalised strings are the last resort. No torch.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction

# Unsigned decimal: thousands groups ("1,000") or plain digits, optional decimals; or ".5".
_UNSIGNED = r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
# Signed number with an optional "/denominator" (a fraction, e.g. after \frac{3}{4} -> 3/4).
_NUMBER = rf"[+-]?{_UNSIGNED}(?:\s*/\s*[+-]?{_UNSIGNED})?"
_NUMBER_RE = re.compile(_NUMBER)
_LEADING_NUMBER = re.compile(rf"^({_NUMBER})\s*%?")
# After a reply's leading number: another digit, an operator or LaTeX make the answer an expression, not a number.
_EXPRESSION_TAIL = re.compile(r"\d|^\s*[-(]|[+*^×÷\\{}]")
# A reference number may be followed only by unit words ("18 dollars", "5 cm") and a final period.
# A space must separate them, so "3x" stays an expression rather than the number 3.
_STRICT_NUMBER = re.compile(rf"^({_NUMBER})\s*%?(?:\s+[A-Za-z][A-Za-z\s.]*)?\.?$")

_GSM8K = re.compile(r"####\s*([^\n]*)")
# "Answer: 7", "Final answer = 7"; "the answer is 7" counts for extraction but not as an explicit format.
_ANSWER_LINE = re.compile(r"\banswer\s*[:=]\s*([^\n]*)", re.IGNORECASE)
_ANSWER_IS = re.compile(r"\banswer\s+is\s*:?\s*([^\n]*)", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")


def _boxed_contents(text: str) -> list[str]:
    """Contents of every balanced \\boxed{...} in order, nested braces included; a truncated one is skipped."""
    out = []
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end() : i - 1])
    return out


def _last_group(pattern: re.Pattern, text: str) -> str | None:
    found = [g.strip() for g in pattern.findall(text)]
    found = [g for g in found if g]
    return found[-1] if found else None


def explicit_answer(text: str) -> str | None:
    """The answer the reply marks as final (boxed, ####, Answer:), or None when it marks none."""
    boxed = [b.strip() for b in _boxed_contents(text) if b.strip()]
    if boxed:
        return boxed[-1]
    return _last_group(_GSM8K, text) or _last_group(_ANSWER_LINE, text)


def extract_reply_answer(text: str) -> str | None:
    """The reply's final answer: an explicit one, else after 'answer is', else the last number in the text."""
    found = explicit_answer(text) or _last_group(_ANSWER_IS, text)
    if found:
        return found
    numbers = _NUMBER_RE.findall(_clean(text))
    return numbers[-1] if numbers else None


def extract_reference_answer(reference: str) -> str:
    """What follows the last '####' (GSM8K), else the last \\boxed{} (MATH), else the whole reference."""
    if "####" in reference:
        return reference.rsplit("####", 1)[1].strip()
    boxed = _boxed_contents(reference)
    return boxed[-1].strip() if boxed else reference.strip()


def _clean(s: str) -> str:
    """LaTeX and markdown dressing off: \\frac{a}{b} -> a/b, \\text{x} -> x, no $ or ** or backticks."""
    s = s.replace("\u2212", "-").replace("{,}", ",").replace("\\!", "").replace("\\,", "")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\%", "%").replace("\\$", "$")
    s = _TEXT.sub(r"\1", s)
    s = _FRAC.sub(_frac_to_slash, s)
    return s.replace("$", "").replace("*", "").replace("`", "").strip()


def _frac_to_slash(m: re.Match) -> str:
    # A bare number or symbol needs no parentheses (\frac{3}{4} -> 3/4, which parses); expressions keep them.
    num, den = (g.strip() for g in m.groups())
    wrap = [g if re.fullmatch(r"[+-]?[\w.,]+", g) else f"({g})" for g in (num, den)]
    return "/".join(wrap)


def _to_fraction(token: str) -> Fraction | None:
    token = token.replace(",", "").replace(" ", "")
    try:
        if "/" in token:
            num, den = token.split("/", 1)
            return Fraction(num) / Fraction(den)
        return Fraction(token)
    except (ValueError, ZeroDivisionError):
        return None


def parse_number(answer: str, strict: bool = False) -> Fraction | None:
    """The answer as an exact rational, or None when it is not a number.

    Lenient (replies): the right-hand side of the last "=" ("5 + 3 = 8" -> 8, "x = 5" -> 5); then the number it
    starts with when only words follow ("72 clips in all"), or its only number when it is a sentence ("The total
    is 42."). An expression is not its leading number: "2\\sqrt{3}", "2^{10}", "3x+1", "12 or 13" and "2.5e3" are
    no number. Strict (references): the whole answer must be a number, optionally followed by unit words
    ("18 dollars") - so "3 - 2i" is not the number 3.
    """
    s = _clean(answer)
    if strict:
        m = _STRICT_NUMBER.match(s)
        return _to_fraction(m.group(1)) if m else None
    s = s.rsplit("=", 1)[-1].strip()
    m = _LEADING_NUMBER.match(s)
    if m:
        rest = s[m.end() :]
        # Words may follow after a space; a digit, an operator or LaTeX after the number make it an expression.
        if not _EXPRESSION_TAIL.search(rest):
            return _to_fraction(m.group(1))
        return None
    numbers = _NUMBER_RE.findall(s)
    if len(numbers) == 1 and not re.search(r"[\\^{}]", s):
        return _to_fraction(numbers[0])
    return None


def normalise_text(answer: str) -> str:
    """Lowercase, no spaces, no \\text{} wrapper, no trailing period: for answers that are not numbers."""
    return re.sub(r"\s+", "", _clean(answer).lower()).rstrip(".")


def answers_match(got: str, want: str) -> bool:
    """Whether a reply's answer `got` equals the reference answer `want` (both already extracted).

    Two numbers compare exactly; when either side is not a plain number, math-verify decides (symbolic
    equality of the parsed LaTeX or expression), and equal normalised strings also match."""
    want_num, got_num = parse_number(want, strict=True), parse_number(got)
    if want_num is not None and got_num is not None:
        return got_num == want_num
    if normalise_text(got) == normalise_text(want) != "":
        return True
    return symbolic_match(got, want)


def symbolic_match(got: str, want: str) -> bool:
    """math-verify's verdict on two extracted answers, each read as inline LaTeX (falling back to a plain
    expression). Its signal-based timeouts work only on the main thread; elsewhere it runs without them."""
    from math_verify import parse, verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"${want}$", parsing_timeout=timeout)
    target = parse(f"${got}$", parsing_timeout=timeout)
    if not gold or not target:
        return False
    return bool(verify(gold, target, timeout_seconds=timeout))


def is_correct(reply: str, reference: str) -> bool:
    """Whether `reply`'s final answer equals the answer in `reference`."""
    got = extract_reply_answer(reply)
    return got is not None and answers_match(got, extract_reference_answer(reference))


def has_final_answer(reply: str) -> bool:
    """Whether the reply marks a final answer explicitly (boxed, ####, Answer:); a stray number is not one."""
    return explicit_answer(reply) is not None
