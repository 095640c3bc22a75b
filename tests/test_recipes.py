"""Every YAML shipped under recipes/ (subfolders included) is a valid recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_rl.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
# Templates name model directories users download: tests/test_templates.py validates them against tiny models.
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if not {"accelerate", "templates"} & set(p.parts))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipe_is_valid(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name their data relative to the repository root
    recipe = load_recipe(path)
    assert recipe.output_dir


def test_there_are_recipes():
    assert RECIPES
