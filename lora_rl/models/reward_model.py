"""A scalar reward read at each sequence's last real token, and the Bradley-Terry pairwise loss.

One convention everywhere a reward is read (TRL's): the reward model reads a text at an EOS that follows it.
`data.reward_ids` makes that input from text, `data.with_eos` from token ids; train-reward, `load --score`, the
reward adapter and a separate reward model in PPO all go through them, so one text gets one reward.
`RewardModel` wraps a sequence classifier (plain or peft-wrapped): backbone -> hidden state at the last
token where attention_mask is 1 -> score head. Reading the position from the attention mask (not from
`input_ids != pad_token_id`, as transformers does) stays right when the pad token equals a real token
such as EOS, and works for right and left padding alike.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, T) mask -> (N,) index of each row's last real token, for right or left padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask).argmax(dim=-1)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, T) positions counted over real tokens only, so a left-padded row sees the same positions as a
    right-padded one (transformers would number the pads first)."""
    return (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.base_model.model if hasattr(model, "peft_config") else model


def no_split_modules(model: nn.Module) -> list[str] | None:
    """The transformers model's block classes (e.g. ["LlamaDecoderLayer"]), for a module that wraps it:
    accelerate's FSDP wraps each block by the prepared module's `_no_split_modules`, and without them it
    wraps only the root, so every forward gathers the whole model at once."""
    return getattr(transformers_model(model), "_no_split_modules", None)


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  positions: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(N, T, H) last hidden states of the (peft) model's backbone; positions counted over real tokens
    unless given. A 4D boolean attention_mask (True: may attend) is passed on as the model's attention takes it."""
    inner = transformers_model(model)
    backbone = getattr(inner, inner.base_model_prefix)
    if positions is None:
        positions = position_ids(attention_mask)
    if attention_mask.dim() == 4:
        attention_mask = custom_mask(attention_mask, inner)
    return backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)[0]


PACKABLE_ATTENTION = ("sdpa", "eager")  # attention implementations that take an arbitrary 4D mask


def custom_mask(visible: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """A (N, 1, T, T) boolean mask in the form the model's attention adds or applies: sdpa takes booleans,
    eager adds a float mask to its scores."""
    implementation = model.config._attn_implementation
    if implementation == "sdpa":
        return visible
    if implementation == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
            ~visible, torch.finfo(dtype).min
        )
    raise ValueError(f"a custom attention mask needs {' or '.join(PACKABLE_ATTENTION)} attention, not {implementation}")


def at_last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, T, H) -> (N, H): each row's hidden state at its last real token."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]


class RewardModel(nn.Module):
    """Sequence classifier -> (N,) float32 rewards at each row's last real token.

    One module, so accelerate/DDP wrap its forward and synchronise gradients as usual.
    """

    def __init__(self, model: nn.Module, head_name: str):
        super().__init__()
        self.model = model  # the (peft) sequence classifier; saved as is
        self.head_name = head_name
        self._no_split_modules = no_split_modules(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                read_at: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Rewards at each row's last real token, or for packed pairs (data.pack_pairs) at each (row, position)
        of read_at."""
        head = getattr(transformers_model(self.model), self.head_name)
        hidden = hidden_states(self.model, input_ids, attention_mask, position_ids)
        last = at_last_token(hidden, attention_mask) if read_at is None else hidden[read_at[:, 0], read_at[:, 1]]
        return head(last).squeeze(-1).float()  # the head only at N positions, not N*T


class PairwiseOutput(NamedTuple):
    loss: torch.Tensor  # scalar
    accuracy: torch.Tensor  # scalar: fraction of pairs with r_chosen > r_rejected
    margin: torch.Tensor  # scalar: mean r_chosen - r_rejected


def bradley_terry(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None, center_coef: float | None = None
) -> PairwiseOutput:
    """Pairwise loss on (B,) rewards, as TRL's RewardTrainer:

    loss = mean(-log sigmoid(r_c - r_r - m)) + center_coef * mean((r_c + r_r)^2)
    The centering term (Eisenstein et al. 2023) keeps rewards near zero.
    """
    diff = chosen - rejected
    loss = -F.logsigmoid(diff - (margin if margin is not None else 0.0)).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return PairwiseOutput(loss, (diff > 0).float().mean(), diff.mean())
