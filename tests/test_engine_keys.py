"""generation.engine and the keys only the vLLM engine reads: vllm refused with one line on every machine (the engine
is not built yet), the vllm-only keys refused with hf, their ranges checked, and vllm never imported."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lora_rl.cli import app
from lora_rl.recipe import GenerationConfig, RecipeError, load_recipe
from lora_rl.rl.setup import VLLM_ONLY, engine_problems

ROOT = Path(__file__).resolve().parent.parent
NOT_BUILT = "the vLLM engine is not built yet in this version (README, On a GPU): use hf"


def test_the_defaults_are_trl_s():
    """hf sampling; TRL GRPOConfig's vllm_gpu_memory_utilization 0.3, vllm_importance_sampling_mode sequence_mask
    and vllm_importance_sampling_clip_max 3.0; the sync check stops the run."""
    generation = load_recipe(ROOT / "recipes/grpo-demo.yaml").generation
    assert (generation.engine, generation.vllm_gpu_memory_utilization) == ("hf", 0.3)
    assert (generation.importance_correction, generation.importance_cap, generation.sync_check) == (
        "sequence_mask", 3.0, "error")  # fmt: skip


def test_vllm_is_refused_with_one_line_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engine_problems(GenerationConfig(engine="vllm")) == [
        "generation.engine: got 'vllm'; vLLM needs a CUDA GPU, this machine has none: use hf"
    ]


def test_vllm_is_refused_on_a_gpu_without_vllm_with_how_to_install(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "vllm" else real_find_spec(name))
    assert engine_problems(GenerationConfig(engine="vllm")) == [
        f"generation.engine: got 'vllm'; vllm is not installed (pip install \"lora-rl[vllm]\"), and {NOT_BUILT}"
    ]


def test_vllm_is_refused_on_a_gpu_with_vllm_until_the_engine_is_built(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert engine_problems(GenerationConfig(engine="vllm")) == [f"generation.engine: got 'vllm'; {NOT_BUILT}"]


@pytest.mark.parametrize(("name", "value", "shown"), [("vllm_gpu_memory_utilization", "0.5", "0.5"),
                                                      ("sync_check", "warn", "'warn'"),
                                                      ("importance_correction", "token_truncate", "'token_truncate'"),
                                                      ("importance_cap", "2", "2.0")])  # fmt: skip
def test_a_vllm_only_key_set_with_hf_is_refused_with_one_line(name, value, shown, tmp_path):
    result = CliRunner().invoke(app, ["grpo", str(ROOT / "recipes/grpo-demo.yaml"), f"generation.{name}={value}",
                                      f"output_dir={tmp_path / 'out'}"])  # fmt: skip
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: generation.{name}: set to {shown}, but only generation.engine: vllm reads it; remove it"]
    assert not (tmp_path / "out").exists()


def test_vllm_only_names_every_key_the_engine_alone_reads():
    assert set(VLLM_ONLY) == {"vllm_gpu_memory_utilization", "sync_check", "importance_correction", "importance_cap"}
    assert engine_problems(GenerationConfig()) == []


@pytest.mark.parametrize(("override", "expected"), [
    ("generation.vllm_gpu_memory_utilization=0", "generation.vllm_gpu_memory_utilization: got 0.0; expected a "
                                                 "number in (0, 1]"),
    ("generation.vllm_gpu_memory_utilization=1.5", "generation.vllm_gpu_memory_utilization: got 1.5; expected a "
                                                   "number in (0, 1]"),
    ("generation.importance_cap=0.5", "generation.importance_cap: got 0.5; expected a number >= 1 (agreeing "
                                      "log-probs, a ratio of 1, must pass)"),
    ("generation.importance_correction=sequence", "generation.importance_correction: got 'sequence'; expected one "
                                                  "of sequence_mask, sequence_truncate, token_mask, token_truncate, "
                                                  "none"),
    ("generation.engine=trt", "generation.engine: got 'trt'; expected one of hf, vllm"),
])  # fmt: skip
def test_values_out_of_range_are_refused(override, expected):
    with pytest.raises(RecipeError) as raised:
        load_recipe(ROOT / "recipes/grpo-demo.yaml", [override])
    assert raised.value.problems == [expected]


def test_full_memory_share_is_accepted():
    recipe = load_recipe(ROOT / "recipes/grpo-demo.yaml", ["generation.vllm_gpu_memory_utilization=1"])
    assert recipe.generation.vllm_gpu_memory_utilization == 1.0


def test_train_reward_refuses_the_generation_keys():
    result = CliRunner().invoke(app, ["train-reward", str(ROOT / "recipes/reward-demo.yaml"), "generation.engine=vllm"])
    assert result.exit_code == 2
    assert ("error: generation.engine: set to 'vllm', but train-reward does not read it (only ppo, grpo); remove it"
            in result.output)  # fmt: skip


def test_checking_an_engine_recipe_imports_no_vllm():
    code = ("import sys; from lora_rl.recipe import GenerationConfig; from lora_rl.rl.setup import engine_problems; "
            "engine_problems(GenerationConfig(engine='vllm')); print('vllm' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
