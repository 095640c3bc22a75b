"""`lora-rl eval RECIPE_OR_RUN`: the evaluation a run makes, on its own, for the base and each adapter. Each
checkpoint's figures equal the run's own evaluation of that update; the base's equal an adapter that changes
nothing; the table and JSON lines; every bad input one line before any model loads. Two processes against one:
tests/test_distributed.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lora_rl.cli import app
from tests.test_evaluation import FUNCTIONS, run
from tests.test_roles import ROOT, reward_adapter  # noqa: F401 (a fixture)

EVAL = ["train.eval_every=2", "eval.num_samples=2", "eval.pass_function=record", "eval.pass_threshold=1.2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A grpo run of 4 updates with held-out prompts: checkpoint-2/, best/ and final/; its metrics lines."""
    tmp = tmp_path_factory.mktemp("eval")
    rows = [{"prompt": f"say the word {word}", "answer": word} for word in ["dog", "cat", "red", "blue", "one"]]
    (tmp / "held-out.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp / "run"
    lines, _ = run(out, "grpo.num_steps=4", "train.save_every=2", "train.save_total_limit=3", FUNCTIONS, *EVAL,
                   f"data.eval_path={tmp / 'held-out.jsonl'}", "train.save_best=eval/reward/record")  # fmt: skip
    return out, lines


def evaluate(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["eval", *args], env={"COLUMNS": "200"})
    return result.exit_code, result.output


def records(output: str) -> dict[str, dict]:
    return {line["model"]: line for line in map(json.loads, output.splitlines())}


def test_each_checkpoint_scores_as_the_run_evaluated_it_and_the_base_as_an_adapter_that_changes_nothing(trained):
    out, lines = trained
    code, output = evaluate(str(out), "--json")
    assert code == 0, output
    found = records(output)
    assert list(found) == ["base", "checkpoint-2", "best", "final"]
    by_update = {line["update"]: {k: v for k, v in line.items() if k.startswith("eval/")} for line in lines}
    best = json.loads((out / "best/manifest.json").read_text())["best"]["update"]
    for name, update in (("checkpoint-2", 2), ("best", best), ("final", 4)):
        assert found[name]["update"] == update
        assert {k: v for k, v in found[name].items() if k.startswith("eval/")} == by_update[update], name
        assert found[name]["adapter"] == str(out / name)
    assert found["base"]["adapter"] is None and found["base"]["update"] is None
    assert found["base"]["eval/reward"] != found["final"]["eval/reward"]  # training changed the completions

    # the base: final/ with every lora_B zeroed (the LoRA delta B A is 0) gives the same completions and rewards
    zero = out.parent / "zero"
    shutil.copytree(out / "final", zero)
    (zero / "manifest.json").unlink()  # hand-made: no lora-rl manifest vouches for its files
    weights = load_file(zero / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
              zero / "adapter_model.safetensors")  # fmt: skip
    code, output = evaluate(str(out / "recipe.yaml"), "--adapter", f"nothing={zero}", "--json")
    assert code == 0, output
    found = records(output)
    assert list(found) == ["base", "nothing"]
    drop = ("model", "adapter", "update", "time_eval")
    assert {k: v for k, v in found["nothing"].items() if k not in drop} == \
        {k: v for k, v in found["base"].items() if k not in drop}  # fmt: skip


def test_the_table_and_an_adapter_directory_on_its_own(trained):
    out, lines = trained
    code, output = evaluate(str(out / "checkpoint-2"))
    assert code == 0, output
    assert "5 held-out prompts, 2 samples each at temperature" in output and "record >= 1.2" in output
    header = next(line for line in output.splitlines() if line.startswith("┃"))
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == ["", "base", "checkpoint-2"]
    rows = {cells[0]: cells[1:] for line in output.splitlines() if line.startswith("│")
            for cells in [[cell.strip() for cell in line.split("│")[1:-1]]]}  # fmt: skip
    assert list(rows) == ["update", "reward", "reward/record", "reward/answer_matches_prompt", "pass@1", "pass@2",
                          "response_length", "seconds"]  # fmt: skip
    assert rows["update"] == ["", "2"]
    assert rows["pass@2"][1] == f"{lines[1]['eval/pass@2']:.4g}"  # the run's evaluation at update 2
    # overrides as for every recipe command: a greedy evaluation; every completion to a new file
    written = out.parent / "completions.jsonl"
    code, output = evaluate(str(out / "final"), "eval.num_samples=1", "--json", "--completions", str(written))
    assert code == 0, output
    assert set(records(output)["final"]) >= {"eval/pass@1", "eval/reward"} and "eval/pass@2" not in output
    code, output = evaluate(str(out / "recipe.yaml"), "--adapter", str(out / "final"), "--json")  # named after DIR
    assert code == 0 and list(records(output)) == ["base", "final"], output
    lines = [json.loads(line) for line in written.read_text().splitlines()]
    assert [(line["model"], line["prompt"]) for line in lines] == [(m, f"say the word {w}") for m in ("base", "final")
                                                                   for w in ["dog", "cat", "red", "blue", "one"]]
    assert set(lines[0]) == {"model", "prompt", "completion", "reward", "reward/record", "reward/answer_matches_prompt",
                             "passed"}  # fmt: skip
    assert lines[0]["completion"] != lines[5]["completion"] or lines[1]["completion"] != lines[6]["completion"]
    before = written.read_text()
    code, output = evaluate(str(out / "final"), "--completions", str(written))
    assert code == 2 and "exists; give a new file" in output and written.read_text() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing-dir"], "RECIPE_OR_RUN: missing-dir not found"),
        ([str(ROOT / "recipes/grpo-demo.yaml")], "eval needs held-out prompts: set data.eval_path"),
        ([str(ROOT / "recipes/grpo-demo.yaml"), "data.eval_fraction=0.2", "--adapter", "x.y=somewhere"],
         "--adapter x.y=somewhere: expected DIR or NAME=DIR"),
        ([str(ROOT / "recipes/grpo-demo.yaml"), "data.eval_fraction=0.2", "--adapter", "base=somewhere"],
         "--adapter base: the name is taken"),
        ([str(ROOT / "recipes/grpo-demo.yaml"), "data.eval_fraction=0.2", "eval.pass_function=nope"],
         "eval.pass_function: got 'nope'"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_before_any_model_loads(args, message):
    code, output = evaluate(*args)
    assert code == 2 and message in output, output
    assert "Traceback" not in output


def test_a_reward_adapter_or_one_for_another_base_is_refused(trained, reward_adapter, tmp_path):  # noqa: F811
    out, _ = trained
    code, output = evaluate(str(out / "recipe.yaml"), "--adapter", f"r={reward_adapter}")
    assert code == 2 and "is a reward (SEQ_CLS) adapter; eval takes policies" in output, output
    other = tmp_path / "other"
    shutil.copytree(out / "final", other)
    (other / "manifest.json").unlink()
    config = json.loads((other / "adapter_config.json").read_text())
    weights = load_file(other / "adapter_model.safetensors")
    name = next(k for k in weights if "lora_A" in k)
    weights[name] = torch.zeros(weights[name].shape[0], weights[name].shape[1] + 3)  # a wider hidden size
    save_file(weights, other / "adapter_model.safetensors")
    (other / "adapter_config.json").write_text(json.dumps(config))
    code, output = evaluate(str(out / "recipe.yaml"), "--adapter", f"o={other}")
    assert code == 2 and "does not fit the base" in output, output


def test_it_ends_as_a_run_does_so_several_processes_leave_together(trained, monkeypatch):
    """With several processes, eval must end through end_distributed_run (a barrier, then os._exit): left to
    interpreter shutdown, gloo aborted the processes after the results were printed ("terminate called without an
    active exception", SIGABRT, exit 1; 2 of 6 two-process tries once, 0 of 12 on an idle machine). Here one
    process: the call is recorded."""
    import lora_rl.training.distributed as distributed

    ended = []
    monkeypatch.setattr(distributed, "end_distributed_run", ended.append)
    code, output = evaluate(str(trained[0] / "final"), "--json")
    assert code == 0 and ended == [0], output
