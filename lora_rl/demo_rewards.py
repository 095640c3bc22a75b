"""Rule-based rewards for the demos: `praise` (ppo), `correct` and `one_word` (grpo) on the built-in tiny models;
`sentiment` (ppo) and `capital` (grpo) for the real-model recipes in recipes/smollm2/.

A reward function receives the prompts and the completions (texts, after the first EOS is cut; messages for
chat prompts), and, if it asks for them by name, the data's other columns (see lora_rl/rewards.py); it returns
one float per completion.
"""

from __future__ import annotations

import math

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


# The grpo demo (recipes/data/grpo-demo.jsonl, scripts/make_grpo_demo_data.py): "say the word X" -> X. Written in
# TRL's GRPOTrainer style (columns by name, **kwargs for the rest), so they also show that style works here.


def correct(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 when the completion's first word is the row's `answer`, 0.5 when the answer comes later, else 0.0.

    The half credit gives a random model a signal it can find (the answer somewhere in a few sampled words is
    several times likelier than in first place); one_word then pays for dropping the rest.
    """
    scores = []
    for completion, expected in zip(completions, answer, strict=True):
        words = _words(completion)
        scores.append(1.0 if words[:1] == [expected] else 0.5 if expected in words else 0.0)
    return scores


def one_word(completions: list, **kwargs) -> list[float]:
    """1.0 when the completion is a single word (the answer and then EOS), else 0.0: a small format reward."""
    return [float(len(_words(completion)) == 1) for completion in completions]


def _words(completion: str | list[dict]) -> list[str]:
    text = completion if isinstance(completion, str) else completion[-1]["content"]
    return text.lower().split()


# The real-model recipes (recipes/smollm2/, data from scripts/make_smollm2_data.py).

_analyzer = None


def sentiment(completions: list[str], **kwargs) -> list[float]:
    """VADER's compound sentiment of each completion, in [-1, 1] (trlx's ppo_sentiments task scores with a
    DistilBERT IMDB classifier from a model hub; VADER is a lexicon and rules, shipped in its wheel: nothing is
    downloaded, and scoring takes microseconds on a CPU)."""
    global _analyzer
    if _analyzer is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise ImportError('the sentiment reward needs vaderSentiment: pip install "lora-rl[demo]"') from None
        _analyzer = SentimentIntensityAnalyzer()
    return [_analyzer.polarity_scores(text)["compound"] for text in completions]


def capital(completions: list, answer: list[str], **kwargs) -> list[float]:
    """sqrt(words of the city / words of the reply) when the reply names the capital, else 0.0: 1.0 for the city
    and nothing else (as the question asks), 0.41 for "The capital of Japan is Tokyo.", less the longer it goes
    on. A flat half credit for any reply naming the city paid as much for rambling on to max_new_tokens."""
    scores = []
    for completion, city in zip(completions, answer, strict=True):
        text = (completion if isinstance(completion, str) else completion[-1]["content"]).lower()
        words = max(len(text.split()), 1)
        scores.append(math.sqrt(min(len(city.split()) / words, 1.0)) if city.lower() in text else 0.0)
    return scores
