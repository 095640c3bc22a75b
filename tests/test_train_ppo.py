"""ppo: one update from its parts (what changes, what must not), and whole runs through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from lora_rl.cli import app
from lora_rl.recipe import RecipeError
from lora_rl.rl import loop as train_ppo
from lora_rl.rl import ppo
from lora_rl.rl import setup as rl_setup
from lora_rl.rl.objectives import Advantages, PPOObjective
from lora_rl.rl.roles import ActorCritic, reference_logprobs
from lora_rl.rl.rollout import collect
from lora_rl.training.checkpoint import verify
from tests.test_load import make_adapter
from tests.test_roles import ROOT, ppo_recipe, randomize, roles_for, rows

PROMPTS = ["what about the cat ?", "tell about the sea ?", "why about the sun ?", "give about the book ?"]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def one_update(write_recipe, **sections):
    """setup -> collect -> advantages -> optimise, as train_ppo.run does for each update."""
    from accelerate import Accelerator

    recipe = ppo_recipe(write_recipe, generation={"max_new_tokens": 6}, train={"batch_size": 2, "learning_rate": 1e-2},
                        ppo={"rollout_batch_size": 4}, **sections)  # fmt: skip
    built, roles = roles_for(recipe)
    actor_critic = ActorCritic(roles, 1.0)
    params = [p for p in actor_critic.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.train.learning_rate)
    ids, mask = train_ppo.pad(built.tokenizer(PROMPTS)["input_ids"], 0, "left")
    torch.manual_seed(0)
    rollout, _ = collect(actor_critic, roles, built.tokenizer, rows(PROMPTS), ids, mask, recipe.generation)
    rewards = ppo.kl_shaped_rewards(rollout.scores + 1.0, rollout.logprobs * 0, rollout.mask, 0.0)
    found = Advantages(*ppo.gae(rewards, rollout.values, rollout.mask, 1.0, 0.95), None)
    step = lambda: train_ppo.optimise(Accelerator(), actor_critic, optimizer, rollout, found,  # noqa: E731
                                      PPOObjective(recipe), recipe, 1, torch.Generator().manual_seed(0), 1)  # fmt: skip
    return roles, actor_critic, rollout, step


def test_one_update_changes_only_adapter_and_head_and_reference_stays_the_base(write_recipe, llama_dir):
    roles, actor_critic, rollout, step = one_update(write_recipe)
    before = {n: p.detach().clone() for n, p in actor_critic.named_parameters()}
    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ids, mask, width = rollout.input_ids, rollout.attention_mask, rollout.prompt_width
    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    expected = torch.log_softmax(base_logits[:, width - 1 : -1], -1).gather(-1, ids[:, width:, None]).squeeze(-1)
    assert torch.allclose(reference_logprobs(roles, ids, mask, width, 1.0), expected, atol=1e-5)

    step()

    changed = {n for n, p in actor_critic.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n or n.startswith("value_head") for n in changed)
    assert any(n.startswith("value_head") for n in changed) and any(".default." in n for n in changed)
    assert all(torch.equal(p, before[n]) for n, p in actor_critic.named_parameters() if "lora_" not in n
               and not n.startswith("value_head")), "a base weight changed"  # fmt: skip
    assert torch.allclose(reference_logprobs(roles, ids, mask, width, 1.0), expected, atol=1e-5)


@pytest.mark.parametrize(
    "model, critic", [("tiny-llama", "shared"), ("tiny-gpt2", "shared"), ("tiny-llama", "adapter")]
)
def test_old_logprobs_and_values_from_generation_equal_a_full_forward(write_recipe, model, critic):
    """The rollout reads the policy's hidden states off generate's steps; a full forward over the same
    left-padded prompts and responses (post-EOS tokens masked) must give the same log-probs and values."""
    recipe = ppo_recipe(
        write_recipe,
        actor={"model": {"path": model, "lora_rank": 4, "target_modules": None}},
        generation={"max_new_tokens": 8, "temperature": 0.7, "top_k": 50},
        critic={"mode": critic},
    )
    built, roles = roles_for(recipe)
    randomize(roles.model)  # the policy adapter (lm_head included) moves the logits away from the base's
    with torch.no_grad():
        roles.value_head.weight.normal_(std=0.1, generator=torch.Generator().manual_seed(1))
    actor_critic = ActorCritic(roles, 0.7)
    prompts = ["what about the cat ?", "sea", "why about the sun and the book ?", "give the book ?"]
    ids, mask = train_ppo.pad(built.tokenizer(prompts)["input_ids"], built.tokenizer.pad_token_id, "left")
    torch.manual_seed(0)
    rollout, _ = collect(actor_critic, roles, built.tokenizer, rows(prompts), ids, mask, recipe.generation)
    with torch.no_grad():
        full = actor_critic(rollout.input_ids, rollout.attention_mask, rollout.prompt_width)
    valid = rollout.mask
    assert valid.sum() > 8 and (valid.sum(1) > 1).all()
    # float32 summation order differs between cached steps and one pass: ~1e-6 relative
    assert torch.allclose(rollout.logprobs[valid], full.logprobs[valid], rtol=1e-5, atol=1e-5)
    assert torch.allclose(rollout.values[valid], full.values[valid], rtol=1e-5, atol=1e-5)
    assert rollout.values[valid].abs().max() > 1e-2  # a real value head, not zeros on both sides


def test_tokens_after_eos_change_no_loss(write_recipe):
    roles, actor_critic, rollout, _ = one_update(write_recipe)
    mask = rollout.mask.clone()
    mask[:, 2:] = False  # every response ends after 2 tokens; the rest is "after EOS"
    attention = rollout.attention_mask.clone()
    attention[:, rollout.prompt_width + 2 :] = 0
    losses = []
    for filler in (5, 77):
        ids = rollout.input_ids.clone()
        ids[:, rollout.prompt_width + 2 :] = filler
        with torch.no_grad():
            out = actor_critic(ids, attention, rollout.prompt_width)
        advantages = torch.ones_like(out.logprobs)
        losses.append((ppo.policy_loss(out.logprobs, out.logprobs.detach() - 0.1, advantages, mask, 0.2).loss,
                       ppo.value_loss(out.values, out.values * 0, advantages, mask, 0.2).loss))  # fmt: skip
    assert torch.equal(losses[0][0], losses[1][0]) and torch.equal(losses[0][1], losses[1][1])


def run_cli(*args: str) -> object:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def demo(tmp_path, *overrides: str) -> tuple[object, Path]:
    out = tmp_path / "ppo"
    result = run_cli("ppo", str(ROOT / "recipes/ppo-demo.yaml"), f"output_dir={out}",
                     f"data.train_path={ROOT / 'recipes/data/prompts-demo.jsonl'}", *overrides)  # fmt: skip
    return result, out


def test_demo_raises_mean_reward(tmp_path):
    # 4 seeds x 30 updates gave first-5 means 0.02-0.04 and last-5 means 0.64-0.82 (smallest gain 0.61):
    # a gain above 0.3 leaves half of the smallest observed gain as headroom.
    result, out = demo(tmp_path, "ppo.num_updates=30")
    assert result.exit_code == 0, result.output
    rewards = [m["reward"] for m in metrics(out)]
    assert len(rewards) == 30 and sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.3
    line = metrics(out)[-1]
    for key in ("kl", "entropy", "policy_loss", "value_loss", "clip_fraction", "approx_kl", "response_length",
                "time_generate", "time_score", "time_train", "kl_coef"):  # fmt: skip
        assert key in line, key


def test_final_policy_adapter_loads_with_plain_peft(tmp_path, llama_dir):
    result, out = demo(tmp_path, "ppo.num_updates=2", "train.save_every=1")
    assert result.exit_code == 0, result.output
    assert verify(out / "final")["step"] == 2 and verify(out / "checkpoint-1")["step"] == 1
    assert (out / "final" / "value_head.safetensors").is_file()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), out / "final")
    ids = torch.tensor([[2, 20, 21]])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            assert not torch.allclose(model(input_ids=ids).logits, tuned)


@pytest.mark.parametrize(
    "overrides",
    [
        ["critic.mode=adapter"],
        [
            "critic.mode=shared",
            "ppo.adaptive_kl=true",
            "ppo.kl_estimator=k3",
            "ppo.normalize_rewards=true",
            "ppo.reward_clip=2.0",
            "ppo.missing_eos_penalty=0.5",
        ],
        ["generation.chat_template=true", "generation.top_k=20", "generation.top_p=0.9"],
        ["actor.model.is_lora=false", "actor.model.target_modules=null"],
    ],
    ids=["critic-adapter", "options", "chat-template", "full-fine-tuning"],
)
def test_modes_run(tmp_path, overrides):
    result, out = demo(tmp_path, "ppo.num_updates=2", *overrides)
    assert result.exit_code == 0, result.output
    assert [m["update"] for m in metrics(out)] == [1, 2]


def test_reward_adapter_and_reward_model_sources_run(tmp_path, gpt2_dir):
    reward_dir = tmp_path / "reward"
    trained = run_cli("train-reward", str(ROOT / "recipes/reward-demo.yaml"), f"output_dir={reward_dir}",
                      f"data.train_path={ROOT / 'recipes/data/reward-demo.jsonl'}", "train.max_steps=2")  # fmt: skip
    assert trained.exit_code == 0, trained.output
    # the policy samples in the chat template; the reward adapter trained on plain pairs (its recipe.yaml says so)
    mismatch = (f"warning: reward.adapter {reward_dir / 'final'} was trained with data.chat_template: false (its "
                "recipe.yaml), the policy samples with generation.chat_template: true: it reads the policy's tokens, "
                "formatted unlike its training pairs; train it with data.chat_template: true")  # fmt: skip
    for source in (f"reward.adapter={reward_dir / 'final'}", f"reward.model={gpt2_dir}"):
        result, out = demo(tmp_path / source.split("=")[0], "ppo.num_updates=2", "reward.function=null", source,
                           "generation.chat_template=true")  # fmt: skip
        assert result.exit_code == 0, result.output
        assert len(metrics(out)) == 2
        warned = [line for line in result.stderr.splitlines() if "chat_template" in line]
        assert warned == ([mismatch] if "adapter" in source else []), source  # gpt2_dir: no recipe.yaml, no claim


def test_initial_adapter_reference_starts_at_zero_kl(tmp_path):
    first, start = demo(tmp_path / "a", "ppo.num_updates=3")
    assert first.exit_code == 0, first.output
    common = ["ppo.num_updates=1", f"actor.model.lora_path={start / 'final'}", "actor.model.target_modules=null",
              "actor.model.lora_rank=8", "actor.model.lora_alpha=16"]  # fmt: skip
    result, out = demo(tmp_path / "b", *common)  # lora_path set: reference defaults to initial_adapter
    assert result.exit_code == 0, result.output
    # The policy starts as the reference (identical weights): zero KL up to float summation order, as old
    # log-probs come from generate's cached steps and the reference's from one full pass.
    assert abs(metrics(out)[0]["kl"]) < 1e-5
    result, out = demo(tmp_path / "c", *common, "ppo.reference=base")
    assert result.exit_code == 0, result.output
    assert abs(metrics(out)[0]["kl"]) > 1e-2


def test_non_finite_loss_skips_updates_then_stops(tmp_path, monkeypatch):
    real = ppo.policy_loss
    monkeypatch.setattr(ppo, "policy_loss", lambda *a, **k: real(*a, **k)._replace(loss=torch.tensor(float("nan"))))
    result, out = demo(tmp_path, "ppo.max_bad_updates=2", "train.save_every=1")
    assert result.exit_code == 1
    assert "warning: update 1: non-finite loss (policy_loss nan" in result.stderr
    assert "update skipped (1 in a row)" in result.stderr
    assert "error: stopping: 2 consecutive updates with non-finite values (ppo.max_bad_updates: 2)" in result.stderr
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("checkpoint-*")) and not (out / "final").exists()


def test_a_reward_function_returning_nan_is_a_named_error(tmp_path):
    result, out = demo(tmp_path, "reward.function=tests.process_rewards:nan")
    assert result.exit_code == 1
    assert ("error: reward function tests.process_rewards:nan: completion 1 of 32: expected a finite number or "
            "None, got nan") in result.stderr  # fmt: skip
    assert not (out / "final").exists() and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["ppo.rollout_batch_size=20", "train.batch_size=3", "train.gradient_accumulation_steps=2"],
            "ppo.rollout_batch_size: 20 is not divisible by train.batch_size x train.gradient_accumulation_steps "
            "= 3 x 2; expected a multiple of 6",
        ),
        (["reward.model=recipes"], "reward.model: 'recipes' has no config.json; expected a model directory"),
        (["ppo.reference=initial_adapter"], "ppo.reference: initial_adapter needs actor.model.lora_path"),
        (
            ["reward.function=null"],
            "reward: set exactly one of reward.adapter, reward.model, reward.function, reward.functions "
            "(found: none)",
        ),
    ],
)
def test_recipe_errors_before_loading(tmp_path, overrides, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    result, out = demo(tmp_path, *overrides)
    assert result.exit_code == 2
    assert message in result.stderr
    assert not out.exists()


def test_check_recipe_reports_every_problem(write_recipe):
    recipe = ppo_recipe(write_recipe, reward={"function": None}, ppo={"rollout_batch_size": 5})
    with pytest.raises(RecipeError) as err:
        rl_setup.check_recipe(recipe)
    assert len(err.value.problems) == 2


def test_pipeline_reward_model_score_of_policy_rises(tmp_path):
    """train-reward demo -> ppo against that reward adapter: the reward model's score of the completions rises.

    3 seeds x 30 updates: first-5 means 2.68-2.72, last-5 means 3.22-3.28 (gains 0.53-0.59); one update's mean
    over 32 completions has a standard error of about 1.2 / sqrt(32), a 5-update mean about 0.1: a gain above
    0.25 is half the smallest observed gain and 2.5 standard errors.
    """
    reward_dir = tmp_path / "reward"
    trained = run_cli("train-reward", str(ROOT / "recipes/reward-demo.yaml"), f"output_dir={reward_dir}",
                      f"data.train_path={ROOT / 'recipes/data/reward-demo.jsonl'}")  # fmt: skip
    assert trained.exit_code == 0, trained.output
    result, out = demo(tmp_path, "ppo.num_updates=30", "reward.function=null", f"reward.adapter={reward_dir / 'final'}")
    assert result.exit_code == 0, result.output
    rewards = [m["reward"] for m in metrics(out)]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.25


def prompt_batches_warning(write_recipe, llama_dir, capsys, max_length: int, chat_template: bool) -> str:
    """What PromptBatches warns about one prompt: 6 tokens as plain text, 9 in the tiny chat template."""
    recipe = ppo_recipe(write_recipe, data={"max_length": max_length}, generation={"chat_template": chat_template})
    accelerator = SimpleNamespace(is_main_process=True, process_index=0, num_processes=1, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    schedule = rl_setup.schedule_of(recipe, "ppo")
    rows = [{"prompt": "what about the cat ?"}]
    prompts = rl_setup.tokenize_rows(rows, tokenizer, recipe)
    train_ppo.PromptBatches(rows, prompts, tokenizer.pad_token_id, recipe, schedule, accelerator)
    return capsys.readouterr().err.strip()


def test_long_templated_prompts_warn_that_the_templates_start_is_cut(write_recipe, llama_dir, capsys):
    assert prompt_batches_warning(write_recipe, llama_dir, capsys, 8, chat_template=True) == (
        "warning: 1 prompts exceed data.max_length (8) in the chat template (the longest: 9 tokens): their last "
        "tokens are kept, so the template's start (system prompt, role header) is cut; raise data.max_length to 9"
    )
    assert prompt_batches_warning(write_recipe, llama_dir, capsys, 4, chat_template=False) == (
        "warning: 1 prompts exceed data.max_length: their last tokens are kept"  # plain text: the prompt's start
    )


def saved_with(directory: Path, source: Path, recipe: dict) -> Path:
    """A copy of the model or adapter in `source` with a recipe.yaml as lora-rl saves next to its outputs."""
    shutil.copytree(source, directory)
    (directory / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return directory


def test_reward_model_trained_in_the_chat_template_reads_it_and_says_so(write_recipe, gpt2_dir, tmp_path):
    reward_model = saved_with(tmp_path / "rm", gpt2_dir, {"data": {"chat_template": True}})
    recipe = ppo_recipe(write_recipe, reward={"function": None, "model": str(reward_model)})
    assert rl_setup.chat_template_warnings(recipe) == [
        f"reward.model {reward_model} was trained with data.chat_template: true (its recipe.yaml), the policy samples "
        "with generation.chat_template: false: its prompts are formatted for it as it was trained"
    ]
    assert rl_setup.load_reward_model(recipe)[2] is True  # model_rewards then templates the prompt for it
    agreeing = ppo_recipe(write_recipe, reward={"function": None, "model": str(reward_model)},
                          generation={"chat_template": True})  # fmt: skip
    assert rl_setup.chat_template_warnings(agreeing) == []


def test_validate_reports_a_reward_adapter_trained_without_the_template(write_recipe, tmp_path):
    adapter = saved_with(tmp_path / "r", make_adapter(tmp_path / "plain", "tiny-llama", 1, reward=True),
                         {"data": {"chat_template": False}})  # fmt: skip
    recipe = write_recipe({"reward": {"adapter": str(adapter)}, "generation": {"chat_template": True},
                           "data": {"train_path": str(ROOT / "recipes/data/prompts-demo.jsonl")}})  # fmt: skip
    result = run_cli("validate", "--for", "ppo", str(recipe))
    assert result.exit_code == 0, result.output
    assert f"warning: reward.adapter {adapter} was trained with data.chat_template: false" in result.stderr
