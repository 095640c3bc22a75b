"""The LM head as the model applies it: some architectures change its output before anything samples from it.

lora-rl computes log-probs from the LM head's input (only at response positions), not from the model's forward,
so it must apply the same processing, or old/new/reference log-probs, KL and entropy describe another
distribution than the one sampled. What each family's ForCausalLM.forward does after `lm_head`, read in
transformers 5.24's sources, by model_type:
- Gemma 2, Gemma 3 (text), VaultGemma, nanochat: logits = cap * tanh(logits / cap), cap = final_logit_softcapping;
- Granite (dense, MoE, shared, hybrid, SWA): logits / logits_scaling;
- Cohere, Cohere 2 (dense, MoE): logits * logit_scale.
Any other model with a setting of that kind is refused before it loads (`unapplied_setting`).

The same holds for sampling: `only_given_sampling` keeps a model's generation_config.json out of generate().
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import GenerationConfig, PretrainedConfig

from lora_rl.models.reward_model import transformers_model


def _softcap(config, logits: torch.Tensor) -> torch.Tensor:
    cap = config.final_logit_softcapping
    return logits if cap is None else torch.tanh(logits / cap) * cap  # the order of operations transformers uses


PROCESSING: dict[str, Callable[[object, torch.Tensor], torch.Tensor]] = {
    **dict.fromkeys(("gemma2", "gemma3_text", "vaultgemma", "nanochat"), _softcap),
    **dict.fromkeys(
        ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa", "granitemoe_swa"),
        lambda config, logits: logits / config.logits_scaling,
    ),  # fmt: skip
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), lambda config, logits: logits * config.logit_scale),
}
# Config settings that transformers' models apply to the LM head's output, each with its value that changes
# nothing. Found by grepping transformers 5.24's modeling files for post-lm_head processing.
SETTINGS = {
    "final_logit_softcapping": None,
    "logits_soft_cap": None,
    "output_logit_soft_cap": None,
    "logits_scaling": 1.0,
    "logit_scale": 1.0,
    "output_multiplier": 1.0,
    "lm_head_multiplier": 1.0,
    "logits_mup_width_multiplier": 1.0,
    "mup_enabled": False,
}


def unapplied_setting(config) -> str | None:
    """The first setting by which the model changes its LM head's output in a way `lm_logits` does not apply, said
    in a sentence; None when there is none (checked on the config: before the weights load)."""
    if config.model_type in PROCESSING:
        return None
    parts = [config, *(value for value in vars(config).values() if isinstance(value, PretrainedConfig))]
    for part in parts:  # a multimodal model keeps them in its text_config
        for name, neutral in SETTINGS.items():
            value = getattr(part, name, neutral)
            if value is not None and value != neutral:
                return (f"this {config.model_type} model sets {name} = {value}, which changes its LM head's logits; "
                        f"lora-rl applies that only for {', '.join(sorted(PROCESSING))}")  # fmt: skip
    return None


def output_layer(model: nn.Module) -> nn.Module:
    """The (peft) model's LM head module, before any processing."""
    return transformers_model(model).get_output_embeddings()


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(..., H) inputs of the LM head -> (..., V) logits as the model's own forward returns them."""
    config = transformers_model(model).config
    process = PROCESSING.get(config.model_type)
    logits = output_layer(model)(hidden)
    return process(config, logits) if process else logits


@contextmanager
def only_given_sampling(model: nn.Module) -> Iterator[None]:
    """generate() samples with exactly the options it is given. It fills in whatever it is not given from the
    model's generation_config.json (Qwen2.5-Instruct's: top_k 20, top_p 0.8, repetition_penalty 1.05), also
    when handed a GenerationConfig; the log-probs are the policy's at the recipe's temperature alone, so any such
    setting makes the samples silently off-policy. For the block, the model's config holds its special tokens only.
    """
    inner = transformers_model(model)
    saved = inner.generation_config
    inner.generation_config = GenerationConfig(
        bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id, pad_token_id=saved.pad_token_id
    )
    try:
        yield
    finally:
        inner.generation_config = saved
