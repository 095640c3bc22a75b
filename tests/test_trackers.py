"""train.report_to: accelerate's trackers get the metrics lines; TensorBoard's own reader loads what was written."""

from __future__ import annotations

import json
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util.tensor_util import make_ndarray
from typer.testing import CliRunner

from lora_rl.cli import app
from tests.test_roles import ROOT

runner = CliRunner()


def run(command: str, recipe: str, out, *overrides: str):
    return runner.invoke(app, [command, str(ROOT / "recipes" / recipe), f"output_dir={out}", *overrides],
                         env={"COLUMNS": "200"})  # fmt: skip


def scalars(out, name: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar in the TensorBoard run that lora-rl wrote to output_dir/lora-rl."""
    events = EventAccumulator(str(out / "lora-rl"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(name)]


def texts(out, tag: str) -> list[tuple[int, str]]:
    """(step, text) of a text summary in the TensorBoard run."""
    events = EventAccumulator(str(out / "lora-rl"), size_guidance={"tensors": 0})
    events.Reload()
    return [(event.step, make_ndarray(event.tensor_proto).item().decode()) for event in events.Tensors(tag)]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ppo_reward_goes_to_tensorboard(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "ppo"
    result = run("ppo", "ppo-demo.yaml", out, "ppo.num_updates=2", "train.report_to=[tensorboard]",
                 "train.samples_every=2", "train.num_samples=2")  # fmt: skip
    assert result.exit_code == 0, result.output
    logged = scalars(out, "reward")
    assert [step for step, _ in logged] == [1, 2]
    assert [value for _, value in logged] == pytest.approx([m["reward"] for m in metrics(out)])
    # samples.jsonl's lines as a markdown table in TensorBoard's text plugin, one per sampled update
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    tables = texts(out, "samples/text_summary")
    assert [step for step, _ in tables] == [1, 2]
    for step, table in tables:
        rows = table.splitlines()[2:]
        assert [row.split(" | ")[0] for row in rows] == [f"| {step}", f"| {step}"]
        shown = [s for s in samples if s["update"] == step]
        assert all(s["prompt"] in row and f"{s['reward']}" in row for s, row in zip(shown, rows, strict=True))


def test_train_reward_splits_go_to_tensorboard(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "reward"
    result = run("train-reward", "reward-demo.yaml", out, "train.max_steps=2", "train.report_to=[tensorboard]")
    assert result.exit_code == 0, result.output
    evals = [m for m in metrics(out) if m["split"] == "eval"]
    assert scalars(out, "eval/accuracy") == [(evals[-1]["step"], pytest.approx(evals[-1]["accuracy"]))]
    trained = [m["step"] for m in metrics(out) if m["split"] == "train"]
    assert [step for step, _ in scalars(out, "train/loss")] == trained


def test_unknown_tracker_lists_the_valid_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "ppo"
    result = run("ppo", "ppo-demo.yaml", out, "train.report_to=[tensorbord]")
    assert result.exit_code == 2
    expected = "train.report_to: got ['tensorbord']; expected a list, each one of tensorboard, wandb, mlflow, comet_ml"
    assert expected in result.stderr
    assert not out.exists()


def test_a_tracker_not_installed_is_named_before_loading(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setitem(sys.modules, "wandb", None)  # importlib.util.find_spec then reports it missing
    out = tmp_path / "ppo"
    result = run("ppo", "ppo-demo.yaml", out, "train.report_to=[wandb]")
    assert result.exit_code == 2
    assert "train.report_to: wandb is not installed; pip install wandb" in result.stderr
    assert not out.exists()


def test_wandb_writes_under_output_dir(tmp_path):
    """accelerate's W&B tracker ignores project_dir: the run's `dir` must name output_dir, or W&B's files land in
    whatever directory the job started in."""
    from lora_rl.recipe import load_recipe
    from lora_rl.training import trackers
    recipe = load_recipe(ROOT / "recipes" / "ppo-demo.yaml", [f"output_dir={tmp_path / 'run'}"])
    calls = []

    class Recorder:
        def init_trackers(self, name, config=None, init_kwargs=None):
            calls.append(init_kwargs)

    trackers.start_trackers(Recorder(), recipe)
    assert calls[0]["wandb"]["dir"] == str(tmp_path / "run")
