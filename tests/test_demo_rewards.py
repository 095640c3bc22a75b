"""The real-model recipes' rewards (lora_rl/demo_rewards.py), against hand-computed values."""

from __future__ import annotations

import math

import pytest

from lora_rl.demo_rewards import capital, sentiment


def test_capital_pays_the_bare_city_most_and_less_the_longer_the_reply():
    replies = ["Tokyo", "Tokyo.", "The capital of Japan is Tokyo.", "Mexico City", "The capital is Mexico City",
               "Kyoto", "tokyo"]  # fmt: skip
    answers = ["Tokyo", "Tokyo", "Tokyo", "Mexico City", "Mexico City", "Tokyo", "Tokyo"]
    expected = [1.0, 1.0, math.sqrt(1 / 6), 1.0, math.sqrt(2 / 5), 0.0, 1.0]
    assert capital(replies, answers) == pytest.approx(expected)
    chat = [[{"role": "assistant", "content": "Paris"}]]  # chat prompts: completions are assistant messages
    assert capital(chat, ["Paris"]) == [1.0]


def test_sentiment_is_vader_compound_in_minus_one_one():
    scores = sentiment(["This movie was wonderful, I loved it.", "A dull, awful mess.", "The film is 90 minutes."])
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0.0
    assert all(-1 <= s <= 1 for s in scores)
