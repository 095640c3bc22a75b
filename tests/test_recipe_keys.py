"""Every recipe key does what it says in each command, or that command refuses it with one line.

Each command runs on a tiny model with settings that reach its branches, while every read of a recipe field is
recorded, unless the reader is the recipe's own validation, printing or saving (those read every key). A key the
command declares it reads (recipe.key's `commands`) must have been read; a key it does not read must be refused
when set. A key accepted and ignored (train.lr_scheduler in ppo and grpo, once) fails here."""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lora_rl import recipe as recipe_module
from lora_rl.cli import app
from lora_rl.recipe import Recipe, RecipeError, commands_reading, describe_keys, load_recipe, unread_settings
from lora_rl.rl.setup import check_recipe

ROOT = Path(__file__).resolve().parent.parent
# Modules whose reads do not count: they read every key to check, print or save the recipe.
NOT_USE = {"lora_rl.recipe", "lora_rl.display", "dataclasses", "copy", "lora_rl.training.trackers"}
# Read only on a path a tiny CPU run cannot take (or takes in another test), with the reason.
NOT_REACHED = {
    "actor.model.trust_remote_code": "passed to from_pretrained; no tiny model ships code",
    "actor.model.allow_pickle_weights": "read when a model directory holds .bin weights (tests/test_model.py)",
    "actor.model.num_layers_unfrozen": "full fine-tuning only (tests/test_model.py)",
    "actor.model.init_lora_weights": "olora/pissa need their own tests (tests/test_model.py)",
    "train.mixed_precision": "read by accelerate's Accelerator; bf16 runs in tests/test_train_ppo.py",
    "train.report_to": "trackers: tests/test_trackers.py",
    "train.resume": "resuming: tests/test_resume.py",
    "train.max_bad_steps": "read when a step's loss is not finite: tests/test_train_reward.py",
    "reward.adapter": "a reward adapter: tests/test_train_ppo.py",
    "reward.model": "a reward model: tests/test_train_ppo.py",
    "reward.function": "the single-function form: tests/test_train_ppo.py",
    "ppo.reference": "initial_adapter reference: tests/test_train_ppo.py",
    "grpo.reference": "initial_adapter reference: tests/test_grpo.py",
    "output_dir": "null output_dir is resolved by the recipe loader",
}

REWARD_RUN = ["train-reward", str(ROOT / "recipes/reward-demo.yaml"), "train.max_steps=2", "train.batch_size=4",
              "data.eval_fraction=0.2", "train.eval_every=1", "train.log_every=1", "train.save_every=1",
              "train.save_total_limit=1", "train.center_rewards_coefficient=0.01", "data.drop_long=true",
              "train.warmup_ratio=0.5", "train.weight_decay=0.01", "train.gradient_checkpointing=true",
              "train.checkpoint_every_n_layers=2", "actor.model.use_rslora=true",
              "data.chat_template=true"]  # fmt: skip
# num_epochs counts only without max_steps: one epoch of a small train split
REWARD_EPOCH = ["train-reward", str(ROOT / "recipes/reward-demo.yaml"), "train.num_epochs=1", "train.batch_size=8",
                "data.eval_fraction=0.95"]  # fmt: skip
PPO_RUN = ["ppo", str(ROOT / "recipes/ppo-demo.yaml"), "ppo.num_updates=2", "ppo.rollout_batch_size=8",
           "train.batch_size=4", "generation.max_new_tokens=4", "ppo.adaptive_kl=true", "ppo.normalize_rewards=true",
           "ppo.reward_clip=2", "ppo.missing_eos_penalty=1", "critic.mode=adapter", "train.save_every=1",
           "train.save_total_limit=1", "train.samples_every=1", "train.num_samples=1", "ppo.max_update_kl=100",
           "generation.top_k=5", "generation.top_p=0.9", "generation.chat_template=true", "ppo.kl_estimator=k3",
           "train.gradient_accumulation_steps=2", "ppo.whiten_advantages=false", "ppo.disable_dropout=false",
           "train.max_grad_norm=0.5", "train.gradient_checkpointing=true",
           "train.checkpoint_every_n_layers=2", "data.eval_fraction=0.01", "train.eval_every=1", "eval.num_samples=2",
           "eval.batch_size=4", "eval.pass_threshold=0.5"]  # fmt: skip
GRPO_RUNS = [
    ["grpo", str(ROOT / "recipes/grpo-demo.yaml"), "grpo.num_steps=2", "grpo.prompts_per_step=2",
     "grpo.num_generations=4", "train.batch_size=4", "generation.max_new_tokens=4", "grpo.beta=0.04",
     "grpo.epsilon_high=0.3", "grpo.scale_rewards=batch", "grpo.num_iterations=2", "grpo.max_update_kl=100",
     "grpo.loss_type=dr_grpo", "grpo.disable_dropout=false",
     f"data.eval_path={ROOT / 'recipes/data/grpo-digits.jsonl'}", "eval.batch_size=64", "eval.pass_function=correct",
     "train.save_best=eval/reward/correct"],
    ["grpo", str(ROOT / "recipes/grpo-demo.yaml"), "grpo.num_steps=2", "grpo.prompts_per_step=2",
     "grpo.num_generations=4", "train.batch_size=4", "generation.max_new_tokens=4", "grpo.beta=0.04",
     "grpo.advantage=reinforce_pp", "train.gradient_checkpointing=true", "train.checkpoint_every_n_layers=2"],
]  # fmt: skip


def config_classes() -> dict[type, str]:
    """Each recipe dataclass and the dotted prefix of its keys ("" for Recipe)."""
    found = {Recipe: ""}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            inner = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)
            inner = hint if dataclasses.is_dataclass(hint) else inner
            if inner is None and typing.get_origin(hint) is not None:  # list[RewardFunctionConfig] | None
                inner = next((b for a in typing.get_args(hint) for b in typing.get_args(a)
                              if dataclasses.is_dataclass(b)), None)  # fmt: skip
            if inner is not None and inner not in found:
                found[inner] = f"{prefix}{f.name}."
                walk(inner, f"{prefix}{f.name}.")

    walk(Recipe, "")
    return found


def keys_read(monkeypatch, runs: list[list[str]], tmp_path: Path) -> set[str]:
    """The dotted keys the commands in `runs` read, outside NOT_USE."""
    classes = config_classes()
    read: set[str] = set()
    for cls, prefix in classes.items():
        names = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self, name, _names=names, _prefix=prefix):
            if name in _names and sys._getframe(1).f_globals.get("__name__") not in NOT_USE:
                read.add(f"{_prefix}{name}")
            return object.__getattribute__(self, name)

        monkeypatch.setattr(cls, "__getattribute__", getattribute)
    for number, args in enumerate(runs):
        result = CliRunner().invoke(app, [*args, f"output_dir={tmp_path / str(number)}"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
    monkeypatch.undo()
    # reward.functions' items are read as reward.functions.function / .weight
    return {"reward.functions" if k.startswith("reward.functions.") else k for k in read}


def keys_of(command: str) -> list[str]:
    return [key for key, _, _ in describe_keys() if command in commands_reading(key)]


@pytest.mark.parametrize(("command", "runs"), [("train-reward", [REWARD_RUN, REWARD_EPOCH]), ("ppo", [PPO_RUN]),
                                               ("grpo", GRPO_RUNS)])  # fmt: skip
def test_every_key_a_command_accepts_is_read_by_it(monkeypatch, tmp_path, command, runs):
    read = keys_read(monkeypatch, runs, tmp_path)
    unread = [key for key in keys_of(command) if key not in read and key not in NOT_REACHED]
    assert unread == [], f"{command} accepts these keys and never reads them: refuse them or use them"


@pytest.mark.parametrize("command", ["train-reward", "ppo", "grpo"])
def test_every_key_a_command_does_not_read_is_refused_with_one_line(command, tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text("seed: 42\n")  # every other key at its default
    refused = 0
    for key, _, _ in describe_keys():
        if command in commands_reading(key):
            continue
        problems = unread_settings(load_recipe(plain, [f"{key}={other_value(key, tmp_path)}"]), command)
        assert len(problems) == 1 and problems[0].startswith(f"{key}: set to ") and "\n" not in problems[0], key
        assert f"but {command} does not read it" in problems[0]
        refused += 1
    assert refused >= 8  # each command has keys it does not read


def other_value(key: str, tmp_path: Path) -> str:
    """A valid override value other than the key's default, from the field's type."""
    config = Recipe
    for part in key.split("."):
        f = next(f for f in dataclasses.fields(config) if f.name == part)
        hint = typing.get_type_hints(config)[part]
        config = hint if dataclasses.is_dataclass(hint) else config
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if key.startswith("reward."):  # a path or a function, as the loader checks them
        (tmp_path / "adapter").mkdir(exist_ok=True)
        (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
        return {"reward.functions": "[{function: tests.grpo_rewards:judge_half}]", "reward.model": "tiny-llama",
                "reward.adapter": str(tmp_path / "adapter")}.get(key, "tests.grpo_rewards:judge_half")
    literal = [a for a in typing.get_args(hint) if isinstance(a, str)]
    literal += [v for a in typing.get_args(hint) for v in typing.get_args(a) if isinstance(v, str)]
    if literal:
        return next(v for v in literal if v != default)
    if isinstance(default, bool):
        return str(not default).lower()
    if hint is str or str in typing.get_args(hint):  # a path the loader checks exists
        return str(ROOT / "recipes/data/reward-demo.jsonl")
    if isinstance(default, float):
        return str(default / 2 if default > 0 else 0.5)  # inside every float key's range
    return str((default or 0) + 1)


def test_the_refusal_reaches_the_user_as_one_line_per_key(tmp_path):
    result = CliRunner().invoke(app, ["grpo", str(ROOT / "recipes/grpo-demo.yaml"), "ppo.kl_coef=0.5",
                                      "train.log_every=5", f"output_dir={tmp_path}"])  # fmt: skip
    assert result.exit_code == 2
    assert "error: ppo.kl_coef: set to 0.5, but grpo does not read it (only ppo); remove it" in result.output
    line = "error: train.log_every: set to 5, but grpo does not read it (only train-reward); remove it"
    assert line in result.output
    with pytest.raises(RecipeError):
        check_recipe(load_recipe(ROOT / "recipes/ppo-demo.yaml", ["grpo.beta=0.1"]), "ppo")


def test_not_reached_names_only_real_keys():
    keys = {key for key, _, _ in describe_keys()}
    assert set(NOT_REACHED) <= keys
    assert recipe_module.COMMANDS == ("train-reward", "ppo", "grpo")
