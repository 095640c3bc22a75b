"""actor.model.load_in_4bit (QLoRA) where no GPU is: refused with one line before anything loads, every command."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lora_rl.cli import app
from lora_rl.models.build import four_bit_options, four_bit_problems
from lora_rl.recipe import ModelConfig, load_recipe

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
NO_GPU = "actor.model.load_in_4bit: 4-bit (bitsandbytes NF4) needs a CUDA GPU, this machine has none"
RUNS = {
    "ppo": ["ppo", str(ROOT / "recipes/ppo-demo.yaml")],
    "grpo": ["grpo", str(ROOT / "recipes/grpo-demo.yaml")],
    "train-reward": ["train-reward", str(ROOT / "recipes/reward-demo.yaml")],
    "validate": ["validate", str(ROOT / "recipes/ppo-demo.yaml"), "--for", "ppo"],
}


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch):
    """A machine without CUDA, also when the suite runs on a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("command", RUNS)
def test_4bit_is_refused_without_a_gpu_before_anything_loads(command, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, [*RUNS[command], "actor.model.load_in_4bit=true", f"output_dir={out}"])
    assert result.exit_code == 2, result.output
    assert f"error: {NO_GPU}" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_every_4bit_problem_comes_at_once_with_the_others(tmp_path):
    result = runner.invoke(app, [*RUNS["grpo"], "actor.model.load_in_4bit=true", "actor.model.is_lora=false",
                                 "generation.engine=vllm", f"output_dir={tmp_path}"])  # fmt: skip
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert lines == [
        "error: generation.engine: got 'vllm'; vLLM needs a CUDA GPU, this machine has none: use hf",
        "error: actor.model.load_in_4bit: 4-bit weights cannot be trained themselves; set is_lora: true (QLoRA "
        "trains LoRA adapters on the 4-bit base)",
        f"error: {NO_GPU}",
    ]


def test_with_cuda_4bit_needs_bitsandbytes(monkeypatch):
    """The check's other branches, on a machine that reports CUDA (nothing is loaded here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else found(name))
    assert four_bit_problems(ModelConfig(load_in_4bit=True)) == [
        'actor.model.load_in_4bit: 4-bit needs bitsandbytes, which is not installed: pip install "lora-rl[qlora]"'
    ]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert four_bit_problems(ModelConfig(load_in_4bit=True)) == []
    assert four_bit_problems(ModelConfig()) == []


def test_the_4bit_base_is_qlora_nf4():
    """What from_pretrained gets (the load itself needs a GPU): NF4, double quantisation, bf16 compute, placed on
    this process's device."""
    options = four_bit_options()
    config = options["quantization_config"]
    assert (config.load_in_4bit, config.load_in_8bit) == (True, False)
    assert (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == ("nf4", True)
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert options["device_map"] == {"": 0}


def test_load_in_4bit_is_false_by_default_and_saved_with_the_recipe(tmp_path):
    assert load_recipe(ROOT / "recipes/ppo-demo.yaml").actor.model.load_in_4bit is False
    recipe = load_recipe(ROOT / "recipes/ppo-demo.yaml", ["actor.model.load_in_4bit=true"])
    recipe.save(tmp_path / "recipe.yaml")
    assert "load_in_4bit: true" in (tmp_path / "recipe.yaml").read_text()
