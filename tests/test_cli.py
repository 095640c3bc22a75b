"""End to end through the CLI, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import lora_rl
from lora_rl.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
# What validate --for ppo (the default) and --for train-reward check before the model: data and a reward source.
PPO = {"data": {"train_path": str(ROOT / "recipes/data/prompts-demo.jsonl")},
       "reward": {"function": "lora_rl.demo_rewards:praise"}}  # fmt: skip
PAIRS = {"data": {"train_path": str(ROOT / "recipes/data/reward-demo.jsonl")}}


def test_version_from_the_installed_script():
    result = subprocess.run([sys.executable, "-m", "lora_rl", "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.strip() == f"lora-rl {lora_rl.__version__}"


@pytest.mark.parametrize(
    ("command", "documented"),
    [
        ("validate", ["RECIPE", "OVERRIDES", "--for"]),
        ("train-reward", ["RECIPE", "OVERRIDES"]),
        ("ppo", ["RECIPE", "OVERRIDES"]),
        ("merge", ["ADAPTER_DIR", "OUT_DIR", "--base", "--dtype", "--force", "--no-check", "--streaming"]),
        ("load", ["BASE_OR_ADAPTER", "--adapter", "--prompt", "--prompts-file", "--max-new-tokens", "--score"]),
    ],
)
def test_every_command_documents_its_arguments(command, documented):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for word in documented:
        assert word in result.stdout, word


def test_validate_prints_recipe_targets_and_parameter_counts(write_recipe):
    path = write_recipe({"actor": {"model": {"lora_rank": 4, "target_modules": ["q_proj", "v_proj"]}}, **PPO})
    result = runner.invoke(app, ["validate", str(path), "train.learning_rate=1e-5"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "learning_rate: 1.0e-05" in result.stdout
    assert "model.layers.0.self_attn.q_proj, model.layers.1.self_attn.q_proj" in result.stdout
    # r*(in+out): q 64->64 and v 64->32 in two layers
    assert f"trainable parameters {2 * 4 * (128 + 96):,} of" in result.stdout


def test_validate_reward_head(write_recipe):
    path = write_recipe({"actor": {"model": {"lora_rank": 2}}, **PAIRS})
    result = runner.invoke(app, ["validate", str(path), "--for", "train-reward"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "LoRA (reward)" in result.stdout


def test_validation_errors_exit_2_one_line_each(write_recipe):
    path = write_recipe({"actor": {"model": {"lora_rnak": 8}}})
    result = runner.invoke(app, ["validate", str(path), "actor.model.lora_dropout=1.5"], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: actor.model.lora_rnak: unknown key; did you mean lora_rank?",
        "error: actor.model.lora_dropout: got 1.5; expected a number in [0, 1)",
    ]


def test_model_errors_exit_2_without_traceback(write_recipe):
    path = write_recipe({"actor": {"model": {"target_modules": ["c_attn"]}}, **PPO})
    result = runner.invoke(app, ["validate", str(path)], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert result.stderr.startswith("error: actor.model.target_modules: c_attn matched no layer of this model")
    assert "Traceback" not in result.output


def test_warnings_are_printed(write_recipe):
    path = write_recipe({"actor": {"model": {"is_lora": False, "lora_rank": 4}}, **PPO})
    result = runner.invoke(app, ["validate", str(path)], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert "warning: actor.model.lora_rank: ignored because is_lora is false (full fine-tuning)" in result.stderr
    assert "full fine-tuning (causal-lm)" in result.stdout


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"reward": {"function": None}}, "reward: set exactly one of reward.adapter, reward.model, reward.function"),
        ({"ppo": {"rollout_batch_size": 6}, "train": {"batch_size": 4}},
         "ppo.rollout_batch_size: 6 is not divisible by train.batch_size x train.gradient_accumulation_steps"),
        ({"reward": {"function": "no_such_rewards:score"}}, "reward.function: cannot import 'no_such_rewards:score'"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("command", ["validate", "ppo"])
def test_validate_and_ppo_make_the_same_checks_before_loading_a_model(command, section, expected, write_recipe,
                                                                       monkeypatch):  # fmt: skip
    def build(*args, **kwargs):
        raise AssertionError("a model was loaded before the checks")

    # train_ppo first: importing it while lora_rl.models.build.build is patched would bind (and restore) the fake
    monkeypatch.setattr("lora_rl.commands.rl.build", build)
    monkeypatch.setattr("lora_rl.models.build.build", build)
    path = write_recipe({**PPO, **section})
    result = runner.invoke(app, [command, str(path)], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {expected}") and len(result.stderr.splitlines()) == 1, result.stderr
    assert not (path.parent / "out").exists()


def test_validate_for_train_reward_reads_the_pairs(write_recipe, tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"chosen": "a"}\n')
    path = write_recipe({"data": {"train_path": str(bad)}})
    result = runner.invoke(app, ["validate", str(path), "--for", "train-reward"], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert result.stderr == f"error: {bad}: row 1: missing 'rejected'\n"


ENTRY_POINTS = {"lora-rl script": [str(Path(sys.executable).parent / "lora-rl")],
                "python -m lora_rl": [sys.executable, "-m", "lora_rl"]}  # fmt: skip


@pytest.mark.parametrize(
    ("entry", "where"),
    [("lora-rl script", "recipe"), ("python -m lora_rl", "recipe"), ("lora-rl script", "working directory")],
)
def test_every_entry_point_finds_a_reward_module_beside_the_recipe_or_in_the_working_directory(entry, where, tmp_path):
    recipe_dir, work = tmp_path / "recipes", tmp_path / "work"
    recipe_dir.mkdir()
    work.mkdir()
    module = (recipe_dir if where == "recipe" else work) / "my_rewards.py"
    module.write_text("from pathlib import Path\n\nPath(__file__).with_suffix('.imported').touch()\n\n\n"
                      "def score(prompts, completions):\n    return [1.0] * len(completions)\n")  # fmt: skip
    data = {**PPO, "output_dir": str(tmp_path / "out"), "reward": {"function": "my_rewards:score"},
            "actor": {"model": {"lora_rank": 2}}}  # fmt: skip
    (recipe_dir / "ppo.yaml").write_text(yaml.safe_dump(data))
    command = [*ENTRY_POINTS[entry], "validate", str(recipe_dir / "ppo.yaml")]
    result = subprocess.run(command, cwd=work, capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"})
    assert result.returncode == 0, result.stderr
    assert module.with_suffix(".imported").is_file()


def test_unexpected_error_is_one_line_exit_1_and_debug_shows_the_traceback(write_recipe, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access\nmore detail")

    monkeypatch.setattr("lora_rl.commands.train_reward.run", fail)
    path = write_recipe(PAIRS)
    result = runner.invoke(app, ["train-reward", str(path)], env={"COLUMNS": "300"})
    assert result.exit_code == 1
    assert result.stderr == ("error: unexpected RuntimeError: CUDA error: an illegal memory access "
                             "(LORA_RL_DEBUG=1 shows the traceback)\n")  # fmt: skip
    result = runner.invoke(app, ["train-reward", str(path)], env={"COLUMNS": "300", "LORA_RL_DEBUG": "1"})
    assert isinstance(result.exception, RuntimeError)
