"""The sync check's decision (rl.engine_sync): which policy an engine's log-probs match, on hand-made log-probs."""

from __future__ import annotations

import pytest
import torch

from lora_rl.rl.engine_sync import MIN_TOKENS, EngineOutOfSync, act_on, mean_distance, sync_verdict

SHAPE = (2, 32)  # 64 valid tokens, over MIN_TOKENS


def logprobs(seed: int, shape: tuple[int, int] = SHAPE) -> torch.Tensor:
    return -torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 4


def near(x: torch.Tensor, seed: int, scale: float) -> torch.Tensor:
    """x moved by Gaussian noise of standard deviation `scale` per token."""
    return x + torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * scale


BASE = logprobs(0)
CURRENT = near(BASE, 1, 0.3)  # a policy several updates from the base
PREVIOUS = near(CURRENT, 2, 0.1)  # the one before the last update
MASK = torch.ones(SHAPE, dtype=torch.bool)


def test_distances_are_mean_absolute_differences_over_valid_tokens():
    engine = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, 0.0, 0.0]])
    current = torch.tensor([[-1.5, -1.0, -3.0], [-0.25, 0.0, float("inf")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert mean_distance(engine, current, mask) == pytest.approx((0.5 + 1.0 + 0.25) / 3)
    verdict = sync_verdict(engine, current, current, mask, update=3)
    assert verdict.metrics() == {"engine/logprob_diff": pytest.approx(0.5833333), "engine/adapter_version": 3.0}
    assert verdict.tokens == 3


def test_an_engine_serving_the_current_policy_is_in_sync():
    engine = near(CURRENT, 3, 0.02)  # bf16-sized mismatch
    verdict = sync_verdict(engine, CURRENT, BASE, MASK, update=5, previous=PREVIOUS)
    assert verdict.matches == "current" and not verdict.stale
    assert verdict.distances["current"] < 0.03 < verdict.distances["previous adapter"] < verdict.distances["base"]
    assert act_on(verdict, "error") is None and act_on(verdict, "warn") is None


def test_an_engine_still_on_the_base_stops_the_run_naming_the_update():
    engine = near(BASE, 3, 0.02)
    verdict = sync_verdict(engine, CURRENT, BASE, MASK, update=5, previous=PREVIOUS)
    assert verdict.matches == "base" and verdict.stale
    with pytest.raises(EngineOutOfSync) as raised:
        act_on(verdict, "error")
    message = str(raised.value)
    assert message.startswith("update 5: the inference engine is sampling with the base (adapters off), not the "
                              "current policy: its log-probs of 64 sampled tokens are ")  # fmt: skip
    assert message.endswith("the adapter did not reach the engine; stopping (generation.sync_check: warn only warns)")
    assert "\n" not in message


def test_warn_returns_the_same_line_without_stopping():
    verdict = sync_verdict(near(BASE, 3, 0.02), CURRENT, BASE, MASK, update=5)
    line = act_on(verdict, "warn")
    assert line.startswith("update 5: the inference engine is sampling with the base (adapters off)")
    assert "stopping" not in line
    assert f"{verdict.distances['base']:.3g} from it and {verdict.distances['current']:.3g} from the policy's" in line


def test_an_engine_one_adapter_behind_is_named():
    verdict = sync_verdict(near(PREVIOUS, 3, 0.01), CURRENT, BASE, MASK, update=7, previous=PREVIOUS)
    assert verdict.matches == "previous adapter"
    with pytest.raises(EngineOutOfSync, match=r"^update 7: the inference engine is sampling with the adapter of "
                                              r"update 6, not the current policy"):  # fmt: skip
        act_on(verdict, "error")


def test_update_zero_is_never_stale():
    """Before the first optimizer step the engine holds the adapter it started with, whatever it is."""
    verdict = sync_verdict(BASE.clone(), CURRENT, BASE, MASK, update=0)
    assert verdict.matches == "undecided" and not verdict.stale
    assert verdict.distances["current"] == pytest.approx(mean_distance(BASE, CURRENT, MASK))


def test_a_policy_still_indistinguishable_from_the_base_decides_nothing():
    """After a tiny update the current policy is within the engine's own mismatch of the base: being nearer the base
    means nothing then, and the check must not fire."""
    current = near(BASE, 4, 1e-4)
    engine = near(BASE, 3, 0.02)
    verdict = sync_verdict(engine, current, BASE, MASK, update=1)
    assert verdict.distances["base"] < verdict.distances["current"]  # nearer the base, by noise
    assert verdict.matches == "undecided" and act_on(verdict, "error") is None


def test_identical_policy_and_base_decide_nothing_even_for_an_exact_engine():
    verdict = sync_verdict(BASE.clone(), BASE.clone(), BASE, MASK, update=2)
    assert verdict.matches == "undecided" and verdict.distances == {"current": 0.0, "base": 0.0}


def test_too_few_tokens_decide_nothing():
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[0, : MIN_TOKENS - 1] = True
    verdict = sync_verdict(near(BASE, 3, 0.02), CURRENT, BASE, mask, update=5)
    assert verdict.tokens == MIN_TOKENS - 1 and verdict.matches == "undecided"
    mask[0, MIN_TOKENS - 1] = True
    assert sync_verdict(near(BASE, 3, 0.02), CURRENT, BASE, mask, update=5).matches == "base"


@pytest.mark.parametrize("separation", [1.0, 2.0, 4.0, 8.0])
def test_seeded_draws_never_call_a_serving_engine_stale(separation):
    """The margin's claim, re-drawn: an engine with mismatch eps serving the current policy is never called stale
    over 32 tokens, whatever the policy's distance from the base; a stale one is caught from 4 eps."""
    eps, false_alarms, caught = 0.02, 0, 0
    for seed in range(200):
        base = logprobs(seed, (1, 32))
        current = near(base, seed + 10_000, eps * separation * 1.25)  # mean |N(0, s)| = 0.8 s
        in_sync = sync_verdict(near(current, seed + 20_000, eps * 1.25), current, base, MASK[:1], update=3)
        stale = sync_verdict(near(base, seed + 30_000, eps * 1.25), current, base, MASK[:1], update=3)
        false_alarms += in_sync.stale
        caught += stale.stale
    assert false_alarms == 0
    if separation >= 4:
        assert caught == 200
