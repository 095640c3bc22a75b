"""Reward functions called as TRL's GRPOTrainer calls them; their returns checked; prompt rows with extra columns."""

from __future__ import annotations

import asyncio
import json
import math
import re
import sys

import pytest
import torch

from lora_rl.data import DataError
from lora_rl.rl.rewards import (
    RewardError,
    RewardTerm,
    StepState,
    as_completions,
    check_terms,
    data_columns,
    load_prompt_rows,
    reward_metrics,
    score_functions,
)

ROWS = [{"prompt": "say cat", "answer": "cat"}] * 2 + [{"prompt": "say dog", "answer": "dog"}] * 2  # G = 2
TEXTS = ["cat", "dog", "dog .", "bird"]
IDS = [[5], [6], [6, 7], [8]]


def score(*terms: RewardTerm, rows=ROWS, texts=TEXTS, **kwargs):
    return score_functions(terms, rows, texts, IDS, **kwargs)


# TRL's documentation style: chat completions, extra columns by name, **kwargs for the rest
def accuracy_reward(completions, answer, **kwargs):
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if content.strip() == expected else 0.0 for content, expected in zip(contents, answer)]  # noqa: B905 (as TRL's docs)


def format_reward(completions, **kwargs):
    pattern = r"^\w+$"
    return [1.0 if re.match(pattern, completion[0]["content"]) else 0.0 for completion in completions]


def test_columns_reach_the_function_by_name():
    seen = {}

    def exact(prompts, completions, answer, completion_ids):
        seen.update(prompts=prompts, answer=answer, completion_ids=completion_ids)
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    out = score(RewardTerm(exact, 1.0, "exact"))
    assert seen == {
        "prompts": [r["prompt"] for r in ROWS],
        "answer": ["cat", "cat", "dog", "dog"],
        "completion_ids": IDS,
    }
    assert out.total.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert out.judged.tolist() == [True] * 4


def test_trl_style_functions_with_kwargs_work_unchanged_on_chat_prompts():
    chat_rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in ROWS]
    received = {}

    def spy(**kwargs):
        received.update(kwargs)
        return [0.0] * len(kwargs["completions"])

    out = score(
        RewardTerm(accuracy_reward, 1.0, "accuracy"),
        RewardTerm(format_reward, 0.5, "format"),
        RewardTerm(spy, 1.0, "spy"),
        rows=chat_rows,
        state=StepState(global_step=3, max_steps=10),
    )
    assert out.per_function["accuracy"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert out.per_function["format"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert out.total.tolist() == [1.5, 0.5, 0.0, 0.5]  # weights applied
    assert received["completions"][0] == [{"role": "assistant", "content": "cat"}]
    assert received["prompts"][0] == [{"role": "user", "content": "say cat"}]
    assert set(received) == {"prompts", "completions", "completion_ids", "answer", "trainer_state"}
    assert received["trainer_state"].global_step == 3


def test_the_old_two_argument_form_works_positionally_too():
    def old(prompts, completions):
        return [float(len(c)) for c in completions]

    def old_other_names(p, c):
        return [1.0 for _ in c]

    def positional_only(prompts, completions, /):
        return [0.5 for _ in completions]

    out = score(
        RewardTerm(old, 1.0, "old"), RewardTerm(old_other_names, 2.0, "other"), RewardTerm(positional_only, 2, "p")
    )
    assert out.total.tolist() == [6.0, 6.0, 8.0, 7.0]


def test_async_functions_are_awaited():
    async def later(completions, **kwargs):
        await asyncio.sleep(0)
        return [1.0] * len(completions)

    assert score(RewardTerm(later, 1.0, "later")).total.tolist() == [1.0] * 4


def test_none_rows_are_left_out_of_the_sum_and_the_metrics():
    def cats(completions, answer, **kwargs):
        return [2.0 if a == "cat" else None for a in answer]

    def dogs(completions, answer, **kwargs):
        return [None if a == "cat" else -1.0 for a in answer[:3]] + [None]

    out = score(RewardTerm(cats, 0.5, "cats"), RewardTerm(dogs, 3.0, "dogs"))
    assert out.total.tolist() == [1.0, 1.0, -3.0, 0.0]  # the last row: nobody judged it -> 0, not judged
    assert out.judged.tolist() == [True, True, True, False]
    assert math.isnan(out.per_function["dogs"][0].item())
    assert reward_metrics(out.per_function) == {"reward/cats": 2.0, "reward/dogs": -1.0}  # unweighted, judged only


def test_a_function_that_judged_nothing_is_not_logged():
    def never(completions, **kwargs):
        return [None] * len(completions)

    assert reward_metrics(score(RewardTerm(never, 1.0, "never")).per_function) == {}


def test_bools_count_as_numbers_like_trl():
    def matches(completions, answer, **kwargs):
        return [c == a for c, a in zip(completions, answer, strict=True)]

    assert score(RewardTerm(matches, 1.0, "m")).total.tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ([1.0, 2.0], "returned 2 rewards for 4 completions"),
        ([1.0, "2", 0.0, 0.0], "completion 2 of 4: expected a finite number or None, got '2'"),
        ([1.0, 0.0, float("nan"), 0.0], "completion 3 of 4: expected a finite number or None, got nan"),
        ([1.0, 0.0, 0.0, -math.inf], "completion 4 of 4: expected a finite number or None, got -inf"),
        ([[1.0], 0.0, 0.0, 0.0], r"completion 1 of 4: expected a finite number or None, got \[1.0\]"),
        ("1234", "expected a list of 4 numbers, got '1234'"),
        (None, "expected a list of 4 numbers, got None"),
        (1.0, "expected a list of 4 numbers, got 1.0"),
    ],
)
def test_bad_returns_are_named_errors(returned, message):
    def bad(prompts, completions):
        return returned

    with pytest.raises(RewardError, match=f"^reward function tests.test_rewards:.*bad: {message}$"):
        score(RewardTerm(bad, 1.0, "bad"))


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ([1.0, 10**400, 0.0, 0.0], r"completion 2 of 4: got 10{50,}\.\.\., beyond the largest reward allowed, 1e\+06"),
        ([3e38, 3e38, 3e38, 3e38], r"completion 1 of 4: got 3e\+38, beyond the largest reward allowed, 1e\+06"),
        ([0.0, 0.0, 0.0, -1e7], r"completion 4 of 4: got -10000000\.0, beyond the largest reward allowed, 1e\+06"),
    ],
)
def test_rewards_too_large_to_sum_in_float32_are_named_errors(returned, message):
    """float32 sums and squares of rewards (group statistics, whitening, metrics) overflow to inf long before a
    float64 does: 8 rewards of 3e38 make a nan advantage and a nan metric. Refused, naming the function."""

    def huge(prompts, completions):
        return returned

    with pytest.raises(RewardError, match=f"^reward function tests.test_rewards:.*huge: {message} \\(scale"):
        score(RewardTerm(huge, 1.0, "huge"))
    score(RewardTerm(lambda p, c: [1e6, -1e6, 0.5, None], 1.0, "bound"))  # the bound itself is allowed


def test_sys_exit_inside_the_function_is_one_named_line():
    def leaves(prompts, completions):
        sys.exit(3)

    with pytest.raises(RewardError, match=r"^reward function .*leaves called sys\.exit\(3\)$"):
        score(RewardTerm(leaves, 1.0, "leaves"))


def test_weights_too_large_are_refused_before_training():
    with pytest.raises(RewardError, match=r"weight 1e\+30 is beyond the largest allowed, 1e\+06"):
        check_terms([RewardTerm(accuracy_reward, 1e30, "a")], ["answer"])


def test_an_exception_inside_the_function_is_one_named_line():
    def broken(completions, **kwargs):
        raise ValueError("no such\n  column")

    with pytest.raises(RewardError, match=r"^reward function .*broken raised ValueError: no such column$"):
        score(RewardTerm(broken, 1.0, "broken"))


def test_signatures_are_checked_before_training():
    def wants_missing(prompts, completions, solution):
        return [0.0] * len(completions)

    assert data_columns([{"prompt": "p", "answer": "a", "completion": "c", "completion_ids": [1]}]) == ["answer"]
    check_terms([RewardTerm(accuracy_reward, 1.0, "a")], columns=["answer"])
    with pytest.raises(RewardError, match=r"parameter 'solution' is neither a data column \(answer\) nor one of"):
        check_terms([RewardTerm(wants_missing, 1.0, "w")], columns=["answer"])
    with pytest.raises(RewardError, match="parameter 'answer'"):
        check_terms([RewardTerm(accuracy_reward, 1.0, "a")], columns=[])
    with pytest.raises(RewardError, match="parameter 'answer'"):  # not mistaken for the old form f(p, c)
        check_terms([RewardTerm(lambda completions, answer: [], 1.0, "a")], columns=[])
    with pytest.raises(RewardError, match="the name 'a' is used twice"):
        check_terms([RewardTerm(format_reward, 1.0, "a"), RewardTerm(format_reward, 1.0, "a")], columns=[])
    with pytest.raises(RewardError, match="weight nan is not finite"):
        check_terms([RewardTerm(format_reward, math.nan, "a")], columns=[])


def test_chat_completions_are_decided_by_the_prompt():
    assert as_completions(["plain"], ["x"]) == ["x"]
    assert as_completions([[{"role": "user", "content": "hi"}]], ["x"]) == [[{"role": "assistant", "content": "x"}]]


def test_tensors_come_back_on_the_device_asked_for():
    out = score(RewardTerm(format_reward_text, 1.0, "f"), device="meta")
    assert out.total.device.type == "meta" and out.per_function["f"].device.type == "meta"


def format_reward_text(completions, **kwargs):
    return [1.0] * len(completions)


# ---- load_prompt_rows ----------------------------------------------------------------------------------------


def write(tmp_path, rows) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_prompt_rows_keep_their_columns(tmp_path):
    rows = [{"prompt": "say cat", "answer": "cat", "level": 1}, {"prompt": "say dog", "answer": "dog", "level": 2}]
    assert load_prompt_rows(write(tmp_path, rows)) == rows
    chat = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say cat"}]}]
    assert load_prompt_rows(write(tmp_path, chat)) == chat


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        ([{"prompt": "ok"}, {"prompt": " "}], "row 2: 'prompt' must be a non-empty string"),
        ([{"prompt": "ok"}, {"prompt": 3}], "row 2: 'prompt' must be a non-empty string"),
        ([{"prompt": [{"role": "user", "content": "hi"}]}, {"prompt": [{"content": "hi"}]}],
         "row 2: 'prompt' must be a list of {role, content} messages"),
        ([{"prompt": [{"role": "user", "content": 7}]}], "row 1: 'prompt' must be a list of {role, content}"),
        ([{"prompt": "ok", "completions": "x"}], "column 'completions' clashes with the reward-function argument"),
    ],
)  # fmt: skip
def test_bad_prompt_rows_name_file_and_row(tmp_path, rows, problem):
    path = write(tmp_path, rows)
    with pytest.raises(DataError) as err:
        load_prompt_rows(path)
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(f"{path}: ")
    assert problem in err.value.problems[0]


def test_reward_tensors_are_float32():
    out = score(RewardTerm(format_reward_text, 2, "f"))
    assert out.total.dtype == torch.float32 and out.per_function["f"].dtype == torch.float32


# ---- the grpo demo's rewards and data ------------------------------------------------------------------------


def test_demo_rewards_read_text_and_chat_completions():
    from lora_rl.demo_rewards import correct, one_word

    texts = ["cat", "the cat", "dog", "", "Cat !"]
    answers = ["cat"] * 5
    assert correct(texts, answers) == [1.0, 0.5, 0.0, 0.0, 1.0]
    assert one_word(texts) == [1.0, 0.0, 1.0, 0.0, 0.0]
    chat = as_completions([[{"role": "user", "content": "say cat"}]] * 5, texts)
    assert correct(chat, answers) == correct(texts, answers) and one_word(chat) == one_word(texts)


def test_demo_data_answers_are_the_last_prompt_word_and_known_to_the_tiny_tokenizer():
    from pathlib import Path

    from lora_rl.models.tiny import VOCAB

    rows = load_prompt_rows(Path(__file__).resolve().parent.parent / "recipes/data/grpo-demo.jsonl")
    assert len(rows) >= 200
    assert all(row["prompt"].split()[-1] == row["answer"] for row in rows)
    assert {word for row in rows for word in row["prompt"].split()} <= set(VOCAB)
