"""A model's context window, read from its config.json without the weights, against the sequences a recipe makes.

A longer sequence fails only once the model runs it, in the middle of training (GPT-2's table of learnt positions
raises IndexError), or runs past what a rotary model learnt; the commands and `validate` check it first.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lora_rl.models.build import resolve_path
from lora_rl.recipe import ModelConfig, RecipeError

# The config attributes naming the positions a model takes, by family; transformers maps most to the first.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def context_window(path: Path, cfg: ModelConfig) -> tuple[int, str] | None:
    """(positions, the config.json key holding them) of the model at `path`; None when its config names none or
    cannot be read (loading the model then says why)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):
        return None
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, config.attribute_map.get(key, key)  # GPT-2 saves max_position_embeddings as n_positions
    return None


def refuse_overlong(keys: str, what: str, positions: int, detail: str, fix: Callable[[int], str],
                    cfg: ModelConfig, model_key: str = "actor.model.path") -> None:  # fmt: skip
    """A RecipeError naming `keys` when `what` takes more `positions` than the model takes; `detail` says where the
    count comes from, `fix(window)` what to set."""
    found = context_window(resolve_path(cfg), cfg)
    if found is None or positions <= found[0]:
        return
    window, key = found
    raise RecipeError([f"{keys}: {what} takes up to {positions} positions ({detail}), over the {window} that "
                       f"{model_key} {cfg.path} takes ({key} in its config.json); {fix(window)}"])  # fmt: skip
