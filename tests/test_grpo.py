"""lora-rl grpo: the shared RL loop without a critic, end to end (the estimators and losses themselves are in
test_advantages.py, reward-function calling in test_rewards.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from lora_rl.cli import app
from lora_rl.recipe import load_recipe
from lora_rl.rl import rollout as rollout_module
from tests.test_roles import ROOT, roles_for

DEMO = ["grpo", str(ROOT / "recipes/grpo-demo.yaml"), f"data.train_path={ROOT / 'recipes/data/grpo-demo.jsonl'}"]


def run(out: Path, *overrides: str):
    result = CliRunner().invoke(app, [*DEMO, f"output_dir={out}", *overrides], env={"COLUMNS": "200"})
    return result, out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


SHORT = ["grpo.num_steps=2", "grpo.prompts_per_step=4", "grpo.num_generations=4", "train.batch_size=8"]


def count_reference_forwards(monkeypatch) -> dict:
    calls, real = {"n": 0}, rollout_module.reference_logprobs

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(rollout_module, "reference_logprobs", counted)
    return calls


def test_beta_zero_runs_no_reference_forward_and_saves_a_plain_adapter(tmp_path, monkeypatch, llama_dir):
    calls = count_reference_forwards(monkeypatch)
    result, out = run(tmp_path / "run", *SHORT)
    assert result.exit_code == 0, result.output
    assert calls["n"] == 0
    lines = metrics(out)
    assert [m["update"] for m in lines] == [1, 2] and "kl" not in lines[0]
    for key in ("reward", "reward_std", "reward/correct", "reward/one_word", "frac_reward_zero_std", "policy_loss",
                "clip_ratio", "entropy", "response_length"):  # fmt: skip
        assert key in lines[-1], key
    assert not (out / "final" / "value_head.safetensors").exists()  # no critic
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), out / "final")
    assert model.active_adapter == "default"


def test_beta_above_zero_uses_the_reference_the_recipe_names(tmp_path, monkeypatch, write_recipe):
    calls = count_reference_forwards(monkeypatch)
    result, out = run(tmp_path / "run", *SHORT, "grpo.beta=0.1")
    assert result.exit_code == 0, result.output
    assert calls["n"] == 2 and all(m["kl"] >= 0 for m in metrics(out))
    # continuing from an adapter: the reference is that adapter (as in ppo), or the base when the recipe says so
    model = {"lora_path": str(out / "final"), "lora_rank": 8, "target_modules": None}
    common = {"reward": {"function": "lora_rl.demo_rewards:one_word"}, "actor": {"model": model},
              "data": {"train_path": str(ROOT / "recipes/data/grpo-demo.jsonl")}}  # fmt: skip
    _, roles = roles_for(load_recipe(write_recipe({**common, "grpo": {"beta": 0.1}})), "grpo")
    assert roles.reference_adapter == "reference" and roles.value_head is None
    _, roles = roles_for(load_recipe(write_recipe({**common, "grpo": {"beta": 0.1, "reference": "base"}})), "grpo")
    assert roles.reference_adapter is None and "reference" not in roles.model.peft_config
    _, roles = roles_for(load_recipe(write_recipe({**common, "grpo": {"beta": 0.0}})), "grpo")
    assert "reference" not in roles.model.peft_config  # beta 0: not even loaded


def test_data_columns_reach_trl_style_functions_and_none_rows_are_left_out(tmp_path):
    functions = ("[{function: tests.grpo_rewards:answer_matches_prompt, weight: 1.0}, "
                 "{function: tests.grpo_rewards:judge_half, weight: 0.5}]")  # fmt: skip
    result, out = run(tmp_path / "run", *SHORT, f"reward.functions={functions}")
    assert result.exit_code == 0, result.output  # answer_matches_prompt raises on a misaligned column
    for line in metrics(out):
        assert 0.0 <= line["reward/answer_matches_prompt"] <= 1.0
        # judge_half's mean is over the even rows it judged: a number, not nan, and the total's mean counts
        # every row (each judged by answer_matches_prompt)
        assert line["reward/judge_half"] == line["reward/judge_half"] and line["reward"] == line["reward"]


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("tests.process_rewards:nan", "reward function tests.process_rewards:nan: completion 1 of 16: expected a "
                                      "finite number or None, got nan"),  # fmt: skip
        ("tests.grpo_rewards:exits", "reward function tests.grpo_rewards:exits called sys.exit(3)"),
        ("tests.grpo_rewards:huge", "reward function tests.grpo_rewards:huge: completion 1 of 16: got 3e+38, beyond "
                                    "the largest reward allowed, 1e+06"),  # fmt: skip
        ("tests.grpo_rewards:judge_none", "update 1: reward function judge_none returned None for all 16 "
                                          "completions: nothing to learn from"),  # fmt: skip
        ("lora_rl.demo_rewards:correct", None),
    ],
)
def test_reward_function_problems_are_one_line_errors(tmp_path, function, message):
    result, out = run(tmp_path / "run", *SHORT, "reward.functions=null", f"reward.function={function}")
    if message is None:  # `correct` needs the answer column, which the demo data has
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 1
    assert message in " ".join(result.stderr.split()) and "Traceback" not in result.output
    assert not (out / "metrics.jsonl").exists()  # stopped before any update used it, nothing logged


def test_single_completion_group_and_missing_column_are_recipe_errors(tmp_path):
    result, out = run(tmp_path / "run", "grpo.num_generations=1")
    assert result.exit_code == 2
    assert "grpo.num_generations: got 1; expected an integer >= 2 (a group of one has no baseline)" in result.stderr
    no_answer = f"data.train_path={ROOT / 'recipes/data/prompts-demo.jsonl'}"
    result, out = run(tmp_path / "run2", "reward.functions=null",
                      "reward.function=tests.grpo_rewards:answer_matches_prompt", no_answer)  # fmt: skip
    assert result.exit_code == 2 and "answer" in result.stderr and not out.exists()


def test_resumed_grpo_run_equals_uninterrupted(tmp_path):
    settings = [*SHORT, "grpo.num_steps=4", "train.save_every=2", "grpo.beta=0.05", "grpo.num_iterations=2"]
    result, full = run(tmp_path / "full", *settings)
    assert result.exit_code == 0, result.output
    crashed = tmp_path / "crashed"
    subprocess.run(["cp", "-r", str(full), str(crashed)], check=True)
    subprocess.run(["rm", "-rf", str(crashed / "final")], check=True)
    result, _ = run(crashed, *settings, "--resume", "auto")
    assert result.exit_code == 0, result.output
    a, b = (load_file(d / "final/adapter_model.safetensors") for d in (full, crashed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    timing = lambda m: {k: v for k, v in m.items() if not k.startswith("time_")}  # noqa: E731
    assert [timing(m) for m in metrics(full)] == [timing(m) for m in metrics(crashed)]


def test_chat_prompts_get_the_template_and_completions_arrive_as_messages(tmp_path):
    data = tmp_path / "chat.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"say the word {w}"}]} for w in ("cat", "dog", "sun", "sea")]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result, out = run(tmp_path / "run", *SHORT, f"data.train_path={data}", "reward.functions=null",
                      "reward.function=tests.grpo_rewards:assistant_messages")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(metrics(out)) == 2
    # the saved recipe says how the policy saw its prompts: `lora-rl load` and the reward-template check read it
    for saved in (out / "recipe.yaml", out / "final" / "recipe.yaml"):
        assert yaml.safe_load(saved.read_text())["generation"]["chat_template"] is True, saved


def test_chat_prompts_with_a_plain_text_reward_model_are_one_error_line(tmp_path):
    """A separate reward model trained on plain text re-reads prompt + completion as text; message prompts have
    none (this was a TypeError traceback in the first rollout)."""
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "say the word cat"}]}) + "\n")
    result, out = run(tmp_path / "run", *SHORT, f"data.train_path={data}", "reward.functions=null",
                      "reward.model=tiny-gpt2")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "reward.model: tiny-gpt2 reads plain text" in " ".join(result.output.split())
    assert "Traceback" not in result.output and not out.exists()


def test_demo_raises_mean_reward(tmp_path):
    """4 seeds x 40 steps of recipes/grpo-demo.yaml: first-5 means 0.008-0.011, steps 36-40 means 0.26-0.48 (gains
    0.25-0.47; 80 steps: 0.24-0.77). A gain above 0.12 is half the smallest observed one."""
    result, out = run(tmp_path / "run", "grpo.num_steps=40")
    assert result.exit_code == 0, result.output
    rewards = [m["reward"] for m in metrics(out)]
    assert len(rewards) == 40 and sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.12
