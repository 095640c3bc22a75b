"""A KL estimate used as a reward (REINFORCE++'s per-token penalty, PPO's KL-shaped rewards): which estimator's
score-function gradient is the gradient of -KL(policy || reference)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lora_rl.recipe import GenerationConfig, GRPOConfig
from lora_rl.rl.advantages import reinforce_pp_returns
from lora_rl.rl.objectives import GRPOObjective
from lora_rl.rl.ppo import kl_per_token
from lora_rl.rl.rollout import Rollout

LOGITS = torch.tensor([0.3, -1.2, 2.0, 0.5, -0.4], dtype=torch.float64)
REF_LOGITS = torch.tensor([1.0, 0.2, 0.1, -0.8, 0.6], dtype=torch.float64)


def expected_reward_gradient(estimator: str) -> torch.Tensor:
    """E_{a ~ pi}[grad log pi(a) * r(a)] with r(a) = -kl_estimator(a), exactly: every action enumerated. The reward
    is a constant of the update (as REINFORCE++ and PPO treat it): only log pi carries the gradient."""
    theta = LOGITS.clone().requires_grad_()
    logp, ref_logp = theta.log_softmax(-1), REF_LOGITS.log_softmax(-1)
    reward = -kl_per_token(logp.detach(), ref_logp, estimator)  # one "sampled token" per action
    (logp.exp().detach() * logp * reward).sum().backward()
    return theta.grad


def kl_gradient() -> torch.Tensor:
    """grad of -KL(pi || ref) = -sum_a pi(a) (log pi(a) - log ref(a)), by autograd."""
    theta = LOGITS.clone().requires_grad_()
    logp, ref_logp = theta.log_softmax(-1), REF_LOGITS.log_softmax(-1)
    (-(logp.exp() * (logp - ref_logp)).sum()).backward()
    return theta.grad


def test_k1_as_a_reward_gives_the_exact_kl_gradient_and_k3_does_not():
    exact = kl_gradient()
    assert exact.abs().max() > 0.1
    torch.testing.assert_close(expected_reward_gradient("k1"), exact, rtol=0, atol=1e-6)
    # k3 = r - 1 - log r (r = ref / pi) adds E[grad log pi * (ref / pi)] = grad sum_a ref(a) log pi(a) = ref - pi
    k3 = expected_reward_gradient("k3")
    assert (k3 - exact).abs().max() > 0.05
    torch.testing.assert_close(k3 - exact, -(REF_LOGITS.softmax(-1) - LOGITS.softmax(-1)), rtol=0, atol=1e-9)


def rollout(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor) -> Rollout:
    rows, width = logprobs.shape
    return Rollout(
        input_ids=torch.zeros(rows, width + 1, dtype=torch.long), attention_mask=torch.ones(rows, width + 1),
        mask=mask, prompt_width=1, has_eos=mask.all(1), logprobs=logprobs, ref_logprobs=ref_logprobs,
        values=torch.zeros(rows, width), scores=scores, judged=torch.ones(rows, dtype=torch.bool), reward_parts={},
    )  # fmt: skip


class OneProcess:
    num_processes, process_index = 1, 0

    def reduce(self, tensor, reduction="sum"):
        return tensor.clone()

    def gather(self, tensor):
        return tensor


@pytest.mark.parametrize("beta", [0.3, 0.0])
def test_reinforce_pp_rewards_carry_k1(beta):
    """The objective's REINFORCE++ returns are those of the per-token penalty beta * (logp - ref_logp)."""
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(4, 5, generator=generator) * 3
    ref_logprobs = logprobs + torch.randn(4, 5, generator=generator)  # far from the policy: k1 and k3 differ a lot
    mask = torch.arange(5) < torch.tensor([5, 3, 4, 1])[:, None]
    scores = torch.tensor([1.0, -0.5, 0.2, 2.0])
    recipe = SimpleNamespace(
        grpo=GRPOConfig(advantage="reinforce_pp", beta=beta, num_generations=2), generation=GenerationConfig()
    )
    found = GRPOObjective(recipe).advantages(OneProcess(), rollout(logprobs, ref_logprobs, mask, scores))
    k1, k3 = (kl_per_token(logprobs, ref_logprobs, name) for name in ("k1", "k3"))
    torch.testing.assert_close(found.advantages, reinforce_pp_returns(scores, k1, mask, beta), rtol=0, atol=1e-6)
    if beta:
        assert not torch.allclose(found.advantages, reinforce_pp_returns(scores, k3, mask, beta), atol=1e-2)
        # the logged "kl" stays TRL's: the mean per-token k3, >= 0
        assert found.kl is not None and torch.equal(found.kl, k3)
