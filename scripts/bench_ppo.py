"""Benchmark `lora-rl ppo` against TRL 1.12's PPOTrainer on the same shape, in one invocation.

    python scripts/bench_ppo.py tiny 16 32 6
    python scripts/bench_ppo.py qwen0.5b 4 16 3 --trl-python .venv-bench/bin/python

Same work as ../shared/bench/trl_ppo_baseline.py: a random-init policy of SHAPE with LoRA r=16 on the
seven projections, BATCH prompts of 64 tokens, RESPONSE_LEN sampled tokens, one PPO epoch in micro-batches
of BATCH/4 with 4 accumulation steps. TRL keeps separate value and reward models; ours is the shared critic
and a reward adapter on the same base (the design being measured). We report the median seconds per update
after the first, and each process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import yaml
from bench_common import DEFAULT_TRL_PYTHON, TARGETS, random_words, report, run_baseline, run_ours, save_base


def save_reward_adapter(base: Path, directory: Path) -> None:
    """A (random) SEQ_CLS LoRA adapter with its score head, as train-reward makes one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=0)
    config = LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32, target_modules=TARGETS, modules_to_save=["score"])
    get_peft_model(model, config).save_pretrained(directory)


def prepare(shape: str, batch: int, response_len: int, updates: int, work: Path) -> Path:
    import torch

    base = save_base(shape, work / "base")
    save_reward_adapter(base, work / "reward")
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": random_words(64, g)} for _ in range(batch * (updates + 1))]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "seed": 0, "output_dir": str(work / "run"),
        "actor": {"model": {"path": str(base), "lora_rank": 16, "lora_alpha": 32, "target_modules": TARGETS}},
        "data": {"train_path": str(work / "prompts.jsonl"), "max_length": 64},
        "generation": {"max_new_tokens": response_len},
        "reward": {"adapter": str(work / "reward")},
        "ppo": {"num_updates": updates, "rollout_batch_size": batch, "ppo_epochs": 1},
        "train": {"batch_size": batch // 4, "gradient_accumulation_steps": 4, "learning_rate": 1e-5,
                  "gradient_checkpointing": False},
    }  # fmt: skip
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return work / "recipe.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=["tiny", "qwen0.5b"])
    parser.add_argument("batch", type=int, help="prompts per update; a multiple of 4")
    parser.add_argument("response_len", type=int)
    parser.add_argument("updates", type=int)
    parser.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = prepare(args.shape, args.batch, args.response_len, args.updates, Path(tmp))
        peak = run_ours("ppo", recipe)
        lines = [json.loads(line) for line in (recipe.parent / "run" / "metrics.jsonl").read_text().splitlines()]
    seconds = [m["time_generate"] + m["time_score"] + m["time_train"] for m in lines]
    ours = {"s_per_update": statistics.median(seconds[1:] or seconds), "peak_rss_gb": peak,
            "split": {k: statistics.median(m[k] for m in lines[1:] or lines)
                      for k in ("time_generate", "time_score", "time_train")}}  # fmt: skip
    line, trl_peak = run_baseline(args.trl_python, "trl_ppo_baseline.py", args.shape, str(args.batch),
                                  str(args.response_len), str(args.updates), "lora")  # fmt: skip
    trl = {"s_per_update": line["s_per_update_median"], "peak_rss_gb": trl_peak}
    title = (f"ppo, shape {args.shape}, {args.batch} prompts x 64 tokens, {args.response_len} new tokens, "
             f"{args.updates} updates (median after the first); ours split: {ours['split']}")  # fmt: skip
    report(title, "s/update", ours, trl, "s_per_update", "<= 0.5x time per update at <= 0.5x memory")


if __name__ == "__main__":
    main()
