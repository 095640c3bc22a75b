from __future__ import annotations

import json
import math

import pytest
import torch

from lora_rl.data import Pair, PairCollator, pad
from lora_rl.models.build import build
from lora_rl.models.reward_model import RewardModel, bradley_terry, last_token_index, position_ids
from lora_rl.recipe import load_recipe


def test_bradley_terry_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.5, -1.0])
    out = bradley_terry(chosen, rejected)
    # diffs 1, -0.5, 0: -log(sigmoid(d)) = log(1 + e^-d)
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(0.5)) + math.log(2)) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.accuracy.item() == pytest.approx(1 / 3)  # a tie is not a correct ranking
    assert out.margin.item() == pytest.approx((1 - 0.5 + 0) / 3)


def test_bradley_terry_margin_and_centering_by_hand():
    chosen, rejected = torch.tensor([2.0, 1.0]), torch.tensor([1.0, -1.0])
    out = bradley_terry(chosen, rejected, margin=torch.tensor([0.5, 3.0]), center_coef=0.01)
    # diffs 1, 2 minus margins 0.5, 3 -> 0.5, -1; centering: ((3)^2 + (0)^2)/2 = 4.5
    expected = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(1))) / 2 + 0.01 * 4.5
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.accuracy.item() == 1.0  # accuracy ignores margins, as in TRL


def test_last_token_index_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 0, 3]
    assert last_token_index(left).tolist() == [3, 3, 3]
    assert position_ids(left).tolist() == [[0, 0, 1, 2], [0, 0, 0, 0], [0, 1, 2, 3]]


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("r") / "r.yaml"
    path.write_text("actor: {model: {lora_rank: 4, init_lora_weights: true}}\ntrain: {gradient_checkpointing: false}\n")
    built = build(load_recipe(path), "reward")
    return RewardModel(built.model, built.report.head_module).eval()


@pytest.mark.parametrize("pad_id", [0, 3])  # 3 is EOS: a pad equal to a real token must not confuse the reading
def test_rewards_equal_for_right_left_and_unpadded(reward_model, pad_id):
    sequences = [[2, 20, 21, 22, 3], [2, 30], [2, 40, 41]]
    with torch.no_grad():
        alone = [reward_model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item() for s in sequences]
        for side in ("right", "left"):
            ids, mask = pad(sequences, pad_id=pad_id, side=side)
            assert reward_model(ids, mask).tolist() == pytest.approx(alone, abs=1e-5), side


def test_rewards_match_transformers_pooling_when_pads_are_pads(reward_model):
    ids, mask = pad([[2, 20, 21, 22], [2, 30]], pad_id=0, side="right")
    with torch.no_grad():
        ours = reward_model(ids, mask)
        theirs = reward_model.model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("path, attention", [("tiny-llama", "sdpa"), ("tiny-gpt2", "sdpa"), ("tiny-llama", "eager")])
def test_packed_pairs_give_the_rewards_and_gradients_of_padded_rows(tmp_path, path, attention):
    """One packed row per pair must read every text exactly as padded rows of their own do."""
    recipe = tmp_path / "r.yaml"
    model = {"path": path, "lora_rank": 4, "target_modules": "all-linear"}
    recipe.write_text(json.dumps({"actor": {"model": model}, "train": {"gradient_checkpointing": False}}))
    built = build(load_recipe(recipe), "reward")
    built.model.set_attn_implementation(attention)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero: give the adapter an effect, so its gradients mean something
        for name, param in built.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model = RewardModel(built.model, built.report.head_module).eval()  # no dropout: the two must compare
    prompt = [2, 20, 21, 22, 23]
    pairs = [Pair(prompt + [30, 31, 3], prompt + [40, 3], 0.0),  # a shared prompt
             Pair([2, 50, 51], [2, 50, 51], 0.0),  # identical texts
             Pair([60, 61], [70, 71, 72, 73, 74, 75, 3], 0.0),  # nothing shared
             Pair(prompt, prompt + [80, 81], 0.0)]  # chosen a prefix of rejected  # fmt: skip
    results = []
    for packed in (False, True):
        batch = PairCollator(0, "right", packed)(pairs)
        rewards = model(*batch.model_inputs())
        bradley_terry(*rewards.chunk(2)).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        results.append((rewards.detach(), grads, batch.input_ids.numel()))
    (padded, padded_grads, padded_tokens), (packed, packed_grads, packed_tokens) = results
    assert packed_tokens < padded_tokens
    assert torch.allclose(packed, padded, atol=1e-5), (packed, padded)
    assert padded[1] == pytest.approx(padded[5].item(), abs=1e-6)  # identical texts, identical rewards
    assert packed_grads.keys() == padded_grads.keys() and any("lora_A" in n for n in packed_grads)
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, rtol=1e-4, atol=1e-6), name
