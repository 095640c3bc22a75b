"""Regenerate the demo data sets under recipes/data/ (deterministic: same files on every machine).

    python scripts/make_demo_data.py

reward-demo.jsonl: preference pairs whose rule a tiny model can learn in a minute on CPU — the chosen
answer carries words of praise (good, great, ...), the rejected one words of complaint (bad, awful, ...),
both padded with the same kind of neutral filler. prompts-demo.jsonl: prompts for the PPO demo.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

POSITIVE = "good great excellent wonderful nice happy glad love fine best better".split()
NEGATIVE = "bad awful terrible poor sad hate worse worst wrong ugly".split()
NEUTRAL = (
    "the a it is was this that day time world cat dog bird tree sun sky sea city road car book song game "
    "home house room door water food one two three red blue green big small old new"
).split()
QUESTIONS = "what how why tell give say".split()
SUBJECTS = "cat dog bird tree sun moon sea city road car book song game house day".split()


def sentence(rng: random.Random, markers: list[str]) -> str:
    words = rng.choices(NEUTRAL, k=rng.randint(4, 9)) + rng.sample(markers, k=rng.randint(1, 3))
    rng.shuffle(words)
    return " ".join(words) + " ."


def prompt(rng: random.Random) -> str:
    return f"{rng.choice(QUESTIONS)} about the {rng.choice(SUBJECTS)} ?"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    rng = random.Random(1234)
    out = Path(__file__).resolve().parent.parent / "recipes" / "data"
    out.mkdir(parents=True, exist_ok=True)
    pairs = [
        {"prompt": prompt(rng), "chosen": sentence(rng, POSITIVE), "rejected": sentence(rng, NEGATIVE)}
        for _ in range(2000)
    ]
    write_jsonl(out / "reward-demo.jsonl", pairs)
    write_jsonl(out / "prompts-demo.jsonl", [{"prompt": prompt(rng)} for _ in range(512)])


if __name__ == "__main__":
    main()
