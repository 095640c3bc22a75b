"""What differs between the RL methods of the one loop (train_ppo.run): how a rollout's scores become
advantages, and each micro-batch's loss.

- ppo: a critic (value head), KL-shaped per-token rewards, GAE, clipped policy and value losses;
- grpo: G completions per prompt, no critic; group-relative (GRPO, Dr. GRPO), leave-one-out (RLOO) or
  REINFORCE++ advantages, and GRPO's clipped loss aggregated per token, per sequence or Dr. GRPO's way.

The math itself lives in ppo.py and advantages.py as pure functions; these classes only pick and combine them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lora_rl.recipe import Recipe
from lora_rl.rl import advantages as estimators
from lora_rl.rl import ppo
from lora_rl.rl.rollout import Rollout


class Advantages(NamedTuple):
    advantages: torch.Tensor  # (B, R) per token, or (B,) one per sequence
    returns: torch.Tensor | None  # (B, R) value targets (ppo); None without a critic
    kl: torch.Tensor | None  # (B, R) rollout-time per-token KL(policy || reference); None without a reference


class PPOObjective:
    """Scores -> (normalised, clipped) -> KL-shaped rewards -> GAE -> whitened advantages; policy + value loss."""

    critic = True
    needs_reference = True

    def __init__(self, recipe: Recipe):
        self.cfg = recipe.ppo
        if self.cfg.adaptive_kl:
            self.kl_control = ppo.AdaptiveKLController(self.cfg.kl_coef, self.cfg.target_kl, self.cfg.kl_horizon)
        else:
            self.kl_control = ppo.FixedKLController(self.cfg.kl_coef)
        self.moments = ppo.RunningMoments() if self.cfg.normalize_rewards else None

    def normalizer(self, accelerator, group_mask: torch.Tensor, accumulation: int) -> None:
        """ppo's losses are means per micro-batch: nothing to count."""

    def state_dict(self) -> dict:
        return {"kl_controller": self.kl_control.state_dict(),
                "reward_moments": self.moments.state_dict() if self.moments else None}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.kl_control.load_state_dict(state["kl_controller"])
        if self.moments is not None:
            self.moments.load_state_dict(state["reward_moments"])

    def advantages(self, accelerator, rollout: Rollout) -> Advantages:
        scores = rollout.scores
        if self.cfg.missing_eos_penalty:
            scores = ppo.penalize_missing_eos(scores, rollout.has_eos, self.cfg.missing_eos_penalty)
        # the running statistics see every process's scores: the same on every process, and in the checkpoint
        seen = accelerator.gather(scores) if self.moments is not None else None
        scores = ppo.normalize_and_clip_scores(scores, self.moments, self.cfg.reward_clip, seen=seen)
        kl = ppo.kl_per_token(rollout.logprobs, rollout.ref_logprobs, self.cfg.kl_estimator)
        rewards = ppo.kl_shaped_rewards(scores, kl, rollout.mask, self.kl_control.value)
        advantages, returns = ppo.gae(rewards, rollout.values, rollout.mask, self.cfg.gamma, self.cfg.lam)
        if self.cfg.whiten_advantages:
            advantages = ppo.masked_whiten(advantages, rollout.mask)
        return Advantages(advantages, returns, kl)

    def loss(self, out, rollout: Rollout, index: torch.Tensor, found: Advantages, normalizer) -> tuple:
        """(loss, {name: scalar tensor}) of one micro-batch (`index`: its rows)."""
        mask = rollout.mask[index]
        policy = ppo.policy_loss(out.logprobs, rollout.logprobs[index], found.advantages[index], mask,
                                 self.cfg.clip_range)  # fmt: skip
        value = ppo.value_loss(out.values, rollout.values[index], found.returns[index], mask, self.cfg.clip_range_value)
        stats = {"policy_loss": policy.loss, "value_loss": value.loss, "clip_fraction": policy.clip_fraction,
                 "value_clip_fraction": value.clip_fraction, "approx_kl": policy.approx_kl}  # fmt: skip
        return policy.loss + self.cfg.vf_coef * value.loss, stats

    def after_update(self, accelerator, rollout: Rollout, found: Advantages) -> dict[str, float]:
        """The KL controller's step: per-sequence KL summed over tokens, averaged over the global batch."""
        sequence_kl = accelerator.reduce((found.kl * rollout.mask).sum(1).mean(), "mean").item()
        self.kl_control.update(sequence_kl, len(rollout.scores) * accelerator.num_processes)
        return {"kl": sequence_kl, "kl_coef": self.kl_control.value}


class GRPOObjective:
    """Group-relative advantages of the raw (weighted) rewards; GRPO's clipped loss, optionally with k3 KL."""

    critic = False
    moments = None

    def __init__(self, recipe: Recipe):
        self.cfg, self.max_length = recipe.grpo, recipe.generation.max_new_tokens
        self.needs_reference = self.cfg.beta > 0  # beta 0: no reference forward at all

    def normalizer(self, accelerator, group_mask: torch.Tensor, accumulation: int) -> torch.Tensor | None:
        """dapo divides by the valid tokens of the whole batch an optimizer step sees (every micro-batch of the
        accumulation group, on every process), so each micro-batch's loss is its share of that mean: the
        accumulated, process-averaged gradient equals the whole batch's (as TRL's num_items_in_batch)."""
        if self.cfg.loss_type != "dapo":
            return None
        tokens = accelerator.reduce(group_mask.sum().float(), "sum")  # N, over every process: a collective
        # the loop backpropagates loss_m / A for each of A micro-batches and DDP averages over P processes:
        # (1/P) sum_pm (S_pm / n) / A = S / N  when  n = N / (P * A)
        return tokens.clamp(min=1) / (accelerator.num_processes * accumulation)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing carries over between steps."""

    def advantages(self, accelerator, rollout: Rollout) -> Advantages:
        cfg, group = self.cfg, self.cfg.num_generations
        kl = ppo.kl_per_token(rollout.logprobs, rollout.ref_logprobs, "k3") if self.needs_reference else None
        # groups are whole on each process; batch statistics (scale_rewards batch, REINFORCE++'s whitening) are
        # the global batch's: every process calls this, so every process takes part in the same collectives
        reduce = sum_over_processes(accelerator)
        if cfg.advantage == "grpo":
            found = estimators.grpo_advantages(rollout.scores, group, cfg.scale_rewards, rollout.judged, reduce)
        elif cfg.advantage == "rloo":
            found = estimators.rloo_advantages(rollout.scores, group, rollout.judged)
        else:  # REINFORCE++: the KL penalty is folded into the per-token rewards, not the loss
            # k1 in the rewards: as a reward, its expected score-function gradient is exactly -grad KL(policy || ref);
            # k3's is not (it adds -grad sum_x ref(x) log policy(x)). `kl` stays k3: the logged "kl", as TRL's
            if self.needs_reference:
                penalty = ppo.kl_per_token(rollout.logprobs, rollout.ref_logprobs, "k1")
            else:
                penalty = torch.zeros_like(rollout.logprobs)
            found = estimators.reinforce_pp_returns(rollout.scores, penalty, rollout.mask, cfg.beta, reduce=reduce)
        return Advantages(found, None, kl)

    def loss(self, out, rollout: Rollout, index: torch.Tensor, found: Advantages, normalizer) -> tuple:
        """(loss, {name: scalar tensor}) of one micro-batch (`index`: its rows)."""
        cfg = self.cfg
        kl_in_loss = self.needs_reference and cfg.advantage != "reinforce_pp"
        result = estimators.clipped_policy_loss(
            out.logprobs, rollout.logprobs[index], found.advantages[index], rollout.mask[index], cfg.epsilon,
            cfg.epsilon_high, cfg.loss_type, self.max_length,
            ref_logp=rollout.ref_logprobs[index] if kl_in_loss else None, beta=cfg.beta if kl_in_loss else 0.0,
            normalizer=normalizer if cfg.loss_type == "dapo" else None,
        )  # fmt: skip
        stats = {"policy_loss": result.loss, "clip_ratio": result.clip_ratio, "clip_ratio_low": result.clip_ratio_low,
                 "clip_ratio_high": result.clip_ratio_high, "approx_kl": result.approx_kl}  # fmt: skip
        return result.loss, stats

    def after_update(self, accelerator, rollout: Rollout, found: Advantages) -> dict[str, float]:
        """frac_reward_zero_std (groups whose rewards are all equal: no signal) and, with a reference, the mean
        per-token k3 KL at sampling time (TRL's "kl")."""
        zero = estimators.zero_std_groups(rollout.scores, self.cfg.num_generations, rollout.judged)
        metrics = {"frac_reward_zero_std": accelerator.reduce(zero.float().mean(), "mean").item()}
        if found.kl is not None:
            metrics["kl"] = accelerator.reduce(ppo.masked_mean(found.kl, rollout.mask), "mean").item()
        return metrics


def sum_over_processes(accelerator) -> ppo.Reduce | None:
    """A sum over every process (accelerate's reduce: an all-reduce); None with one process (no collective)."""
    return (lambda tensor: accelerator.reduce(tensor, "sum")) if accelerator.num_processes > 1 else None


def objective_for(command: str, recipe: Recipe) -> PPOObjective | GRPOObjective:
    return PPOObjective(recipe) if command == "ppo" else GRPOObjective(recipe)
