"""Benchmark `lora-rl train-reward` against TRL's RewardTrainer on the same shape, in one invocation.

    python scripts/bench_reward.py tiny 16 128 10
    python scripts/bench_reward.py qwen0.5b 4 128 4 --trl-python .venv-bench/bin/python

Same work as ../shared/bench/trl_reward_baseline.py: a random-init model of SHAPE, LoRA r=16 on the
seven projections, the score head trained whole, gradient checkpointing, BATCH pairs of SEQ_LEN tokens
per step. Each side runs in a fresh process; we report the median pairs/s over the steps after the first
and the process's peak RSS. The TRL side needs trl==1.12.* in its own virtual environment (--trl-python).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import yaml
from bench_common import DEFAULT_TRL_PYTHON, TARGETS, random_words, report, run_baseline, run_ours, save_base


def prepare(shape: str, batch: int, seq: int, steps: int, work: Path, every: int = 1) -> Path:
    """Base model directory, data and recipe for our side (outside the measured process)."""
    import torch

    save_base(shape, work / "base")
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": random_words(seq // 2, g) + " ", "chosen": random_words(seq // 2, g),
             "rejected": random_words(seq // 2, g)} for _ in range(batch * (steps + 1))]  # fmt: skip
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "seed": 0, "output_dir": str(work / "run"),
        "actor": {"model": {"path": str(work / "base"), "lora_rank": 16, "lora_alpha": 32, "target_modules": TARGETS}},
        "data": {"train_path": str(work / "pairs.jsonl"), "max_length": seq + 8},
        "train": {"batch_size": batch, "max_steps": steps, "learning_rate": 1e-4, "gradient_checkpointing": True,
                  "checkpoint_every_n_layers": every},
    }  # fmt: skip
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return work / "recipe.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=["tiny", "qwen0.5b"])
    parser.add_argument("batch", type=int)
    parser.add_argument("seq_len", type=int)
    parser.add_argument("steps", type=int)
    parser.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON)
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        metavar="N",
        help="ours: recompute only every N-th layer (train.checkpoint_every_n_layers)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = prepare(args.shape, args.batch, args.seq_len, args.steps, Path(tmp), args.checkpoint_every)
        peak = run_ours("train-reward", recipe)
        lines = [json.loads(line) for line in (recipe.parent / "run" / "metrics.jsonl").read_text().splitlines()]
    ours = {"pairs_per_s": statistics.median([m["pairs_per_s"] for m in lines][1:]), "peak_rss_gb": peak}
    line, trl_peak = run_baseline(args.trl_python, "trl_reward_baseline.py", args.shape, str(args.batch),
                                  str(args.seq_len), str(args.steps))  # fmt: skip
    trl = {"pairs_per_s": line["pairs_per_s"], "peak_rss_gb": trl_peak}
    title = (f"train-reward, shape {args.shape}, {args.batch} pairs x {args.seq_len} tokens, {args.steps} steps, "
             f"ours recomputing every {args.checkpoint_every} layer(s)")  # fmt: skip
    report(title, "pairs/s", ours, trl, "pairs_per_s", ">= 1.5x pairs/s at <= 1.0x memory")


if __name__ == "__main__":
    main()
