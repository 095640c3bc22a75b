"""Grade-school word problems with integer answers for GRPO on verifiable math (deterministic: the same files
everywhere).

    python scripts/make_math_data.py            # writes recipes/data/math-train.jsonl and math-eval.jsonl
    python scripts/make_math_data.py --out DIR  # the same files, elsewhere
    python scripts/make_math_data.py --gsm8k train.jsonl --out /data   # GSM8K rows -> /data/gsm8k-train.jsonl

--gsm8k converts a GSM8K file you downloaded (openai/gsm8k's jsonl: {"question", "answer": "...#### 72"}) into
rows of the same form, with the same system prompt, for the larger models of recipes/templates/*/grpo-math.yaml.

Each row is {"prompt": [system message, user problem], "answer": "42", "template": "sum"}: the system message asks
for reasoning and then a last line "Answer: <number>" (what lora_rl.math_rewards:format pays for), `answer` is
what lora_rl.math_rewards:correct compares the completion's final answer with, and `template` names the kind of
problem (for accuracy per kind; reward functions may ignore it).

The held-out file measures what training taught, not what it memorised: its problems use number combinations the
training file never shows, and two of its templates (HELD_OUT) appear only there. Numbers are small on purpose:
GRPO needs a base that is sometimes right: SmolLM2-135M-Instruct solves 6 of the 64 eval problems greedily (9%;
0-33% per template) and ends 39% of its replies with the answer line asked for (scripts/measure_math_base.py).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "recipes" / "data"

SYSTEM = "Solve the math problem. Show your calculation step by step, then end with the line 'The answer is <number>.'"

NAMES = [("Anna", "she"), ("Ben", "he"), ("Carla", "she"), ("David", "he"), ("Emma", "she"), ("Felix", "he"),
         ("Grace", "she"), ("Hugo", "he"), ("Ivy", "she"), ("Jack", "he"), ("Lena", "she"), ("Max", "he"),
         ("Nora", "she"), ("Oscar", "he"), ("Paula", "she"), ("Sam", "he")]  # fmt: skip
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells", "cards", "balloons"]
GOODS = [("notebook", "notebooks"), ("pen", "pens"), ("ticket", "tickets"), ("sandwich", "sandwiches"),
         ("toy car", "toy cars"), ("cup of tea", "cups of tea"), ("ball", "balls"), ("plant", "plants")]  # fmt: skip
VEHICLES = ["train", "bus", "car", "boat", "cyclist", "truck"]

# A template: rng -> (problem text, integer answer, the numbers in it). The numbers identify a problem across
# files: eval problems never reuse a training problem's template and numbers (its wording may differ too).
Problem = tuple[str, int, tuple[int, ...]]


def _person(rng: random.Random) -> tuple[str, str]:
    return rng.choice(NAMES)


def sum_(rng: random.Random) -> Problem:
    (name, pron), item = _person(rng), rng.choice(ITEMS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    text = f"{name} has {a} {item}. {pron.capitalize()} gets {b} more {item}. How many {item} does {name} have now?"
    return text, a + b, (a, b)


def difference(rng: random.Random) -> Problem:
    (name, _), item = _person(rng), rng.choice(ITEMS)
    a = rng.randint(6, 30)
    b = rng.randint(2, a - 2)
    text = f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} does {name} have left?"
    return text, a - b, (a, b)


def unit_price(rng: random.Random) -> Problem:
    one, many = rng.choice(GOODS)
    p, n = rng.randint(2, 10), rng.randint(2, 8)
    return f"One {one} costs {p} dollars. How many dollars do {n} {many} cost?", p * n, (p, n)


def speed(rng: random.Random) -> Problem:
    vehicle = rng.choice(VEHICLES)
    s, h = rng.randint(2, 12) * 5, rng.randint(2, 7)
    return f"A {vehicle} travels {s} miles every hour. How many miles does it travel in {h} hours?", s * h, (s, h)


def share(rng: random.Random) -> Problem:
    (name, _), item = _person(rng), rng.choice(ITEMS)
    k, q = rng.randint(2, 8), rng.randint(2, 10)
    text = f"{name} shares {k * q} {item} equally among {k} friends. How many {item} does each friend get?"
    return text, q, (k, q)


def three_days(rng: random.Random) -> Problem:
    (name, pron) = _person(rng)
    a, b, c = rng.randint(2, 15), rng.randint(2, 15), rng.randint(2, 15)
    text = (f"{name} read {a} pages on Monday, {b} pages on Tuesday and {c} pages on Wednesday. "
            f"How many pages did {pron} read in total?")  # fmt: skip
    return text, a + b + c, (a, b, c)


def packs(rng: random.Random) -> Problem:
    (name, pron), item = _person(rng), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 15), rng.randint(2, 5), rng.randint(2, 6)
    text = (f"{name} has {a} {item}. {pron.capitalize()} buys {b} packs with {c} {item} in each pack. "
            f"How many {item} does {name} have now?")  # fmt: skip
    return text, a + b * c, (a, b, c)


def change(rng: random.Random) -> Problem:
    (name, pron), (_, many) = _person(rng), rng.choice(GOODS)
    bill = rng.choice([10, 20, 50])
    while True:
        n, p = rng.randint(2, 5), rng.randint(2, 9)
        if n * p < bill:
            break
    text = (f"{name} buys {n} {many} that cost {p} dollars each and pays with a {bill} dollar bill. "
            f"How many dollars of change does {pron} get?")  # fmt: skip
    return text, bill - n * p, (n, p, bill)


# held out: only in the eval file, multi-step like packs and change but worded and composed differently
def bus(rng: random.Random) -> Problem:
    a = rng.randint(10, 30)
    b, c = rng.randint(2, 9), rng.randint(2, 9)
    text = (f"A bus has {a} passengers. At the first stop, {b} people get off and {c} people get on. "
            "How many passengers are on the bus now?")  # fmt: skip
    return text, a - b + c, (a, b, c)


def times_as_many(rng: random.Random) -> Problem:
    (name, _), (other, _), item = _person(rng), _person(rng), rng.choice(ITEMS)
    while other == name:
        other = _person(rng)[0]
    a, k = rng.randint(2, 12), rng.randint(2, 3)
    text = (f"{name} has {a} {item}. {other} has {k} times as many {item} as {name}. "
            f"How many {item} do they have together?")  # fmt: skip
    return text, a + k * a, (a, k)


TEMPLATES: dict[str, Callable[[random.Random], Problem]] = {
    "sum": sum_, "difference": difference, "unit_price": unit_price, "speed": speed, "share": share,
    "three_days": three_days, "packs": packs, "change": change,
}  # fmt: skip
HELD_OUT: dict[str, Callable[[random.Random], Problem]] = {"bus": bus, "times_as_many": times_as_many}

TRAIN_PER_TEMPLATE = 48  # 384 training problems
EVAL_PER_TEMPLATE = 6  # 8 templates x 6 + 2 held-out templates x 8 = 64 eval problems
EVAL_PER_HELD_OUT = 8


def row(name: str, text: str, answer: int | str) -> dict:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
    return {"prompt": messages, "answer": str(answer), "template": name}


def draw(rng: random.Random, name: str, template: Callable, count: int, taken: set) -> list[dict]:
    """`count` problems of one template whose (template, numbers) is not in `taken` (updated)."""
    rows = []
    for _ in range(count * 200):
        text, answer, numbers = template(rng)
        if (name, numbers) not in taken:
            taken.add((name, numbers))
            rows.append(row(name, text, answer))
            if len(rows) == count:
                return rows
    raise RuntimeError(f"{name}: could not draw {count} distinct problems")


def make() -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows): the same on every run and machine."""
    rng = random.Random(19)
    taken: set = set()
    train = [r for name, t in TEMPLATES.items() for r in draw(rng, name, t, TRAIN_PER_TEMPLATE, taken)]
    evaluation = [r for name, t in TEMPLATES.items() for r in draw(rng, name, t, EVAL_PER_TEMPLATE, taken)]
    evaluation += [r for name, t in HELD_OUT.items() for r in draw(rng, name, t, EVAL_PER_HELD_OUT, taken)]
    rng.shuffle(train)
    rng.shuffle(evaluation)
    return train, evaluation


def write(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {path}: {len(rows)} rows")


def gsm8k_rows(path: Path) -> list[dict]:
    """GSM8K's {"question", "answer": "reasoning #### 1,234"} lines -> rows with the answer "1234"."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            item = json.loads(line)
            final = item["answer"].rsplit("####", 1)
            if len(final) != 2:
                raise SystemExit(f"{path}: line {number}: the answer has no '#### <number>' line")
            rows.append(row("gsm8k", item["question"], final[1].strip().replace(",", "")))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA, help="folder to write into (default: recipes/data)")
    parser.add_argument("--gsm8k", type=Path, help="convert this GSM8K jsonl file to gsm8k-NAME.jsonl instead")
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.gsm8k:
        write(out / f"gsm8k-{args.gsm8k.stem}.jsonl", gsm8k_rows(args.gsm8k))
        return
    train, evaluation = make()
    write(out / "math-train.jsonl", train)
    write(out / "math-eval.jsonl", evaluation)


if __name__ == "__main__":
    main()
