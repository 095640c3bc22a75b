"""A reward function that records what it received and returned, for tests that compare it with samples.jsonl."""

from __future__ import annotations

CALLS: list[dict] = []


def record(prompts, completions, trainer_state, **kwargs) -> list[float]:
    """0.25 per word plus 0.01 per character: rewards that differ between completions. Appends
    {update, prompts, completions, rewards} to CALLS (trainer_state.global_step counts the updates done before)."""
    rewards = [0.25 * len(completion.split()) + 0.01 * len(completion) for completion in completions]
    CALLS.append({"update": trainer_state.global_step + 1, "prompts": list(prompts),
                  "completions": list(completions), "rewards": rewards})  # fmt: skip
    return rewards
