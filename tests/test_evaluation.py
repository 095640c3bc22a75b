"""Evaluation during ppo and grpo on held-out prompts: pass@k on a hand-made case, the batches dealt out to the
processes, eval lines at the right updates, eval_samples.jsonl, resuming, the checks before any model loads. One
process against two: tests/test_distributed.py; the curves: tests/test_plot.py."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_rl.cli import app
from lora_rl.data import DataError
from lora_rl.recipe import EvalConfig, RecipeError, load_recipe
from lora_rl.rl import evaluation
from lora_rl.rl.setup import check_inputs
from tests import recording_rewards
from tests.test_roles import ROOT, reward_adapter  # noqa: F401 (a fixture)

GRPO = ["grpo", str(ROOT / "recipes/grpo-demo.yaml"), f"data.train_path={ROOT / 'recipes/data/grpo-demo.jsonl'}",
        "grpo.prompts_per_step=4", "grpo.num_generations=4", "train.batch_size=8"]  # fmt: skip
# the recorded rewards (0.25 a word + 0.01 a character) and a function that fails unless each completion arrives
# with its own row's `answer` column
FUNCTIONS = ("reward.functions=[{function: tests.recording_rewards:record, weight: 1.0}, "
             "{function: tests.grpo_rewards:answer_matches_prompt, weight: 0.5}]")  # fmt: skip
TIMES = ("time_generate", "time_score", "time_train", "time_eval")


def completion(row: int, sample: int, reward: float | None, **parts: float | None) -> dict:
    return {"row": row, "sample": sample, "completion": f"c{row}.{sample}", "reward": reward, "parts": parts,
            "length": row + sample}  # fmt: skip


def test_pass_at_k_on_a_hand_made_case():
    """3 prompts x 3 samples: prompt 0 has one completion at the threshold, prompt 1 none above it, prompt 2 one
    that only a function judged; pass_function decides by that function's own (unweighted) reward."""
    found = [completion(0, 0, 0.0, f=0.0, g=None), completion(0, 1, 1.0, f=1.0, g=None),
             completion(0, 2, 0.5, f=0.5, g=None),
             completion(1, 0, 0.2, f=0.2, g=None), completion(1, 1, 0.9, f=0.3, g=3.0),
             completion(1, 2, 0.999, f=0.999, g=None),
             completion(2, 0, None, f=None, g=None), completion(2, 1, 2.0, f=None, g=4.0),
             completion(2, 2, None, f=None, g=None)]  # fmt: skip
    metrics = evaluation.summarise(found, EvalConfig(num_samples=3))
    assert metrics["eval/pass@3"] == pytest.approx(2 / 3)  # prompts 0 and 2
    assert metrics["eval/pass@1"] == pytest.approx(2 / 9)  # 2 of 9 completions
    assert metrics["eval/reward"] == pytest.approx((0 + 1 + 0.5 + 0.2 + 0.9 + 0.999 + 2.0) / 7)  # the judged ones
    assert metrics["eval/reward/f"] == pytest.approx((0 + 1 + 0.5 + 0.2 + 0.3 + 0.999) / 6)
    assert metrics["eval/reward/g"] == pytest.approx(3.5)
    assert metrics["eval/response_length"] == pytest.approx(sum(c["length"] for c in found) / 9)
    by_g = evaluation.summarise(found, EvalConfig(num_samples=3, pass_function="g", pass_threshold=3.5))
    # only completion 1 of prompt 2 has g >= 3.5
    assert (by_g["eval/pass@3"], by_g["eval/pass@1"]) == (pytest.approx(1 / 3), pytest.approx(1 / 9))
    lines = evaluation.records(found, [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}], EvalConfig(), 7)
    assert [line["passed"] for line in lines] == [False, True, False, False, False, False, False, True, False]
    assert lines[6] == {"update": 7, "prompt": "c", "completion": "c2.0", "reward": None, "reward/f": None,
                        "reward/g": None, "passed": False}  # fmt: skip
    greedy = evaluation.summarise([completion(0, 0, 1.0), completion(1, 0, 0.0)], EvalConfig())
    assert set(greedy) == {"eval/reward", "eval/pass@1", "eval/response_length"} and greedy["eval/pass@1"] == 0.5


def test_due_after_every_nth_update_and_the_last():
    assert [u for u in range(1, 8) if evaluation.due(u, 7, 3)] == [3, 6, 7]
    assert [u for u in range(1, 8) if evaluation.due(u, 7, 0)] == [7]


def accelerator(rank: int, world: int, kind: str = "MULTI_CPU"):
    return SimpleNamespace(process_index=rank, num_processes=world, is_main_process=rank == 0,
                           distributed_type=SimpleNamespace(value=kind))  # fmt: skip


def test_batches_are_the_same_for_every_process_count_and_dealt_out_in_turn(monkeypatch):
    """7 prompts x 2 samples in batches of 4 completions: 4 batches of 2, 2, 2, 1 prompts, whatever the process
    count; 3 processes take batches 0 and 3, 1, 2. Under FSDP every process runs 2 (its last again, or batch 0),
    and the repeat's results are dropped."""
    assert [list(b) for b in evaluation.batches(7, 4, 2)] == [[0, 1], [2, 3], [4, 5], [6]]
    assert [list(b) for b in evaluation.batches(3, 1, 4)] == [[0], [1], [2]]  # at least one prompt a batch
    rows = [{"prompt": f"say the word {w}"} for w in ["cat", "dog", "red", "blue", "one", "two", "three"]]
    tokenizer = SimpleNamespace(pad_token_id=0)
    monkeypatch.setattr(evaluation, "tokenize_rows", lambda rows, *_: SimpleNamespace(
        pairs=[[1]] * len(rows), truncated=0))  # fmt: skip
    recipe = load_recipe(ROOT / "recipes/grpo-demo.yaml", ["eval.num_samples=2", "eval.batch_size=4"])
    sets = {(kind, rank): evaluation.EvalSet(rows, tokenizer, recipe, 64, accelerator(rank, 3, kind))
            for kind in ("MULTI_CPU", "FSDP") for rank in range(3)}  # fmt: skip
    assert [sets["MULTI_CPU", r].mine for r in range(3)] == [[0, 3], [1], [2]]
    ran = []
    monkeypatch.setattr(evaluation, "complete_batch", lambda roles, tok, evalset, number, *_: ran.append(number) or [
        {"row": i, "sample": 0, "batch": number} for i in evalset.batches[number]])  # fmt: skip
    found = {key: evaluation.complete(None, tokenizer, s, None, 0, None, None) for key, s in sets.items()}
    assert ran == [0, 3, 1, 2] + [0, 3, 1, 1, 2, 2]  # under FSDP, 2 batches on every process
    assert [[c["row"] for c in found["FSDP", r]] for r in range(3)] == [[0, 1, 6], [2, 3], [4, 5]]
    assert found["FSDP", 1] == found["MULTI_CPU", 1]
    single = evaluation.EvalSet(rows, tokenizer, recipe, 64, accelerator(0, 1, "FSDP"))
    assert single.mine == [0, 1, 2, 3] and single.rounds == 4


def run(out: Path, *overrides: str, args: list[str] = GRPO) -> tuple[list[dict], list[dict]]:
    """The command's metrics.jsonl and eval_samples.jsonl lines."""
    recording_rewards.CALLS.clear()
    result = CliRunner().invoke(app, [*args, f"output_dir={out}", *overrides], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = lambda name: [json.loads(x) for x in (out / name).read_text().splitlines()]  # noqa: E731
    return lines("metrics.jsonl"), lines(evaluation.FILE) if (out / evaluation.FILE).exists() else []


@pytest.fixture
def held_out(tmp_path) -> Path:
    """5 prompts the training data also has, in an order of their own, with their `answer` column."""
    rows = [{"prompt": f"say the word {word}", "answer": word} for word in ["dog", "cat", "red", "blue", "dog"]]
    path = tmp_path / "held-out.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_eval_lines_at_every_nth_update_and_the_last_with_every_completion_in_eval_samples(tmp_path, held_out):
    lines, written = run(tmp_path / "out", "grpo.num_steps=3", "train.eval_every=2", FUNCTIONS,
                         f"data.eval_path={held_out}", "eval.num_samples=3", "eval.pass_threshold=1.2",
                         "eval.pass_function=record",
                         "eval.batch_size=6")  # fmt: skip
    evaluated = [("eval/pass@3" in line, "time_eval" in line) for line in lines]
    assert evaluated == [(False, False), (True, True), (True, True)]  # updates 2 and 3
    prompts = [json.loads(x)["prompt"] for x in held_out.read_text().splitlines()]
    assert [(w["update"], w["prompt"]) for w in written] == [(u, p) for u in (2, 3) for p in prompts for _ in range(3)]
    for update in (2, 3):
        mine = [w for w in written if w["update"] == update]
        assert set(mine[0]) == {"update", "prompt", "completion", "reward", "reward/record",
                                "reward/answer_matches_prompt", "passed"}  # fmt: skip
        for w in mine:  # what the recording function returned for this completion, weighted as in training
            record = 0.25 * len(w["completion"].split()) + 0.01 * len(w["completion"])
            assert w["reward/record"] == pytest.approx(record)
            assert w["reward"] == pytest.approx(record + 0.5 * w["reward/answer_matches_prompt"])
            assert w["passed"] == (w["reward/record"] >= 1.2)
        line = lines[update - 1]
        assert line["eval/reward"] == pytest.approx(sum(w["reward"] for w in mine) / 15)
        assert line["eval/reward/record"] == pytest.approx(sum(w["reward/record"] for w in mine) / 15)
        assert line["eval/pass@1"] == pytest.approx(sum(w["passed"] for w in mine) / 15)
        assert line["eval/pass@3"] == pytest.approx(sum(any(w["passed"] for w in mine[i : i + 3])
                                                        for i in range(0, 15, 3)) / 5)  # fmt: skip
        assert 0 < line["eval/pass@1"] < line["eval/pass@3"] < 1  # the threshold splits them: not a trivial case
    # the reward function got the held-out prompts in batches of 2 prompts x 3 samples, at trainer_state.global_step
    # = the updates done (recording_rewards counts global_step + 1)
    calls = [c for c in recording_rewards.CALLS if len(c["prompts"]) != 16]
    batches = [(u + 1, [p for p in prompts[i : i + 2] for _ in range(3)]) for u in (2, 3) for i in (0, 2, 4)]
    assert [(c["update"], c["prompts"]) for c in calls] == batches


def test_evaluation_leaves_the_training_as_it_was_and_greedy_is_the_default(tmp_path, held_out):
    """The same run with a sampled evaluation after every update and without one: the same training metrics and
    weights (evaluation draws from its own seeds, not the run's streams). Greedy: one completion per prompt."""
    plain, _ = run(tmp_path / "plain", "grpo.num_steps=3")
    sampled, written = run(tmp_path / "sampled", "grpo.num_steps=3", f"data.eval_path={held_out}",
                           "train.eval_every=1", "eval.num_samples=2")  # fmt: skip
    strip = lambda line: {k: v for k, v in line.items() if k not in TIMES and not k.startswith("eval/")}  # noqa: E731
    assert [strip(line) for line in sampled] == [strip(line) for line in plain]
    a, b = (load_file(out / "final/adapter_model.safetensors") for out in (tmp_path / "plain", tmp_path / "sampled"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(written) == 3 * 5 * 2
    _, greedy = run(tmp_path / "greedy", "grpo.num_steps=1", f"data.eval_path={held_out}")
    assert [w["prompt"] for w in greedy] == [json.loads(x)["prompt"] for x in held_out.read_text().splitlines()]
    assert greedy[0]["completion"] == greedy[4]["completion"]  # the same prompt twice: the same greedy completion


def test_resume_trims_eval_samples_and_equals_the_uninterrupted_run(tmp_path, held_out):
    settings = ["grpo.num_steps=4", "train.save_every=2", "train.eval_every=1", f"data.eval_path={held_out}",
                "eval.num_samples=2", "train.save_best=eval/reward"]  # fmt: skip
    full_lines, full_written = run(tmp_path / "full", *settings)
    crashed = tmp_path / "crashed"  # as a crash after update 3 leaves the run
    shutil.copytree(tmp_path / "full", crashed)
    shutil.rmtree(crashed / "final")
    lines, written = run(crashed, *settings, "--resume", "auto")
    assert [w["update"] for w in written] == [u for u in (1, 2, 3, 4) for _ in range(10)]  # 3 and 4 once each
    assert written == full_written
    strip = lambda line: {k: v for k, v in line.items() if k not in TIMES}  # noqa: E731
    assert [strip(line) for line in lines] == [strip(line) for line in full_lines]
    best = [json.loads((out / "best/manifest.json").read_text())["best"] for out in (tmp_path / "full", crashed)]
    assert best[0] == best[1]


def test_a_best_saved_past_the_checkpoint_resumed_is_named(tmp_path):
    from lora_rl.commands import rl as rl_command
    from lora_rl.rl.loop import Position
    from lora_rl.training.checkpoint import FORMAT

    (tmp_path / "best").mkdir()
    (tmp_path / "best/manifest.json").write_text(json.dumps({"format": FORMAT, "best": {"update": 7}}))
    trainer = SimpleNamespace(out=tmp_path, position=Position(update=5, best=0.25, best_update=3))
    (line,) = rl_command.Trainer.later_best(trainer)
    assert line == (f"{tmp_path / 'best'} is the policy of update 7, past the checkpoint resumed (update 5): it stays "
                    "until an evaluation beats the best before the checkpoint, 0.25 (update 3)")  # fmt: skip
    trainer.position.update = 7
    assert rl_command.Trainer.later_best(trainer) == []


def test_ppo_holds_out_eval_fraction_and_scores_with_its_reward_adapter(tmp_path, reward_adapter):  # noqa: F811
    prompts = ROOT / "recipes/data/prompts-demo.jsonl"
    args = ["ppo", str(ROOT / "recipes/ppo-demo.yaml"), f"data.train_path={prompts}", "ppo.num_updates=2",
            "ppo.rollout_batch_size=8", "train.batch_size=8", "generation.max_new_tokens=4"]  # fmt: skip
    lines, written = run(tmp_path / "out", "data.eval_fraction=0.02", "reward.function=null",
                         f"reward.adapter={reward_adapter}", "eval.pass_threshold=-100", args=args)  # fmt: skip
    held = round(0.02 * 512)
    assert "eval/reward" not in lines[0] and lines[1]["eval/pass@1"] == 1.0  # every reward is above -100
    assert len(written) == held and len({w["prompt"] for w in written}) > 1
    assert all(math.isfinite(w["reward"]) and w["passed"] for w in written)
    assert lines[1]["eval/reward"] == pytest.approx(sum(w["reward"] for w in written) / held)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["train.eval_every=2"],
      "train.eval_every: set, but there are no held-out prompts to evaluate on: set data.eval_path or "
      "data.eval_fraction"),
     (["eval.num_samples=4"], "eval.num_samples: set, but there are no held-out prompts"),
     (["data.eval_fraction=0.1", "data.eval_path={prompts}"], "data.eval_path and data.eval_fraction: both set"),
     (["data.eval_fraction=0.1", "eval.pass_function=nope"],
      "eval.pass_function: got 'nope'; expected the name of a reward function (the reward functions are correct, "
      "one_word)"),
     (["data.eval_path={prompts}"],
      "data.eval_path: {prompts}: reward function lora_rl.demo_rewards:correct: parameter 'answer' is neither a data "
      "column (none) nor one of"),
     (["data.eval_path={chat}"], "data.eval_path: {chat}'s prompts are chat messages, data.train_path's are text"),
     (["data.eval_path={empty}"], "{empty}: no rows"),
     (["data.eval_fraction=0.999"], "data.eval_fraction: 0.999 of 320 rows leaves none to train on")],
)  # fmt: skip
def test_eval_settings_are_checked_before_any_model_loads(tmp_path, overrides, message):
    files = {"prompts": ROOT / "recipes/data/prompts-demo.jsonl", "chat": tmp_path / "chat.jsonl",
             "empty": tmp_path / "empty.jsonl"}  # fmt: skip
    files["chat"].write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "answer": "hi"}) + "\n")
    files["empty"].write_text("")
    recipe = load_recipe(ROOT / "recipes/grpo-demo.yaml", [o.format(**files) for o in overrides])
    with pytest.raises((RecipeError, DataError)) as raised:
        check_inputs(recipe, command="grpo")
    assert message.format(**files) in str(raised.value)


def test_the_held_out_prompts_leave_training(tmp_path):
    recipe = load_recipe(ROOT / "recipes/grpo-demo.yaml", ["data.eval_fraction=0.25"])
    inputs = check_inputs(recipe, command="grpo")
    assert (len(inputs.rows), len(inputs.eval_rows)) == (240, 80)
    assert check_inputs(recipe, command="grpo").eval_rows == inputs.eval_rows  # seeded
    every = [json.loads(x) for x in (ROOT / "recipes/data/grpo-demo.jsonl").read_text().splitlines()]
    assert sorted(map(json.dumps, inputs.rows + inputs.eval_rows)) == sorted(map(json.dumps, every))


def test_trackers_get_the_eval_metrics_and_the_completions_as_a_table(tmp_path, held_out, monkeypatch):
    from lora_rl.training import trackers
    from tests.test_samples import TableTracker

    class Recorder(TableTracker):
        logged: list = []

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, values))

    tracker = Recorder()
    monkeypatch.setattr(trackers, "tracker_options", lambda recipe: {"log_with": [tracker]})
    _, written = run(tmp_path / "out", "grpo.num_steps=2", f"data.eval_path={held_out}", "train.eval_every=1",
                     "train.samples_every=0")  # fmt: skip
    columns = list(written[0])
    rows = [[w[c] for c in columns] for w in written]
    assert tracker.tables == [("eval_samples", 1, columns, rows[:5]), ("eval_samples", 2, columns, rows[5:])]
    assert [(step, "eval/pass@1" in values and "time_eval" in values) for step, values in tracker.logged] == [
        (1, True), (2, True)]  # fmt: skip


def test_save_best_saves_when_the_metric_beats_every_earlier_evaluation(monkeypatch, tmp_path):
    from lora_rl.commands import rl as rl_command
    from lora_rl.rl.loop import Position

    saved = []
    monkeypatch.setattr(rl_command, "save_policy", lambda *args, extra: saved.append((args[6], extra["best"])))
    recipe = load_recipe(ROOT / "recipes/grpo-demo.yaml", ["train.save_best=eval/pass@1"])
    trainer = SimpleNamespace(recipe=recipe, position=Position(), out=tmp_path, main=False, progress=None,
                              accelerator=None, trained=None, roles=None, built=None,
                              schedule=SimpleNamespace(command="grpo"))  # fmt: skip
    for update, value in enumerate([0.2, 0.5, 0.5, 0.1, 0.7, None], start=1):
        rl_command.Trainer.keep_best(trainer, update, {} if value is None else {"eval/pass@1": value})
    assert saved == [(update, {"metric": "eval/pass@1", "value": value, "update": update})
                     for update, value in [(1, 0.2), (2, 0.5), (5, 0.7)]]  # fmt: skip
    assert (trainer.position.best, trainer.position.best_update) == (0.7, 5)


def test_best_is_the_policy_of_its_update_and_loads(tmp_path, held_out):
    out = tmp_path / "out"
    lines, _ = run(out, "grpo.num_steps=3", "train.eval_every=1", "train.save_every=1", f"data.eval_path={held_out}",
                   "eval.num_samples=2", "train.save_best=eval/reward", "train.learning_rate=0.01")  # fmt: skip
    values = [line["eval/reward"] for line in lines]
    update = values.index(max(values)) + 1  # the first of equal values
    manifest = json.loads((out / "best/manifest.json").read_text())
    assert manifest["best"] == {"metric": "eval/reward", "value": max(values), "update": update}
    assert manifest["step"] == update and not (out / "best/trainer_state.json").exists()  # a policy, not a checkpoint
    same = out / (f"checkpoint-{update}" if update < 3 else "final")
    a, b = (load_file(d / "adapter_model.safetensors") for d in (out / "best", same))
    assert all(torch.equal(a[k], b[k]) for k in a)
    result = CliRunner().invoke(app, ["load", str(out / "best"), "--prompt", "say the word cat"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, [*GRPO, f"output_dir={out}", "grpo.num_steps=1", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (out / "best").exists()  # a run's own best/ goes with it


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["train.save_best=eval/reward"], "train.save_best: set, but there are no held-out prompts to evaluate on"),
     (["data.eval_fraction=0.1", "train.save_best=eval/pass@4"],
      "train.save_best: got 'eval/pass@4'; expected a metric the evaluation logs, where higher is better: "
      "eval/reward, eval/pass@1, eval/reward/correct, eval/reward/one_word")],
)  # fmt: skip
def test_save_best_names_a_metric_the_evaluation_logs(overrides, message):
    with pytest.raises(RecipeError) as raised:
        check_inputs(load_recipe(ROOT / "recipes/grpo-demo.yaml", overrides), command="grpo")
    assert message in str(raised.value)


def test_a_skipped_last_update_is_evaluated_all_the_same_on_a_line_of_its_own(tmp_path, held_out, monkeypatch):
    from lora_rl.commands import rl as rl_command
    from lora_rl.training.guards import BadUpdate

    def non_finite(accelerator, update, rollout):
        raise BadUpdate(f"update {update}: non-finite reward (as a test says)")

    monkeypatch.setattr(rl_command, "check_finite", non_finite)
    lines, written = run(tmp_path / "out", "grpo.num_steps=2", "grpo.max_bad_updates=5", f"data.eval_path={held_out}")
    assert [sorted(line) for line in lines] == [["eval/pass@1", "eval/response_length", "eval/reward",
                                                 "eval/reward/correct", "eval/reward/one_word", "time_eval",
                                                 "update"]]  # fmt: skip
    assert lines[0]["update"] == 2 and [w["update"] for w in written] == [2] * 5
