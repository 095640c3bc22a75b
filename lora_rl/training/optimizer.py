"""The optimizer and learning-rate schedule every command trains with: AdamW at train.learning_rate, then
train.lr_scheduler after train.warmup_ratio of the run's optimizer steps (transformers' schedules, as TRL)."""

from __future__ import annotations

import math

import torch

from lora_rl.recipe import TrainConfig


def make_optimizer(params: list[torch.nn.Parameter], train: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int):
    """A LambdaLR stepped once per optimizer step; `total_steps` is the run's whole count (its state, saved in
    each checkpoint, says how far it went)."""
    from transformers import get_scheduler

    warmup = math.ceil(train.warmup_ratio * total_steps)
    name = "constant_with_warmup" if train.lr_scheduler == "constant" else train.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
