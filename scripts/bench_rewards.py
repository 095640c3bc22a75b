"""The benchmarks' reward, the same as ../shared/bench/trl_grpo_baseline.py's (`bench_rewards:even_words`)."""


def even_words(prompts, completions, **kwargs) -> list[float]:
    """Share of completion words w<N> with N even: a reward any policy can move."""
    out = []
    for text in completions:
        words = [w for w in text.split() if w[1:].isdigit()]
        out.append(sum(int(w[1:]) % 2 == 0 for w in words) / max(len(words), 1))
    return out
