"""`lora-rl plot` through the CLI: a PNG of the expected size from hand-written metrics.jsonl files, and the
one-line errors."""

from __future__ import annotations

import json
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from lora_rl.cli import app
from lora_rl.commands import plot

runner = CliRunner()


def write_metrics(run_dir, records):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def ppo_run(run_dir, reward_scale=1.0):
    records = [{"update": u, "reward": reward_scale * u / 4, "reward_std": 0.1, "response_length": 8 + u,
                "eos_fraction": 0.5, "kl": 0.01 * u, "kl_coef": 0.05, "policy_loss": -0.1, "value_loss": 0.3 / u,
                "entropy": 2.0 - 0.1 * u} for u in range(1, 5)]  # fmt: skip
    return write_metrics(run_dir, records)


def pixels(path):
    with Image.open(path) as image:
        return image.size


def test_ppo_runs_side_by_side(tmp_path):
    first, second = ppo_run(tmp_path / "run-a"), ppo_run(tmp_path / "run-b", reward_scale=2.0)
    result = runner.invoke(app, ["plot", str(first), str(second)])
    assert result.exit_code == 0, result.output
    assert f"wrote {first / 'metrics.png'}" in result.output
    # six panels (reward, kl, entropy, policy_loss, value_loss, response_length): 3 columns x 2 rows of 4x3 in
    assert pixels(first / "metrics.png") == (3 * 400, 2 * 300)
    assert not (second / "metrics.png").exists()


def test_reward_run_train_and_eval_to_out(tmp_path):
    records = [{"step": s, "split": "train", "loss": 0.7 - 0.1 * s, "accuracy": 0.5 + 0.1 * s, "margin": 0.1 * s,
                "lr": 1e-4, "pairs_per_s": 10.0} for s in range(1, 5)]  # fmt: skip
    records.append({"step": 4, "split": "eval", "loss": 0.5, "accuracy": 0.75, "margin": 0.3, "pairs": 8})
    run_dir = write_metrics(tmp_path / "reward", records)
    result = runner.invoke(app, ["plot", str(run_dir), "--out", str(tmp_path / "curves.png")])
    assert result.exit_code == 0, result.output
    assert pixels(tmp_path / "curves.png") == (3 * 400, 300)  # loss, accuracy, margin: one row
    series = plot.read_series(run_dir / "metrics.jsonl")
    assert series[("accuracy", "eval", "step")] == ([4], [0.75])
    assert series[("loss", "train", "step")][0] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "not found"), ("", "empty"), ('{"update": 1}\nnot json\n', "line 2 is not a metrics record"),
     ('{"update": 1, "lr": 0.1}\n', "none of the metrics")],
)  # fmt: skip
def test_bad_metrics_file_is_one_line_exit_2(tmp_path, content, expected):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if content is not None:
        (run_dir / "metrics.jsonl").write_text(content)
    result = runner.invoke(app, ["plot", str(run_dir)])
    assert result.exit_code == 2
    assert expected in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (run_dir / "metrics.png").exists()


def test_out_must_be_a_png_in_an_existing_directory(tmp_path):
    run_dir = ppo_run(tmp_path / "run")
    for out, expected in [(tmp_path / "curves.pdf", "expected a .png"), (tmp_path / "no" / "c.png", "does not exist")]:
        result = runner.invoke(app, ["plot", str(run_dir), "--out", str(out)])
        assert result.exit_code == 2
        assert expected in result.output


def test_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    run_dir = ppo_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = runner.invoke(app, ["plot", str(run_dir)])
    assert result.exit_code == 2
    assert 'pip install "lora-rl[plot]"' in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (run_dir / "metrics.png").exists()


def test_grpo_held_out_evaluation_joins_the_reward_panel_and_pass_at_k_gets_its_own(tmp_path):
    """eval/reward and eval/response_length on an update's line are the eval split of the reward and length panels;
    each eval/pass@k logged is a panel after the others; eval/reward/<fn> and time_eval are not drawn."""
    records = [{"update": u, "reward": u / 4, "response_length": 4.0, "entropy": 1.0} for u in range(1, 5)]
    for record in records[1::2]:  # evaluated after updates 2 and 4
        record.update({"eval/reward": 0.1 * record["update"], "eval/reward/correct": 0.5, "eval/pass@1": 0.25,
                       "eval/pass@8": 0.5, "eval/response_length": 3.0, "time_eval": 1.5})  # fmt: skip
    run_dir = write_metrics(tmp_path / "grpo", records)
    series = plot.read_series(run_dir / "metrics.jsonl")
    assert series[("reward", "", "update")] == ([1, 2, 3, 4], [0.25, 0.5, 0.75, 1.0])
    assert series[("reward", "eval", "update")] == ([2, 4], [0.2, 0.4])
    assert series[("pass@8", "eval", "update")] == ([2, 4], [0.5, 0.5])
    assert {metric for metric, _, _ in series} == {"reward", "response_length", "entropy", "pass@1", "pass@8"}
    result = runner.invoke(app, ["plot", str(run_dir)])
    assert result.exit_code == 0, result.output
    # reward, entropy, response_length, pass@1, pass@8: 3 columns x 2 rows
    assert pixels(run_dir / "metrics.png") == (3 * 400, 2 * 300)
