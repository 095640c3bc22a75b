"""The policy's LoRA adapter as an inference engine (vLLM) takes it from memory after each update: its tensors under
the names peft saves them with, and the config vLLM reads. Never merged into the base; nothing is written.

vLLM builds an in-memory adapter with LoRAModel.from_lora_tensors(tensors, PEFTHelper.from_dict(config))
(vllm/lora/lora_model.py, vllm/lora/peft_helper.py). Each tensor name is parsed by parse_fine_tuned_lora_name
(vllm/lora/utils.py): "base_model.model." is dropped, then `<module>.lora_A.weight` / `.lora_B.weight` (a linear
layer) or `<module>.lora_embedding_A` / `_B` (an embedding) name the module and the factor; any other name is an
error. Those are the names of peft's adapter_model.safetensors; in memory peft puts the adapter's name after the
factor (`...q_proj.lora_A.default.weight`), and one model holds several adapters (policy, critic, reward, reference).
PEFTHelper needs r, lora_alpha and target_modules, scales by alpha / r (alpha / sqrt(r) with use_rslora), and
refuses DoRA and modules_to_save.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from lora_rl.models.build import ModelError

PEFT_PREFIX = "base_model.model."
# peft's in-memory names of LoRA factors: the module, the factor, the adapter's name, and `.weight` for nn.Linear's
LINEAR_FACTOR = re.compile(r"(?P<module>.+)\.(?P<factor>lora_A|lora_B)\.(?P<adapter>[^.]+)\.weight")
EMBEDDING_FACTOR = re.compile(r"(?P<module>.+)\.(?P<factor>lora_embedding_A|lora_embedding_B)\.(?P<adapter>[^.]+)")


def engine_tensors(named: Iterable[tuple[str, torch.Tensor]], adapter: str = "default") -> dict[str, torch.Tensor]:
    """A PeftModel's (name, tensor) pairs (named_parameters()) -> adapter `adapter`'s LoRA factors, named as peft saves
    them and vLLM parses them: `base_model.model.<module>.lora_A.weight`. The base and every other adapter are left
    out; the tensors are the model's own, detached (no copy). What vLLM cannot load (a DoRA magnitude, a LoRA bias, a
    module saved whole) is a ModelError naming it."""
    found, refused = {}, []
    for name, tensor in named:
        if not name.startswith(PEFT_PREFIX) or f".{adapter}." not in f"{name}.":
            continue  # the base, or another adapter
        match = LINEAR_FACTOR.fullmatch(name) or EMBEDDING_FACTOR.fullmatch(name)
        if match is None or match["adapter"] != adapter:
            refused.append(name)
            continue
        suffix = ".weight" if match.re is LINEAR_FACTOR else ""
        found[f"{match['module']}.{match['factor']}{suffix}"] = tensor.detach()
    if refused:
        raise ModelError(f"adapter {adapter!r}: vLLM loads LoRA factors only; it cannot take {', '.join(refused[:3])}"
                         + (f" and {len(refused) - 3} more" if len(refused) > 3 else ""))  # fmt: skip
    if not found:
        raise ModelError(f"adapter {adapter!r}: the model holds no LoRA factors of it")
    return found


def engine_config(config) -> dict:
    """A peft LoraConfig -> the adapter config vLLM's PEFTHelper.from_dict reads: r, lora_alpha, target_modules (a
    sorted list, or the string peft was given) and use_rslora. What vLLM would refuse or scale otherwise than peft
    (DoRA, modules saved whole, per-module ranks or alphas) is a ModelError listing each."""
    unsupported = {
        "use_dora": "DoRA",
        "modules_to_save": "modules saved whole (modules_to_save)",
        "rank_pattern": "per-module ranks (rank_pattern)",
        "alpha_pattern": "per-module alphas (alpha_pattern)",
        "lora_bias": "LoRA biases (lora_bias)",
    }
    found = [what for attr, what in unsupported.items() if getattr(config, attr, None)]
    if found:
        raise ModelError(f"vLLM cannot serve this adapter: {', '.join(found)}")
    targets = config.target_modules
    return {"r": config.r, "lora_alpha": config.lora_alpha, "use_rslora": config.use_rslora,
            "target_modules": targets if isinstance(targets, str) else sorted(targets)}  # fmt: skip
