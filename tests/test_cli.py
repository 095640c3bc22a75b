"""End to end through the CLI, as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

import lora_rl
from lora_rl.cli import app

runner = CliRunner()


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
    path = write_recipe({"actor": {"model": {"lora_rank": 4, "target_modules": ["q_proj", "v_proj"]}}})
    result = runner.invoke(app, ["validate", str(path), "train.learning_rate=1e-5"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "learning_rate: 1.0e-05" in result.stdout
    assert "model.layers.0.self_attn.q_proj, model.layers.1.self_attn.q_proj" in result.stdout
    # r*(in+out): q 64->64 and v 64->32 in two layers
    assert f"trainable parameters {2 * 4 * (128 + 96):,} of" in result.stdout


def test_validate_reward_head(write_recipe):
    path = write_recipe({"actor": {"model": {"lora_rank": 2}}})
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
    path = write_recipe({"actor": {"model": {"target_modules": ["c_attn"]}}})
    result = runner.invoke(app, ["validate", str(path)], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert result.stderr.startswith("error: actor.model.target_modules: c_attn matched no layer of this model")
    assert "Traceback" not in result.output


def test_warnings_are_printed(write_recipe):
    path = write_recipe({"actor": {"model": {"is_lora": False, "lora_rank": 4}}})
    result = runner.invoke(app, ["validate", str(path)], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert "warning: actor.model.lora_rank: ignored because is_lora is false (full fine-tuning)" in result.stderr
    assert "full fine-tuning (causal-lm)" in result.stdout
