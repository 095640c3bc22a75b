"""`lora-rl validate`: every check a command makes before training, the resolved recipe and the LoRA
pre-flight table (the model is built, nothing is trained)."""

from __future__ import annotations

from pathlib import Path

from lora_rl import display
from lora_rl.commands import train_reward
from lora_rl.models.build import build
from lora_rl.recipe import Recipe
from lora_rl.rl import setup as rl_setup


def run(recipe: Recipe, purpose: str, recipe_dir: Path) -> None:
    """`purpose`: the command the recipe is for (train-reward, ppo, grpo): it decides the checks and the head."""
    display.print_recipe(recipe)
    if purpose == "train-reward":
        display.print_warnings(train_reward.check_inputs(recipe).warnings)
    else:
        recipe = rl_setup.check_inputs(recipe, recipe_dir, purpose).recipe
        display.print_warnings(rl_setup.chat_template_warnings(recipe))
    built = build(recipe, "reward" if purpose == "train-reward" else "causal-lm")
    display.print_model_report(built.report)
