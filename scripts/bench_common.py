"""Shared by the bench_*.py scripts: the baselines' shapes and tokenizer, and peak-RSS measurement.

The shapes and tokenizer copy ../shared/bench/trl_ppo_baseline.py (that file imports trl, which our
environment does not have), so both sides run the same model on the same tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINES = ROOT.parent / "shared" / "bench"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TRL_PYTHON = str(ROOT / ".venv-bench" / "bin" / "python")

# Runs argv as a script in this process and prints its peak RSS last: one fresh process per measurement.
PEAK_RSS_WRAPPER = """
import json, resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print(json.dumps({"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def shape_config(shape: str):
    from transformers import LlamaConfig, Qwen2Config

    if shape == "tiny":
        return LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=True)  # fmt: skip


def tokenizer(n_words: int = 2000):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(n_words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def save_base(shape: str, directory: Path) -> Path:
    """A random-init causal LM of `shape` with the baselines' tokenizer, saved for from_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    config = shape_config(shape)
    config.pad_token_id, config.eos_token_id = 0, 1
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    return directory


def random_words(n: int, generator) -> str:
    import torch

    return " ".join(f"w{i}" for i in torch.randint(0, 2000, (n,), generator=generator).tolist())


def measured(argv: list[str]) -> tuple[str, float]:
    """Run a script in a fresh process; (its stdout, its peak RSS in GB)."""
    result = subprocess.run([argv[0], "-c", PEAK_RSS_WRAPPER, *argv[1:]], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{result.stderr[-3000:]}")
    *_, last = result.stdout.strip().splitlines()
    return result.stdout, json.loads(last)["peak_rss_gb"]


def run_baseline(python: str, script: str, *args: str) -> tuple[dict, float]:
    """(the baseline's JSON line, its peak RSS in GB)."""
    out, peak = measured([python, str(BASELINES / script), *args])
    return next(json.loads(line) for line in out.splitlines() if line.startswith('{"peer"')), peak


def run_ours(command: str, recipe: Path) -> float:
    """Run `lora-rl COMMAND RECIPE` in a fresh process; its peak RSS in GB."""
    return measured([sys.executable, str(ROOT / "lora_rl" / "__main__.py"), command, str(recipe)])[1]


def report(title: str, unit: str, ours: dict, trl: dict, key: str, goal: str) -> None:
    print(title)
    print(f"{'':10} {unit:>12} {'peak RSS GB':>12}")
    for name, r in (("lora-rl", ours), ("TRL", trl)):
        print(f"{name:10} {r[key]:>12.3f} {r['peak_rss_gb']:>12.2f}")
    speed, memory = ours[key] / trl[key], ours["peak_rss_gb"] / trl["peak_rss_gb"]
    print(f"{'ratio':10} {speed:>11.2f}x {memory:>11.2f}x   (goal: {goal})")
    print(json.dumps({"ours": ours, "trl": trl, "ratio": speed, "memory_ratio": memory}))
