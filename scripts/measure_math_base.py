"""A model's greedy accuracy on the math eval set, per template: how much headroom GRPO has (before training) or
what it gained (on a merged policy, `lora-rl merge`).

    python scripts/measure_math_base.py                                  # SmolLM2-135M-Instruct (built in)
    python scripts/measure_math_base.py --model runs/merged --show 3     # a merged policy; print 3 replies

SmolLM2-135M-Instruct as shipped, max_new_tokens 160: 6 of 64 correct (9%), 39% formatted; 24 minutes on a
2-core CPU busy with other jobs (a batch of 16 prompts x 128 tokens took 12 s with the cores free). Prompts go
through the model's chat template (system message included), completions are greedy (transformers generate,
batched with left padding) and scored with lora_rl.math_rewards: `correct` (accuracy) and `format` (the share
of replies that reason and end with the line "The answer is <number>."). Plain transformers, no lora-rl
training code: the number is comparable with any other tool's greedy evaluation.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_rl import builtin
from lora_rl.math_rewards import correct, format

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a model directory or a built-in name")
    parser.add_argument("--data", type=Path, default=ROOT / "recipes" / "data" / "math-eval.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=160)  # as recipes/smollm2/grpo-math.yaml
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=0, help="only the first N rows (0: all)")
    parser.add_argument("--show", type=int, default=0, help="print the first N replies")
    parser.add_argument("--out", type=Path, help="write each row's reply and scores here (JSONL)")
    args = parser.parse_args()

    path = builtin.materialize(args.model) if args.model in builtin.NAMES else Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    rows = rows[: args.limit] if args.limit else rows

    start = time.perf_counter()
    replies = []
    for first in range(0, len(rows), args.batch_size):
        batch = rows[first : first + args.batch_size]
        texts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in batch]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        replies += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"  {len(replies)}/{len(rows)} rows, {time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start

    right = correct(replies, [r["answer"] for r in rows])
    formatted = format(replies)
    by_template = defaultdict(list)
    for r, c, f in zip(rows, right, formatted, strict=True):
        by_template[r.get("template", "all")].append((c, f == 1.0))
    print(f"\n{path} on {args.data.name}: greedy, max_new_tokens={args.max_new_tokens}, {seconds:.0f} s\n")
    print(f"{'template':<16}{'rows':>6}{'correct':>10}{'format':>9}")
    for name, scores in sorted(by_template.items()):
        n = len(scores)
        print(f"{name:<16}{n:>6}{sum(c for c, _ in scores) / n:>10.0%}{sum(f for _, f in scores) / n:>9.0%}")
    total = len(rows)
    print(f"{'all':<16}{total:>6}{sum(right) / total:>10.0%}{sum(f == 1.0 for f in formatted) / total:>9.0%}")
    for r, reply in list(zip(rows, replies, strict=True))[: args.show]:
        print(f"\n--- {r['prompt'][-1]['content']}  (answer {r['answer']})\n{reply}")
    if args.out:
        with open(args.out, "w") as f:
            for r, reply, c, fm in zip(rows, replies, right, formatted, strict=True):
                f.write(json.dumps({**r, "reply": reply, "correct": c, "format": fm}) + "\n")


if __name__ == "__main__":
    main()
