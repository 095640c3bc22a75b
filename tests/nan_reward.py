"""A reward function that returns nan, for the non-finite guard test (`tests.nan_reward:nan`)."""


def nan(prompts: list[str], completions: list[str]) -> list[float]:
    return [float("nan")] * len(completions)
