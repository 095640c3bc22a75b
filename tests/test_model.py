from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lora_rl.models import tiny
from lora_rl.models.build import ModelError, build, classifier_head_name, count_parameters, load_base, load_tokenizer
from lora_rl.recipe import load_recipe
from lora_rl.training import checkpoint

V = len(tiny.VOCAB)


def recipe_for(write_recipe, model: dict, **train):
    return load_recipe(write_recipe({"actor": {"model": model}, "train": {"gradient_checkpointing": False, **train}}))


def lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def test_llama_default_list_matches_its_layers_and_counts(write_recipe):
    built = build(recipe_for(write_recipe, {"lora_rank": 4}), "causal-lm")
    matched = {m.entry: m.modules for m in built.report.matches if m.modules}
    assert set(matched) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
    assert matched["q_proj"] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    r = 4
    # r*(in+out) per layer: q 64->64, k 64->32, v 64->32 (2 kv heads of 16), o 64->64,
    # gate 64->128, up 64->128, down 128->64; two layers; lm_head 64->V.
    per_layer = r * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + (64 + 128) + (64 + 128) + (128 + 64))
    assert built.report.trainable == 2 * per_layer + r * (64 + V)
    assert count_parameters(built.model)[0] == built.report.trainable
    assert built.report.warnings == []


def test_gpt2_conv1d_targets_count(write_recipe):
    built = build(
        recipe_for(write_recipe, {"path": "tiny-gpt2", "lora_rank": 2, "target_modules": ["c_attn", "c_proj", "c_fc"]}),
        "causal-lm",
    )
    r = 2
    # Conv1D layers: c_attn 64->192, attn.c_proj 64->64, c_fc 64->256, mlp.c_proj 256->64; two layers.
    assert built.report.trainable == 2 * r * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    c_proj = next(m for m in built.report.matches if m.entry == "c_proj")
    assert c_proj.modules == [
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.attn.c_proj",
        "transformer.h.1.mlp.c_proj",
    ]


def test_gpt2_default_list_warns_about_tied_lm_head(write_recipe):
    built = build(recipe_for(write_recipe, {"path": "tiny-gpt2", "lora_rank": 2}), "causal-lm")
    assert [m.modules for m in built.report.matches if m.modules] == [["lm_head"]]
    assert built.report.warnings[0].startswith("lm_head is tied to the input embeddings: vLLM cannot serve")
    assert "its linear layers: c_attn, c_proj, c_fc, lm_head" in built.report.warnings[1]


@pytest.mark.parametrize("spelling", ["all-linear", ["all-linear"]])
def test_all_linear_skips_output_layer(write_recipe, spelling):
    built = build(recipe_for(write_recipe, {"lora_rank": 2, "target_modules": spelling}), "causal-lm")
    (match,) = built.report.matches
    assert len(match.modules) == 14 and "lm_head" not in match.modules
    assert built.report.trainable == 2 * (2 * 1024)  # two layers of r*1024 (see the default-list test), r=2


def test_user_entry_matching_nothing_is_an_error(write_recipe):
    with pytest.raises(ModelError) as err:
        build(recipe_for(write_recipe, {"target_modules": ["q_proj", "c_attn"]}), "causal-lm")
    assert str(err.value) == (
        "actor.model.target_modules: c_attn matched no layer of this model; its linear layers are: "
        "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"
    )


def test_reward_head_trains_whole_and_is_not_lora_wrapped(write_recipe):
    built = build(recipe_for(write_recipe, {"lora_rank": 2, "target_modules": "all-linear"}), "reward")
    names = {n for n, p in built.model.named_parameters() if p.requires_grad}
    assert any(n.endswith("score.modules_to_save.default.weight") for n in names)
    assert not any("score.lora" in n for n in names)
    assert all("score" not in m for m in built.report.matches[0].modules)


def test_reward_head_of_gpt2_is_found(write_recipe, gpt2_dir):
    recipe = recipe_for(write_recipe, {"path": "tiny-gpt2", "target_modules": ["c_attn"]})
    base = load_base(gpt2_dir, recipe.actor.model, "reward", load_tokenizer(gpt2_dir, recipe.actor.model))
    assert classifier_head_name(base) == "score"
    built = build(recipe, "reward")
    assert "score" in built.model.peft_config["default"].modules_to_save
    assert built.model.base_model.model.score.modules_to_save["default"].weight.requires_grad


def test_full_fine_tuning_trains_everything(write_recipe):
    built = build(recipe_for(write_recipe, {"is_lora": False}), "causal-lm")
    assert not isinstance(built.model, PeftModel)
    assert built.report.trainable == built.report.total > 0


def test_num_layers_unfrozen_trains_top_layers_only(write_recipe):
    model = build(recipe_for(write_recipe, {"is_lora": False, "num_layers_unfrozen": 1}), "causal-lm").model
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not grads["model.embed_tokens.weight"]
    assert not grads["model.layers.0.self_attn.q_proj.weight"]
    assert grads["model.layers.1.self_attn.q_proj.weight"]
    assert grads["model.norm.weight"] and grads["lm_head.weight"]


def test_gradient_checkpointing_with_lora_reaches_adapters(write_recipe):
    built = build(
        recipe_for(write_recipe, {"lora_rank": 2, "init_lora_weights": True}, gradient_checkpointing=True), "causal-lm"
    )
    model = built.model
    model.train()
    ids = torch.tensor([[2, 30, 40, 50, 60]])
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def randomize_lora(model, seed: int = 0) -> None:
    """Give LoRA B non-zero values, so the adapter changes outputs (B starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lora_params(model).items():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.fixture
def saved_adapter(write_recipe, tmp_path):
    recipe = recipe_for(write_recipe, {"lora_rank": 4, "target_modules": ["q_proj", "v_proj"]})
    built = build(recipe, "causal-lm")
    randomize_lora(built.model)
    checkpoint.save_adapter(
        built.model,
        tmp_path / "adapter",
        step=3,
        tokenizer=built.tokenizer,
        recipe=recipe,
        extra={"base_fingerprint": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": V}},
    )
    return tmp_path / "adapter", built.model


def test_lora_path_continues_training_with_identical_weights(write_recipe, saved_adapter):
    adapter_dir, original = saved_adapter
    recipe = recipe_for(
        write_recipe, {"lora_rank": 4, "target_modules": ["q_proj", "v_proj"], "lora_path": str(adapter_dir)}
    )
    loaded = build(recipe, "causal-lm").model
    before, after = lora_params(original), lora_params(loaded)
    assert before.keys() == after.keys()
    assert any(t.abs().sum() > 0 for n, t in after.items() if "lora_B" in n)
    for name in before:
        assert torch.equal(before[name], after[name]), name
        assert after[name].requires_grad, name


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"lora_rank": 8}, "its r is 4, the recipe's lora_rank is 8"),
        ({"lora_alpha": 4}, "its lora_alpha is 8, the recipe's lora_alpha is 4"),
        ({"target_modules": ["q_proj"]}, "wrap other layers than the recipe's target_modules"),
    ],
)
def test_lora_path_contradicting_recipe_is_refused(write_recipe, saved_adapter, change, expected):
    adapter_dir, _ = saved_adapter
    model = {"lora_rank": 4, "target_modules": ["q_proj", "v_proj"], "lora_path": str(adapter_dir), **change}
    with pytest.raises(ModelError) as err:
        build(recipe_for(write_recipe, model), "causal-lm")
    assert str(err.value).startswith(f"actor.model.lora_path: {adapter_dir} does not fit the recipe: ")
    assert expected in str(err.value)


def test_lora_path_for_another_base_is_refused(write_recipe, gpt2_dir, tmp_path):
    gpt2 = build(
        recipe_for(write_recipe, {"path": "tiny-gpt2", "lora_rank": 4, "target_modules": ["c_attn"]}), "causal-lm"
    )
    checkpoint.save_adapter(gpt2.model, tmp_path / "gpt2-adapter", step=0)
    recipe = recipe_for(
        write_recipe, {"lora_rank": 4, "target_modules": ["q_proj"], "lora_path": str(tmp_path / "gpt2-adapter")}
    )
    with pytest.raises(ModelError) as err:
        build(recipe, "causal-lm")
    assert f"it was made for base {gpt2_dir} ({{'model_type': 'gpt2'" in str(err.value)


def test_lora_path_with_altered_file_is_refused(write_recipe, saved_adapter):
    adapter_dir, _ = saved_adapter
    weights = adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    recipe = recipe_for(
        write_recipe, {"lora_rank": 4, "target_modules": ["q_proj", "v_proj"], "lora_path": str(adapter_dir)}
    )
    with pytest.raises(checkpoint.CheckpointError, match="adapter_model.safetensors: sha256 differs"):
        build(recipe, "causal-lm")


def test_saved_adapter_loads_with_plain_peft(saved_adapter, llama_dir):
    adapter_dir, original = saved_adapter
    ids = torch.tensor([[2, 20, 21, 22, 23, 24]])
    with torch.no_grad():
        expected = original(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(llama_dir)
        plain = PeftModel.from_pretrained(base, adapter_dir)
        assert torch.equal(plain(input_ids=ids).logits, expected)
        with plain.disable_adapter():  # the adapter really changes the output
            assert not torch.allclose(plain(input_ids=ids).logits, expected)
    assert (adapter_dir / "recipe.yaml").is_file() and (adapter_dir / "tokenizer.json").is_file()


def test_build_leaves_recipe_untouched(write_recipe):
    recipe = recipe_for(write_recipe, {"lora_rank": 2})
    copy = dataclasses.replace(recipe)
    build(recipe, "causal-lm")
    assert recipe == copy


def test_custom_tokenizer_on_a_qwen2_model_is_honoured(tmp_path):
    """transformers 5 would load it as Qwen2's BPE tokenizer (from the model type) and encode nothing."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config

    from lora_rl.recipe import ModelConfig

    core = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2, "w1": 3, "w2": 4}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>").save_pretrained(tmp_path)
    Qwen2Config(vocab_size=5, hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path, ModelConfig())
    assert tokenizer("w1 w2 w1")["input_ids"] == [3, 4, 3]


def test_checkpoint_every_n_layers_recomputes_only_those_layers(write_recipe):
    built = build(recipe_for(write_recipe, {"lora_rank": 2}, gradient_checkpointing=True, checkpoint_every_n_layers=2),
                  "causal-lm")  # fmt: skip
    layers = built.model.base_model.model.model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    every = build(recipe_for(write_recipe, {"lora_rank": 2}, gradient_checkpointing=True), "causal-lm")
    assert all(layer.gradient_checkpointing for layer in every.model.base_model.model.model.layers)


def test_save_adapter_writes_the_given_state_dict(write_recipe, tmp_path):
    """Under FSDP/ZeRO-3 the module holds shards: the weights gathered from every rank are what must be saved."""
    from safetensors.torch import load_file

    built = build(recipe_for(write_recipe, {"lora_rank": 2, "target_modules": ["q_proj"]}), "causal-lm")
    gathered = {k: torch.full_like(v, 0.5) if "lora_B" in k else v for k, v in built.model.state_dict().items()}
    checkpoint.save_adapter(built.model, tmp_path / "a", step=0, state_dict=gathered)
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and all(torch.equal(v, torch.full_like(v, 0.5)) for v in lora_b)
