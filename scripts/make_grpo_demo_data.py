"""Regenerate recipes/data/grpo-demo.jsonl, the grpo demo's verifiable task, and grpo-digits.jsonl, a second small
task for the stability tests (deterministic: same files everywhere).

    python scripts/make_grpo_demo_data.py

Each row asks the model to say a word and names it last: {"prompt": "please say the word cat", "answer": "cat"}.
Generation continues from that last word, so even the built-in tiny random model can learn in a few minutes on
CPU to repeat it; the reward lora_rl.demo_rewards:correct checks the completion's first word against `answer`.
Every word is in the built-in tokenizer's vocabulary (checked below), so nothing becomes <unk>.
grpo-digits.jsonl asks for a digit instead ({"prompt": "the answer is 3", "answer": "3"}): other tokens, other
prompts, the same reward; a default that learns one task and collapses on the other is caught by
tests/test_stability.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lora_rl.models.tiny import VOCAB

ANSWERS = "cat dog red blue".split()  # few: a random model samples them often enough to find the reward
TEMPLATES = ("say {}", "say the word {}", "please say {}", "please say the word {}", "can you say {}",
             "tell me the word {}", "the word is {}", "answer with the word {}")  # fmt: skip
ROWS = 320
DIGITS = "1 2 3 4".split()
DIGIT_TEMPLATES = ("say {}", "the answer is {}", "please say {}", "tell me {}", "answer with {}", "say the answer {}")


def rows(answers: list[str], templates: tuple[str, ...], seed: int) -> list[dict]:
    unknown = {word for template in templates for word in template.format("").split()} | set(answers)
    unknown -= set(VOCAB)
    if unknown:
        raise SystemExit(f"not in the tiny tokenizer's vocabulary: {sorted(unknown)}")
    rng = random.Random(seed)
    chosen = []
    for _ in range(ROWS):
        answer = rng.choice(answers)
        chosen.append({"prompt": rng.choice(templates).format(answer), "answer": answer})
    return chosen


def main() -> None:
    data = Path(__file__).resolve().parent.parent / "recipes" / "data"
    for name, answers, templates, seed in (("grpo-demo", ANSWERS, TEMPLATES, 1234),
                                           ("grpo-digits", DIGITS, DIGIT_TEMPLATES, 5678)):  # fmt: skip
        (data / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows(answers, templates, seed)))


if __name__ == "__main__":
    main()
