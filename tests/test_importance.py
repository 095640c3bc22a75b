"""Importance weights for an engine's samples (rl.importance) against hand-computed values and a plain-Python
reference of TRL's formulas (trl/trainer/grpo_trainer.py v1.9.0), and the weight's place in both policy losses."""

from __future__ import annotations

import math

import pytest
import torch

from lora_rl.rl.advantages import clipped_policy_loss
from lora_rl.rl.importance import MODES, importance_weights
from lora_rl.rl.ppo import kl_per_token, policy_loss

NAN = float("nan")
# row 0: three valid tokens, log-ratios 0.5, -1.0, 0.0; row 1: two, 0.0 and 1.7; padding holds nan and inf
OURS = torch.tensor([[-1.0, -2.0, -0.5, NAN], [-0.3, -0.3, 5.0, -math.inf]])
ENGINE = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [-0.3, -2.0, NAN, 0.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
E = math.exp
EXPECTED = {  # cap 3
    "token_truncate": [[E(0.5), E(-1.0), 1.0, 0.0], [1.0, 3.0, 0.0, 0.0]],
    "token_mask": [[E(0.5), E(-1.0), 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]],
    "sequence_truncate": [[E(-0.5)] * 3 + [0.0], [3.0, 3.0, 0.0, 0.0]],
    "sequence_mask": [[E(-0.5)] * 3 + [0.0], [0.0, 0.0, 0.0, 0.0]],
}


def reference(ours: list[list[float]], engine: list[list[float]], mask: list[list[bool]], mode: str,
              cap: float) -> list[list[float]]:  # fmt: skip
    """TRL's vllm importance sampling in plain Python: diff = (old - engine) * mask, summed per row for sequence
    modes; exp; clamp(max=cap) or zero above cap. Padding reported as 0 (TRL leaves it 1; the loss masks it)."""
    out = []
    for o_row, e_row, m_row in zip(ours, engine, mask, strict=True):
        diffs = [o - e if m else 0.0 for o, e, m in zip(o_row, e_row, m_row, strict=True)]
        if mode.startswith("sequence"):
            diffs = [sum(diffs)] * len(diffs)
        ratios = [math.exp(d) for d in diffs]
        ratios = [min(r, cap) if mode.endswith("truncate") else 0.0 if r > cap else r for r in ratios]
        out.append([r if m else 0.0 for r, m in zip(ratios, m_row, strict=True)])
    return out


@pytest.mark.parametrize("mode", MODES)
def test_weights_are_the_hand_computed_ones(mode):
    got = importance_weights(OURS, ENGINE, MASK, mode, cap=3.0)
    assert torch.allclose(got, torch.tensor(EXPECTED[mode]), atol=1e-6)
    assert torch.isfinite(got).all()  # nan and inf in the padding stay out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cap", [1.0, 1.5, 3.0, 10.0])
def test_weights_match_a_plain_python_reference(mode, cap):
    generator = torch.Generator().manual_seed(0)
    ours = -torch.rand(5, 7, generator=generator) * 3
    engine = ours + torch.randn(5, 7, generator=generator) * 0.4
    mask = torch.arange(7) < torch.tensor([7, 5, 1, 3, 6])[:, None]
    expected = reference(ours.tolist(), engine.tolist(), mask.tolist(), mode, cap)
    assert torch.allclose(importance_weights(ours, engine, mask, mode, cap), torch.tensor(expected), atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_identical_log_probs_weigh_one_and_padding_zero(mode):
    logp = torch.tensor([[-0.7, -2.3, -0.1], [-1.2, -0.4, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert importance_weights(logp, logp.clone(), mask, mode, 3.0).tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]


@pytest.mark.parametrize("mode", MODES)
def test_an_all_masked_row_weighs_nothing(mode):
    ours, engine = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]]), torch.tensor([[-1.0, -3.0], [NAN, 40.0]])
    got = importance_weights(ours, engine, torch.tensor([[1, 1], [0, 0]]), mode, 3.0)
    assert got[1].tolist() == [0.0, 0.0]


def test_overflowing_ratios_are_capped_or_masked():
    ours, engine, mask = torch.tensor([[0.0, 0.0]]), torch.tensor([[-500.0, -500.0]]), torch.ones(1, 2)
    assert importance_weights(ours, engine, mask, "token_truncate", 3.0).tolist() == [[3.0, 3.0]]
    assert importance_weights(ours, engine, mask, "sequence_mask", 3.0).tolist() == [[0.0, 0.0]]


def test_the_sequence_ratio_sums_log_ratios_over_tokens():
    """Each token's ratio is 1.5 (< cap 3), but the sequence's is 1.5^3 = 3.375: masked as a sequence only."""
    ours, engine, mask = torch.full((1, 3), math.log(1.5)), torch.zeros(1, 3), torch.ones(1, 3)
    assert torch.allclose(importance_weights(ours, engine, mask, "token_mask", 3.0), torch.full((1, 3), 1.5))
    assert importance_weights(ours, engine, mask, "sequence_mask", 3.0).tolist() == [[0.0, 0.0, 0.0]]
    assert importance_weights(ours, engine, mask, "sequence_truncate", 3.0).tolist() == [[3.0, 3.0, 3.0]]


def test_weights_carry_no_gradient_and_unknown_modes_are_refused():
    ours = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    assert not importance_weights(ours, torch.zeros(1, 2), torch.ones(1, 2), "token_truncate", 3.0).requires_grad
    with pytest.raises(ValueError, match="unknown importance mode 'sequence'"):
        importance_weights(ours, torch.zeros(1, 2), torch.ones(1, 2), "sequence", 3.0)


# ---------------------------------------------------------------- the weight in the losses

LOGP = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -1.1, -0.7]])
OLD = torch.tensor([[-1.1, -0.4, -2.5], [-0.2, -1.0, NAN]])
ADV = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.3, 0.3]])
LOSS_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
WEIGHTS = torch.tensor([[0.5, 2.0, 0.0], [1.0, 3.0, 0.0]])


def clipped_terms(eps_low: float, eps_high: float) -> list[tuple[int, int, float]]:
    """(row, column, -min(rho A, clip(rho) A)) of each valid token, in plain Python."""
    terms = []
    for i in range(2):
        for t in range(3):
            if LOSS_MASK[i, t]:
                rho, a = math.exp(LOGP[i, t] - OLD[i, t]), ADV[i, t].item()
                terms.append((i, t, -min(rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a)))
    return terms


def test_grpo_loss_weighs_the_clipped_term_per_token():
    terms = clipped_terms(0.2, 0.2)
    expected = sum(WEIGHTS[i, t].item() * term for i, t, term in terms) / len(terms)  # dapo: over valid tokens
    got = clipped_policy_loss(LOGP, OLD, ADV, LOSS_MASK, 0.2, loss_type="dapo", weights=WEIGHTS).loss
    assert got.item() == pytest.approx(expected, rel=1e-6)
    unweighted = clipped_policy_loss(LOGP, OLD, ADV, LOSS_MASK, 0.2, loss_type="dapo")
    ones = clipped_policy_loss(LOGP, OLD, ADV, LOSS_MASK, 0.2, loss_type="dapo", weights=torch.ones(2, 3))
    assert ones.loss.item() == unweighted.loss.item() == pytest.approx(sum(t for *_, t in terms) / len(terms))


def test_grpo_loss_leaves_the_kl_term_unweighted():
    """As TRL: the clipped term is weighted, then beta * k3 is added; zero weights leave the KL alone."""
    ref = torch.tensor([[-0.9, -0.7, -1.5], [-0.3, -1.0, 0.0]])
    got = clipped_policy_loss(LOGP, OLD, ADV, LOSS_MASK, 0.2, loss_type="dapo", ref_logp=ref, beta=0.1,
                              weights=torch.zeros(2, 3))  # fmt: skip
    k3 = kl_per_token(LOGP, ref, "k3")
    assert got.loss.item() == pytest.approx(0.1 * k3[LOSS_MASK].mean().item(), rel=1e-6)


def test_ppo_loss_weighs_each_token():
    terms = clipped_terms(0.2, 0.2)  # PPO's max(-A rho, -A clip(rho)) is GRPO's -min(rho A, clip(rho) A)
    expected = sum(WEIGHTS[i, t].item() * term for i, t, term in terms) / len(terms)
    assert policy_loss(LOGP, OLD, ADV, LOSS_MASK, 0.2, WEIGHTS).loss.item() == pytest.approx(expected, rel=1e-6)
    plain = policy_loss(LOGP, OLD, ADV, LOSS_MASK, 0.2).loss.item()
    assert plain == pytest.approx(sum(t for *_, t in terms) / len(terms), rel=1e-6)
