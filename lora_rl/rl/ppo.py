"""PPO's tensor math as pure functions: response masks, log-probs, KL penalties, GAE, whitening, clipped losses.

Shapes: B = batch, T = response length, V = vocabulary. A `mask` argument is (B, T), bool or 0/1, and marks
each row's valid response tokens, which come first: the response up to and including its first EOS (as
`response_mask` makes it). Values at masked positions may be anything, inf and nan included: they are
replaced before they can reach an output or a gradient. Nothing here loads a model or reads a recipe.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, NamedTuple

import torch

KLEstimator = Literal["k1", "k2", "k3"]
# Sums a tensor over every process and returns the sum on each (e.g. lambda t: accelerator.reduce(t, "sum")): lets
# a batch statistic cover the batch of all processes. None: this process's tensors alone.
Reduce = Callable[[torch.Tensor], torch.Tensor]


class ResponseMask(NamedTuple):
    mask: torch.Tensor  # (B, T) bool: True up to and including each row's first EOS
    lengths: torch.Tensor  # (B,) long: number of valid tokens per row
    has_eos: torch.Tensor  # (B,) bool: the row contains an EOS (False: cut at max_new_tokens)


def response_mask(
    responses: torch.Tensor, eos_token_id: int | Sequence[int], pad_token_id: int | None = None
) -> ResponseMask:
    """(B, T) generated tokens -> valid-token mask, lengths and EOS flags.

    A row ends at its first EOS, which is a real token (the policy chose it); whatever follows is masked.
    The EOS is found before pads are looked at, so pad_token_id == eos_token_id cannot hide a real EOS (TRL's
    "first pad - 1" length does). A row without EOS is valid to its end, except a trailing run of
    pad_token_id (rollouts of different widths padded to one); a pad inside a row was sampled and counts.
    """
    width = responses.shape[1]
    is_eos = torch.isin(responses, torch.tensor(eos_token_id, device=responses.device).reshape(-1))
    has_eos = is_eos.any(dim=1)
    # argmax returns the first maximal index: the first EOS (0 in a row without one, replaced by where)
    lengths = torch.where(has_eos, is_eos.int().argmax(dim=1) + 1, width)
    if pad_token_id is not None:
        trailing_pads = (responses == pad_token_id).flip(1).int().cumprod(dim=1).sum(dim=1)
        lengths = torch.where(has_eos, lengths, width - trailing_pads)
    mask = torch.arange(width, device=responses.device) < lengths[:, None]
    return ResponseMask(mask, lengths, has_eos)


def penalize_missing_eos(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """(B,) scores -> (B,) scores minus `penalty` where the row has no EOS (as TRL's missing_eos_penalty)."""
    return scores - penalty * (~has_eos.bool()).to(scores.dtype)


def _chunks(length: int, chunk_size: int) -> list[slice]:
    return [slice(start, start + chunk_size) for start in range(0, length, chunk_size)]


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits / temperature) at the given tokens, in float32 one chunk of T at a time, forward and
    backward. Plain autograd over chunks would keep every chunk's float32 copy of bf16 logits for backward:
    the full (B, T, V) float32 tensor this exists to avoid. Saved for backward: the logits themselves and
    (B, T) logsumexps."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature, chunk_size):
        # log p(x_t) = z_t[x_t] - logsumexp_v z_t[v],  z = logits / temperature
        chunks = _chunks(logits.shape[1], chunk_size)
        logsumexp = torch.cat([(logits[:, c].float() / temperature).logsumexp(-1) for c in chunks], dim=1)
        picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float() / temperature
        ctx.save_for_backward(logits, tokens, logsumexp)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return picked - logsumexp

    @staticmethod
    def backward(ctx, grad):
        logits, tokens, logsumexp = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for c in _chunks(logits.shape[1], ctx.chunk_size):
            # d log p(x_t) / d logits_t = (onehot(x_t) - softmax(z_t)) / temperature
            probs = torch.exp(logits[:, c].float() / ctx.temperature - logsumexp[:, c, None])
            chunk_grad = (-grad[:, c, None] * probs).scatter_add_(-1, tokens[:, c, None], grad[:, c, None])
            grad_logits[:, c] = chunk_grad / ctx.temperature
        return grad_logits, None, None, None


def gather_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, chunk_size: int = 32
) -> torch.Tensor:
    """(B, T, V) logits, (B, T) tokens -> (B, T) float32 log-probs of the tokens under softmax(logits / temperature).

    Equal to log_softmax(logits.float() / temperature).gather(tokens), but only a (B, chunk_size, V) float32
    block exists at a time, in forward and in backward; the gradient has the logits' dtype. Use the sampling
    temperature: the ratio and the KL are about the distribution the tokens were drawn from.
    """
    return _TokenLogprobs.apply(logits, tokens, temperature, chunk_size)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0, chunk_size: int = 32) -> torch.Tensor:
    """(B, T, V) logits -> (B, T) float32 entropy of softmax(logits / temperature), chunked along T.

    A statistic to log under no_grad; it is differentiable, but then autograd keeps each chunk's float32 copy.
    """
    # H_t = -sum_v p_v log p_v; entr(0) = 0, so logits masked to -inf stay finite
    chunks = _chunks(logits.shape[1], chunk_size)
    return torch.cat(
        [torch.special.entr((logits[:, c].float() / temperature).softmax(-1)).sum(-1) for c in chunks], dim=1
    )


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """(B, T) log-probs of the sampled tokens under the policy that sampled them and under the reference ->
    (B, T) per-token estimates of KL(policy || reference) (Schulman, "Approximating KL Divergence", 2020).

    "Unbiased" below is about the KL's value. Used as a reward (kl_shaped_rewards, REINFORCE++), what counts is
    the expected policy gradient E[grad log pi * -k]: only k1 gives -grad KL exactly; k3 adds
    -grad sum_x ref(x) log pi(x) (tests/test_kl_reward.py enumerates a small policy)."""
    log_r = ref_logp - logp  # r = ref(x) / policy(x), x ~ policy
    if estimator == "k1":
        return -log_r  # k1 = -log r: unbiased, high variance, negative on some tokens
    if estimator == "k2":
        return 0.5 * log_r**2  # k2 = (log r)^2 / 2: biased, low variance, >= 0
    if estimator == "k3":
        return torch.expm1(log_r) - log_r  # k3 = (r - 1) - log r: unbiased, low variance, >= 0
    raise ValueError(f"unknown KL estimator {estimator!r}: expected 'k1', 'k2' or 'k3'")


def kl_shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """(B,) sequence scores, (B, T) per-token KL -> (B, T) per-token rewards (Ziegler et al. 2019).

    r_t = -kl_coef * kl_t on valid tokens, plus the score on each row's last valid token; 0 where masked.
    A row with no valid token gets no score. Pass rollout-time tensors (no grad).
    """
    mask = mask.bool()
    rewards = torch.where(mask, -kl_coef * kl, 0)
    lengths = mask.sum(dim=1)
    last = (lengths - 1).clamp(min=0)
    rewards[torch.arange(len(rewards), device=rewards.device), last] += torch.where(lengths > 0, scores, 0)
    return rewards


class GAEOutput(NamedTuple):
    advantages: torch.Tensor  # (B, T), 0 where masked
    returns: torch.Tensor  # (B, T) advantages + values: the value targets, 0 where masked


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> GAEOutput:
    """(B, T) rewards and values -> generalised advantage estimates and returns (Schulman et al. 2016).

    The episode ends after each row's last valid token: nothing is bootstrapped past it. Vectorised over B,
    a loop over T. Computed in the rewards' dtype (float32 from kl_shaped_rewards, also for bf16 values). No
    grad: advantages and returns are constants of the PPO objective.
    """
    mask = mask.bool()
    rewards, values = torch.where(mask, rewards, 0), torch.where(mask, values, 0).to(rewards.dtype)
    advantages = torch.zeros_like(values)
    next_value = next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        # delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1}
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage  # stays 0 through the zeroed tail
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return GAEOutput(advantages, advantages + values)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over valid entries (all dims, or along `dim`); 0 where nothing is valid, not nan."""
    mask = mask.bool()
    return torch.where(mask, x, 0).sum(dim=dim) / mask.sum(dim=dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Scalar variance of x over valid entries; unbiased (n - 1) by default, as TRL's masked_var."""
    variance = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    if unbiased:
        # Bessel's n / (n - 1); one valid entry gives 0, not inf (and no host sync to check for it)
        count = mask.bool().sum()
        variance = variance * count / (count - 1).clamp(min=1)
    return variance


def masked_moments(
    x: torch.Tensor, mask: torch.Tensor, reduce: Reduce | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased (n - 1) variance): scalars over the valid entries of every process's batch (`reduce`: a sum
    over processes, see Reduce; None: this process's alone), in float32 at least. With `reduce`, two collectives:
    the count and sum, then the squares about the global mean (no sum-of-squares cancellation); every process
    gets the same numbers. One valid entry: variance 0; none: mean 0."""
    mask, x = mask.bool(), x.to(torch.promote_types(x.dtype, torch.float32))
    total = (lambda t: t) if reduce is None else reduce
    count, summed = total(torch.stack([mask.sum().to(x.dtype), torch.where(mask, x, 0).sum()]))
    mean = summed / count.clamp(min=1)
    squares = total(torch.where(mask, x - mean, 0).pow(2).sum())
    return mean, squares / (count - 1).clamp(min=1)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, reduce: Reduce | None = None
) -> torch.Tensor:
    """(B, T) -> (B, T) scaled to unit (unbiased) variance over the valid entries of the whole batch, and to
    mean 0 unless shift_mean=False (then the mean is kept). Masked entries become 0. With `reduce` (see Reduce)
    the mean and variance are those of every process's valid entries together (verl whitens the global batch)."""
    mean, variance = masked_moments(x, mask, reduce)
    # w = (x - mean) / sqrt(var + eps)  [+ mean]
    whitened = (x - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0)


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar: the clipped surrogate to minimise
    clip_fraction: torch.Tensor  # scalar, no grad: share of valid tokens where the clipped term wins (zero grad)
    approx_kl: torch.Tensor  # scalar, no grad: k3 estimate of KL(old || new) over valid tokens


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """(B, T) new and old log-probs of the sampled tokens and advantages -> PPO's clipped policy loss; `weights`
    (B, T), an engine's importance weights (importance.importance_weights), multiply each token's term.

    approx_kl is k3 with the old policy as the sampler, (rho - 1) - log rho: unbiased and >= 0 (TRL logs
    0.5 * mean(log rho ^ 2) instead, k2, which is biased).
    """
    mask = mask.bool()
    # padding may hold anything: masked_mean keeps it out of the loss, this where out of the gradient and exp
    log_ratio = torch.where(mask, logp - old_logp, 0)
    ratio = log_ratio.exp()
    # L = mean_t w_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)),  rho_t = pi(x_t) / pi_old(x_t)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    loss = masked_mean(per_token if weights is None else per_token * weights, mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return PolicyLossOutput(loss, clip_fraction, approx_kl)


class ValueLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar: the clipped value loss to minimise (before vf_coef)
    clip_fraction: torch.Tensor  # scalar, no grad: share of valid tokens where the clipped error wins (zero grad)


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range_value: float
) -> ValueLossOutput:
    """(B, T) new values, rollout-time values and returns -> PPO's clipped value loss."""
    mask = mask.bool()
    values = torch.where(mask, values, 0)  # masked_mean keeps padding out of the loss, this out of the gradient
    # L = 0.5 * mean_t max((V_t - R_t)^2, (V_old,t + clip(V_t - V_old,t, -eps, eps) - R_t)^2)
    clipped_values = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return ValueLossOutput(loss, clip_fraction)


class FixedKLController:
    """A constant KL coefficient (beta); the base of AdaptiveKLController."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """A fixed coefficient ignores the measured KL."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019's proportional controller: beta grows while the KL is above target, shrinks below."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        super().__init__(init_kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """current_kl: KL summed over each sequence's tokens, averaged over the rollout batch (the units of
        target, as in Ziegler et al. and TRL); n_steps: sequences in that batch."""
        if not math.isfinite(current_kl):
            raise ValueError(f"non-finite KL {current_kl}: the KL coefficient would be lost")
        # e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon)
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon


class RunningMoments:
    """Count, mean and standard deviation of every value seen so far, merged batch by batch in float64
    (Chan et al.'s parallel form of Welford's algorithm); state_dict() restores them exactly."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0  # m2: sum of squared deviations from the mean

    def update(self, x: torch.Tensor) -> None:
        """Merge the values of x; raises on inf/nan, which would spoil every later update."""
        x = x.detach().double().flatten()
        if x.numel() == 0:
            return
        n, batch_mean = x.numel(), x.mean().item()  # .item(): one host sync per batch
        batch_m2 = ((x - batch_mean) ** 2).sum().item()
        if not math.isfinite(batch_m2):
            raise ValueError("non-finite value in RunningMoments.update")
        # mean += delta * n_b / n;  M2 = M2_a + M2_b + delta^2 * n_a * n_b / n,  delta = mean_b - mean_a
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        """Unbiased standard deviation; 1.0 until two values have been seen (nothing to scale by yet)."""
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def normalize_and_clip_scores(
    scores: torch.Tensor,
    moments: RunningMoments | None = None,
    clip: float | None = None,
    eps: float = 1e-8,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) scores -> (B,) scores z-scored by running moments and clipped to [-clip, clip]; None skips a step.

    The moments are updated first with `seen` (default: these scores), so the first batch is scaled by its own
    statistics. With several processes pass every process's scores as `seen`: all then hold the same moments.
    """
    if moments is not None:
        moments.update(scores if seen is None else seen)
        # s <- (s - mean) / (std + eps)
        scores = (scores - moments.mean) / (moments.std + eps)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores
