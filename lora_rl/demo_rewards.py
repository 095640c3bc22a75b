"""Rule-based rewards for the demos (`reward.function: lora_rl.demo_rewards:praise`).

A reward function receives the prompts and the completions (texts, after the first EOS is cut) and
returns one float per completion.
"""

from __future__ import annotations

PRAISE = frozenset("good great excellent wonderful nice happy glad love fine best better".split())
COMPLAINT = frozenset("bad awful terrible poor sad hate worse worst wrong ugly".split())


def praise(prompts: list[str], completions: list[str]) -> list[float]:
    """(praise words - complaint words) / 10 per completion, clipped to [-1, 1].

    A count, not a share: a share would pay "good ." as much as a sentence of praise, and PPO would
    learn to stop after one word.
    """
    scores = []
    for text in completions:
        words = text.lower().split()
        hits = sum(w in PRAISE for w in words) - sum(w in COMPLAINT for w in words)
        scores.append(max(-1.0, min(1.0, hits / 10)))
    return scores
