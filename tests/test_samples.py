"""samples.jsonl: at the expected updates, the completions and rewards the reward function saw; to a tracker's table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from accelerate.tracking import GeneralTracker
from typer.testing import CliRunner

from lora_rl.cli import app
from lora_rl.rl.samples import markdown_table
from lora_rl.training import trackers
from tests import recording_rewards
from tests.test_roles import ROOT

PPO = ["ppo", str(ROOT / "recipes/ppo-demo.yaml"), f"data.train_path={ROOT / 'recipes/data/prompts-demo.jsonl'}",
       "ppo.rollout_batch_size=8", "train.batch_size=8", "generation.max_new_tokens=6",
       "reward.function=tests.recording_rewards:record"]  # fmt: skip
GRPO = ["grpo", str(ROOT / "recipes/grpo-demo.yaml"), f"data.train_path={ROOT / 'recipes/data/grpo-demo.jsonl'}",
        "grpo.prompts_per_step=4", "grpo.num_generations=4", "train.batch_size=8"]  # fmt: skip


def run(args: list[str], out: Path, *overrides: str) -> list[dict]:
    """Run the command with the recording reward; its samples.jsonl records."""
    recording_rewards.CALLS.clear()
    result = CliRunner().invoke(app, [*args, f"output_dir={out}", *overrides], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def seen_by_the_reward(update: int) -> list[tuple]:
    """(prompt, completion, reward) of every completion the recording reward function scored at `update`."""
    (call,) = [c for c in recording_rewards.CALLS if c["update"] == update]
    return list(zip(call["prompts"], call["completions"], call["rewards"], strict=True))


def test_ppo_samples_are_what_the_reward_function_saw_at_update_1_and_every_nth(tmp_path):
    written = run(PPO, tmp_path / "out", "ppo.num_updates=5", "train.samples_every=2", "train.num_samples=3")
    assert [s["update"] for s in written] == [1, 1, 1, 2, 2, 2, 4, 4, 4]
    for start in range(0, len(written), 3):
        update = written[start]["update"]
        seen = seen_by_the_reward(update)
        for sample, row in zip(written[start : start + 3], (0, 2, 5), strict=True):  # spread over the batch of 8
            assert set(sample) == {"update", "prompt", "completion", "reward", "reward/record"}
            prompt, completion, reward = seen[row]
            assert (sample["prompt"], sample["completion"]) == (prompt, completion), f"update {update} row {row}"
            assert sample["reward"] == pytest.approx(reward) == sample["reward/record"]
    assert any(s["completion"] for s in written)  # texts, not all empty


def test_grpo_samples_carry_each_functions_own_reward(tmp_path):
    functions = ("[{function: tests.recording_rewards:record, weight: 1.0}, "
                 "{function: tests.grpo_rewards:judge_half, weight: 0.5}]")  # fmt: skip
    written = run(GRPO, tmp_path / "out", "grpo.num_steps=3", "train.samples_every=3", "train.num_samples=3",
                  f"reward.functions={functions}")  # fmt: skip
    assert [s["update"] for s in written] == [1, 1, 1, 3, 3, 3]
    for sample in written:
        seen = dict(((p, c), r) for p, c, r in seen_by_the_reward(sample["update"]))
        assert sample["reward/record"] == pytest.approx(seen[sample["prompt"], sample["completion"]])
        judged = sample["reward/judge_half"]
        assert judged is None or judged == len(sample["completion"].split())
        assert sample["reward"] == pytest.approx(sample["reward/record"] + 0.5 * (judged or 0.0))
    # batch of 4 prompts x 4 completions, 3 samples: rows 0, 5 and 10, from three prompts; judge_half judges the even
    assert [s["reward/judge_half"] is None for s in written[:3]] == [False, True, False]
    assert len({s["prompt"] for s in written[:3]}) == 3


def test_samples_every_0_writes_none(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [*PPO, f"output_dir={out}", "ppo.num_updates=1", "train.samples_every=0"])
    assert result.exit_code == 0, result.output
    assert (out / "metrics.jsonl").is_file() and not (out / "samples.jsonl").exists()


class TableTracker(GeneralTracker):
    """A tracker with accelerate's log_table (as W&B's and ClearML's have), recording each table."""

    name = "table-recorder"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.tables = []

    @property
    def tracker(self):
        return self

    def log(self, values, step=None, **kwargs):
        pass

    def log_table(self, table_name, columns=None, data=None, dataframe=None, step=None, **kwargs):
        self.tables.append((table_name, step, columns, data))


def test_a_tracker_with_a_table_gets_each_sampled_update(tmp_path, monkeypatch):
    tracker = TableTracker()
    monkeypatch.setattr(trackers, "tracker_options", lambda recipe: {"log_with": [tracker]})
    written = run(PPO, tmp_path / "out", "ppo.num_updates=2", "train.samples_every=1", "train.num_samples=2")
    columns = ["update", "prompt", "completion", "reward", "reward/record"]
    rows = [[s[c] for c in columns] for s in written]
    assert tracker.tables == [("samples", 1, columns, rows[:2]), ("samples", 2, columns, rows[2:])]


def test_markdown_table_keeps_pipes_and_line_breaks_inside_their_cell():
    table = markdown_table(["prompt", "completion", "reward"], [["a | b", "one\ntwo", None]])
    assert table.splitlines() == ["| prompt | completion | reward |", "| --- | --- | --- |",
                                  "| a \\| b | one<br>two |  |"]  # fmt: skip
