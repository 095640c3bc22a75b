"""Shared fixtures: built-in tiny models materialised once per test session, in a temp home."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import yaml

# Set before lora_rl is imported anywhere: every test reads and writes tiny models here, never in ~.
os.environ["LORA_RL_HOME"] = tempfile.mkdtemp(prefix="lora-rl-tests-")

from lora_rl import tiny  # noqa: E402


@pytest.fixture(scope="session")
def llama_dir() -> Path:
    return tiny.materialize("tiny-llama")


@pytest.fixture(scope="session")
def gpt2_dir() -> Path:
    return tiny.materialize("tiny-gpt2")


@pytest.fixture
def write_recipe(tmp_path: Path):
    """write_recipe({...}) -> path of a YAML recipe with those contents (output under tmp_path)."""

    def write(data: dict, name: str = "recipe.yaml") -> Path:
        data = {"output_dir": str(tmp_path / "out"), **data}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    return write
