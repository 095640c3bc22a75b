"""RL numbers under the settings users run: gradient checkpointing with a critic adapter, dropout, bf16,
skipped updates, fp16 loss scaling. Each test compares against an independent reference run."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lora_rl.rl import loop as train_ppo
from lora_rl.rl import ppo
from lora_rl.rl.objectives import Advantages, PPOObjective
from lora_rl.rl.roles import CRITIC, POLICY, ActorCritic
from lora_rl.rl.rollout import collect
from tests.test_roles import ROOT, ppo_recipe, randomize, roles_for, rows

PROMPTS = ["what about the cat ?", "tell about the sea ?", "why about the sun ?", "give about the book ?"]


def setup(write_recipe, seed: int = 0, **sections):
    """Roles with random policy and critic adapters and value head (so every role's weights matter)."""
    sections = {"generation": {"max_new_tokens": 6}, "ppo": {"rollout_batch_size": 4}, **sections}
    sections["train"] = {"batch_size": 2, "learning_rate": 1e-2, **sections.get("train", {})}
    recipe = ppo_recipe(write_recipe, **sections)
    torch.manual_seed(seed)  # peft draws lora_A from the global generator
    built, roles = roles_for(recipe)
    randomize(roles.model, POLICY, seed=seed)
    if roles.critic_adapter:
        randomize(roles.model, CRITIC, seed=seed + 1)
    with torch.no_grad():
        roles.value_head.weight.normal_(std=0.1, generator=torch.Generator().manual_seed(seed))
    actor_critic = ActorCritic(roles, 1.0)
    return recipe, built, roles, actor_critic


def rollout_of(built, roles, actor_critic, recipe):
    ids, mask = train_ppo.pad(built.tokenizer(PROMPTS)["input_ids"], built.tokenizer.pad_token_id, "left")
    torch.manual_seed(0)
    rollout, _ = collect(actor_critic, roles, built.tokenizer, rows(PROMPTS), ids, mask, recipe.generation)
    return rollout


def optimise(actor_critic, recipe, rollout, accelerator=None, optimizer=None, advantages=None):
    from accelerate import Accelerator

    if optimizer is None:
        optimizer = torch.optim.AdamW(trainable_params(actor_critic), lr=recipe.train.learning_rate)
    if advantages is None:
        rewards = ppo.kl_shaped_rewards(torch.tensor([1.0, -1.0, 0.5, 2.0]), rollout.logprobs * 0, rollout.mask, 0.0)
        found = Advantages(*ppo.gae(rewards, rollout.values, rollout.mask, 1.0, 0.95), None)
    else:
        found = Advantages(advantages, advantages, None)
    return train_ppo.optimise(accelerator or Accelerator(), actor_critic, optimizer, rollout, found,
                              PPOObjective(recipe), recipe, recipe.ppo.ppo_epochs, torch.Generator().manual_seed(0),
                              1)  # fmt: skip


def trainable_params(actor_critic) -> list[torch.nn.Parameter]:
    return [p for p in actor_critic.parameters() if p.requires_grad]


def trained_weights(actor_critic) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in actor_critic.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- 1. critic adapter + gradient checkpointing


def test_critic_adapter_gradients_are_the_same_with_and_without_gradient_checkpointing(write_recipe):
    """Checkpointing recomputes each block's forward during backward, after the critic's scope has ended: the
    recomputation must run under the critic adapter again, not under the policy's."""
    results, before, rollout = {}, None, None
    for checkpointing in (False, True):
        recipe, built, roles, actor_critic = setup(
            write_recipe, critic={"mode": "adapter"}, train={"gradient_checkpointing": checkpointing}
        )
        before = before or trained_weights(actor_critic)
        optimizer = torch.optim.AdamW(trainable_params(actor_critic), lr=recipe.train.learning_rate)  # as run() does
        rollout = rollout or rollout_of(built, roles, actor_critic, recipe)
        optimise(actor_critic, recipe, rollout, optimizer=optimizer)
        results[checkpointing] = trained_weights(actor_critic)
    critic = [n for n in results[False] if f"lora_B.{CRITIC}." in n and "lm_head" not in n]  # values: no LM head
    assert critic and all(not torch.equal(results[False][n], before[n]) for n in critic)
    for name, weight in results[False].items():
        torch.testing.assert_close(results[True][name], weight, rtol=1e-5, atol=1e-6, msg=name)


def test_a_recomputed_forward_runs_under_the_adapter_it_ran_with(write_recipe):
    """Not only the critic: any forward under a non-default adapter whose backward runs later."""
    recipe, built, roles, actor_critic = setup(
        write_recipe, critic={"mode": "adapter"}, train={"gradient_checkpointing": True}
    )
    roles.model.train()
    ids = torch.tensor([[2, 20, 21, 22, 23]])
    grads = {}
    for checkpointing in (True, False):
        for layer in roles.model.modules():
            if hasattr(layer, "gradient_checkpointing") and hasattr(layer, "_gradient_checkpointing_func"):
                layer.gradient_checkpointing = checkpointing
        with roles.use(CRITIC):
            hidden = roles.model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        hidden.square().sum().backward()  # the policy adapter is active again here
        grads[checkpointing] = {n: p.grad.clone() for n, p in roles.model.named_parameters() if p.grad is not None}
        roles.model.zero_grad(set_to_none=True)
    assert any(f".{CRITIC}." in n for n in grads[False])
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- 2. dropout


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_first_micro_batch_of_an_update_has_ratio_one_with_dropout_in_the_config(write_recipe, model):
    """GPT-2's config has 0.1 dropout everywhere, and lora_dropout is 0.1: with dropout on in training but off
    while sampling, the ratio measures dropout noise. One epoch, one micro-batch: approx_kl and clip fraction
    must be 0 (up to float rounding: the full forward and generate's cached steps sum in another order)."""
    common = dict(actor={"model": {"path": model, "lora_rank": 4, "lora_dropout": 0.1, "target_modules": None}},
                  train={"batch_size": 4}, ppo={"rollout_batch_size": 4, "ppo_epochs": 1})  # fmt: skip
    recipe, built, roles, actor_critic = setup(write_recipe, **common)
    stats = optimise(actor_critic, recipe, rollout_of(built, roles, actor_critic, recipe))
    assert stats["approx_kl"] < 1e-9 and stats["clip_fraction"] == 0.0
    # the key that keeps dropout: then the ratio is not 1 (so this test can fail)
    recipe, built, roles, actor_critic = setup(write_recipe, ppo={**common["ppo"], "disable_dropout": False},
                                               **{k: v for k, v in common.items() if k != "ppo"})  # fmt: skip
    stats = optimise(actor_critic, recipe, rollout_of(built, roles, actor_critic, recipe))
    assert stats["approx_kl"] > 1e-4


# ---------------------------------------------------------------- 6. bf16: old and reference log-probs


def run_ppo(out, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "lora_rl", "ppo", str(ROOT / "recipes/ppo-demo.yaml"), f"output_dir={out}",
            f"data.train_path={ROOT / 'recipes/data/prompts-demo.jsonl'}", *overrides]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT)


def test_bf16_fresh_adapter_has_zero_kl_and_ratio_one_at_the_first_update(tmp_path):
    """A fresh adapter (lora_B = 0) is the base exactly, so the first update's KL must be 0 and its first
    micro-batch's ratio 1, also under bf16 autocast, where generate's cached steps and a full forward differ."""
    result = run_ppo(tmp_path / "out", "ppo.num_updates=1", "train.mixed_precision=bf16", "ppo.ppo_epochs=1",
                     "train.batch_size=32")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads((tmp_path / "out/metrics.jsonl").read_text().splitlines()[0])
    assert line["kl"] == 0.0 and line["approx_kl"] == 0.0 and line["clip_fraction"] == 0.0, line


# ---------------------------------------------------------------- 7. a skipped update is skipped whole


def test_bad_update_after_some_steps_restores_weights_optimizer_and_statistics(write_recipe):
    recipe, built, roles, actor_critic = setup(write_recipe, train={"batch_size": 1})
    rollout = rollout_of(built, roles, actor_critic, recipe)
    params = [p for p in actor_critic.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.train.learning_rate)
    optimise(actor_critic, recipe, rollout, optimizer=optimizer)  # optimizer state exists
    moments = ppo.RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 4.0]))
    weights, state = trained_weights(actor_critic), json.dumps(moments.state_dict())
    adam = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in params}

    snapshot = train_ppo.UpdateSnapshot(actor_critic, optimizer, moments)
    moments.update(torch.tensor([100.0]))
    advantages = torch.ones_like(rollout.logprobs)
    advantages[3] = float("nan")  # micro-batch order is seeded: a later one than the first
    with pytest.raises(train_ppo.BadUpdate):
        optimise(actor_critic, recipe, rollout, optimizer=optimizer, advantages=advantages)
    assert any(not torch.equal(p, weights[n]) for n, p in trained_weights(actor_critic).items()), "no step ran"
    snapshot.restore()

    assert all(torch.equal(p, weights[n]) for n, p in trained_weights(actor_critic).items())
    assert json.dumps(moments.state_dict()) == state
    for p in params:
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in adam[id(p)].items())


def test_a_run_whose_last_update_fails_midway_saves_the_weights_of_the_update_before(tmp_path, monkeypatch):
    """Update 2 fails at its third micro-batch, after an optimizer step: the final adapter must equal that
    of a run that stopped after update 1."""
    from tests.test_train_ppo import demo

    calls, real = {"n": 0}, ppo.policy_loss

    def failing(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out._replace(loss=out.loss * float("nan")) if calls["n"] == 7 else out

    # 32 prompts: 4 micro-batches and steps per update. A constant rate: runs of 1 and 2 updates share their first
    # update's rates only then (a decaying schedule spans the whole run; test_lr_schedule checks its undo)
    common = ["train.batch_size=8", "ppo.ppo_epochs=1", "train.lr_scheduler=constant"]
    result, one = demo(tmp_path / "one", "ppo.num_updates=1", *common)
    assert result.exit_code == 0, result.output
    monkeypatch.setattr(ppo, "policy_loss", failing)
    result, two = demo(tmp_path / "two", "ppo.num_updates=2", *common)
    assert result.exit_code == 0, result.output
    assert "update 2: non-finite loss" in result.stderr and calls["n"] == 7
    a, b = (load_file(d / "final/adapter_model.safetensors") for d in (one, two))
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_file(d / "final/value_head.safetensors") for d in (one, two))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_overflow_is_the_grad_scalers_skip_not_a_bad_update(write_recipe):
    """With fp16 a GradScaler scales the loss; an overflow makes the gradient norm inf, and the scaler skips that
    step and lowers its scale. It is not a bad update, and the next step must work ("unscale_() has already been
    called" if the scaler was never told)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    recipe, built, roles, actor_critic = setup(write_recipe, train={"batch_size": 1})
    rollout = rollout_of(built, roles, actor_critic, recipe)
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision="fp16")
    accelerator.native_amp = False  # no fp16 autocast on CPU; the scaler is what is tested
    # 2^126 overflows the first step; the backoff then brings the scale down to 2^26
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**126, backoff_factor=2.0**-100)
    params = [p for p in actor_critic.parameters() if p.requires_grad]
    model, optimizer = accelerator.prepare(actor_critic, torch.optim.AdamW(params, lr=recipe.train.learning_rate))
    accelerator.native_amp = True  # unscale_gradients acts only with native AMP
    before = trained_weights(actor_critic)
    try:
        stats = optimise(model, recipe, rollout, accelerator=accelerator, optimizer=optimizer)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert accelerator.scaler.get_scale() < 2.0**30  # it overflowed and backed off
    assert stats["overflow_steps"] >= 1
    assert any(not torch.equal(p, before[n]) for n, p in trained_weights(actor_critic).items())  # later steps ran


def test_the_models_generation_config_does_not_change_what_the_policy_samples(write_recipe):
    """The log-probs are the policy's at the recipe's temperature alone. A model's generation_config.json
    (Qwen2.5-Instruct's sets top_k 20, top_p 0.8, repetition_penalty 1.05) filled in whatever generate() was not
    given, so the samples came from another distribution than the one trained on: silently off-policy."""
    from lora_rl.models.reward_model import transformers_model

    recipe, built, roles, actor_critic = setup(write_recipe)
    plain = rollout_of(built, roles, actor_critic, recipe).input_ids
    model = transformers_model(roles.model)
    model.generation_config.update(top_k=1, top_p=0.5, repetition_penalty=5.0, no_repeat_ngram_size=1)
    assert torch.equal(rollout_of(built, roles, actor_critic, recipe).input_ids, plain)
    assert model.generation_config.top_k == 1 and model.generation_config.repetition_penalty == 5.0  # left as found


def test_entropy_is_computed_once_per_completion_and_averaged_over_those(write_recipe, monkeypatch):
    """Entropy is a statistic (a softmax over the vocabulary at every response token): the first epoch's forwards
    cover every completion once; later epochs and the rollout compute none. Its metric averages what was computed."""
    from lora_rl.rl import roles as roles_module

    recipe, built, roles, actor_critic = setup(write_recipe, ppo={"rollout_batch_size": 4, "ppo_epochs": 3})
    real, seen = roles_module.entropy_from_logits, []

    def counted(logits, temperature=1.0, chunk_size=32):
        values = real(logits, temperature, chunk_size)
        seen.append(values)
        return values

    monkeypatch.setattr(roles_module, "entropy_from_logits", counted)
    rollout = rollout_of(built, roles, actor_critic, recipe)
    assert seen == []  # the rollout keeps none
    stats = optimise(actor_critic, recipe, rollout)
    assert len(seen) == 2  # 4 completions, micro-batches of 2, first of 3 epochs only
    assert stats["entropy"] > 0 and math.isfinite(stats["entropy"])
