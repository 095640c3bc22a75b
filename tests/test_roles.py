"""One base serving every PPO role: adapter scopes, reference = base, reward adapter = its classifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from lora_rl.commands import train_reward
from lora_rl.data import pad
from lora_rl.models.build import ModelError, build
from lora_rl.recipe import load_recipe
from lora_rl.rl import setup as rl_setup
from lora_rl.rl.objectives import objective_for
from lora_rl.rl.rewards import load_prompt_rows
from lora_rl.rl.roles import POLICY, REWARD, adapter_rewards, import_reward_function, reference_logprobs

ROOT = Path(__file__).resolve().parent.parent
IDS = torch.tensor([[2, 20, 21, 22, 23, 24, 25]])


def ppo_recipe(write_recipe, **sections):
    data = {
        "actor": {"model": {"lora_rank": 4, "init_lora_weights": True}},
        "reward": {"function": "lora_rl.demo_rewards:praise"},
        "data": {"train_path": str(ROOT / "recipes/data/prompts-demo.jsonl")},
        "train": {"gradient_checkpointing": False},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return load_recipe(write_recipe(data))


def roles_for(recipe, command: str = "ppo"):
    """The base and roles as `lora-rl COMMAND` sets them up."""
    built = build(recipe, "causal-lm")
    terms = rl_setup.import_rewards(recipe, load_prompt_rows(recipe.data.train_path))
    schedule, objective = rl_setup.schedule_of(recipe, command), objective_for(command, recipe)
    return built, rl_setup.setup_roles(built, recipe, terms, schedule, objective)


def rows(prompts: list[str]) -> list[dict]:
    return [{"prompt": p} for p in prompts]


def randomize(model, adapter: str = POLICY, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f"lora_B.{adapter}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


@pytest.fixture(scope="module")
def reward_adapter(tmp_path_factory):
    """A reward adapter trained for a few steps on the demo pairs (tiny-llama, the policy's base)."""
    tmp = tmp_path_factory.mktemp("reward")
    (tmp / "r.yaml").write_text(json.dumps({
        "output_dir": str(tmp / "out"), "actor": {"model": {"lora_rank": 4, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"train_path": str(ROOT / "recipes/data/reward-demo.jsonl"), "max_length": 32},
        "train": {"max_steps": 3, "batch_size": 8, "learning_rate": 1e-2},
    }))  # fmt: skip
    return train_reward.run(load_recipe(tmp / "r.yaml"))


def test_reference_is_the_untouched_base_exactly(write_recipe, llama_dir):
    built, roles = roles_for(ppo_recipe(write_recipe))
    randomize(roles.model)
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    with torch.no_grad():
        expected = base(input_ids=IDS).logits
        with roles.use(roles.reference_adapter):
            assert torch.equal(roles.model(input_ids=IDS).logits, expected)
        assert not torch.allclose(roles.model(input_ids=IDS).logits, expected)  # the policy differs
        logprobs = reference_logprobs(roles, IDS, torch.ones_like(IDS), 3, temperature=1.0)
    want = torch.log_softmax(expected[:, 2:-1], -1).gather(-1, IDS[:, 3:, None]).squeeze(-1)
    assert torch.allclose(logprobs, want, atol=1e-6)


def test_scope_restores_the_adapter_after_an_exception(write_recipe, reward_adapter):
    _, roles = roles_for(ppo_recipe(write_recipe, reward={"function": None, "adapter": str(reward_adapter)}))
    with pytest.raises(RuntimeError), roles.use(REWARD):
        assert roles.model.active_adapter == REWARD
        raise RuntimeError("mid-forward")
    assert roles.model.active_adapter == POLICY
    with pytest.raises(RuntimeError), roles.use(None):
        raise RuntimeError("mid-forward")
    assert roles.model.active_adapter == POLICY
    with torch.no_grad():  # adapters are on again: the policy's output, not the base's
        randomize(roles.model)
        with roles.use(None):
            base = roles.model(input_ids=IDS).logits
        assert not torch.equal(roles.model(input_ids=IDS).logits, base)


def test_only_policy_critic_and_heads_train(write_recipe, reward_adapter, tmp_path):
    recipe = ppo_recipe(
        write_recipe, reward={"function": None, "adapter": str(reward_adapter)}, critic={"mode": "adapter"}
    )
    _, roles = roles_for(recipe)
    for adapter in (REWARD, None, "critic", POLICY):  # peft's set_adapter would unfreeze the reward adapter
        with roles.use(adapter):
            pass
        trainable = {n for n, p in roles.model.named_parameters() if p.requires_grad}
        assert trainable and all(".default." in n or ".critic." in n for n in trainable), adapter
    assert not any(p.requires_grad for p in roles.reward_head.parameters())


def test_reward_adapter_scores_equal_its_sequence_classifier(write_recipe, reward_adapter, llama_dir):
    _, roles = roles_for(ppo_recipe(write_recipe, reward={"function": None, "adapter": str(reward_adapter)}))
    ids, mask = pad([[2, 20, 21, 22, 3], [2, 30], [2, 40, 41]], pad_id=0, side="right")  # a sampled EOS, or none
    classifier = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(llama_dir, num_labels=1, pad_token_id=0), reward_adapter
    )
    with torch.no_grad():  # the reward is read at an EOS: the sampled one, else one appended
        with_eos, eos_mask = pad([[2, 20, 21, 22, 3], [2, 30, 3], [2, 40, 41, 3]], pad_id=0, side="right")
        expected = classifier(input_ids=with_eos, attention_mask=eos_mask).logits.squeeze(-1)
        assert torch.allclose(adapter_rewards(roles, ids, mask, eos_id=3), expected, atol=1e-5)


def test_reward_adapter_for_a_causal_lm_is_refused(write_recipe, tmp_path):
    built = build(ppo_recipe(write_recipe), "causal-lm")
    from lora_rl.training.checkpoint import save_adapter

    save_adapter(built.model, tmp_path / "causal", step=0)
    with pytest.raises(ModelError, match="is a CAUSAL_LM adapter; expected SEQ_CLS"):
        roles_for(ppo_recipe(write_recipe, reward={"function": None, "adapter": str(tmp_path / "causal")}))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("lora_rl.demo_rewards", "expected package.module:function"),
        ("no_such_module:f", "cannot import 'no_such_module:f'"),
        ("lora_rl.demo_rewards:nope", "cannot import 'lora_rl.demo_rewards:nope'"),
        ("lora_rl.demo_rewards:PRAISE", "is not callable"),
    ],
)
def test_bad_reward_function(spec, message):
    with pytest.raises(ModelError, match=message):
        import_reward_function(spec)
