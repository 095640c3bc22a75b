"""train.lr_scheduler and train.warmup_ratio in ppo and grpo (they were validated, saved and ignored): counted in
optimizer steps, checkpointed, continued on resume, undone with a skipped update."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lora_rl.cli import app
from lora_rl.commands import rl as rl_command
from lora_rl.recipe import load_recipe
from lora_rl.rl.loop import UpdateSnapshot
from lora_rl.training.checkpoint import MANIFEST, sha256
from lora_rl.training.optimizer import make_optimizer, make_scheduler

ROOT = Path(__file__).resolve().parent.parent
GRPO = ["grpo", str(ROOT / "recipes/grpo-demo.yaml"), "grpo.prompts_per_step=2", "grpo.num_generations=4",
        "train.batch_size=4", "generation.max_new_tokens=4"]  # fmt: skip
PPO = ["ppo", str(ROOT / "recipes/ppo-demo.yaml"), "ppo.rollout_batch_size=8", "train.batch_size=4",
       "generation.max_new_tokens=4"]  # fmt: skip


def expected_lr(peak: float, kind: str, warmup: int, total: int, step: int) -> float:
    """transformers' schedules written out: the rate for the optimizer step after `step` steps."""
    if step < warmup:
        return peak * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return peak * max(0.0, 1 - progress)
    if kind == "cosine":
        return peak * max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))
    return peak


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("command", "kind", "steps_per_update", "overrides"), [
    (GRPO, "linear", 4, ["grpo.num_iterations=2"]),  # 8 completions / 4 per step x 2 iterations
    (PPO, "cosine", 2, ["ppo.ppo_epochs=1"]),  # 8 / 4 per step x 1 epoch
])  # fmt: skip
def test_each_update_logs_the_rate_the_schedule_gives(tmp_path, command, kind, steps_per_update, overrides):
    updates, peak = 4, 1e-3
    result = CliRunner().invoke(app, [*command, *overrides, f"output_dir={tmp_path}", f"train.lr_scheduler={kind}",
                                      "train.warmup_ratio=0.25", f"train.learning_rate={peak}",
                                      f"{command[0] == 'ppo' and 'ppo.num_updates' or 'grpo.num_steps'}={updates}"])
    assert result.exit_code == 0, result.output
    total = updates * steps_per_update
    warmup = math.ceil(0.25 * total)
    logged = [record["lr"] for record in metrics(tmp_path)]
    want = [expected_lr(peak, kind, warmup, total, steps_per_update * update) for update in range(1, updates + 1)]
    assert logged == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert logged[-1] == pytest.approx(0.0, abs=1e-12)  # decayed to zero by the last step


def test_a_resumed_run_continues_the_schedule_and_an_old_checkpoint_is_caught_up(tmp_path):
    args = [*GRPO, "grpo.num_steps=4", "train.save_every=2", "train.learning_rate=1e-3"]
    assert CliRunner().invoke(app, [*args, f"output_dir={tmp_path / 'full'}"]).exit_code == 0
    full = metrics(tmp_path / "full")
    for name, drop_state in (("resumed", False), ("old", True)):
        out = tmp_path / name
        shutil.copytree(tmp_path / "full", out)
        shutil.rmtree(out / "final")
        shutil.rmtree(out / "checkpoint-3", ignore_errors=True)
        state_file = out / "checkpoint-2" / "trainer_state.json"
        if drop_state:  # a checkpoint written before the schedule was honoured: no scheduler state
            state = json.loads(state_file.read_text())
            del state["scheduler"]
            state_file.write_text(json.dumps(state))
            manifest = json.loads((out / "checkpoint-2" / MANIFEST).read_text())
            manifest["files"]["trainer_state.json"] = sha256(state_file)  # the manifest vouches for the edit
            (out / "checkpoint-2" / MANIFEST).write_text(json.dumps(manifest))
        rl_command.run(load_recipe(out / "recipe.yaml", [f"output_dir={out}"]), resume="auto", command="grpo")
        assert [r["lr"] for r in metrics(out)] == [r["lr"] for r in full], name


def test_a_skipped_update_leaves_the_schedule_where_it_was():
    layer = torch.nn.Linear(2, 2)
    recipe = load_recipe(ROOT / "recipes/grpo-demo.yaml", ["train.learning_rate=1e-2", "train.lr_scheduler=linear"])
    optimizer = make_optimizer(list(layer.parameters()), recipe.train)
    scheduler = make_scheduler(optimizer, recipe.train, total_steps=10)
    snapshot = UpdateSnapshot(layer, optimizer, None, scheduler)
    for _ in range(3):
        layer(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(7e-3)
    snapshot.restore()
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-2) and scheduler.last_epoch == 0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
