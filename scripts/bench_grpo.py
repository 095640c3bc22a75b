"""Benchmark `lora-rl grpo` against TRL 1.16's GRPOTrainer on the same shape, in one invocation.

    python scripts/bench_grpo.py tiny 8 4 32 6
    python scripts/bench_grpo.py qwen0.5b 2 4 16 3 --trl-python .venv-bench16/bin/python

Same work as ../shared/bench/trl_grpo_baseline.py: a random-init policy of SHAPE with LoRA r=16 on the seven
projections, PROMPTS prompts of 64 tokens per step, GENERATIONS completions each of COMPLETION_LEN new tokens,
one optimizer step per generation batch, beta 0 (no reference forward), dapo loss, the same "even words"
reward, gradient checkpointing and dropout off. We report the median seconds per step after the first, and
each process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import yaml
from bench_common import ROOT, TARGETS, random_words, report, run_baseline, run_ours, save_base

DEFAULT_TRL16_PYTHON = str(ROOT / ".venv-bench16" / "bin" / "python")


def prepare(shape: str, prompts: int, generations: int, completion_len: int, steps: int, work: Path) -> Path:
    import torch

    base = save_base(shape, work / "base")
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": random_words(64, g)} for _ in range(prompts * (steps + 1))]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "seed": 0, "output_dir": str(work / "run"),
        "actor": {"model": {"path": str(base), "lora_rank": 16, "lora_alpha": 32, "target_modules": TARGETS}},
        "data": {"train_path": str(work / "prompts.jsonl"), "max_length": 64},
        "generation": {"max_new_tokens": completion_len},
        "reward": {"function": "bench_rewards:even_words"},
        "grpo": {"num_steps": steps, "prompts_per_step": prompts, "num_generations": generations, "beta": 0.0,
                 "loss_type": "dapo"},
        "train": {"batch_size": prompts * generations, "learning_rate": 1e-5, "gradient_checkpointing": False},
    }  # fmt: skip
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return work / "recipe.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=["tiny", "qwen0.5b"])
    parser.add_argument("prompts", type=int, help="prompts per step")
    parser.add_argument("generations", type=int, help="completions per prompt")
    parser.add_argument("completion_len", type=int)
    parser.add_argument("steps", type=int)
    parser.add_argument("--trl-python", default=DEFAULT_TRL16_PYTHON, help="a Python with trl==1.16 installed")
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        recipe = prepare(args.shape, args.prompts, args.generations, args.completion_len, args.steps, Path(tmp))
        peak = run_ours("grpo", recipe)
        lines = [json.loads(line) for line in (recipe.parent / "run" / "metrics.jsonl").read_text().splitlines()]
    seconds = [m["time_generate"] + m["time_score"] + m["time_train"] for m in lines]
    ours = {"s_per_step": statistics.median(seconds[1:] or seconds), "peak_rss_gb": peak,
            "split": {k: round(statistics.median(m[k] for m in lines[1:] or lines), 3)
                      for k in ("time_generate", "time_score", "time_train")}}  # fmt: skip
    line, trl_peak = run_baseline(args.trl_python, "trl_grpo_baseline.py", args.shape, str(args.prompts),
                                  str(args.generations), str(args.completion_len), str(args.steps))  # fmt: skip
    trl = {"s_per_step": line["s_per_step_median"], "peak_rss_gb": trl_peak}
    title = (
        f"grpo, shape {args.shape}, {args.prompts} prompts x 64 tokens x {args.generations} completions of "
        f"{args.completion_len} tokens, {args.steps} steps (median after the first); ours split: {ours['split']}"
    )
    report(title, "s/step", ours, trl, "s_per_step", "<= 0.5x time per step at <= 1.0x memory")


if __name__ == "__main__":
    main()
