"""Reward functions that depend on the process they run in, for multi-process tests
(`tests.process_rewards:nan`, ...)."""

import os


def nan(prompts: list[str], completions: list[str]) -> list[float]:
    return [float("nan")] * len(completions)


def nan_on_process_1(prompts: list[str], completions: list[str]) -> list[float]:
    """nan on the second of several processes only: all of them must still skip the update together."""
    return [float("nan") if os.environ.get("RANK") == "1" else 1.0] * len(completions)


def rank(prompts: list[str], completions: list[str]) -> list[float]:
    """The process's rank: each process's scores have std 0, the global batch's do not."""
    return [float(os.environ.get("RANK", 0))] * len(completions)


def none_on_process_1(prompts: list[str], completions: list[str]) -> list[float | None]:
    """None (not judged) on the second of several processes only: ppo needs every score, on every process."""
    return [None if os.environ.get("RANK") == "1" else 1.0] * len(completions)
