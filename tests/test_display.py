"""Output where jobs run: under nohup or slurm stdout is a file, and a progress bar shows nothing until the end."""

from __future__ import annotations

import subprocess
import sys

from tests.test_roles import ROOT


def run_to_a_file(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """As `nohup lora-rl ... > log` runs it: stdout is a file, not a terminal."""
    with open(tmp_path / "log", "w") as log:
        result = subprocess.run([sys.executable, "-m", "lora_rl", *args], stdout=log, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT)  # fmt: skip
    result.stdout = (tmp_path / "log").read_text()
    return result


def test_without_a_terminal_every_update_is_one_plain_line(tmp_path):
    args = ["ppo", "recipes/ppo-demo.yaml", f"output_dir={tmp_path / 'out'}", "ppo.num_updates=3",
            "train.save_every=2"]  # fmt: skip
    result = run_to_a_file(tmp_path, *args)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("ppo ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"], result.stdout
    assert all("reward " in line and "kl " in line and "━" not in line for line in lines)
    # a resumed run says where it continues from
    (tmp_path / "out" / "final").rename(tmp_path / "final-moved")
    result = run_to_a_file(tmp_path, *args[:-1], "train.save_every=2", "--resume", "auto")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from {tmp_path / 'out' / 'checkpoint-2'} (update 2)" in result.stdout
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("ppo ")] == ["3/3"]


def test_train_reward_without_a_terminal_prints_each_logged_step(tmp_path):
    result = run_to_a_file(tmp_path, "train-reward", "recipes/reward-demo.yaml", f"output_dir={tmp_path / 'out'}",
                           "train.max_steps=4", "train.log_every=2")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("train ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"] and all("loss " in line for line in lines)
