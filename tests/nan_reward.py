"""Reward functions that return nan, for the non-finite guard tests (`tests.nan_reward:nan`)."""

import os


def nan(prompts: list[str], completions: list[str]) -> list[float]:
    return [float("nan")] * len(completions)


def nan_on_process_1(prompts: list[str], completions: list[str]) -> list[float]:
    """nan on the second of several processes only: all of them must still skip the update together."""
    return [float("nan") if os.environ.get("RANK") == "1" else 1.0] * len(completions)
