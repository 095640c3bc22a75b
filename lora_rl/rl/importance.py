"""Importance weights for an inference engine's samples: the loss's per-token weight when the tokens were sampled by
an engine (vLLM) whose log-probs differ from ours, as TRL's GRPOTrainer applies them (trl/trainer/grpo_trainer.py,
_generate_and_score_completions, v1.9.0: vllm_importance_sampling_mode).

The policy ratio's old log-probs stay ours (the trainer's, at sampling time); the engine's only weight each token's
loss by how much likelier our policy made the token than the engine that drew it: rho = exp(ours_old - engine), per
token, or per sequence with the log-ratio summed over its tokens. Above the cap C a ratio is truncated to C or
masked to 0; below it nothing changes (TRL's default has no lower bound: vllm_importance_sampling_clip_min None).
Shapes: B = batch, T = response length; a `mask` is (B, T), bool or 0/1, marking the valid response tokens.
"""

from __future__ import annotations

from typing import Literal

import torch

ImportanceMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def importance_weights(
    old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, mode: ImportanceMode, cap: float
) -> torch.Tensor:
    """(B, T) our log-probs of the sampled tokens at sampling time and the engine's -> (B, T) loss weights, 0 where
    masked. No grad: a weight, not part of the policy ratio.

    token_*:    rho_t = exp(old_t - engine_t)
    sequence_*: rho   = exp(sum_t (old_t - engine_t)), the same on every valid token of the row
    *_truncate: w = min(rho, C);   *_mask: w = rho where rho <= C, else 0
    """
    if mode not in MODES:
        raise ValueError(f"unknown importance mode {mode!r}: expected one of {', '.join(MODES)}")
    mask = mask.bool()
    with torch.no_grad():
        # padding may hold anything (nan, inf): kept out of the sum and the exp
        log_ratio = torch.where(mask, old_logp.float() - engine_logp.float(), 0)
        if mode.startswith("sequence"):
            log_ratio = log_ratio.sum(dim=1, keepdim=True).expand_as(log_ratio)
        ratio = log_ratio.exp()  # inf when it overflows: truncated to C, or masked
        weights = ratio.clamp(max=cap) if mode.endswith("truncate") else torch.where(ratio > cap, 0, ratio)
        return torch.where(mask, weights, 0)
