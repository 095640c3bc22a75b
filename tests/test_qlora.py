"""actor.model.load_in_4bit (QLoRA) where no GPU is: refused with one line before anything loads, every command;
an adapter trained on a 4-bit base merged into the full-precision base, and loaded on it, saying so."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lora_rl.adapters import merge
from lora_rl.cli import app
from lora_rl.commands import load
from lora_rl.models import build as build_module
from lora_rl.models.build import four_bit_options, four_bit_problems
from lora_rl.recipe import ModelConfig, load_recipe
from tests.test_merge import make_adapter, peft_merged, saved_tensors

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


# ---------------------------------------------------------------- an adapter trained on a 4-bit base

FOUR_BIT_LINE = ("the adapter trained on a 4-bit (NF4) base (actor.model.load_in_4bit in its recipe.yaml): merged into "
                 "the full-precision base, never into 4-bit weights")  # fmt: skip


@pytest.fixture
def four_bit_adapter(tmp_path) -> Path:
    """A hand-made adapter on tiny-llama with the recipe lora-rl would have saved beside it after a QLoRA run."""
    adapter = make_adapter(tmp_path / "adapter", build_module.resolve_path(ModelConfig(path="tiny-llama")), seed=3)
    load_recipe(ROOT / "recipes/ppo-demo.yaml", ["actor.model.load_in_4bit=true"]).save(adapter / "recipe.yaml")
    return adapter


@pytest.mark.parametrize("mode", ["--in-memory", "--streaming"])
def test_merge_folds_it_into_the_full_precision_base_and_says_so(four_bit_adapter, tmp_path, mode):
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(four_bit_adapter), str(out), mode], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert FOUR_BIT_LINE in result.output
    assert "check: max |logit diff| merged vs adapter" in result.output and "): ok" in result.output
    expected = peft_merged(four_bit_adapter, build_module.resolve_path(ModelConfig(path="tiny-llama"))).state_dict()
    merged = saved_tensors(out)
    assert merged.keys() <= expected.keys()
    for name, tensor in merged.items():  # float32 weights: the base's + the delta, never rounded to 4 bits
        assert tensor.dtype == torch.float32 and torch.allclose(tensor, expected[name], atol=1e-6), name


def test_merge_of_an_adapter_trained_full_precision_says_nothing_of_4bit(four_bit_adapter, tmp_path):
    load_recipe(ROOT / "recipes/ppo-demo.yaml").save(four_bit_adapter / "recipe.yaml")
    result = runner.invoke(app, ["merge", str(four_bit_adapter), str(tmp_path / "merged")], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "4-bit" not in result.output


def test_load_runs_it_on_the_full_precision_base_without_a_gpu(four_bit_adapter, tmp_path):
    args = ["load", str(four_bit_adapter), "--prompt", "the cat is", "--max-new-tokens", "4"]
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert ("adapter trained on a 4-bit (NF4) base: loading the full-precision base instead (4-bit (bitsandbytes "
            "NF4) needs a CUDA GPU, this machine has none); outputs differ from the quantised model's by the "
            "quantisation error") in result.output  # fmt: skip
    plain = shutil.copytree(four_bit_adapter, tmp_path / "plain")
    (plain / "recipe.yaml").unlink()
    quantised_columns = load.run(four_bit_adapter, [], ["the cat is"], None, 4)
    plain_columns = load.run(plain, [], ["the cat is"], None, 4)
    assert list(quantised_columns.values()) == list(plain_columns.values())  # the same full-precision model


def test_load_says_which_adapters_keep_the_base_full_precision(four_bit_adapter, tmp_path, monkeypatch):
    """On a machine that could load 4-bit, a column trained full precision keeps the base full precision."""
    other = make_adapter(tmp_path / "other", build_module.resolve_path(ModelConfig(path="tiny-llama")), seed=4)
    specs = {"qlora": merge.read_adapter(four_bit_adapter), "other": merge.read_adapter(other)}
    monkeypatch.setattr(load, "four_bit_unavailable", lambda: None)
    assert load.four_bit_base(specs) is False
    assert load.four_bit_base({"qlora": specs["qlora"]}) is True
    assert load.four_bit_base({"other": specs["other"]}) is False
