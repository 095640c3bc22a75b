"""train-reward end to end on the tiny models: what trains, what is saved, and that it reloads."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from lora_rl.cli import app
from lora_rl.commands import train_reward
from lora_rl.data import DataError, PairCollator, load_pairs, pad, tokenize_pairs, tokenize_prompts
from lora_rl.models.reward_model import bradley_terry
from lora_rl.recipe import RecipeError, load_recipe
from lora_rl.rl import ppo
from lora_rl.rl.roles import reward_rows
from lora_rl.rl.rollout import model_rewards
from lora_rl.training.checkpoint import CheckpointError, verify

ROOT = Path(__file__).resolve().parent.parent
DEMO_PAIRS = [json.loads(line) for line in (ROOT / "recipes/data/reward-demo.jsonl").read_text().splitlines()]


@pytest.fixture
def pair_files(tmp_path):
    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    return write("train.jsonl", DEMO_PAIRS[:96]), write("eval.jsonl", DEMO_PAIRS[1000:1032])


def short_recipe(write_recipe, pair_files, model: dict | None = None, train: dict | None = None):
    train_path, eval_path = pair_files
    return load_recipe(write_recipe({
        "actor": {"model": {"lora_rank": 4, "target_modules": ["q_proj", "v_proj"], **(model or {})}},
        "data": {"train_path": train_path, "eval_path": eval_path, "max_length": 32},
        "train": {"batch_size": 8, "max_steps": 6, "learning_rate": 5e-3, **(train or {})},
    }))  # fmt: skip


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def mean_margin_with_plain_peft(base_dir, adapter_dir, eval_path) -> float:
    """The eval set's mean r_chosen - r_rejected, computed by plain transformers + peft (no lora_rl model code)."""
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, pad_token_id=0)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    pairs = tokenize_pairs(load_pairs(eval_path), tokenizer, 32, False).pairs
    batch = PairCollator(tokenizer.pad_token_id)(pairs)
    with torch.no_grad():
        chosen, rejected = (
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1).chunk(2)
        )
    return (chosen - rejected).mean().item()


def test_lora_reward_trains_saves_and_reloads_with_plain_peft(write_recipe, pair_files, llama_dir):
    recipe = short_recipe(write_recipe, pair_files, train={"save_every": 2, "eval_every": 3})
    final = train_reward.run(recipe)
    out = Path(recipe.output_dir)

    # metrics: a train line per step, eval at step 3 and at the end
    lines = metrics(out)
    assert [m["step"] for m in lines if m["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    evals = [m for m in lines if m["split"] == "eval"]
    assert [m["step"] for m in evals] == [3, 6] and evals[-1]["pairs"] == 32
    # checkpoints every 2 steps (not at the last step: final/ is that one), each sealed by a manifest
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert verify(out / "checkpoint-4")["step"] == 4 and verify(final)["step"] == 6
    assert load_recipe(out / "recipe.yaml") == recipe

    # the score head trained (it starts random: without modules_to_save it would stay so) and was saved
    saved = load_file(final / "adapter_model.safetensors")
    base_head = AutoModelForSequenceClassification.from_pretrained(llama_dir, num_labels=1).score.weight
    assert not torch.allclose(saved["base_model.model.score.weight"], base_head)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in saved.items())

    # plain peft gives the rewards training ended with
    margin = mean_margin_with_plain_peft(llama_dir, final, pair_files[1])
    assert margin == pytest.approx(evals[-1]["margin"], abs=1e-4)


def test_packed_and_padded_training_give_the_same_metrics(write_recipe, pair_files):
    """train.pack_pairs changes how the pairs are laid out, not what is computed (float order aside)."""
    runs = []
    for packed in (True, False):
        recipe = short_recipe(write_recipe, pair_files, train={"pack_pairs": packed, "eval_every": 3})
        train_reward.run(recipe, overwrite=True)
        runs.append(metrics(Path(recipe.output_dir)))
    for packed_line, padded_line in zip(*runs, strict=True):
        for name in ("loss", "accuracy", "margin"):
            assert packed_line[name] == pytest.approx(padded_line[name], abs=1e-4), (name, packed_line["step"])


def test_attention_without_custom_masks_falls_back_to_padded_rows(write_recipe, pair_files, capsys):
    recipe = short_recipe(write_recipe, pair_files)
    built = train_reward.build(recipe, "reward")
    assert train_reward.packs(built, recipe, main=True)
    built.model.config._attn_implementation = "flash_attention_2"
    assert not train_reward.packs(built, recipe, main=True)
    assert "train.pack_pairs: flash_attention_2 attention takes no custom mask" in capsys.readouterr().err


def test_score_head_reloads_identically_with_seeded_head(write_recipe, pair_files, llama_dir):
    """The score head saved is the trained one: two loads of the adapter give the same head as the file."""
    final = train_reward.run(short_recipe(write_recipe, pair_files, train={"max_steps": 2}))
    saved = load_file(final / "adapter_model.safetensors")["base_model.model.score.weight"]
    for _ in range(2):  # the base's own score head is random per load; the adapter's replaces it
        base = AutoModelForSequenceClassification.from_pretrained(llama_dir, num_labels=1)
        model = PeftModel.from_pretrained(base, final)
        assert torch.equal(model.base_model.model.score.modules_to_save["default"].weight, saved)


def test_gradient_checkpointing_with_lora_changes_adapters(write_recipe, pair_files):
    final = train_reward.run(short_recipe(write_recipe, pair_files, train={"gradient_checkpointing": True}))
    saved = load_file(final / "adapter_model.safetensors")
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert len(lora_b) == 4 and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero


def test_full_fine_tuning_saves_a_plain_model(write_recipe, pair_files, llama_dir):
    recipe = short_recipe(write_recipe, pair_files, model={"is_lora": False}, train={"max_steps": 2})
    final = train_reward.run(recipe)
    assert (final / "model.safetensors").is_file() and not (final / "adapter_config.json").exists()
    trained = AutoModelForSequenceClassification.from_pretrained(final)
    base = AutoModelForSequenceClassification.from_pretrained(llama_dir, num_labels=1)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained.state_dict()[name], base.state_dict()[name])


def test_training_without_eval_set(write_recipe, pair_files):
    recipe = load_recipe(write_recipe({"data": {"train_path": pair_files[0]}, "train": {"max_steps": 2}}))
    final = train_reward.run(recipe)
    assert verify(final)["step"] == 2
    assert {m["split"] for m in metrics(Path(recipe.output_dir))} == {"train"}


def test_existing_run_refused_without_overwrite(write_recipe, pair_files):
    recipe = short_recipe(write_recipe, pair_files, train={"max_steps": 1})
    train_reward.run(recipe)
    with pytest.raises(CheckpointError, match="already holds a run"):
        train_reward.run(recipe)
    train_reward.run(recipe, overwrite=True)
    assert len([m for m in metrics(Path(recipe.output_dir)) if m["split"] == "train"]) == 1


def test_fp16_on_cpu_refused_before_loading(write_recipe, pair_files):
    recipe = short_recipe(write_recipe, pair_files, train={"mixed_precision": "fp16"})
    with pytest.raises(RecipeError, match="fp16 needs a CUDA GPU"):
        train_reward.run(recipe)
    assert not Path(recipe.output_dir).exists()


def test_bad_data_stops_before_training(write_recipe, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": "a"}\n')
    path = write_recipe({"data": {"train_path": str(bad)}})
    result = CliRunner().invoke(app, ["train-reward", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {bad}: row 2: missing 'rejected'"
    assert not (tmp_path / "out").exists()


def test_pairs_that_tokenize_alike_are_counted_before_training(write_recipe, tmp_path):
    """Pairs whose chosen and rejected read the same (equal texts, or cut by data.max_length before they differ)
    teach nothing: counted in a warning naming their rows in their file, held-out rows included; all of them: an
    error (test_bad_inputs)."""
    rows = [{"chosen": "a good cat", "rejected": "a bad cat"}] * 8
    rows[1] = rows[5] = {"chosen": "the cat", "rejected": "the cat"}
    rows[6] = {"prompt": "the cat is", "chosen": " good and big and old", "rejected": " good and big and new"}
    train = tmp_path / "pairs.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = write_recipe({"data": {"train_path": str(train), "max_length": 8}, "train": {"max_steps": 1}})
    result = CliRunner().invoke(app, ["train-reward", str(path)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert (f"warning: {train}: chosen and rejected tokenize to the same ids in 3 of 8 pairs (rows 2, 6, 7): they "
            "teach nothing (loss log 2, accuracy 0); 2 are the same in full (equal texts, or text the tokenizer "
            "cannot tell apart), 1 differs only past data.max_length 8") in result.stderr  # fmt: skip
    # held out with the seed: the rows keep their numbers in the file
    result = CliRunner().invoke(app, ["validate", str(path), "data.eval_fraction=0.5", "--for", "train-reward"],
                                env={"COLUMNS": "400"})  # fmt: skip
    assert result.exit_code == 0, result.output
    named = re.findall(r"tokenize to the same ids in \d+ of \d+ pairs \(rows? ([\d, ]+)\)", result.stderr)
    assert sorted(int(n) for rows in named for n in rows.split(", ")) == [2, 6, 7], result.stderr


def test_demo_recipe_reaches_accuracy_bar(tmp_path, monkeypatch):
    """The shipped demo, through the CLI: held-out pairwise accuracy >= 0.9."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["train-reward", "recipes/reward-demo.yaml", f"output_dir={out}"])
    assert result.exit_code == 0, result.output
    final_eval = [m for m in metrics(out) if m["split"] == "eval"][-1]
    assert final_eval["pairs"] == 200 and final_eval["accuracy"] >= 0.9
    assert f"saved {out / 'final'}" in result.stdout


def test_eval_metrics_are_defined_as_in_training():
    """With a margin column, accuracy and margin ignore it (as in training and TRL); only the loss uses it."""
    import math

    from accelerate import Accelerator

    from lora_rl.data import PairBatch

    class FixedRewards(torch.nn.Module):  # rows 0..B-1 chosen, B..2B-1 rejected
        def forward(self, input_ids, attention_mask, position_ids, read_at):
            return torch.tensor([2.0, 1.0, 0.0, 0.5])

    batch = PairBatch(torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1, dtype=torch.long), torch.tensor([3.0, 0.0]))
    record = train_reward.evaluate(FixedRewards(), [batch], Accelerator(cpu=True), step=7)
    # diffs 2 - 0 = 2 and 1 - 0.5 = 0.5; margins 3 and 0: loss uses 2 - 3 = -1 and 0.5
    assert record["accuracy"] == 1.0 and record["margin"] == pytest.approx(1.25) and record["pairs"] == 2
    assert record["loss"] == pytest.approx((math.log(1 + math.exp(1)) + math.log(1 + math.exp(-0.5))) / 2)


def test_diverging_run_skips_non_finite_steps_then_stops_with_nothing_final(write_recipe, pair_files):
    """A huge (finite) learning rate blows the weights up after one step: every later step is non-finite."""
    recipe = short_recipe(write_recipe, pair_files, train={"learning_rate": 1e30, "max_bad_steps": 2, "save_every": 1})
    path = Path(recipe.output_dir).parent / "diverge.yaml"
    recipe.save(path)
    result = CliRunner().invoke(app, ["train-reward", str(path)], env={"COLUMNS": "300"})
    assert result.exit_code == 1, result.output
    assert "warning: step 2: non-finite gradient norm; step skipped (1 in a row)" in result.stderr
    assert "error: stopping: 2 consecutive steps with non-finite values (train.max_bad_steps: 2)" in result.stderr
    assert "Traceback" not in result.output
    out = Path(recipe.output_dir)
    assert not (out / "final").exists() and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert all(math.isfinite(m["loss"]) for m in metrics(out))


def test_one_non_finite_step_is_skipped_and_training_goes_on(write_recipe, pair_files, monkeypatch, capsys):
    calls = []

    def nan_on_third_micro_batch(chosen, rejected, *args):
        calls.append(1)
        out = bradley_terry(chosen, rejected, *args)
        return out._replace(loss=out.loss * math.nan) if len(calls) == 3 else out

    monkeypatch.setattr(train_reward, "bradley_terry", nan_on_third_micro_batch)
    recipe = short_recipe(write_recipe, pair_files, train={"max_steps": 4})
    final = train_reward.run(recipe)
    assert "step 3: non-finite loss; step skipped (1 in a row)" in capsys.readouterr().err
    assert all(torch.isfinite(t).all() for t in load_file(final / "adapter_model.safetensors").values())
    assert [m["step"] for m in metrics(Path(recipe.output_dir)) if m["split"] == "train"] == [1, 2, 4]


def test_fp16_overflow_is_the_grad_scalers_skip_not_a_bad_step():
    """With a GradScaler an inf gradient norm is an overflow (the scaler skips the step and lowers its scale),
    not a bad step: three in a row, usual while the scale settles, must not stop the run."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from lora_rl.commands.train_reward import step_problem
    from lora_rl.models.reward_model import PairwiseOutput

    accelerator = Accelerator()
    model = accelerator.prepare(torch.nn.Linear(2, 1))
    for param in model.parameters():
        param.grad = torch.full_like(param, float("inf"))
    recipe = SimpleNamespace(train=SimpleNamespace(max_grad_norm=1.0))
    finite = [(PairwiseOutput(torch.tensor(0.5), torch.tensor(1.0), torch.tensor(0.1)), 2)]
    assert step_problem(accelerator, model, recipe, finite) == "non-finite gradient norm"  # no scaler: a bad step
    accelerator.scaler = torch.amp.GradScaler("cpu")
    try:
        assert step_problem(accelerator, model, recipe, finite) is None
        nan = [(PairwiseOutput(torch.tensor(float("nan")), torch.tensor(1.0), torch.tensor(0.1)), 2)]
        assert step_problem(accelerator, model, recipe, nan) == "non-finite loss"  # a loss is never an overflow
    finally:
        accelerator.scaler = None


def test_the_metrics_window_sums_on_the_device_of_the_outputs():
    """On a GPU the loss lives on cuda: the window must not mix in a CPU tensor (it crashed every GPU run).
    The meta device stands in for a GPU here: any CPU tensor mixed in raises as it would on cuda."""
    from lora_rl.commands.train_reward import Window
    from lora_rl.models.reward_model import PairwiseOutput

    window = Window()
    on_meta = PairwiseOutput(*(torch.zeros((), device="meta") for _ in range(3)))
    window.add(on_meta, pairs=4)
    window.add(on_meta, pairs=4)
    assert window.sums.device.type == "meta" and window.sums.shape == (4,) and window.pairs == 8


PAIR = {"prompt": "what about the cat ?", "chosen": "a good cat .", "rejected": "bad bad"}


def test_templated_pairs_are_the_ids_ppo_shows_a_reward(llama_dir):
    """data.chat_template: train-reward reads, for a prompt and an answer, exactly the ids ppo's reward adapter
    reads when the policy (generation.chat_template) sampled that answer, and a separate reward model the same."""
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    eos, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    pair = tokenize_pairs([PAIR], tokenizer, 64, False, chat_template=True).pairs[0]
    assert tokenizer.decode(pair.chosen) == "user : what about the cat ? answer : a good cat . <eos>"

    # ppo: the prompt as PromptBatches tokenizes and left-pads it (next to a longer one), then what the policy
    # sampled: chosen ending in its EOS, rejected cut at max_new_tokens (no EOS), both padded
    prompts = tokenize_prompts([PAIR["prompt"], "tell about the big old sea ?"], tokenizer, 64, True).pairs
    prompt_ids, prompt_mask = pad([prompts[0], prompts[0], prompts[1]], pad_id, "left")
    sampled = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (PAIR["chosen"], PAIR["rejected"])]
    responses, _ = pad([sampled[0] + [eos, pad_id], sampled[1], sampled[1]], pad_id, "right")
    found = ppo.response_mask(responses, eos, pad_id)
    input_ids = torch.cat([prompt_ids, responses], dim=1)
    attention_mask = torch.cat([prompt_mask, found.mask.long()], dim=1)
    assert reward_rows(input_ids, attention_mask, eos)[:2] == [pair.chosen, pair.rejected]

    read = []  # a separate reward model trained with data.chat_template re-tokenizes the decoded texts alike

    def reward_model(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        read.extend(row[real.bool()].tolist() for row, real in zip(ids, mask, strict=True))
        return torch.zeros(len(ids))

    answers = [PAIR["chosen"], PAIR["rejected"]]
    model_rewards(reward_model, tokenizer, [PAIR["prompt"]] * 2, answers, "cpu", chat_template=True)
    assert read == [pair.chosen, pair.rejected]


def test_chat_template_key_reaches_the_pairs_and_needs_a_template_and_prompts(write_recipe, llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    recipe = load_recipe(write_recipe({"data": {"chat_template": True}}))
    templated = train_reward.tokenize(train_reward.Split("pairs.jsonl", [PAIR], [1]), tokenizer, recipe).pairs
    assert templated == tokenize_pairs([PAIR], tokenizer, 512, False, chat_template=True).pairs
    assert templated != tokenize_pairs([PAIR], tokenizer, 512, False).pairs  # plain: prompt + text, as TRL
    with pytest.raises(DataError, match=r"^rows 2: no 'prompt'; data.chat_template: true formats each pair"):
        tokenize_pairs([PAIR, {"chosen": "a", "rejected": "b"}], tokenizer, 64, False, chat_template=True)
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="^data.chat_template is true, but the tokenizer has no chat template$"):
        tokenize_pairs([PAIR], tokenizer, 64, False, chat_template=True)
