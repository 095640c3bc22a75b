"""Guards of a training step: non-finite values skip or stop (BadUpdate), gradient clipping, mixed precision."""

from __future__ import annotations

import math

import torch

from lora_rl import display
from lora_rl.recipe import RecipeError


def check_mixed_precision(precision: str) -> None:
    """fp16 needs a GPU; bf16 runs on CPUs and on GPUs that support it."""
    if precision == "fp16" and not torch.cuda.is_available():
        raise RecipeError(
            ["train.mixed_precision: got 'fp16'; fp16 needs a CUDA GPU, this machine has none: use bf16 or no"]
        )
    if precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise RecipeError(["train.mixed_precision: got 'bf16'; this GPU does not support bf16: use fp16 or no"])


class BadUpdate(Exception):
    """A non-finite value at an update or optimizer step: nothing from it is applied or saved."""


def clip_gradients(accelerator, model: torch.nn.Module, max_norm: float | None) -> bool:
    """Clip the gradients to `max_norm` (None: only measure them); whether their norm is finite.

    All the prepared model's parameters (frozen ones have no gradient): accelerate then uses FSDP's own clipping,
    whose norm covers every rank's shard, not this rank's alone, so every process gets the same answer. DeepSpeed
    clips (and steps) inside backward and may report no norm: taken as finite here.
    """
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm or math.inf)
    return norm is None or math.isfinite(float(norm))


def skip_or_stop(problem: str, in_a_row: int, limit: int, unit: str, key: str, main: bool) -> None:
    """After an update or step skipped for `problem` (`in_a_row` so far): warn, and stop the run at `limit`."""
    if main:  # the same on every process
        display.print_warnings([f"{problem}; {unit} skipped ({in_a_row} in a row)"])
    if in_a_row >= limit:
        raise BadUpdate(f"stopping: {in_a_row} consecutive {unit}s with non-finite values ({key}: {limit})")
