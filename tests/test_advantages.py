"""Critic-free estimators and GRPO's loss against plain-Python loops (expectations never come from lora_rl)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from lora_rl.rl.advantages import (
    clipped_policy_loss,
    grpo_advantages,
    reinforce_pp_returns,
    rloo_advantages,
    zero_std_groups,
)

G = 4
# three prompts, prompt-major; the second group's rewards are all equal (0.1 is not exact in binary)
REWARDS = [1.0, 0.0, 0.5, 2.0, 0.1, 0.1, 0.1, 0.1, -1.0, 3.0, 0.0, 0.0]


def groups(values: list[float], size: int = G) -> list[list[float]]:
    return [values[i : i + size] for i in range(0, len(values), size)]


def loop_grpo(rewards: list[float], scale: str) -> list[float]:
    """TRL 1.16: (r - group mean) / (std + 1e-4), std unbiased, of the group or the whole batch; none: no division."""
    out = []
    for group in groups(rewards):
        mean = sum(group) / len(group)
        std = statistics.stdev(group) if scale == "group" else statistics.stdev(rewards)
        for r in group:
            out.append(0.0 if len(set(group)) == 1 else (r - mean) / (std + 1e-4) if scale != "none" else r - mean)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_match_the_loop(scale):
    got = grpo_advantages(torch.tensor(REWARDS), G, scale)
    assert got.tolist() == pytest.approx(loop_grpo(REWARDS, scale), rel=1e-5, abs=1e-6)
    assert got[4:8].tolist() == [0.0] * 4  # equal rewards: exactly 0, not (0.1 - mean(0.1...)) / 1e-4


def test_grpo_group_scale_hand_computed():
    # group [0, 1]: mean 0.5, unbiased std sqrt(0.5) -> +-0.5 / (0.70711 + 1e-4)
    got = grpo_advantages(torch.tensor([0.0, 1.0]), 2, "group")
    expected = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert got.tolist() == pytest.approx([-expected, expected], rel=1e-6)


def test_unjudged_rows_leave_the_statistics_and_get_zero():
    rewards = torch.tensor([1.0, float("nan"), 3.0, 0.0, 5.0, float("inf"), 2.0, 2.0])
    judged = torch.tensor([True, False, True, True, True, False, True, False])
    # group 1 judged: [1, 3, 0]; group 2 judged: [5, 2]
    expected = []
    for values, flags in zip(groups(rewards.tolist()), groups(judged.tolist()), strict=True):
        kept = [v for v, f in zip(values, flags, strict=True) if f]
        mean, std = sum(kept) / len(kept), statistics.stdev(kept)
        expected += [(v - mean) / (std + 1e-4) if f else 0.0 for v, f in zip(values, flags, strict=True)]
    got = grpo_advantages(rewards, G, "group", judged)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    rloo = rloo_advantages(rewards, G, judged)
    assert torch.isfinite(rloo).all() and rloo[[1, 5, 7]].tolist() == [0.0, 0.0, 0.0]
    assert rloo[0].item() == pytest.approx(1.0 - (3.0 + 0.0) / 2)  # baseline: judged siblings only


def test_a_row_without_judged_siblings_gets_zero():
    judged = torch.tensor([True, False, False, False])
    assert grpo_advantages(torch.tensor([7.0, 1.0, 2.0, 3.0]), G, "none", judged).tolist() == [0.0] * 4
    assert rloo_advantages(torch.tensor([7.0, 1.0, 2.0, 3.0]), G, judged).tolist() == [0.0] * 4
    assert zero_std_groups(torch.tensor([7.0, 1.0, 2.0, 3.0]), G, judged).tolist() == [True]


def test_rloo_matches_the_loop():
    expected = []
    for group in groups(REWARDS):
        for i, r in enumerate(group):
            others = group[:i] + group[i + 1 :]
            expected.append(r - sum(others) / len(others))
    got = rloo_advantages(torch.tensor(REWARDS), G)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert got[4:8].tolist() == [0.0] * 4


def test_zero_std_groups_counts_equal_groups():
    assert zero_std_groups(torch.tensor(REWARDS), G).tolist() == [False, True, False]
    assert zero_std_groups(torch.tensor([1.0, 1.0, 1.0, 1.0 + 1e-6]), 2).tolist() == [True, False]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_eight_equal_rewards_give_exactly_zero(scale):
    # float32: the sum of eight 0.7 divided by 8 is 0.7 + 6e-8, which TRL divides by 0 + 1e-4
    rewards = torch.tensor([0.7] * 8 + [0.0] * 7 + [1.0])
    assert grpo_advantages(rewards, 8, scale)[:8].tolist() == [0.0] * 8
    assert rloo_advantages(rewards, 8)[:8].tolist() == [0.0] * 8


def test_groups_must_divide_the_batch():
    with pytest.raises(ValueError, match="groups of 4"):
        grpo_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="unknown reward scale"):
        grpo_advantages(torch.zeros(4), 2, "rank")


# ---- REINFORCE++ ---------------------------------------------------------------------------------------------


def loop_reinforce_pp(scores, kl, lengths, kl_coef, gamma):
    """verl: r_t = -kl_coef * kl_t (+ score at the last valid token), return-to-go, whitened over valid tokens with
    the unbiased variance, (R - mean) / sqrt(var + 1e-8); 0 past each row's end."""
    returns = []
    for score, row, n in zip(scores, kl, lengths, strict=True):
        rewards = [-kl_coef * row[t] + (score if t == n - 1 else 0.0) for t in range(n)]
        running, out = 0.0, [0.0] * n
        for t in reversed(range(n)):
            running = rewards[t] + gamma * running
            out[t] = running
        returns.append(out)
    flat = [v for row in returns for v in row]
    mean, var = sum(flat) / len(flat), statistics.variance(flat)
    width = len(kl[0])
    return [[(v - mean) / math.sqrt(var + 1e-8) for v in row] + [0.0] * (width - len(row)) for row in returns]


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_the_loop(gamma):
    scores = [1.0, -0.5, 2.0]
    kl = [[0.1, 0.2, 0.3, 0.4], [0.5, -0.1, 0.0, 0.0], [0.05, 0.05, 0.2, 0.0]]
    lengths = [4, 2, 3]
    mask = torch.tensor([[t < n for t in range(4)] for n in lengths])
    kl_tensor = torch.tensor(kl)
    kl_tensor[~mask] = float("nan")  # garbage past each row's end
    got = reinforce_pp_returns(torch.tensor(scores), kl_tensor, mask, kl_coef=0.05, gamma=gamma)
    assert got.tolist() == [pytest.approx(row, abs=1e-5) for row in loop_reinforce_pp(scores, kl, lengths, 0.05, gamma)]
    assert got[1, 2:].tolist() == [0.0, 0.0]


# ---- clipped_policy_loss -------------------------------------------------------------------------------------

LOGP = [[-1.0, -2.0, -0.5, -1.5], [-0.3, -0.7, -2.2, -0.1], [-1.1, -0.9, -1.3, -0.4]]
OLD = [[-1.2, -1.8, -0.5, -1.0], [-0.3, -1.0, -2.0, -0.1], [-0.9, -0.9, -1.6, -0.4]]
REF = [[-1.0, -1.5, -0.7, -1.4], [-0.5, -0.6, -2.2, -0.3], [-1.0, -1.0, -1.0, -1.0]]
ADV = [1.0, -2.0, 0.5]
LENGTHS = [4, 2, 3]
MAX_LENGTH = 6


def loop_loss(logp, old, adv, lengths, eps, eps_high, loss_type, ref=None, beta=0.0):
    """TRL 1.16 _compute_loss written as loops over valid tokens; torch scalars so autograd can check gradients."""
    per_seq, total, count = [], 0.0, 0
    for i, n in enumerate(lengths):
        row = 0.0
        for t in range(n):
            ratio = torch.exp(logp[i][t] - old[i][t])
            clipped = torch.clamp(ratio, 1 - eps, 1 + eps_high)
            loss = -torch.minimum(ratio * adv[i], clipped * adv[i])
            if beta:
                d = ref[i][t] - logp[i][t]
                loss = loss + beta * (torch.exp(d) - d - 1)
            row, count = row + loss, count + 1
        per_seq.append(row / max(n, 1))
        total = total + row
    if loss_type == "grpo":
        return sum(per_seq) / len(lengths)
    if loss_type == "dapo":
        return total / count
    return total / (len(lengths) * MAX_LENGTH)


def with_garbage(values: list[list[float]], fill: float) -> torch.Tensor:
    tensor = torch.tensor(values)
    tensor[torch.arange(4)[None, :] >= torch.tensor(LENGTHS)[:, None]] = fill
    return tensor


def mask() -> torch.Tensor:
    return torch.arange(4)[None, :] < torch.tensor(LENGTHS)[:, None]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_loss_and_gradient_match_the_loop(loss_type, beta):
    logp = with_garbage(LOGP, float("nan")).requires_grad_()
    out = clipped_policy_loss(
        logp, with_garbage(OLD, float("inf")), torch.tensor(ADV), mask(), epsilon=0.2, epsilon_high=0.28,
        loss_type=loss_type, max_length=MAX_LENGTH, ref_logp=with_garbage(REF, float("-inf")), beta=beta,
    )  # fmt: skip
    out.loss.backward()

    leaves = [[torch.tensor(v, requires_grad=True) for v in row] for row in LOGP]
    old = [[torch.tensor(v) for v in row] for row in OLD]
    ref = [[torch.tensor(v) for v in row] for row in REF]
    expected = loop_loss(leaves, old, ADV, LENGTHS, 0.2, 0.28, loss_type, ref, beta)
    expected.backward()
    expected_grad = [[0.0 if leaf.grad is None else leaf.grad.item() for leaf in row] for row in leaves]

    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.isfinite(logp.grad).all()
    assert logp.grad.tolist() == [pytest.approx(row, abs=1e-6) for row in expected_grad]
    assert logp.grad[~mask()].abs().sum().item() == 0.0


def test_epsilon_high_clips_asymmetrically():
    # ratios 1.25 with A > 0 (inside 1 + 0.28, outside 1 + 0.2) and 0.75 with A < 0 (outside 1 - 0.2)
    logp = torch.log(torch.tensor([[1.25, 1.25], [0.75, 1.0]])).requires_grad_()
    old, advantages, valid = torch.zeros(2, 2), torch.tensor([1.0, -1.0]), torch.ones(2, 2, dtype=torch.bool)
    symmetric = clipped_policy_loss(logp, old, advantages, valid, 0.2, loss_type="dapo")
    higher = clipped_policy_loss(logp, old, advantages, valid, 0.2, epsilon_high=0.28, loss_type="dapo")
    # tokens: -min(1.25, 1.2), -min(1.25, 1.2), -min(-0.75, -0.8), -min(-1, -1) -> mean
    assert symmetric.loss.item() == pytest.approx((-1.2 - 1.2 + 0.8 + 1.0) / 4)
    assert higher.loss.item() == pytest.approx((-1.25 - 1.25 + 0.8 + 1.0) / 4)
    assert (symmetric.clip_ratio_high.item(), symmetric.clip_ratio_low.item()) == (0.5, 0.25)
    assert (higher.clip_ratio_high.item(), higher.clip_ratio_low.item(), higher.clip_ratio.item()) == (0.0, 0.25, 0.25)
    (grad,) = torch.autograd.grad(higher.loss, logp)
    # d/dlogp of -rho * A / 4 = -rho * A / 4 where unclipped; 0 where the clipped term wins
    assert grad.flatten().tolist() == pytest.approx([-1.25 / 4, -1.25 / 4, 0.0, 1.0 / 4])


def test_dr_grpo_divides_by_a_constant():
    logp = torch.full((2, 4), -1.0, requires_grad=True)
    advantages = torch.tensor([1.0, 1.0])
    short = torch.tensor([[True, False, False, False], [True, True, False, False]])
    full = torch.ones(2, 4, dtype=torch.bool)
    for valid in (short, full):
        out = clipped_policy_loss(logp, logp.detach(), advantages, valid, 0.2, loss_type="dr_grpo", max_length=8)
        # every token's loss is -1 (ratio 1, A 1): the sum over valid tokens / (2 * 8)
        assert out.loss.item() == pytest.approx(-valid.sum().item() / 16)
    with pytest.raises(ValueError, match="max_length"):
        clipped_policy_loss(logp, logp.detach(), advantages, full, 0.2, loss_type="dr_grpo")


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_a_global_normalizer_makes_split_batches_add_up(loss_type):
    """Two halves, each divided by the whole batch's normaliser, give the whole batch's gradient."""
    logp = torch.tensor(LOGP, requires_grad=True)
    old, advantages, valid = torch.tensor(OLD), torch.tensor(ADV), mask()
    common = {"epsilon": 0.2, "loss_type": loss_type, "max_length": MAX_LENGTH}
    (whole,) = torch.autograd.grad(clipped_policy_loss(logp, old, advantages, valid, **common).loss, logp)
    normalizer = {"grpo": 3, "dapo": valid.sum(), "dr_grpo": 3 * MAX_LENGTH}[loss_type]
    halves = sum(
        clipped_policy_loss(logp[rows], old[rows], advantages[rows], valid[rows], normalizer=normalizer, **common).loss
        for rows in (slice(0, 1), slice(1, 3))
    )
    (split,) = torch.autograd.grad(halves, logp)
    assert torch.allclose(split, whole, atol=1e-7)


def test_kl_metric_is_the_mean_k3_over_valid_tokens():
    out = clipped_policy_loss(
        torch.tensor(LOGP), torch.tensor(OLD), torch.tensor(ADV), mask(), 0.2, ref_logp=torch.tensor(REF), beta=0.5
    )
    k3 = [
        math.exp(REF[i][t] - LOGP[i][t]) - (REF[i][t] - LOGP[i][t]) - 1 for i, n in enumerate(LENGTHS) for t in range(n)
    ]
    assert out.kl.item() == pytest.approx(sum(k3) / len(k3), rel=1e-5)
    with pytest.raises(ValueError, match="ref_logp"):
        clipped_policy_loss(torch.tensor(LOGP), torch.tensor(OLD), torch.tensor(ADV), mask(), 0.2, beta=0.1)


def test_per_token_advantages_are_accepted():
    per_token = torch.tensor(ADV)[:, None].expand(3, 4).clone()
    per_token[~mask()] = float("nan")
    logp = torch.tensor(LOGP, requires_grad=True)
    a = clipped_policy_loss(logp, torch.tensor(OLD), per_token, mask(), 0.2, loss_type="grpo")
    b = clipped_policy_loss(logp, torch.tensor(OLD), torch.tensor(ADV), mask(), 0.2, loss_type="grpo")
    assert a.loss.item() == pytest.approx(b.loss.item())
    (grad_a,) = torch.autograd.grad(a.loss, logp)
    (grad_b,) = torch.autograd.grad(b.loss, logp)
    assert torch.isfinite(grad_a).all() and torch.allclose(grad_a, grad_b)  # nan advantages past the end stay out
