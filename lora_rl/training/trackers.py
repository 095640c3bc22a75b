"""Experiment trackers (train.report_to) through accelerate: checked before loading, one run per training run."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from lora_rl.recipe import Recipe, RecipeError


def check_trackers(recipe: Recipe) -> None:
    """Every tracker in train.report_to is installed (accelerate would fail only once the model is loaded)."""
    missing = [name for name in recipe.train.report_to if importlib.util.find_spec(name) is None]
    if missing:
        raise RecipeError([f"train.report_to: {name} is not installed; pip install {name}" for name in missing])


def tracker_options(recipe: Recipe) -> dict[str, Any]:
    """Accelerator keywords for train.report_to: the trackers, logging under output_dir."""
    if not recipe.train.report_to:
        return {}
    return {"log_with": list(recipe.train.report_to), "project_dir": recipe.output_dir}


def start_trackers(accelerator, recipe: Recipe) -> None:
    """One tracker run per training run (named after output_dir) with the resolved recipe as its flat config:
    TensorBoard's hyper-parameters take only scalars, so lists and nulls go as text."""
    flat = {}

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for name, inner in value.items():
                flatten(f"{prefix}{name}.", inner)
        else:
            flat[prefix[:-1]] = value if isinstance(value, int | float | str | bool) else str(value)

    flatten("", recipe.to_dict())
    # accelerate's W&B tracker ignores project_dir: without `dir` its files land in the working directory
    wandb = {"name": Path(recipe.output_dir).name, "dir": str(recipe.output_dir)}
    accelerator.init_trackers("lora-rl", config=flat, init_kwargs={"wandb": wandb})
