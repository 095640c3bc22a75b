"""Regenerate recipes/data/grpo-demo.jsonl, the grpo demo's verifiable task (deterministic: same file everywhere).

    python scripts/make_grpo_demo_data.py

Each row asks the model to say a word and names it last: {"prompt": "please say the word cat", "answer": "cat"}.
Generation continues from that last word, so even the built-in tiny random model can learn in a few minutes on
CPU to repeat it; the reward lora_rl.demo_rewards:correct checks the completion's first word against `answer`.
Every word is in the built-in tokenizer's vocabulary (checked below), so nothing becomes <unk>.
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


def main() -> None:
    unknown = {word for template in TEMPLATES for word in template.format("").split()} | set(ANSWERS)
    unknown -= set(VOCAB)
    if unknown:
        raise SystemExit(f"not in the tiny tokenizer's vocabulary: {sorted(unknown)}")
    rng = random.Random(1234)
    rows = []
    for _ in range(ROWS):
        answer = rng.choice(ANSWERS)
        rows.append({"prompt": rng.choice(TEMPLATES).format(answer), "answer": answer})
    path = Path(__file__).resolve().parent.parent / "recipes" / "data" / "grpo-demo.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
