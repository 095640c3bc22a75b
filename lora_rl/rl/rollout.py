"""Rollouts: sample completions with the policy, then score them -> a Rollout of tensors that travel together.

Shapes: B prompts, P prompt width (left-padded), R response width (<= max_new_tokens).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from lora_rl.data import pad, reward_pair_ids
from lora_rl.models.lm_head import only_given_sampling, output_layer
from lora_rl.models.reward_model import RewardModel
from lora_rl.recipe import GenerationConfig
from lora_rl.rl import ppo
from lora_rl.rl.rewards import FunctionRewards, StepState, score_functions
from lora_rl.rl.roles import POLICY, ActorCritic, Roles, adapter_rewards, reference_logprobs


class Rollout(NamedTuple):
    input_ids: torch.Tensor  # (B, P+R) prompt and response tokens
    attention_mask: torch.Tensor  # (B, P+R) 1 on real prompt tokens and valid response tokens
    mask: torch.Tensor  # (B, R) bool: response tokens up to and including the first EOS
    prompt_width: int  # P
    has_eos: torch.Tensor  # (B,) bool
    logprobs: torch.Tensor  # (B, R) float32: the policy's, at sampling time ("old" log-probs)
    ref_logprobs: torch.Tensor | None  # (B, R) float32: the reference's; None when nothing needs it (grpo, beta 0)
    values: torch.Tensor  # (B, R) float32: the critic's, at sampling time (zeros without a critic)
    scores: torch.Tensor  # (B,) float32: raw scores from the reward (weighted sum of the judging functions)
    judged: torch.Tensor  # (B,) bool: a score was given (a reward function may return None for a row)
    reward_parts: dict[str, torch.Tensor]  # reward function name -> (B,) its own rewards, nan where None


class Timings(NamedTuple):
    generate: float
    score: float


@torch.no_grad()
def generate(roles: Roles, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cfg: GenerationConfig,
             greedy: bool = False, hidden: bool = True, adapter: str | None = POLICY,
             ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(B, P) left-padded prompts -> (B, R) sampled responses (greedy: the likeliest token at each step), and
    (B, R, H) the policy's last hidden state before each of them: the LM head's input at each step (KV cache;
    stops once every row has EOS); None without `hidden`. `adapter`: the one generating (None: adapters off)."""
    roles.model.eval()
    steps = []
    record = None
    if hidden:
        record = output_layer(roles.model).register_forward_pre_hook(lambda _, args: steps.append(args[0][:, -1]))
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": cfg.temperature,
                                                    "top_k": cfg.top_k or None, "top_p": cfg.top_p}  # fmt: skip
    try:
        with roles.use(adapter), only_given_sampling(roles.model):
            sequences = roles.model.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=cfg.max_new_tokens, use_cache=True,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling,
            )  # fmt: skip
    finally:
        if record is not None:
            record.remove()
    responses = sequences[:, prompt_ids.shape[1] :]
    if not hidden:
        return responses, None
    assert len(steps) == responses.shape[1], "one LM head call per sampled token"
    return responses, torch.stack(steps, dim=1)


@torch.no_grad()
def collect(actor_critic: ActorCritic, roles: Roles, tokenizer, rows: list[dict], prompt_ids: torch.Tensor,
            prompt_mask: torch.Tensor, cfg: GenerationConfig, reference: bool = True,
            state: StepState | None = None) -> tuple[Rollout, Timings]:  # fmt: skip
    """Sample, then score: old log-probs and values, reference log-probs (if `reference`), rewards.

    rows: each prompt's data row ({"prompt": ..., other columns}); state: what reward functions get as
    trainer_state."""
    started = time.perf_counter()
    responses, policy_hidden = generate(roles, tokenizer, prompt_ids, prompt_mask, cfg)
    eos = ppo.response_mask(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    input_ids = torch.cat([prompt_ids, responses], dim=1)
    attention_mask = torch.cat([prompt_mask, eos.mask.long()], dim=1)
    width = prompt_ids.shape[1]
    generated = time.perf_counter()
    # Old log-probs (and shared-critic values) come from the hidden states generate computed to sample: the
    # same weights, tokens and positions as a full forward, so in float32 the same numbers up to summation
    # order (held to 1e-5 by a test), and one forward pass fewer per update. generate's `scores` would not do:
    # they are after temperature/top-k/top-p processing. Under autocast (bf16/fp16) cached steps round
    # differently from a full pass (a fresh adapter showed KL -0.027 against the reference at update 1), so
    # there they come from a full forward, computed as the reference's and the training forward's are.
    if torch.is_autocast_enabled(input_ids.device.type):  # the rollout keeps no entropy: training logs it
        out = actor_critic.outputs(input_ids, attention_mask, width, entropy=False)
    else:
        out = actor_critic.from_hidden(policy_hidden, input_ids, attention_mask, width, entropy=False)
    ref = reference_logprobs(roles, input_ids, attention_mask, width, cfg.temperature) if reference else None
    found = score(roles, tokenizer, rows, responses, eos.mask, input_ids, attention_mask, state or StepState())
    rollout = Rollout(input_ids, attention_mask, eos.mask, width, eos.has_eos, out.logprobs, ref, out.values,
                      *found)  # fmt: skip
    return rollout, Timings(generated - started, time.perf_counter() - generated)


def score(roles: Roles, tokenizer, rows: list[dict], responses: torch.Tensor, mask: torch.Tensor,
          input_ids: torch.Tensor, attention_mask: torch.Tensor, state: StepState) -> FunctionRewards:  # fmt: skip
    """(B,) float32 scores from whichever reward the recipe names, which rows were judged, and each reward
    function's own rewards."""
    if roles.reward_head is not None:
        return _every_row(adapter_rewards(roles, input_ids, attention_mask, tokenizer.eos_token_id))
    completions = decode(tokenizer, responses, mask)
    if roles.reward_terms:
        ids = [row[m.bool()].tolist() for row, m in zip(responses, mask, strict=True)]
        return score_functions(roles.reward_terms, rows, completions, ids, state, responses.device)
    prompts = [row["prompt"] for row in rows]
    return _every_row(model_rewards(roles.reward_model, roles.reward_tokenizer, prompts, completions,
                                    responses.device, roles.reward_chat_template))  # fmt: skip


def _every_row(scores: torch.Tensor) -> FunctionRewards:
    return FunctionRewards(scores, torch.ones_like(scores, dtype=torch.bool), {})


def decode(tokenizer, responses: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Completion texts, cut after the first EOS, special tokens removed."""
    return [tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(responses, mask, strict=True)]


@torch.no_grad()
def model_rewards(model: RewardModel, tokenizer, prompts: list, completions: list[str], device,
                  chat_template: bool = False) -> torch.Tensor:  # fmt: skip
    """Scores from a separate reward model, which may tokenize differently: prompt and completion are re-tokenized
    for it as it was trained (chat_template: its recipe's data.chat_template), read at an EOS after them."""
    ids = reward_pair_ids(tokenizer, prompts, completions, chat_template)
    input_ids, attention_mask = pad(ids, tokenizer.pad_token_id, "right")
    return model(input_ids.to(device), attention_mask.to(device))
