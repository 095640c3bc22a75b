"""Reward functions for the grpo tests, written as TRL's GRPOTrainer documentation writes them."""


def answer_matches_prompt(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 for every row whose `answer` column is the last word of its own prompt: the column must arrive aligned
    with the G completions of each prompt, or this raises (and the run fails)."""
    for prompt, expected in zip(prompts, answer, strict=True):
        if prompt.split()[-1] != expected:
            raise AssertionError(f"answer {expected!r} arrived with prompt {prompt!r}")
    return [1.0 if completion.strip() else 0.0 for completion in completions]


def judge_half(completions, **kwargs) -> list[float | None]:
    """Judges only even rows (None for the others), as a function specialised to some rows does."""
    return [float(len(c.split())) if i % 2 == 0 else None for i, c in enumerate(completions)]


def assistant_messages(prompts, completions, **kwargs) -> list[float]:
    """Chat data: prompts arrive as message lists and completions as one assistant message each, or this raises."""
    for prompt, completion in zip(prompts, completions, strict=True):
        if not (isinstance(prompt, list) and prompt[-1]["role"] == "user"):
            raise AssertionError(f"prompt {prompt!r} is not a list of messages")
        if not (len(completion) == 1 and completion[0]["role"] == "assistant"):
            raise AssertionError(f"completion {completion!r} is not one assistant message")
    return [float(len(completion[0]["content"].split())) for completion in completions]


def judge_none(completions, **kwargs) -> list[None]:
    """Judges no row: a batch nobody judged has nothing to learn from."""
    return [None] * len(completions)


def exits(completions, **kwargs) -> list[float]:
    """Ends the process, as user code sometimes does on a condition it cannot handle."""
    import sys

    sys.exit(3)


def huge(completions, **kwargs) -> list[float]:
    """Finite in float32, one at a time; a group's sum is inf."""
    return [3e38] * len(completions)
