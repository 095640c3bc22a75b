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
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT.parent / "shared" / "bench" / "trl_reward_baseline.py"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Runs `argv` as a script in this process and prints its peak RSS last: one fresh process per measurement.
PEAK_RSS_WRAPPER = """
import json, resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print(json.dumps({"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def shape_config(shape: str):
    """The baseline's SHAPES (copied: that file imports trl, which our environment does not have)."""
    from transformers import LlamaConfig, Qwen2Config

    if shape == "tiny":
        return LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=True)  # fmt: skip


def prepare(shape: str, batch: int, seq: int, steps: int, work: Path) -> Path:
    """Base model directory, data and recipe for our side (outside the measured process)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(2000)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    config = shape_config(shape)
    config.pad_token_id = 0
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    g = torch.Generator().manual_seed(0)

    def words(n: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(0, 2000, (n,), generator=g).tolist())

    rows = [{"prompt": words(seq // 2) + " ", "chosen": words(seq // 2), "rejected": words(seq // 2)}
            for _ in range(batch * (steps + 1))]  # fmt: skip
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "seed": 0, "output_dir": str(work / "run"),
        "actor": {"model": {"path": str(work / "base"), "lora_rank": 16, "lora_alpha": 32, "target_modules": TARGETS}},
        "data": {"train_path": str(work / "pairs.jsonl"), "max_length": seq + 8},
        "train": {"batch_size": batch, "max_steps": steps, "learning_rate": 1e-4, "gradient_checkpointing": True},
    }  # fmt: skip
    import yaml

    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return work / "recipe.yaml"


def measured(argv: list[str]) -> tuple[str, float]:
    """Run a script in a fresh process; (its stdout, its peak RSS in GB)."""
    result = subprocess.run([argv[0], "-c", PEAK_RSS_WRAPPER, *argv[1:]], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{result.stderr[-3000:]}")
    *_, last = result.stdout.strip().splitlines()
    return result.stdout, json.loads(last)["peak_rss_gb"]


def run_ours(recipe: Path) -> dict:
    cli = ROOT / "lora_rl" / "__main__.py"
    _, peak = measured([sys.executable, str(cli), "train-reward", str(recipe)])
    lines = [json.loads(line) for line in (recipe.parent / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [m["pairs_per_s"] for m in lines if m["split"] == "train"][1:]
    return {"pairs_per_s": statistics.median(rates), "peak_rss_gb": peak}


def run_trl(python: str, shape: str, batch: int, seq: int, steps: int) -> dict:
    out, peak = measured([python, str(BASELINE), shape, str(batch), str(seq), str(steps)])
    line = next(json.loads(s) for s in out.splitlines() if s.startswith('{"peer"'))
    return {"pairs_per_s": line["pairs_per_s"], "peak_rss_gb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=["tiny", "qwen0.5b"])
    parser.add_argument("batch", type=int)
    parser.add_argument("seq_len", type=int)
    parser.add_argument("steps", type=int)
    parser.add_argument("--trl-python", default=str(ROOT / ".venv-bench" / "bin" / "python"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = prepare(args.shape, args.batch, args.seq_len, args.steps, Path(tmp))
        ours = run_ours(recipe)
    trl = run_trl(args.trl_python, args.shape, args.batch, args.seq_len, args.steps)
    print(
        f"shape {args.shape}, {args.batch} pairs x {args.seq_len} tokens, {args.steps} steps (median after the first)"
    )
    print(f"{'':10} {'pairs/s':>10} {'peak RSS GB':>12}")
    for name, r in (("lora-rl", ours), ("TRL", trl)):
        print(f"{name:10} {r['pairs_per_s']:>10.1f} {r['peak_rss_gb']:>12.2f}")
    speed, memory = ours["pairs_per_s"] / trl["pairs_per_s"], ours["peak_rss_gb"] / trl["peak_rss_gb"]
    print(f"{'ratio':10} {speed:>9.2f}x {memory:>11.2f}x   (goal: >= 1.5x pairs/s at <= 1.0x memory)")
    print(json.dumps({"shape": args.shape, "ours": ours, "trl": trl, "speed_ratio": speed, "memory_ratio": memory}))


if __name__ == "__main__":
    main()
