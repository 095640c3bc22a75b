"""Critic-free RL math as pure functions: group advantages (GRPO, Dr. GRPO, RLOO), REINFORCE++ returns, and the
clipped policy loss with GRPO's three aggregations (grpo, dapo, dr_grpo) and its k3 KL term.

Shapes: N = completions in the batch, G = completions per prompt, P = N / G prompts, T = response length. Rows are
prompt-major: the G completions of one prompt are adjacent (rows p*G .. p*G + G - 1). `judged` (N,) bool marks rows
some reward function scored (see rewards.py); an unjudged row is left out of its group's statistics and gets
advantage 0, as TRL 1.16 does with its NaN ("unscorable") rows. A `mask` is (N, T), bool or 0/1, marking valid
response tokens; masked values may be anything, inf and nan included, and reach neither an output nor a gradient.
Nothing here loads a model or reads a recipe.

Groups are whole on each process (each samples all G completions of its prompts), so group statistics are local.
Batch statistics (scale="batch", REINFORCE++'s whitening) are those of the global batch, as TRL (it gathers the
rewards) and verl compute them, when `reduce` sums over processes (ppo.Reduce; objectives.py passes accelerate's
reduce); without it, of this process's rows alone.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from lora_rl.rl.ppo import Reduce, gae, kl_per_token, kl_shaped_rewards, masked_mean, masked_moments, masked_whiten

RewardScale = Literal["group", "batch", "none"]
LossType = Literal["grpo", "dapo", "dr_grpo"]
STD_EPS = 1e-4  # TRL 1.16 GRPOTrainer: advantages / (std + 1e-4); added to the std, not under the root


class GroupStats(NamedTuple):
    mean: torch.Tensor  # (P,) mean of each group's judged rewards (0 for a group with none)
    std: torch.Tensor  # (P,) unbiased (n - 1) std of each group's judged rewards (0 for a group with under two)
    zero_std: torch.Tensor  # (P,) bool: the judged rewards are all equal (vacuously, for fewer than two)


def _grouped(rewards: torch.Tensor, group_size: int, judged: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) rewards and judged -> (P, G) float rewards with 0 where unjudged, and (P, G) bool judged."""
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
    judged = torch.ones_like(rewards, dtype=torch.bool) if judged is None else judged.bool()
    rewards = torch.where(judged, rewards, 0)  # an unjudged row may hold nan: keep it out of every sum
    return rewards.view(-1, group_size), judged.view(-1, group_size)


def group_stats(rewards: torch.Tensor, group_size: int, judged: torch.Tensor | None = None) -> GroupStats:
    """(N,) rewards -> per-group mean, unbiased std and all-equal flags over judged rows (TRL's nanmean/nanstd)."""
    grouped, valid = _grouped(rewards, group_size, judged)
    count = valid.sum(dim=1)
    mean = grouped.sum(dim=1) / count.clamp(min=1)
    # std = sqrt(sum_i (r_i - mean)^2 / (n - 1)) over the group's judged rows
    squares = torch.where(valid, grouped - mean[:, None], 0).pow(2).sum(dim=1)
    std = (squares / (count - 1).clamp(min=1)).sqrt()
    # exact equality, not isclose(std, 0) as TRL: a float mean of equal values may differ from them by an ulp
    highest = torch.where(valid, grouped, -torch.inf).amax(dim=1)
    lowest = torch.where(valid, grouped, torch.inf).amin(dim=1)
    zero_std = (count < 2) | (highest == lowest)
    return GroupStats(mean, std, zero_std)


def zero_std_groups(rewards: torch.Tensor, group_size: int, judged: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) rewards -> (P,) bool: groups whose judged rewards are all equal (advantage 0 in every estimator here).

    Its mean is TRL's `frac_reward_zero_std`. TRL counts isclose(std, 0) and, under scale_rewards="batch", asks
    it of the batch std; here it is always per group (what the metric is read as), and a group with fewer than
    two judged rows counts (it teaches nothing either; TRL's nanstd is nan there, so TRL does not count it).
    """
    return group_stats(rewards, group_size, judged).zero_std


def grpo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: RewardScale = "group",
    judged: torch.Tensor | None = None,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """(N,) rewards -> (N,) GRPO advantages, as TRL 1.16 GRPOTrainer._generate_and_score_completions defines them
    (multi_objective_aggregation="sum_then_normalize", its default).

    scale="group": divide by the group's std (GRPO, Shao et al. 2024); "batch": by the std of the whole batch's judged
    rewards, around the batch mean, over every process with `reduce` (TRL, which gathers the rewards; Liu et al.'s
    "Understanding R1-Zero" suggests it); "none": no division (Dr. GRPO, Liu et al. 2025). Stds are unbiased
    (torch.std, TRL's nanstd). A group whose judged rewards are all equal, and every unjudged row, gets exactly 0
    (TRL: about 1e-8 / 1e-4 and 0).
    """
    stats = group_stats(rewards, group_size, judged)
    grouped, valid = _grouped(rewards, group_size, judged)
    # A_i = (r_i - mean_group) / (std + 1e-4), std the group's or the batch's;  Dr. GRPO: A_i = r_i - mean_group
    advantages = grouped - stats.mean[:, None]
    if scale == "group":
        advantages = advantages / (stats.std[:, None] + STD_EPS)
    elif scale == "batch":
        advantages = advantages / (masked_moments(grouped, valid, reduce)[1].sqrt() + STD_EPS)
    elif scale != "none":
        raise ValueError(f"unknown reward scale {scale!r}: expected 'group', 'batch' or 'none'")
    return torch.where(valid & ~stats.zero_std[:, None], advantages, 0).view(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int, judged: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) rewards -> (N,) REINFORCE leave-one-out advantages (Ahmadian et al. 2024): each row's baseline is the
    mean of the other judged rows of its group.

    As TRL 1.16 RLOOTrainer (normalize_advantages=False, its default) and OpenRLHF's advantage estimator "rloo"
    (trainer/ppo_utils/experience_maker.py: compute_advantages_and_returns). A row with no judged sibling, an
    unjudged row and a group of equal rewards get exactly 0. Fold a sequence KL penalty into `rewards` first
    when wanted (TRL RLOO: r - beta * sum_t (logp_old - logp_ref)).
    """
    grouped, valid = _grouped(rewards, group_size, judged)
    count = valid.sum(dim=1, keepdim=True)
    # A_i = r_i - (sum_j r_j - r_i) / (n - 1) = n / (n - 1) * (r_i - mean)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (count - 1).clamp(min=1)
    zero_std = group_stats(rewards, group_size, judged).zero_std[:, None]
    return torch.where(valid & ~zero_std, grouped - baseline, 0).view(-1)


@torch.no_grad()
def reinforce_pp_returns(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    gamma: float = 1.0,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """(N,) sequence scores, (N, T) rollout-time per-token KL -> (N, T) REINFORCE++ advantages (Hu 2025), 0 where
    masked; G plays no part (no group baseline).

    Per-token reward r_t = -kl_coef * kl_t, plus the score on the row's last valid token; the return-to-go
    R_t = sum_{s >= t} gamma^(s-t) r_s; then whitened over every valid token of the batch (of every process's
    batch with `reduce`, as verl whitens the global batch).

    Pass k1 as `kl` (logp - ref_logp, kl_per_token(..., "k1")), as verl (apply_kl_penalty, kl_penalty "kl") and
    OpenRLHF do: as a reward, k1's expected score-function gradient E[grad log pi * -k1] is exactly
    -grad KL(pi || ref). k3 is unbiased for the KL's value but biased as a reward: its expected gradient has an
    extra -grad sum_x ref(x) log pi(x).

    With k1, matches verl (trainer/ppo/core_algos.py: compute_reinforce_plus_plus_outcome_advantage with
    ray_trainer.apply_kl_penalty's token_level_rewards; utils/torch_functional.py: masked_whiten): unbiased
    (n - 1) variance, (R - mean) * rsqrt(var + 1e-8), masked tail 0. OpenRLHF's estimator "reinforce"
    (trainer/ppo_utils/experience_maker.py: get_cumulative_returns, compute_advantages_and_returns;
    models/utils.py: compute_reward) builds the same rewards and returns but whitens with the biased (n)
    variance, (R - mean) * rsqrt(max(var, 1e-8)), and leaves its masked tail at -mean * rstd: the two differ by
    a factor sqrt(n / (n - 1)) over n valid tokens, which is negligible at batch scale. Neither clips.
    """
    rewards = kl_shaped_rewards(scores, torch.where(mask.bool(), kl, 0), mask, kl_coef)
    # with zero values and lambda = 1, GAE's A_t = r_t + gamma * A_{t+1} is exactly the return-to-go
    returns = gae(rewards, torch.zeros_like(rewards), mask, gamma, lam=1.0).advantages
    return masked_whiten(returns, mask, reduce=reduce)


class GRPOLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar: clipped surrogate (+ beta * k3 KL to the reference), aggregated by loss_type
    clip_ratio_low: torch.Tensor  # scalar, no grad: valid tokens with rho < 1 - eps and A < 0 (TRL clip_ratio/low)
    clip_ratio_high: torch.Tensor  # scalar, no grad: valid tokens with rho > 1 + eps_high and A > 0 (TRL's high)
    clip_ratio: torch.Tensor  # scalar, no grad: either of the two (TRL clip_ratio/region_mean)
    approx_kl: torch.Tensor  # scalar, no grad: k3 estimate of KL(old || new) over valid tokens (as ppo.policy_loss)
    kl: torch.Tensor  # scalar, no grad: mean k3 KL(policy || reference) over valid tokens (TRL "kl"); 0 if beta 0


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float,
    epsilon_high: float | None = None,
    loss_type: LossType = "dapo",
    max_length: int | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    normalizer: float | torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> GRPOLossOutput:
    """(N, T) new, old (and reference) log-probs of the sampled tokens, (N,) or (N, T) advantages -> GRPO's loss,
    as TRL 1.16 GRPOTrainer._compute_loss (importance_sampling_level="token", no delta).

    Per token: l_t = -w_t min(rho_t A, clip(rho_t, 1 - epsilon, 1 + epsilon_high) A) + beta * k3_t, with
    w_t the (N, T) `weights` of an engine's samples (importance.importance_weights; 1 without), as TRL's vLLM
    correction multiplies the clipped term before the KL is added,
    rho_t = exp(logp_t - old_logp_t), epsilon_high defaulting to epsilon (DAPO's clip-higher when larger) and
    k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1 (TRL's per_token_kl; only when beta != 0).
    Aggregation, the sum S over valid tokens divided by `normalizer`, or by default:
      grpo:    sum over sequences of (sum_t l_t / valid tokens of the sequence), / N (mean of sequence means)
      dapo:    S / valid tokens of this batch (TRL's default loss_type)
      dr_grpo: S / (N * max_length), a constant (max_length: generation's max new tokens)
    Pass `normalizer` when this batch is one part of a larger one (gradient accumulation, several processes):
    each part's loss is then its share of the whole's, and the summed gradients equal the whole batch's. Under
    DDP/accelerate, which average gradients over processes, that is the whole's divisor / num_processes, as
    TRL's dapo does: num_items_in_batch (valid tokens of the generation batch on all processes) / processes,
    rescaled to one accumulation window. TRL's grpo and dr_grpo divide each micro-batch's default by the
    accumulation steps: normalizer = N_micro * steps (grpo) or N_micro * max_length * steps (dr_grpo) here.
    """
    mask = mask.bool()
    advantages = advantages[:, None] if advantages.dim() == 1 else advantages
    # masked values may be nan: keep them out of exp and out of the gradient (0 * nan is nan in backward)
    log_ratio = torch.where(mask, logp - old_logp, 0)
    ratio = log_ratio.exp()
    high = epsilon if epsilon_high is None else epsilon_high
    # l_t = -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps_high) A_t)
    per_token = -torch.minimum(ratio * advantages, ratio.clamp(1 - epsilon, 1 + high) * advantages)
    if weights is not None:
        per_token = per_token * weights
    kl = torch.zeros((), device=logp.device)
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs the reference log-probs (ref_logp)")
        per_token_kl = kl_per_token(torch.where(mask, logp, 0), torch.where(mask, ref_logp, 0), "k3")
        per_token = per_token + beta * per_token_kl
        kl = masked_mean(per_token_kl.detach(), mask)
    loss = _aggregate(torch.where(mask, per_token, 0), mask, loss_type, max_length, normalizer)
    with torch.no_grad():
        low_clipped = (ratio < 1 - epsilon) & (advantages < 0)
        high_clipped = (ratio > 1 + high) & (advantages > 0)
        return GRPOLossOutput(
            loss,
            masked_mean(low_clipped.float(), mask),
            masked_mean(high_clipped.float(), mask),
            masked_mean((low_clipped | high_clipped).float(), mask),
            masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            kl,
        )


def _aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_type: LossType,
    max_length: int | None,
    normalizer: float | torch.Tensor | None,
) -> torch.Tensor:
    """(N, T) per-token losses, 0 where masked -> the scalar loss of `loss_type` (see clipped_policy_loss)."""
    if loss_type == "grpo":
        # sum_i (sum_t l_it / |o_i|), divided by N by default: the mean of sequence means
        total = (per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()
        default = per_token.shape[0]
    elif loss_type == "dapo":
        total, default = per_token.sum(), mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        if max_length is None and normalizer is None:
            raise ValueError("loss_type 'dr_grpo' needs max_length (or a normalizer)")
        total, default = per_token.sum(), per_token.shape[0] * (max_length or 0)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: expected 'grpo', 'dapo' or 'dr_grpo'")
    return total / (default if normalizer is None else normalizer)
