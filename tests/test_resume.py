"""Resume: a resumed run equals the uninterrupted one (CPU: exactly); Ctrl-C and kills lose nothing saved."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_rl.commands import train_reward
from lora_rl.recipe import RecipeError, load_recipe
from lora_rl.training.checkpoint import verify
from lora_rl.training.lock import LOCK
from lora_rl.training.resume import checkpoints

ROOT = Path(__file__).resolve().parent.parent
TIMING = {"pairs_per_s", "time_generate", "time_score", "time_train"}


def reward_recipe(write_recipe, tmp_path, **train) -> Path:
    rows = (ROOT / "recipes/data/reward-demo.jsonl").read_text().splitlines()[:100]
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    return write_recipe({
        "actor": {"model": {"lora_rank": 4, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.1}},
        "data": {"train_path": str(tmp_path / "pairs.jsonl"), "eval_fraction": 0.2, "max_length": 32},
        "train": {"batch_size": 8, "gradient_accumulation_steps": 2, "num_epochs": 3, "learning_rate": 5e-3,
                  "log_every": 2, "eval_every": 3, "save_every": 3, **train},
    })  # fmt: skip


def without_timing(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in path.read_text().splitlines()]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resumed_reward_run_equals_uninterrupted(write_recipe, tmp_path):
    # 80 train pairs / 8 = 10 micro-batches = 5 steps an epoch; 3 epochs = 15 steps; dropout makes RNG matter
    recipe = load_recipe(reward_recipe(write_recipe, tmp_path))
    full = train_reward.run(recipe)
    out = Path(recipe.output_dir)
    assert [p.name for p in checkpoints(out)] == ["checkpoint-3", "checkpoint-6", "checkpoint-9", "checkpoint-12"]

    # the run as a crash after step 6 leaves it: later checkpoints and metrics lines gone or stale
    crashed = tmp_path / "crashed"
    shutil.copytree(out, crashed)
    for name in ("checkpoint-9", "checkpoint-12", "final"):
        shutil.rmtree(crashed / name)
    resumed = train_reward.run(load_recipe(crashed / "recipe.yaml", [f"output_dir={crashed}"]), resume="auto")
    assert same_weights(full, resumed)
    assert without_timing(crashed / "metrics.jsonl") == without_timing(out / "metrics.jsonl")


def test_resume_refuses_changed_settings_unless_allowed(write_recipe, tmp_path):
    path = reward_recipe(write_recipe, tmp_path, num_epochs=1)
    train_reward.run(load_recipe(path))
    changed = load_recipe(path, ["seed=7", "train.learning_rate=1e-3"])
    with pytest.raises(RecipeError, match=r"seed: 42 -> 7; train.learning_rate: 0.005 -> 0.001.*--allow-changes"):
        train_reward.run(changed, resume="auto")
    assert verify(train_reward.run(changed, resume="auto", allow_changes=True))
    # the held-out share decides which rows train: another one would continue on other data
    other_split = load_recipe(path, ["seed=7", "train.learning_rate=1e-3", "data.eval_fraction=0.5"])
    with pytest.raises(RecipeError, match=r"data.eval_fraction: 0.2 -> 0.5"):
        train_reward.run(other_split, resume="auto")


def test_rotation_keeps_newest_checkpoints(write_recipe, tmp_path):
    recipe = load_recipe(reward_recipe(write_recipe, tmp_path, save_every=1, save_total_limit=2, num_epochs=1))
    train_reward.run(recipe)
    assert [p.name for p in checkpoints(Path(recipe.output_dir))] == ["checkpoint-3", "checkpoint-4"]


def launch(recipe: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lora_rl", "train-reward", str(recipe), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **(env or {})})  # fmt: skip


def test_ctrl_c_saves_at_a_step_boundary_and_resumes_to_the_same_result(write_recipe, tmp_path):
    path = reward_recipe(write_recipe, tmp_path, num_epochs=40, save_every=0, eval_every=0)
    recipe = load_recipe(path)
    metrics = Path(recipe.output_dir) / "metrics.jsonl"
    process = launch(path)
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    (saved,) = checkpoints(Path(recipe.output_dir))
    step = int(saved.name.split("-")[1])
    assert f"interrupted at step {step}; saved {saved}; continue with --resume {saved}" in " ".join(stderr.split())
    assert verify(saved)["step"] == step and not (Path(recipe.output_dir) / "final").exists()
    assert not (Path(recipe.output_dir) / LOCK).exists()  # released on Ctrl-C

    resumed = train_reward.run(recipe, resume=str(saved))
    uninterrupted = train_reward.run(load_recipe(path, [f"output_dir={tmp_path / 'straight'}"]))
    assert same_weights(resumed, uninterrupted)


KILL_DURING_SAVE = """
import os, signal, sys
from lora_rl import cli
from lora_rl.training import checkpoint
write = checkpoint._write_manifest
def killed_at_step_4(directory, step, extra):
    if step == 4:  # every file of checkpoint-4 is in its temporary directory: die before it is complete
        os.kill(os.getpid(), signal.SIGKILL)
    write(directory, step, extra)
checkpoint._write_manifest = killed_at_step_4
sys.argv = ["lora-rl", "train-reward", sys.argv[1]]
cli.app()
"""


def test_kill_during_checkpoint_write_leaves_previous_checkpoint_loadable(write_recipe, tmp_path):
    path = reward_recipe(write_recipe, tmp_path, save_every=2, num_epochs=1)
    recipe = load_recipe(path)
    result = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(path)], cwd=ROOT, capture_output=True)
    assert result.returncode == -signal.SIGKILL
    out = Path(recipe.output_dir)
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2"] and not (out / "checkpoint-4").exists()
    assert verify(out / "checkpoint-2")["step"] == 2
    final = train_reward.run(recipe, resume="auto")  # and the run continues from it
    assert verify(final)["step"] == 5
    assert not list(out.glob(".checkpoint-4.tmp-*")), "the dead save's temporary directory was not cleaned up"


def test_resumed_ppo_run_equals_uninterrupted(tmp_path):
    from lora_rl.commands import rl as rl_command

    overrides = [f"output_dir={tmp_path / 'full'}", f"data.train_path={ROOT / 'recipes/data/prompts-demo.jsonl'}",
                 "ppo.num_updates=6", "train.save_every=3", "critic.mode=adapter", "ppo.adaptive_kl=true",
                 "ppo.target_kl=0.1", "ppo.kl_horizon=100", "ppo.normalize_rewards=true", "ppo.rollout_batch_size=16",
                 "train.batch_size=8", "train.samples_every=2", "train.num_samples=2"]  # fmt: skip
    recipe = load_recipe(ROOT / "recipes/ppo-demo.yaml", overrides)
    full = rl_command.run(recipe)
    crashed = tmp_path / "crashed"
    shutil.copytree(full.parent, crashed)
    shutil.rmtree(crashed / "final")
    resumed = rl_command.run(load_recipe(crashed / "recipe.yaml", [f"output_dir={crashed}"]), resume="auto")
    assert same_weights(full, resumed)
    assert same_weights(full / "critic", resumed / "critic")
    assert torch.equal(load_file(full / "value_head.safetensors")["weight"],
                       load_file(resumed / "value_head.safetensors")["weight"])  # fmt: skip
    lines = without_timing(crashed / "metrics.jsonl")
    assert lines == without_timing(full.parent / "metrics.jsonl") and len(lines) == 6
    assert lines[0]["kl_coef"] != lines[-1]["kl_coef"]  # the adaptive coefficient moved: its state mattered
    # samples of updates 4 and 6, past checkpoint-3, were dropped and written again: none twice, none stale
    samples = (crashed / "samples.jsonl").read_text()
    assert [json.loads(line)["update"] for line in samples.splitlines()] == [1, 1, 2, 2, 4, 4, 6, 6]
    assert samples == (full.parent / "samples.jsonl").read_text()
