"""The verifiable-math rewards (lora_rl/math_rewards.py) on hand-written completions, and the data they are for
(scripts/make_math_data.py): deterministic, and an eval file that shares no problem with the training file."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora_rl.math_rewards import correct, final_answer, format
from lora_rl.rl.rewards import RewardTerm, score_functions

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "recipes" / "data"


def load_script():
    spec = importlib.util.spec_from_file_location("make_math_data", ROOT / "scripts" / "make_math_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RIGHT = {  # completion -> the answer it gives, in the forms models write
    "She has 5 + 7 = 12 apples.\n\\boxed{12}": "12",
    "5 + 7 = 12\n#### 12": "12",
    "First 5 + 7 = 12.\nThe answer is 12.": "12",
    "The answer is: 12": "12",
    "10 boxes of 100 make 1000.\nAnswer: 1,000": "1000",
    "Answer: 1000": "1,000",
    "Each costs $3, so 4 cost $12.": "12",
    "The final answer is $12.00.": "12",
    "So the total is 12.0": "12",
    "He has 3 - 5 = -2 left. The answer is -2.": "-2",
    "\\boxed{12} is the answer; check: 3 + 4 = 7.": "12",  # boxed wins over later numbers
    "The answer is 20 * 2 = 40.": "40",  # the result of an equation on the answer line, not its first number
    "**Answer:** 42": "42",
    "\\boxed{1{,}000}": "1000",
    "#### 42\nThat took 3 steps.": "42",
    "7 + 5 = 12": 12,  # an int in the answer column
}

WRONG = {
    "The answer is 13.": "12",
    "\\boxed{12}\nThe answer is 13.": "13",  # the boxed answer is the final one
    "The answer is 12.5.": "12",
    "Answer: 12\nBut 7 + 6 = 13.": "13",  # an answer line wins over later numbers
    "version 1.2.3": "3",
}

UNREADABLE = ["", "   ", "I do not know.", "\\boxed{}", "Answer: none", None, 12, [], [{}], {"content": None},
              [{"role": "assistant"}]]  # fmt: skip


@pytest.mark.parametrize("completion, expected", list(RIGHT.items()))
def test_correct_reads_the_final_answer_in_every_usual_form(completion, expected):
    assert correct([completion], [expected]) == [1.0]


@pytest.mark.parametrize("completion, expected", list(WRONG.items()))
def test_correct_pays_nothing_for_a_wrong_final_answer(completion, expected):
    assert correct([completion], [expected]) == [0.0]


@pytest.mark.parametrize("completion", UNREADABLE, ids=repr)
def test_unreadable_completions_score_zero_and_never_raise(completion):
    assert correct([completion], ["12"]) == [0.0]
    assert format([completion]) == [0.0]


def test_an_unreadable_expected_answer_scores_zero():
    assert correct(["The answer is 12."] * 3, ["twelve", None, ""]) == [0.0, 0.0, 0.0]


def test_chat_completions_are_read_from_the_assistant_message():
    chat = [[{"role": "assistant", "content": "3 + 4 = 7 apples in all.\nThe answer is 7."}],
            [{"role": "assistant", "content": "The answer is 8."}],
            [{"role": "assistant", "content": [{"type": "text", "text": "\\boxed{7}"}]}]]  # fmt: skip
    assert correct(chat, ["7", "7", "7"]) == [1.0, 0.0, 1.0]
    assert format(chat) == [1.0, 0.5, 0.0]


def test_correct_returns_exactly_one_or_zero():  # pass@k counts a sample as solved when correct returns 1.0
    scores = correct(list(RIGHT) + list(WRONG), list(RIGHT.values()) + list(WRONG.values()))
    assert set(scores) == {1.0, 0.0} and all(type(s) is float for s in scores)


def test_final_answer_keeps_the_written_form():
    assert final_answer("Answer: $1,000.") == "$1,000"
    assert final_answer("no digits here") is None


LAYOUTS = {
    "Sam has 8 + 7 = 15 stamps.\nThe answer is 15.": 1.0,
    "Sam has 8 stamps and gets 7 more.\n8 + 7 = 15\n\nAnswer: 15": 1.0,
    "8 + 7 = 15, so Sam has 15 stamps now.\nThe final answer is $15": 1.0,
    "The answer is 15.": 0.5,  # no reasoning before it
    "8 + 7 = 15\nThe answer is 15.\nThe answer is 15.\nThe answer": 0.5,  # not the last line: it went on
    "Sam has 8 + 7 = 15 stamps.\nThe answer is 15 stamps.": 0.0,  # not a bare number
    "Sam has 8 + 7 = 15 stamps. The answer is 15.": 0.0,  # not on a line of its own
    "Sam has 8 + 7 = 15 stamps.\n#### 15": 0.0,  # not the format the system prompt asks for
    "Sam has 8 + 7 = 15 stamps.\n\\boxed{15}": 0.0,
}


@pytest.mark.parametrize("completion, expected", list(LAYOUTS.items()))
def test_format_pays_for_reasoning_then_an_answer_line(completion, expected):
    assert format([completion]) == [expected]


def test_both_work_as_lora_rl_calls_reward_functions_with_the_data_columns():
    rows = [json.loads(line) for line in (DATA / "math-eval.jsonl").read_text().splitlines()[:2]]
    texts = [f"Working it out.\nThe answer is {rows[0]['answer']}.", "The answer is -1."]
    terms = [RewardTerm(correct, 1.0, "correct"), RewardTerm(format, 0.2, "format")]
    scored = score_functions(terms, rows, texts, [[1], [1]])
    assert scored.per_function["correct"].tolist() == [1.0, 0.0]
    assert scored.per_function["format"].tolist() == [1.0, 0.5]
    assert scored.total.tolist() == pytest.approx([1.2, 0.1])


def test_data_script_is_deterministic_and_wrote_the_shipped_files(tmp_path):
    script = load_script()
    assert script.make() == script.make()
    script.main(["--out", str(tmp_path)])
    for name in ("math-train.jsonl", "math-eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), f"rerun scripts/make_math_data.py: {name}"


def test_eval_problems_are_held_out_from_training():
    script = load_script()
    train, evaluation = script.make()
    problem = lambda row: row["prompt"][-1]["content"]  # noqa: E731
    assert len(evaluation) == 64 and len({problem(r) for r in train}) == len(train)
    assert not {problem(r) for r in train} & {problem(r) for r in evaluation}
    train_templates, eval_templates = {r["template"] for r in train}, {r["template"] for r in evaluation}
    assert train_templates < eval_templates and eval_templates - train_templates == set(script.HELD_OUT)


def test_rows_are_chat_prompts_with_an_integer_answer_and_the_system_prompt_format_pays_for():
    train, evaluation = load_script().make()
    for row in train + evaluation:
        system, user = row["prompt"]
        assert (system["role"], user["role"]) == ("system", "user") and "The answer is <number>." in system["content"]
        assert row["answer"] == str(int(row["answer"])) and int(row["answer"]) >= 0
        assert correct([f"Let me work it out.\nThe answer is {row['answer']}."], [row["answer"]]) == [1.0]


def test_gsm8k_rows_take_the_number_after_the_hashes(tmp_path):
    source = tmp_path / "test.jsonl"
    lines = [{"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = <<3+2=5>>5\n#### 5"},
             {"question": "What is 25 x 40?", "answer": "25 * 40 = 1000\n#### 1,000"}]  # fmt: skip
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    load_script().main(["--gsm8k", str(source), "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "gsm8k-test.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["5", "1000"]
    assert rows[0]["prompt"][1] == {"role": "user", "content": lines[0]["question"]}
    assert rows[0]["prompt"][0]["role"] == "system"


def test_measure_script_scores_a_model_on_the_eval_file(tmp_path):
    out = tmp_path / "replies.jsonl"
    args = ["--model", "tiny-llama", "--limit", "3", "--max-new-tokens", "4", "--batch-size", "2", "--out", str(out)]
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "measure_math_base.py"), *args],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "all                  3" in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["correct"] in (0.0, 1.0) and isinstance(r["reply"], str) for r in rows)
