"""Built-in correctness verifiers: ``fn(solution, answer) -> bool``.

They see only the solution (the text after the end-of-thinking marker), never the thinking. Model
output is parsed, never evaluated: math goes through math-verify's LaTeX/expression parser and sympy.
"""

from __future__ import annotations

import re
import threading

from orchestrator.rewards.registry import register_verifier

# math-verify's own timeouts use signal.alarm, which only works on the main thread; worker processes
# are main-thread, and the pool's per-sample timeout is the real guard anyway.
MATH_VERIFY_TIMEOUT_S = 3

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"\\[{}]|[{}]")  # escaped \{ \} are set delimiters, not groups
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (balanced braces), or None."""
    opens = {m.end() - 1 for m in _BOXED.finditer(text)}
    if not opens:
        return None
    stack: list[int] = []
    last = None
    for m in _BRACE.finditer(text):  # one pass over braces only: linear even for unbalanced spam
        if len(m.group()) == 2:
            continue
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            start = stack.pop()
            if start in opens and (last is None or start > last[0]):
                last = (start, m.start())
    return None if last is None else text[last[0] + 1 : last[1]]


def answer_tag_content(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>``, or None."""
    found = _ANSWER_TAG.findall(text)
    return found[-1] if found else None


@register_verifier("exact_match")
def exact_match(solution: str, answer: str) -> bool:
    return solution.strip() == answer.strip()


@register_verifier("answer_tag_match")
def answer_tag_match(solution: str, answer: str) -> bool:
    """Exact match on the last <answer>...</answer> (tag-format tasks); no tag means wrong."""
    content = answer_tag_content(solution)
    return content is not None and content.strip() == answer.strip()


def _math_timeout() -> int | None:
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _parse_gold(answer: str):
    from math_verify import parse

    t = _math_timeout()
    text = answer.strip()
    # A bare reference ("\frac{1}{2}", "x^2+1") is not found by math-verify's extractors; boxing it is.
    wrapped = text if ("\\boxed" in text or "$" in text) else "\\boxed{" + text + "}"
    return parse(wrapped, parsing_timeout=t) or parse(text, parsing_timeout=t)


def _parse_pred(solution: str):
    from math_verify import parse

    t = _math_timeout()
    boxed = last_boxed(solution)
    # Only the LAST box counts: math-verify would merge several boxes into a set.
    return parse("\\boxed{" + boxed + "}" if boxed is not None else solution, parsing_timeout=t)


@register_verifier("math")
def math_verify(solution: str, answer: str) -> bool:
    """Symbolic/numeric equivalence of the last \\boxed{} (else the final expression) and the reference."""
    from math_verify import verify

    gold = _parse_gold(answer)
    if not gold:
        return False
    pred = _parse_pred(solution)
    if not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=_math_timeout()))


def _warm_math() -> None:
    math_verify("\\boxed{\\frac{1}{2}}", "0.5")


# Workers call ``fn.warmup()`` once before their first item, so imports and parser construction are not
# charged to a sample's timeout.
math_verify.warmup = _warm_math
