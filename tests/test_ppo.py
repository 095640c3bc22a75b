"""PPO math against hand-computed numbers and plain-Python loops (expectations never come from lora_rl.rl.ppo)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lora_rl.rl.ppo import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    entropy_from_logits,
    gae,
    gather_logprobs,
    kl_per_token,
    kl_shaped_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    normalize_and_clip_scores,
    penalize_missing_eos,
    policy_loss,
    response_mask,
    value_loss,
)


def prefix_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.tensor([[t < n for t in range(width)] for n in lengths])


# ---- response_mask -------------------------------------------------------------------------------------------


def test_response_mask_pad_equal_to_eos_keeps_the_first_eos():
    eos = pad = 2
    responses = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 2], [5, 6, 7, 8], [2, 2, 2, 2]])
    out = response_mask(responses, eos, pad)
    assert out.mask.tolist() == [
        [True, True, False, False],  # the first 2 is the real EOS, the rest are pads
        [True, True, True, True],  # EOS in the last slot
        [True, True, True, True],  # no EOS: cut at max_new_tokens, every token is real
        [True, False, False, False],  # EOS as the very first token is still a token
    ]
    assert out.lengths.tolist() == [2, 4, 4, 1]
    assert out.has_eos.tolist() == [True, True, False, True]


def test_response_mask_pad_different_from_eos():
    responses = torch.tensor([[5, 2, 0, 0], [5, 2, 7, 2], [5, 6, 0, 0], [5, 0, 6, 7], [0, 0, 0, 0]])
    out = response_mask(responses, eos_token_id=2, pad_token_id=0)
    # 1: EOS at 1; 2: after the EOS nothing counts, pad or not; 3: no EOS, trailing pads are padding;
    # 4: a pad inside a row without EOS was sampled, so it counts; 5: nothing but padding
    assert out.lengths.tolist() == [2, 2, 2, 4, 0]
    assert out.has_eos.tolist() == [True, True, False, False, False]
    assert out.mask.sum(dim=1).tolist() == [2, 2, 2, 4, 0]


def test_response_mask_without_eos_and_with_several_eos_ids():
    out = response_mask(torch.tensor([[4, 5, 6], [4, 3, 9]]), eos_token_id=[2, 3])
    assert out.lengths.tolist() == [3, 2]
    assert out.has_eos.tolist() == [False, True]
    assert out.mask.tolist() == [[True, True, True], [True, True, False]]


def test_penalize_missing_eos():
    scores = penalize_missing_eos(torch.tensor([1.0, 2.0]), torch.tensor([True, False]), penalty=3.0)
    assert scores.tolist() == [1.0, -1.0]


# ---- log-probs and entropy -------------------------------------------------------------------------------------


def naive_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gather_logprobs_equals_log_softmax_gather_with_grad(chunk_size, temperature):
    gen = torch.Generator().manual_seed(0)
    full = (3 * torch.randn(2, 9, 11, generator=gen)).requires_grad_()
    logits = full[:, 1:8]  # a non-contiguous slice, as the response positions of a prompt + response forward
    tokens = torch.randint(0, 11, (2, 7), generator=gen)
    weights = torch.randn(2, 7, generator=gen)  # a non-uniform upstream gradient

    ours = gather_logprobs(logits, tokens, temperature=temperature, chunk_size=chunk_size)
    (ours_grad,) = torch.autograd.grad((ours * weights).sum(), full)
    naive = naive_logprobs(logits, tokens, temperature)
    (naive_grad,) = torch.autograd.grad((naive * weights).sum(), full)

    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, naive)
    torch.testing.assert_close(ours_grad, naive_grad)


def test_gather_logprobs_bf16_computes_in_float32_per_chunk():
    gen = torch.Generator().manual_seed(2)
    logits = (4 * torch.randn(3, 9, 50, generator=gen)).bfloat16().requires_grad_()
    tokens = torch.randint(0, 50, (3, 9), generator=gen)

    ours = gather_logprobs(logits, tokens, chunk_size=4)
    (ours_grad,) = torch.autograd.grad(ours.sum(), logits)
    naive = naive_logprobs(logits, tokens)  # log_softmax of the float32 upcast: what ours must equal
    (naive_grad,) = torch.autograd.grad(naive.sum(), logits)

    assert ours.dtype == torch.float32 and ours_grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)  # float32 math on both sides
    torch.testing.assert_close(ours_grad, naive_grad)  # bf16 tolerances


def test_gather_logprobs_keeps_no_float32_copy_of_the_logits_for_backward():
    logits = torch.randn(2, 6, 40).bfloat16().requires_grad_()
    tokens = torch.randint(0, 40, (2, 6))

    def float32_copies_saved(compute) -> int:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            compute()
        return sum(t.dtype == torch.float32 and t.numel() == logits.numel() for t in saved)

    assert float32_copies_saved(lambda: naive_logprobs(logits, tokens)) > 0  # the hook sees what autograd keeps
    assert float32_copies_saved(lambda: gather_logprobs(logits, tokens, chunk_size=2)) == 0


def test_entropy_from_logits():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 13, generator=gen)
    probs = torch.softmax(logits, dim=-1)
    expected = -(probs * torch.log(probs)).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=2), expected)
    # uniform over V -> log V; -inf logits (masked vocabulary) -> uniform over the rest, and finite
    assert entropy_from_logits(torch.zeros(1, 3, 8))[0].tolist() == pytest.approx([math.log(8)] * 3)
    masked = torch.tensor([[[0.0, 0.0, -math.inf, -math.inf]]])
    assert entropy_from_logits(masked).item() == pytest.approx(math.log(2))
    # temperature -> infinity flattens any distribution towards uniform
    assert entropy_from_logits(logits, temperature=1e6).flatten().tolist() == pytest.approx([math.log(13)] * 10)


# ---- KL ------------------------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    logp, ref_logp = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    # logp - ref = 0.5, -1.0;  log r = ref - logp = -0.5, 1.0
    assert kl_per_token(logp, ref_logp, "k1")[0].tolist() == pytest.approx([0.5, -1.0])
    assert kl_per_token(logp, ref_logp, "k2")[0].tolist() == pytest.approx([0.5 * 0.25, 0.5 * 1.0])
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]  # e^(log r) - 1 - log r
    assert kl_per_token(logp, ref_logp, "k3")[0].tolist() == pytest.approx(k3)
    with pytest.raises(ValueError, match="k4"):
        kl_per_token(logp, ref_logp, "k4")


def test_k1_and_k3_expectations_are_the_exact_kl():
    # over a whole 4-token vocabulary the sampling expectation is a weighted sum: no Monte Carlo needed
    policy, ref = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.25, 0.25, 0.4, 0.1])
    exact = sum(p * math.log(p / q) for p, q in zip(policy.tolist(), ref.tolist(), strict=True))
    for estimator in ("k1", "k3"):
        per_token = kl_per_token(policy.log()[None], ref.log()[None], estimator)[0]
        assert (policy * per_token).sum().item() == pytest.approx(exact, rel=1e-5), estimator
    assert (kl_per_token(policy.log()[None], ref.log()[None], "k3") >= 0).all()


def test_kl_shaped_rewards_by_hand():
    scores = torch.tensor([1.0, 2.0, 5.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
    mask = prefix_mask([2, 3, 0], 3)
    rewards = kl_shaped_rewards(scores, kl, mask, kl_coef=0.5)
    expected = [
        [-0.05, -0.1 + 1.0, 0.0],  # score on the last valid token (index 1)
        [-0.2, -0.25, -0.3 + 2.0],
        [0.0, 0.0, 0.0],  # no valid token: no penalty and no score
    ]
    assert rewards.tolist() == [pytest.approx(row) for row in expected]


# ---- GAE -----------------------------------------------------------------------------------------------------


def reference_gae(rewards, values, lengths, gamma, lam):
    """Plain-Python GAE over each row's first `length` tokens; 0 after."""
    advantages, returns = [], []
    for r, v, n in zip(rewards, values, lengths, strict=True):
        adv, running = [0.0] * len(r), 0.0
        for t in reversed(range(n)):
            next_value = v[t + 1] if t + 1 < n else 0.0  # the episode ends at the last valid token
            running = r[t] + gamma * next_value - v[t] + gamma * lam * running
            adv[t] = running
        advantages.append(adv)
        returns.append([adv[t] + v[t] if t < n else 0.0 for t in range(len(r))])
    return advantages, returns


@pytest.mark.parametrize("gamma, lam", [(0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (0.0, 0.7), (1.0, 0.5)])
def test_gae_equals_plain_python_loop(gamma, lam):
    gen = torch.Generator().manual_seed(4)
    lengths, width = [7, 1, 4, 0, 6], 7
    rewards = torch.randn(5, width, generator=gen, dtype=torch.float64)
    values = torch.randn(5, width, generator=gen, dtype=torch.float64)  # garbage past each length too
    out = gae(rewards, values, prefix_mask(lengths, width), gamma, lam)
    advantages, returns = reference_gae(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    torch.testing.assert_close(out.advantages, torch.tensor(advantages, dtype=torch.float64))
    torch.testing.assert_close(out.returns, torch.tensor(returns, dtype=torch.float64))


def test_gae_lambda_zero_is_td0_and_lambda_one_is_reward_to_go():
    gen = torch.Generator().manual_seed(5)
    mask = prefix_mask([5, 3, 2], 5)
    rewards, values = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    r, v = rewards * mask, values * mask

    # lam = 0: A_t = r_t + gamma * V_{t+1} m_{t+1} - V_t
    next_v = torch.cat([v[:, 1:], torch.zeros(3, 1)], dim=1)
    td0 = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    torch.testing.assert_close(td0.advantages, (r + 0.9 * next_v - v) * mask)

    # gamma = lam = 1: returns are the undiscounted reward-to-go, A_t = sum_{k >= t} r_k - V_t
    reward_to_go = r.flip(1).cumsum(1).flip(1) * mask
    mc = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(mc.returns, reward_to_go)
    torch.testing.assert_close(mc.advantages, reward_to_go - v)


# ---- whitening -----------------------------------------------------------------------------------------------


def test_masked_mean_and_var_equal_plain_statistics_of_the_valid_entries():
    gen = torch.Generator().manual_seed(6)
    x, mask = torch.randn(4, 6, generator=gen), prefix_mask([6, 2, 5, 1], 6)
    valid = x[mask]
    assert masked_mean(x, mask).item() == pytest.approx(valid.mean().item(), rel=1e-6)
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx(
        [x[i, :n].mean().item() for i, n in enumerate([6, 2, 5, 1])]
    )
    assert masked_var(x, mask).item() == pytest.approx(valid.var(correction=1).item(), rel=1e-5)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(valid.var(correction=0).item(), rel=1e-5)
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0  # nothing valid: 0, not nan
    assert masked_var(x, prefix_mask([1, 0, 0, 0], 6)).item() == 0.0  # one value: 0, not inf


def test_masked_whiten_mean_zero_var_one_on_valid_positions():
    gen = torch.Generator().manual_seed(7)
    x, mask = 3 + 5 * torch.randn(4, 6, generator=gen), prefix_mask([6, 2, 5, 1], 6)
    x[~mask] = math.nan  # padding may hold anything
    white = masked_whiten(x, mask)
    assert white[mask].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert white[mask].var(correction=1).item() == pytest.approx(1.0, rel=1e-5)
    assert (white[~mask] == 0).all()

    kept = masked_whiten(x, mask, shift_mean=False)
    assert kept[mask].mean().item() == pytest.approx(x[mask].mean().item(), rel=1e-5)
    assert kept[mask].var(correction=1).item() == pytest.approx(1.0, rel=1e-5)


# ---- losses --------------------------------------------------------------------------------------------------


def test_policy_loss_clip_fraction_and_approx_kl_by_hand():
    # ratios 1.5, 0.5, 1.1, 0.5 and a masked 3.0; clip_range 0.2 -> clip(ratio) 1.2, 0.8, 1.1, 0.8
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.5, 3.0]])
    old_logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]])
    logp = (old_logp + ratios.log()).requires_grad_()
    advantages = torch.tensor([[1.0, 1.0, -1.0, -2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    out = policy_loss(logp, old_logp, advantages, mask, clip_range=0.2)
    # per token max(-A r, -A clip(r)):
    #   max(-1.5, -1.2) = -1.2 (clipped)   max(-0.5, -0.8) = -0.5   max(1.1, 1.1) = 1.1   max(1.0, 1.6) = 1.6 (clipped)
    assert out.loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 1.6) / 4)
    assert out.clip_fraction.item() == pytest.approx(2 / 4)
    # k3 of KL(old || new): (r - 1) - log r
    k3 = [0.5 - math.log(1.5), -0.5 - math.log(0.5), 0.1 - math.log(1.1), -0.5 - math.log(0.5)]
    assert out.approx_kl.item() == pytest.approx(sum(k3) / 4, rel=1e-5)
    # d loss / d logp = -A r / 4 where the unclipped term wins, 0 where clipping does, 0 where masked
    out.loss.backward()
    assert logp.grad.tolist() == [pytest.approx([0.0, -1.0 * 0.5 / 4, 1.0 * 1.1 / 4, 0.0, 0.0])]
    assert not out.clip_fraction.requires_grad and not out.approx_kl.requires_grad


def test_value_loss_and_clip_fraction_by_hand():
    values = torch.tensor([[1.0, 0.6, 0.0, 1.0, 9.0]], requires_grad=True)
    old_values = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.0, -1.0, 0.5, -9.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    out = value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    # clipped V = old + clip(V - old, -0.2, 0.2) = 0.7, 0.6, 0.3, 0.7
    # (V - R)^2 = 1, 0.36, 1, 0.25;  (Vclip - R)^2 = 1.69, 0.36, 1.69, 0.04
    # max = 1.69 (clipped), 0.36, 1.69 (clipped), 0.25
    assert out.loss.item() == pytest.approx(0.5 * (1.69 + 0.36 + 1.69 + 0.25) / 4)
    assert out.clip_fraction.item() == pytest.approx(2 / 4)
    # gradient 0.5 * 2 (V - R) / 4 only where the unclipped error wins: token 2 (0.6 - 0) and token 4 (1 - 0.5)
    out.loss.backward()
    assert values.grad.tolist() == [pytest.approx([0.0, 0.6 / 4, 0.0, 0.5 / 4, 0.0])]


def test_tokens_after_eos_change_no_output_and_no_gradient():
    gen = torch.Generator().manual_seed(8)
    mask = prefix_mask([4, 2, 3], 4)
    # logp, old_logp, advantages, values, old_values, returns, kl
    inputs = [torch.randn(3, 4, generator=gen) for _ in range(7)]

    def run(fill: float) -> list[torch.Tensor]:
        logp, old_logp, advantages, values, old_values, returns, kl = (torch.where(mask, x, fill) for x in inputs)
        logp.requires_grad_(), values.requires_grad_()
        loss = policy_loss(logp, old_logp, advantages, mask, 0.2).loss
        loss = loss + value_loss(values, old_values, returns, mask, 0.2).loss
        loss.backward()
        rewards = kl_shaped_rewards(torch.ones(3), kl, mask, 0.1)
        return [loss.detach(), logp.grad, values.grad, rewards, *gae(rewards, old_values, mask, 0.99, 0.95)]

    reference = run(0.0)
    for fill in (123.0, math.inf, math.nan):
        for ours, expected in zip(run(fill), reference, strict=True):
            torch.testing.assert_close(ours, expected)


# ---- KL controllers and score normalisation -----------------------------------------------------------------


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    # n_steps / horizon = 256 / 10000 = 0.0256;  error = clip(kl / 6 - 1, -0.2, 0.2)
    ctl.update(3.0, n_steps=256)  # 3/6 - 1 = -0.5 -> -0.2
    assert ctl.value == pytest.approx(0.2 * (1 - 0.2 * 0.0256), rel=1e-12)
    ctl.update(6.6, n_steps=256)  # 6.6/6 - 1 = 0.1
    assert ctl.value == pytest.approx(0.2 * (1 - 0.2 * 0.0256) * (1 + 0.1 * 0.0256), rel=1e-12)
    ctl.update(100.0, n_steps=256)  # -> +0.2
    assert ctl.value == pytest.approx(0.2 * (1 - 0.2 * 0.0256) * (1 + 0.1 * 0.0256) * (1 + 0.2 * 0.0256), rel=1e-12)
    ctl.update(6.0, n_steps=256)  # on target: unchanged
    assert ctl.value == pytest.approx(0.2 * (1 - 0.2 * 0.0256) * (1 + 0.1 * 0.0256) * (1 + 0.2 * 0.0256), rel=1e-12)
    with pytest.raises(ValueError, match="non-finite"):
        ctl.update(math.nan, n_steps=256)


def test_kl_controllers_state_dict_round_trip_is_exact():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=1_000)
    for kl in (0.3, 1.7, 0.95):
        ctl.update(kl, n_steps=64)
    resumed = AdaptiveKLController(0.1, target=1.0, horizon=1_000)
    resumed.load_state_dict(json.loads(json.dumps(ctl.state_dict())))  # through a checkpoint's JSON
    assert resumed.value == ctl.value != 0.1  # bitwise equal, and not the initial value
    ctl.update(2.0, n_steps=64)
    resumed.update(2.0, n_steps=64)
    assert resumed.value == ctl.value

    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_steps=64)
    assert fixed.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05


def test_running_moments_equal_statistics_of_everything_seen_and_round_trip():
    gen = torch.Generator().manual_seed(11)
    batches = [3 + 2 * torch.randn(n, generator=gen) for n in (1, 5, 8)]
    moments = RunningMoments()
    for batch in batches:
        moments.update(batch)
    everything = torch.cat(batches).double()
    assert moments.count == 14
    assert moments.mean == pytest.approx(everything.mean().item(), rel=1e-12)
    assert moments.std == pytest.approx(everything.std(correction=1).item(), rel=1e-12)

    resumed = RunningMoments()
    resumed.load_state_dict(json.loads(json.dumps(moments.state_dict())))
    assert (resumed.count, resumed.mean, resumed.std) == (moments.count, moments.mean, moments.std)
    with pytest.raises(ValueError, match="non-finite"):
        moments.update(torch.tensor([1.0, math.inf]))
    assert moments.count == 14  # a rejected batch leaves the statistics alone


def test_normalize_and_clip_scores():
    moments = RunningMoments()
    out = normalize_and_clip_scores(torch.tensor([1.0, 3.0, 5.0, 11.0]), moments, clip=1.2)
    # mean 5; unbiased var (16 + 4 + 0 + 36) / 3 = 56 / 3 -> z = (x - 5) / sqrt(56 / 3), then clip to +-1.2
    std = math.sqrt(56 / 3)
    assert out.tolist() == pytest.approx([-4 / std, -2 / std, 0.0, 1.2], rel=1e-6)
    assert normalize_and_clip_scores(torch.tensor([-7.0, 0.5, 7.0]), clip=2.0).tolist() == [-2.0, 0.5, 2.0]
