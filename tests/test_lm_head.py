"""Log-probs under the model's own logit processing (Gemma 2/3 soft-capping, Granite's logits_scaling, Cohere's
logit_scale): lora-rl's old, new and reference log-probs equal log_softmax of the model's own forward logits; a
model whose processing lora-rl does not apply is refused before it loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from lora_rl.cli import app
from lora_rl.models import tiny
from lora_rl.rl import loop as train_ppo
from lora_rl.rl.roles import POLICY, ActorCritic
from lora_rl.rl.rollout import collect
from tests.test_roles import ROOT, ppo_recipe, randomize, roles_for, rows

SIZE = {"vocab_size": len(tiny.VOCAB), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512,
        "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}  # fmt: skip
# Strong settings: at random init the raw logits are ~0.1, so a soft cap of 30 would change nothing measurable.
FAMILIES = {
    "gemma2": {"final_logit_softcapping": 0.1},
    "gemma3_text": {"final_logit_softcapping": 0.1},
    "granite": {"logits_scaling": 0.05},
    "cohere": {"logit_scale": 20.0},
    "cohere2": {"logit_scale": 20.0},
}
# How much each family's setting multiplies the logits (tanh's slope is at most 1): old log-probs come from
# generate's cached steps, whose float summation order differs from one full pass by ~1e-6 relative
# (test_train_ppo holds it to 1e-5), and the multiplier scales that difference with the logits.
GAIN = {"gemma2": 1.0, "gemma3_text": 1.0, "granite": 20.0, "cohere": 20.0, "cohere2": 20.0}
PROMPTS = ["what about the cat ?", "sea", "why about the sun and the book ?", "give the book ?"]


def save_tiny(directory: Path, model_type: str, **settings) -> Path:
    """A random-init model of `model_type` with the tiny tokenizer, saved where lora-rl loads it by path."""
    config = AutoConfig.for_model(model_type, **SIZE, **settings)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tiny.build_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> tuple[Path, float]:
    directory = save_tiny(tmp_path_factory.mktemp(request.param), request.param, **FAMILIES[request.param])
    return directory, GAIN[request.param]


def forward_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, width: int, temperature: float) -> torch.Tensor:
    """log_softmax of the model's own forward logits at the response tokens."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    return torch.log_softmax(logits[:, width - 1 : -1].float() / temperature, -1).gather(-1, ids[:, width:, None])[
        ..., 0
    ]


def test_logprobs_are_those_of_the_models_own_logits(family, write_recipe):
    directory, gain = family
    recipe = ppo_recipe(write_recipe, actor={"model": {"path": str(directory), "lora_rank": 4}},
                        generation={"max_new_tokens": 8, "temperature": 0.7})  # fmt: skip
    built, roles = roles_for(recipe)
    randomize(roles.model)  # the policy differs from the reference (the base)
    actor_critic = ActorCritic(roles, 0.7)
    ids, mask = train_ppo.pad(built.tokenizer(PROMPTS)["input_ids"], built.tokenizer.pad_token_id, "left")
    torch.manual_seed(0)
    rollout, _ = collect(actor_critic, roles, built.tokenizer, rows(PROMPTS), ids, mask, recipe.generation)
    ids, mask, width, valid = rollout.input_ids, rollout.attention_mask, rollout.prompt_width, rollout.mask
    with torch.no_grad():
        with roles.use(POLICY):
            policy = forward_logprobs(roles.model, ids, mask, width, 0.7)
        with roles.use(None):
            reference = forward_logprobs(roles.model, ids, mask, width, 0.7)
        new = actor_critic(ids, mask, width).logprobs
    assert valid.sum() > 8 and (policy - reference)[valid].abs().max() > 1e-2
    for name, got, expected, tolerance in [("old", rollout.logprobs, policy, 1e-5 * gain), ("new", new, policy, 1e-5),
                                           ("reference", rollout.ref_logprobs, reference, 1e-5)]:  # fmt: skip
        torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=tolerance,
                                   msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip


def test_a_short_ppo_run_on_granite(tmp_path):
    base = save_tiny(tmp_path / "granite", "granite", **FAMILIES["granite"])
    out = tmp_path / "ppo"
    result = CliRunner().invoke(app, ["ppo", str(ROOT / "recipes/ppo-demo.yaml"), f"output_dir={out}",
                                      f"data.train_path={ROOT / 'recipes/data/prompts-demo.jsonl'}",
                                      f"actor.model.path={base}", "ppo.num_updates=2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["update"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize(
    "model_type, setting, value",
    [("falcon_h1", "lm_head_multiplier", 0.5), ("llama", "final_logit_softcapping", 30.0)],
)
def test_logit_processing_lora_rl_does_not_apply_is_refused(tmp_path, write_recipe, model_type, setting, value):
    """One line naming the setting, before any weights load (only a config is there)."""
    AutoConfig.for_model(model_type, **{setting: value}).save_pretrained(tmp_path / "model")
    tiny.build_tokenizer().save_pretrained(tmp_path / "model")
    recipe = write_recipe({"actor": {"model": {"path": str(tmp_path / "model")}},
                           "reward": {"function": "lora_rl.demo_rewards:praise"},
                           "data": {"train_path": str(ROOT / "recipes/data/prompts-demo.jsonl")}})  # fmt: skip
    result = CliRunner().invoke(app, ["ppo", str(recipe)], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and f"{setting} = {value}" in result.stderr
