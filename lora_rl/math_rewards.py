"""Rewards for verifiable math (word problems with a numeric answer, as in GSM8K), in TRL's GRPOTrainer form:
`correct(completions, answer, **kwargs)` and `format(completions, **kwargs)`, for recipes/smollm2/grpo-math.yaml
(data from scripts/make_math_data.py) or any prompt file with an `answer` column.

- correct: exactly 1.0 when the completion's final answer equals the row's `answer` as a number, else exactly 0.0
  (the mean of correct is the accuracy; a sample counts as solved, e.g. for pass@k, when correct returns 1.0).
  The final answer is the last number inside the last `\\boxed{...}`; else the last number on the line after the
  last `####`; else on the line after the last "answer:" / "answer is" ("The answer is 20 * 2 = 40." -> 40); else
  the last number in the text. "1,000", "$12", "12.0", "12." and "-3" read as numbers: "1,000" equals "1000",
  "12.0" equals "12", "12.5" does not.
- format: 1.0 for reasoning followed by a last line "The answer is <number>." (what the system prompt of
  scripts/make_math_data.py asks for; "Answer: <number>" counts too), 0.5 for such a line that is not the last
  or has no reasoning before it, else 0.0. The line holds the number only: "The answer is 12 apples." is not one.

Both return 0.0 for what they cannot read (empty, None, odd types) and never raise. Completions are texts, or,
for chat prompts, a list holding one assistant message ({"role", "content"}), as lora-rl and TRL pass them.

Numbers are compared exactly (Decimal), not symbolically, and HuggingFace's math-verify is not used: the answers
here are integers, math-verify does not know GSM8K's `####` line ("#### 42\\nThat took 3 steps." reads as 3), and
its parse() raises in threads unless its timeout is turned off. For LaTeX answers (fractions, radicals, sets)
call math-verify in your own reward function.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

# a number as written in a reply: optional sign and dollar sign, thousands separators, decimals ("1,000.50")
_NUMBER = re.compile(r"(?<![\w.])-?(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])")
_BOXED = re.compile(r"\\boxed\s*\{")
_HASHES = re.compile(r"####")
_ANSWER = re.compile(r"\banswer(?:\*\*)?\s*(?:is\s*:?|:|=)", re.IGNORECASE)
# the answer line format pays for: "The answer is 42." (or "Answer: 42") and nothing else on the line
_ANSWER_LINE = re.compile(
    r"^\s*(?:\*\*)?(?:the\s+)?(?:final\s+)?answer(?:\*\*)?\s*(?:is\s*:?|:)(?:\*\*)?\s*"
    r"(?:\$\s?)?-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\s*\.?\s*$",
    re.IGNORECASE,
)


def correct(completions: list, answer: list, **kwargs: Any) -> list[float]:
    """1.0 when the final answer of the completion equals the row's `answer` (numerically), else 0.0."""
    return [1.0 if is_correct(c, expected) else 0.0 for c, expected in zip(completions, answer, strict=True)]


def format(completions: list, **kwargs: Any) -> list[float]:  # the metric is reward/format
    """1.0 for reasoning, then a last line "The answer is <number>."; 0.5 for such a line elsewhere or alone."""
    return [_format_score(completion_text(completion)) for completion in completions]


def is_correct(completion: Any, expected: Any) -> bool:
    """The completion's final answer equals `expected` (a number or a string like "1,000"); False when either
    cannot be read."""
    got = to_number(final_answer(completion_text(completion)))
    want = to_number(expected if isinstance(expected, str) else str(expected) if expected is not None else None)
    return got is not None and want is not None and got == want


def completion_text(completion: Any) -> str:
    """The text of a completion: itself, or the content of the last message of a chat completion; "" otherwise."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, list | tuple) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
            return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def final_answer(text: str) -> str | None:
    """The number a reply gives as its answer, as written ("1,000"), or None. See the module's docstring."""
    if not isinstance(text, str) or not text:
        return None
    boxed = [m.end() for m in _BOXED.finditer(text)]
    if boxed:
        return _last_number(_braced(text, boxed[-1]))
    for marker in (_HASHES, _ANSWER):
        found = [m.end() for m in marker.finditer(text)]
        if found:
            number = _last_number(text[found[-1] :].split("\n", 1)[0])
            if number is not None:
                return number
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def to_number(written: str | None) -> Decimal | None:
    """ "1,000" -> 1000, "$12" -> 12, "12.0" -> 12.0 (equal to 12), "-3" -> -3; None when it is not a number."""
    if not written:
        return None
    cleaned = written.replace(",", "").replace("$", "").replace(" ", "").strip().rstrip(".")
    try:
        number = Decimal(cleaned)
    except (InvalidOperation, ValueError):
        return None
    return number if number.is_finite() else None


def _braced(text: str, start: int) -> str:
    """The text from `start` to the brace that closes the one just before it (or to the end)."""
    depth = 1
    for index in range(start, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[start:index]
    return text[start:]


def _last_number(span: str) -> str | None:
    span = span.replace("{,}", ",").replace("\\,", ",").replace("\\$", "$")  # LaTeX "1{,}000", "\\$12"
    numbers = _NUMBER.findall(span)
    return numbers[-1] if numbers else None


def _format_score(text: str) -> float:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    answer_lines = [i for i, line in enumerate(lines) if _ANSWER_LINE.match(line)]
    if not answer_lines:
        return 0.0
    last = answer_lines[-1] == len(lines) - 1
    reasoning = answer_lines[-1] > 0 and len(" ".join(lines[: answer_lines[-1]]).split()) >= 3
    return 1.0 if last and reasoning else 0.5
