"""Shared fixtures: built-in models materialised once per test session, in a temp home."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import yaml

# Set before lora_rl is imported anywhere: every test reads and writes built-in models here, never in ~.
os.environ["LORA_RL_HOME"] = tempfile.mkdtemp(prefix="lora-rl-tests-")

from lora_rl import builtin  # noqa: E402


@pytest.fixture(scope="session")
def llama_dir() -> Path:
    return builtin.materialize("tiny-llama")


@pytest.fixture(scope="session")
def gpt2_dir() -> Path:
    return builtin.materialize("tiny-gpt2")


@pytest.fixture
def write_recipe(tmp_path: Path):
    """write_recipe({...}) -> path of a YAML recipe with those contents (output under tmp_path)."""

    def write(data: dict, name: str = "recipe.yaml") -> Path:
        data = {"output_dir": str(tmp_path / "out"), **data}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    return write


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real built-in model, converted once per session (about a minute on CPU)."""
    return builtin.materialize("smollm2-135m-instruct")
