"""One reward-reading convention everywhere (TRL's): the reward model reads each text at an EOS that follows it.

A text gets the same reward from train-reward's own scoring (packed and padded pairs, the eval path),
`lora-rl load --score`, the reward adapter in PPO (on the tokens a rollout holds), a separate reward model
(which re-tokenizes the decoded completion) and the merged model loaded with plain transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lora_rl.adapters import merge
from lora_rl.commands import load, train_reward
from lora_rl.data import PairCollator, pad, reward_ids, tokenize_pairs
from lora_rl.models.reward_model import RewardModel
from lora_rl.recipe import load_recipe
from lora_rl.rl import ppo, rollout
from lora_rl.rl.rewards import StepState
from tests.test_roles import roles_for, rows

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["the cat is ", "hello how are you doing today "]  # the tiny tokenizer's decode adds no leading space
COMPLETIONS = ["good and nice", "bad"]
TEXTS = [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A reward adapter trained a few steps on the demo pairs (tiny-llama), and its merge."""
    tmp = tmp_path_factory.mktemp("convention")
    (tmp / "r.yaml").write_text(json.dumps({
        "output_dir": str(tmp / "out"), "actor": {"model": {"lora_rank": 4, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"train_path": str(ROOT / "recipes/data/reward-demo.jsonl"), "max_length": 32},
        "train": {"max_steps": 3, "batch_size": 8, "learning_rate": 1e-2},
    }))  # fmt: skip
    adapter = train_reward.run(load_recipe(tmp / "r.yaml"))
    return {"adapter": adapter, "merged": merge.run(adapter, tmp / "merged")}


def classifier(base_dir: Path, adapter: Path, pad_token_id: int = 0) -> RewardModel:
    """The reward model as train-reward holds it: the sequence classifier with the adapter."""
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, pad_token_id=pad_token_id)
    return RewardModel(PeftModel.from_pretrained(base, adapter).eval(), "score")


@torch.no_grad()
def at_eos(model: RewardModel, tokenizer) -> torch.Tensor:
    """The convention itself: each text's tokens, then EOS, one text at a time (no padding), read at the EOS."""
    ids = [torch.tensor([tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]) for text in TEXTS]
    return torch.cat([model(row, torch.ones_like(row)) for row in ids])


@torch.no_grad()
def train_reward_scores(model: RewardModel, tokenizer) -> tuple[dict[str, torch.Tensor], float]:
    """(chosen, rejected) = (TEXTS[0], TEXTS[1]) as one pair, through tokenize_pairs and the collator, packed and
    padded; and the eval path's margin r_chosen - r_rejected."""
    rows = [{"chosen": TEXTS[0], "rejected": TEXTS[1]}]
    pairs = tokenize_pairs(rows, tokenizer, 64, drop_long=False).pairs
    scores = {}
    for packed in (True, False):
        batch = PairCollator(tokenizer.pad_token_id, "right", packed)(pairs)
        scores["packed" if packed else "padded"] = model(*batch.model_inputs())
    return scores, train_reward.evaluate(model, [batch], Accelerator(cpu=True), step=0)["margin"]


def rollout_tensors(tokenizer, with_eos: list[bool]) -> tuple:
    """What a rollout holds: left-padded prompt ids, then the sampled completion ids (EOS where sampled),
    right-padded; a row without EOS was cut at max_new_tokens."""
    prompt_ids, prompt_mask = pad(tokenizer(PROMPTS)["input_ids"], tokenizer.pad_token_id, "left")
    completions = tokenizer(COMPLETIONS, add_special_tokens=False)["input_ids"]
    completions = [ids + [tokenizer.eos_token_id] * eos for ids, eos in zip(completions, with_eos, strict=True)]
    responses, _ = pad(completions, tokenizer.pad_token_id, "right")
    eos = ppo.response_mask(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    input_ids = torch.cat([prompt_ids, responses], dim=1)
    return responses, eos.mask, input_ids, torch.cat([prompt_mask, eos.mask.long()], dim=1)


def ppo_scores(write_recipe, reward: dict, with_eos: list[bool]) -> torch.Tensor:
    """rollout.score, as collect calls it, with the reward the recipe names."""
    recipe = load_recipe(write_recipe({
        "actor": {"model": {"lora_rank": 4}}, "reward": reward,
        "data": {"train_path": str(ROOT / "recipes/data/prompts-demo.jsonl")},
    }))  # fmt: skip
    built, roles = roles_for(recipe)
    responses, mask, input_ids, attention_mask = rollout_tensors(built.tokenizer, with_eos)
    return rollout.score(roles, built.tokenizer, rows(PROMPTS), responses, mask, input_ids, attention_mask,
                         StepState()).total  # fmt: skip


@torch.no_grad()
def test_one_text_one_reward_on_every_path(trained, write_recipe, llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(trained["adapter"])
    reference = classifier(llama_dir, trained["adapter"])
    scores, eval_margin = train_reward_scores(reference, tokenizer)
    scores["load --score"] = torch.tensor(load.run(trained["adapter"], [], TEXTS, None, score=True)["final"])
    for eos in ([True, True], [False, True], [True, False]):  # a completion cut without EOS is read at an EOS too
        scores[f"ppo adapter {eos}"] = ppo_scores(write_recipe, {"adapter": str(trained["adapter"])}, eos)
        scores[f"ppo reward model {eos}"] = ppo_scores(write_recipe, {"model": str(trained["merged"])}, eos)
    merged = AutoModelForSequenceClassification.from_pretrained(trained["merged"]).eval()
    merged_tokenizer = AutoTokenizer.from_pretrained(trained["merged"])
    batch = merged_tokenizer([t + merged_tokenizer.eos_token for t in TEXTS], return_tensors="pt", padding=True)
    scores["merged, plain transformers"] = merged(**batch).logits.squeeze(-1)

    expected = at_eos(reference, tokenizer)
    assert expected[0] != pytest.approx(expected[1].item(), abs=1e-3)  # the texts are told apart
    scores["eval margin"] = torch.tensor([eval_margin]) + expected[1]  # r_chosen - r_rejected, shifted to r_chosen
    off = {path: (got - expected[: len(got)]).abs().max().item() for path, got in scores.items()}
    assert {path: gap for path, gap in off.items() if not gap <= 1e-5} == {}


def test_reward_ids_end_in_exactly_one_eos(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    eos = tokenizer.eos_token_id
    plain, ending = reward_ids(tokenizer, ["the cat", "the cat" + tokenizer.eos_token])
    assert plain == ending and plain[-1] == eos and plain[-2] != eos
    pairs = tokenize_pairs([{"chosen": "the cat is good", "rejected": "bad"}], tokenizer, 4, drop_long=False).pairs
    assert pairs[0].chosen[-1] == eos and len(pairs[0].chosen) == 4  # truncated, still read at an EOS
    packed = PairCollator(tokenizer.pad_token_id, packed=True)(pairs)
    assert (packed.input_ids[packed.read_at[:, 0], packed.read_at[:, 1]] == eos).all()


def test_merged_reward_model_whose_tokenizer_pads_with_eos(tmp_path, llama_dir):
    """transformers reads a classifier's reward at the last token that is not the pad: were the pad the EOS, it
    would read the token before the EOS. The merged config has no pad_token_id then: plain transformers reads an
    unpadded text + EOS at the EOS, and refuses a padded batch instead of misreading it."""
    base = tmp_path / "base"
    shutil.copytree(llama_dir, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(base)
    (tmp_path / "r.yaml").write_text(json.dumps({
        "output_dir": str(tmp_path / "out"), "actor": {"model": {"path": str(base), "lora_rank": 4}},
        "data": {"train_path": str(ROOT / "recipes/data/reward-demo.jsonl"), "max_length": 32},
        "train": {"max_steps": 2, "batch_size": 8, "learning_rate": 1e-2},
    }))  # fmt: skip
    adapter = train_reward.run(load_recipe(tmp_path / "r.yaml"))
    out = merge.run(adapter, tmp_path / "merged")
    merged_tokenizer = AutoTokenizer.from_pretrained(out)
    assert merged_tokenizer.pad_token_id == merged_tokenizer.eos_token_id

    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.pad_token_id is None
    with torch.no_grad():
        got = torch.cat([merged(**merged_tokenizer(t + merged_tokenizer.eos_token, return_tensors="pt")).logits[0]
                         for t in TEXTS])  # fmt: skip
        expected = at_eos(classifier(base, adapter, pad_token_id=tokenizer.eos_token_id), merged_tokenizer)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no padding token"):
        merged(**merged_tokenizer(TEXTS, return_tensors="pt", padding=True))
