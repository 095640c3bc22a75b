"""The policy adapter as vLLM takes it from memory (adapters.engine_adapter), against peft's real module names on
tiny models: the names peft's save_pretrained writes, read by vLLM's name parser re-implemented here."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lora_rl import builtin
from lora_rl.adapters.engine_adapter import engine_config, engine_tensors
from lora_rl.models.build import ModelError, build
from lora_rl.recipe import load_recipe
from lora_rl.rl.roles import CRITIC, POLICY, REFERENCE

ROOT = Path(__file__).resolve().parent.parent
# vllm/lora/utils.py is_base_embeddding_weights: names from_lora_tensors skips (peft saves a tied head's base)
SKIPPED_BY_VLLM = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")


def vllm_parse(name: str) -> tuple[str, bool]:
    """vllm/lora/utils.py parse_fine_tuned_lora_name, without a weights mapper: (module, is_lora_a); other names
    raise as vLLM's does."""
    start = 2 if name.startswith("base_model.model.") else 0
    parts = name.split(".")
    if parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[start:-2]), parts[-2] == "lora_A"
    if parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return ".".join(parts[start:-1]), parts[-1] == "lora_embedding_A"
    raise ValueError(f"{name} is unsupported LoRA weight")


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


@pytest.fixture(scope="module")
def policy():
    """The policy as ppo builds it (the default targets on tiny-llama), with a critic and a reference adapter on
    the same base, as the roles attach them; LoRA B made non-zero so every tensor is told apart."""
    model = quiet(build, load_recipe(ROOT / "recipes/ppo-demo.yaml", ["actor.model.lora_rank=4"]), "causal-lm").model
    quiet(model.add_adapter, CRITIC, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    quiet(model.add_adapter, REFERENCE, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        for param in (p for name, p in model.named_parameters() if "lora_B" in name):
            param.normal_(generator=torch.Generator().manual_seed(param.numel()))
    return model


def test_the_policy_tensors_are_what_peft_saves(policy, tmp_path):
    tensors = engine_tensors(policy.named_parameters(), POLICY)
    quiet(policy.save_pretrained, tmp_path, selected_adapters=[POLICY])
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert set(tensors) == {name for name in saved if not name.endswith(SKIPPED_BY_VLLM)}
    for name, tensor in tensors.items():
        assert torch.equal(tensor, saved[name]), name
    assert not any(".default" in name or CRITIC in name or REFERENCE in name for name in tensors)
    # the model's own tensors, not copies: an update reaches them without another call
    lora_a = next(p for n, p in policy.named_parameters() if n.endswith("q_proj.lora_A.default.weight"))
    assert any(t.data_ptr() == lora_a.data_ptr() for t in tensors.values())


def test_vllm_reads_every_name_as_a_target_module_with_both_factors(policy):
    tensors = engine_tensors(policy.named_parameters(), POLICY)
    config = engine_config(policy.peft_config[POLICY])
    base = policy.get_base_model()
    factors: dict[str, dict[bool, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        module, is_a = vllm_parse(name)
        assert module.rsplit(".", 1)[-1] in config["target_modules"]  # vLLM's check_unexpected_modules
        factors.setdefault(module, {})[is_a] = tensor
    assert len(factors) == 2 * 7 + 1  # 2 layers x q, k, v, o, gate, up, down; and lm_head
    for module, pair in factors.items():
        layer = base.get_submodule(module).base_layer  # a real module of the model, as peft wrapped it
        assert pair[True].shape == (config["r"], layer.in_features)
        assert pair[False].shape == (layer.out_features, config["r"])


def test_other_adapters_map_under_their_own_name(policy, tmp_path):
    critic = engine_tensors(policy.named_parameters(), CRITIC)
    assert sorted({vllm_parse(name)[0].rsplit(".", 1)[-1] for name in critic}) == ["q_proj", "v_proj"]
    quiet(policy.save_pretrained, tmp_path, selected_adapters=[CRITIC])
    assert set(critic) == set(load_file(tmp_path / CRITIC / "adapter_model.safetensors"))


def test_the_config_is_what_vllm_needs_from_peft(policy, tmp_path):
    config = engine_config(policy.peft_config[POLICY])
    quiet(policy.save_pretrained, tmp_path, selected_adapters=[POLICY])
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config == {"r": 4, "lora_alpha": 8, "use_rslora": False, "target_modules": sorted(saved["target_modules"])}
    assert config["r"] == saved["r"] and config["lora_alpha"] == saved["lora_alpha"]


def test_embedding_factors_map_as_peft_saves_them(tmp_path):
    model = quiet(AutoModelForCausalLM.from_pretrained, builtin.materialize("tiny-llama"))
    peft_model = quiet(get_peft_model, model, LoraConfig(r=2, lora_alpha=2, target_modules=["embed_tokens", "q_proj"],
                                                         use_rslora=True))  # fmt: skip
    tensors = engine_tensors(peft_model.named_parameters())
    quiet(peft_model.save_pretrained, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert set(tensors) == {name for name in saved if not name.endswith(SKIPPED_BY_VLLM)}
    assert {"base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.model.embed_tokens."
            "lora_embedding_B"} <= set(tensors)  # fmt: skip
    assert vllm_parse("base_model.model.model.embed_tokens.lora_embedding_A") == ("model.embed_tokens", True)
    assert engine_config(peft_model.peft_config["default"])["use_rslora"] is True


def test_what_vllm_cannot_load_is_refused_by_name():
    model = quiet(AutoModelForCausalLM.from_pretrained, builtin.materialize("tiny-llama"))
    dora = quiet(get_peft_model, model, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ModelError, match=r"^adapter 'default': vLLM loads LoRA factors only; it cannot take "
                                         r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_magnitude_"
                                         r"vector\.default\.weight"):  # fmt: skip
        engine_tensors(dora.named_parameters())
    with pytest.raises(ModelError, match="^vLLM cannot serve this adapter: DoRA$"):
        engine_config(dora.peft_config["default"])
    saved_whole = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(ModelError, match=r"modules saved whole \(modules_to_save\)"):
        engine_config(saved_whole)
    with pytest.raises(ModelError, match="^adapter 'policy': the model holds no LoRA factors of it$"):
        engine_tensors(dora.named_parameters(), "policy")
