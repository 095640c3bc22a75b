"""The guards against a dying run: max_update_kl undoes an update that moved the policy too far (measured as
KL(sampling policy || updated policy) on its rollout), and the live warnings name a collapse or a stuck run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_rl.cli import app
from lora_rl.rl.health import WINDOW, RunHealth
from lora_rl.rl.loop import update_kl
from lora_rl.rl.rollout import Rollout

ROOT = Path(__file__).resolve().parent.parent
GRPO = ["grpo", str(ROOT / "recipes/grpo-demo.yaml"), "grpo.num_steps=3", "grpo.prompts_per_step=2",
        "grpo.num_generations=4", "train.batch_size=4", "generation.max_new_tokens=4",
        "reward.functions=[{function: tests.recording_rewards:record}]"]  # rewards that differ: every update moves


class Out(NamedTuple):
    logprobs: torch.Tensor


def test_update_kl_is_the_k3_mean_over_valid_tokens_of_the_whole_rollout():
    old = torch.log(torch.tensor([[0.5, 0.25, 0.1], [0.2, 0.9, 0.3]]))
    new = torch.log(torch.tensor([[0.4, 0.5, 0.7], [0.1, 0.6, 0.3]]))
    mask = torch.tensor([[True, True, False], [True, True, True]])
    rows = torch.arange(2).unsqueeze(1).expand(2, 5)  # each row's ids hold its index: the fake model reads it
    rollout = Rollout(rows, torch.ones(2, 5), mask, 2, mask[:, -1], old, None, torch.zeros(2, 3), torch.zeros(2),
                      torch.ones(2, dtype=torch.bool), {})  # fmt: skip

    def model(ids, attention_mask, prompt_width, entropy):
        return Out(new[ids[:, 0]])

    r = (new - old).exp()
    want = ((r - 1 - (new - old)) * mask).sum() / mask.sum()  # E_old[r - 1 - log r] = KL(old || new)
    for micro in (1, 2):  # one row at a time or both: the same mean over every valid token
        assert update_kl(Accelerator(), model, rollout, micro) == pytest.approx(want.item(), rel=1e-6)


def run(tmp_path: Path, *overrides: str):
    result = CliRunner().invoke(app, [*GRPO, f"output_dir={tmp_path}", *overrides], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return result, records, load_file(tmp_path / "final/adapter_model.safetensors")


def test_max_update_kl_undoes_every_update_that_moves_further(tmp_path):
    result, records, weights = run(tmp_path / "strict", "grpo.max_update_kl=1e-12")
    assert [r["update_undone"] for r in records] == [1, 1, 1]
    assert all(r["update_kl"] > 1e-12 for r in records)
    assert "update 1: KL(sampling policy || updated policy)" in result.stderr and "(3 so far)" in result.stderr
    assert all(not w.any() for name, w in weights.items() if "lora_B" in name)  # nothing of any update stayed
    result, records, weights = run(tmp_path / "loose", "grpo.max_update_kl=1e9")
    assert all("update_undone" not in r and r["update_kl"] > 0 for r in records)
    assert any(w.any() for name, w in weights.items() if "lora_B" in name)


def feed(health: RunHealth, rewards: list[float], approx_kl: list[float], zero_std: float = 0.0) -> list[str]:
    warnings = []
    for update, (reward, kl) in enumerate(zip(rewards, approx_kl, strict=True), len(health.rewards) + 1):
        record = {"update": update, "reward": reward, "approx_kl": kl, "entropy": 1.0, "frac_reward_zero_std": zero_std}
        warnings += health.check(record)
    return warnings


def test_a_collapse_with_a_jump_in_approx_kl_is_named_once():
    health = RunHealth("grpo")
    rising = [i / 20 for i in range(20)]  # 0 -> 0.95
    assert feed(health, rising, [0.01] * 20) == []
    warnings = feed(health, [0.02] * 10, [2.0] + [0.02] * 9)
    assert len(warnings) == 1
    # the 3rd low update: the last 5 (0.9, 0.95, 0.02 x 3) average 0.382, below half of the gain (best 0.85, first 0.1)
    assert warnings[0].startswith("update 23: reward 0.382 (mean of the last 5 updates) is far below its best 0.85")
    assert "approx_kl jumped to 2" in warnings[0] and "grpo.max_update_kl" in warnings[0]


def test_a_noisy_plateau_or_a_dip_without_a_jump_is_not_a_collapse():
    health = RunHealth("ppo")
    rewards = [i / 20 for i in range(20)] + [0.9, 0.7, 0.95, 0.8, 0.85] * 4 + [0.3] * WINDOW
    assert feed(health, rewards, [0.01] * len(rewards)) == []


def test_a_stuck_run_is_named_once_after_a_window_and_again_after_it_moved():
    health = RunHealth("grpo")
    warnings = feed(health, [0.0] * 12, [0.0] * 12, zero_std=1.0)
    assert warnings == [f"updates 1-{WINDOW}: every group's rewards are equal (frac_reward_zero_std 1.0, reward 0): "
                        "no advantage is left to learn from; the policy may have collapsed (README: When a run "
                        "collapses)"]  # fmt: skip
    assert feed(health, [0.3], [0.0], zero_std=0.5) == []
    assert len(feed(health, [0.0] * WINDOW, [0.0] * WINDOW, zero_std=1.0)) == 1
