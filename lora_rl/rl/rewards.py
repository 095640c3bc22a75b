"""Reward functions for ppo and grpo, called as TRL 1.16's GRPOTrainer calls them, and the prompt rows they read.

A reward function is either the old form `f(prompts, completions) -> list[float]` or TRL's
`f(prompts, completions, completion_ids, **columns)`: every column of the prompt data other than `prompt`
(e.g. `answer`) is passed by name as a list with one entry per completion. What a function receives follows
its signature (see `call_arguments`). It returns one number or None per completion: None means "not judged
here", and the row's total is the weighted sum of the functions that did judge it (TRL's nansum). A row no
function judged gets total 0 and judged=False; the advantage estimators leave it out of its group and give it
advantage 0 (TRL 1.16 marks it NaN, warns, and does the same); a batch no function judged at all is an error.
NaN, inf, values beyond +-MAX_REWARD and a function calling sys.exit are errors naming the function, never passed
on.

Chat data: when prompts are message lists ({role, content}), completions are passed as
[{"role": "assistant", "content": text}] and prompts as the message lists, as TRL does.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from lora_rl.data import MAX_REPORTED, DataError, read_rows

# TRL drops these columns before calling reward functions (the prompt arrives as `prompts`)
NOT_PASSED = frozenset({"prompt", "completion", "completion_ids"})
# arguments lora-rl passes itself: a data column of the same name would be ambiguous
PASSED = ("prompts", "completions", "completion_ids", "trainer_state")
# The largest |reward| (and |weight|) taken. Rewards are summed, squared and averaged in float32 (the weighted
# total, group statistics, whitening, metrics): a batch of 3e38s, each finite, sums to inf and makes every advantage
# nan. 1e6 keeps every such sum finite and is far above any reward scale in use (OpenRLHF clips to +-10).
MAX_REWARD = 1e6


class RewardError(Exception):
    """A reward function that cannot be called as declared (found by check_terms before training: exit code 2),
    or that raised or returned something unusable during training (exit code 1). One line."""


@dataclass(frozen=True)
class StepState:
    """What TRL passes as `trainer_state` (a transformers.TrainerState), reduced to the fields a reward schedule
    reads: functions doing `trainer_state.global_step / trainer_state.max_steps` work unchanged."""

    global_step: int = 0  # optimizer steps done before this batch
    max_steps: int = 0  # steps the run will take


class RewardTerm(NamedTuple):
    function: Callable[..., Sequence[Any]]
    weight: float
    name: str  # the metric is reward/<name>


class FunctionRewards(NamedTuple):
    total: torch.Tensor  # (N,) float32: sum of weight * reward over the functions that judged the row; 0 if none
    judged: torch.Tensor  # (N,) bool: some function returned a number for the row
    per_function: dict[str, torch.Tensor]  # name -> (N,) float32 unweighted rewards, nan where it returned None


def function_label(function: Callable) -> str:
    """`module:qualname`, how errors name a function."""
    return f"{getattr(function, '__module__', '?')}:{getattr(function, '__qualname__', repr(function))}"


def is_conversational(prompt: Any) -> bool:
    """A prompt given as chat messages: a non-empty list of {role, content} dicts (TRL's is_conversational)."""
    return (
        isinstance(prompt, list)
        and bool(prompt)
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in prompt)
    )


def as_completions(prompts: Sequence[Any], texts: Sequence[str]) -> list:
    """Completion texts as reward functions receive them: texts, or one assistant message each for chat prompts
    (TRL: `[{"role": "assistant", "content": text}]`, decided by the first prompt as TRL does)."""
    if prompts and is_conversational(prompts[0]):
        return [[{"role": "assistant", "content": text}] for text in texts]
    return list(texts)


def call_arguments(function: Callable, columns: Sequence[str]) -> tuple[bool, list[str]]:
    """How to call `function`: (by_keyword, names). When every required parameter is something lora-rl passes,
    by name: with **kwargs everything (TRL's call), else the parameters it declares. Else, for two required
    positional parameters of other names, the old form f(prompts, completions). Else RewardError."""
    try:
        params = inspect.signature(function).parameters.values()
    except (ValueError, TypeError):  # some builtins and C extensions have no signature: assume the old form
        return False, ["prompts", "completions"]
    available = [*PASSED, *columns]
    required = [p for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    missing = [p.name for p in required if p.name not in available or p.kind is p.POSITIONAL_ONLY]
    if not missing and any(p.kind is p.VAR_KEYWORD for p in params):
        return True, available
    if not missing:
        return True, [p.name for p in params if p.name in available and p.kind is not p.POSITIONAL_ONLY]
    old_form = len(missing) == len(required) == 2 and all(p.kind is not p.KEYWORD_ONLY for p in required)
    if old_form and not any(p.kind is p.VAR_KEYWORD for p in params):
        return False, ["prompts", "completions"]
    raise RewardError(
        f"reward function {function_label(function)}: parameter {missing[0]!r} is neither a data column "
        f"({', '.join(columns) or 'none'}) nor one of {', '.join(PASSED)}"
    )


def data_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The columns reward functions receive by name: every column but the prompt (and those TRL drops)."""
    return [key for key in rows[0] if key not in NOT_PASSED] if rows else []


def check_terms(terms: Sequence[RewardTerm], columns: Sequence[str]) -> None:
    """Before training: every function callable with what the data offers (columns: data_columns(rows)), names
    unique, weights finite. Raises RewardError: an input problem (exit code 2)."""
    names = [term.name for term in terms]
    for term in terms:
        call_arguments(term.function, columns)
        if not math.isfinite(term.weight):
            raise RewardError(f"reward function {function_label(term.function)}: weight {term.weight} is not finite")
        if abs(term.weight) > MAX_REWARD:
            raise RewardError(f"reward function {function_label(term.function)}: weight {term.weight:g} is beyond "
                              f"the largest allowed, {MAX_REWARD:g}")  # fmt: skip
        if names.count(term.name) > 1:
            raise RewardError(f"reward functions: the name {term.name!r} is used twice; metric names must differ")


def call_function(
    function: Callable, arguments: Mapping[str, Any], columns: Sequence[str], size: int
) -> list[float | None]:
    """Call one reward function as its signature asks -> its validated rewards (floats, None for not judged)."""
    by_keyword, names = call_arguments(function, columns)
    try:
        if by_keyword:
            result = function(**{name: arguments[name] for name in names})
        else:
            result = function(arguments["prompts"], arguments["completions"])
        if inspect.iscoroutine(result):  # TRL accepts async reward functions; here they run one after another
            result = asyncio.run(result)
    except Exception as err:  # the user's code: report it as theirs, in one line
        detail = " ".join(str(err).split())
        raise RewardError(f"reward function {function_label(function)} raised {type(err).__name__}: {detail}") from err
    except SystemExit as err:  # would end the run with the function's exit code and no word of why
        raise RewardError(f"reward function {function_label(function)} called sys.exit({err.code!r})") from None
    return check_result(function, result, size)


def check_result(function: Callable, result: Any, size: int) -> list[float | None]:
    """The function's return value as `size` floats or None; bool counts as 0/1, as TRL's torch.tensor makes it."""
    label = function_label(function)
    if isinstance(result, torch.Tensor):
        result = result.tolist()
    if isinstance(result, str | bytes | Mapping) or not _sized(result):
        raise RewardError(f"reward function {label}: expected a list of {size} numbers, got {_short(result)}")
    values = list(result)
    if len(values) != size:
        raise RewardError(f"reward function {label}: returned {len(values)} rewards for {size} completions")
    for row, value in enumerate(values):
        problem = _value_problem(value)
        if problem:
            raise RewardError(f"reward function {label}: completion {row + 1} of {size}: {problem}")
    return [None if value is None else float(value) for value in values]


def _value_problem(value: Any) -> str | None:
    """What makes one returned value unusable, or None. Compared, never converted first: float(10**400) raises."""
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or value != value or abs(value) == math.inf:
        return f"expected a finite number or None, got {_short(value)}"
    if abs(value) > MAX_REWARD:
        return (f"got {_short(value)}, beyond the largest reward allowed, {MAX_REWARD:g} (scale it down: rewards are "
                "summed and squared in float32)")  # fmt: skip
    return None


def check_judged(judged: torch.Tensor, names: Sequence[str], update: int) -> None:
    """Raise when no reward function judged any completion of the batch (`judged`: gathered from every process).
    Every advantage would be 0 and the reward metrics nan: a run of such batches learns nothing and would end as if
    it had (TRL logs nan and goes on). Refused rather than skipped: a function judging only some prompts can judge
    none of a batch by chance only with very few prompts per step; a function that never judges is a bug."""
    if judged.numel() and not judged.any():
        functions = f"reward function{'s' if len(names) > 1 else ''} {', '.join(names)}"
        raise RewardError(f"update {update}: {functions} returned None for all {judged.numel()} completions: nothing "
                          "to learn from (None means not judged)")  # fmt: skip


def _sized(value: Any) -> bool:
    return hasattr(value, "__len__") and hasattr(value, "__iter__")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def score_functions(
    terms: Sequence[RewardTerm],
    rows: Sequence[Mapping[str, Any]],
    texts: Sequence[str],
    completion_ids: Sequence[Sequence[int]],
    state: StepState = StepState(),
    device: torch.device | str = "cpu",
) -> FunctionRewards:
    """N completions -> their weighted total rewards and each function's own.

    rows: the prompt row of each completion (a prompt's row repeated for each of its G completions, in order);
    texts: decoded completions (cut after the first EOS, special tokens removed); completion_ids: their tokens.
    """
    columns = data_columns(rows)
    prompts = [row["prompt"] for row in rows]
    arguments = {name: [row.get(name) for row in rows] for name in columns}
    arguments |= {"prompts": prompts, "completions": as_completions(prompts, texts), "trainer_state": state}
    arguments["completion_ids"] = [list(ids) for ids in completion_ids]
    total = torch.zeros(len(rows), dtype=torch.float32)
    judged = torch.zeros(len(rows), dtype=torch.bool)
    per_function = {}
    for term in terms:
        values = call_function(term.function, arguments, columns, len(rows))
        rewards = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)
        scored = ~rewards.isnan()
        # r_i = sum_k w_k * r_ik over the functions k that judged row i (TRL: nansum of weighted rewards)
        total += torch.where(scored, term.weight * rewards, 0)
        judged |= scored
        per_function[term.name] = rewards.to(device)
    return FunctionRewards(total.to(device), judged.to(device), per_function)


def reward_metrics(per_function: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """reward/<name>: each function's mean over the rows it judged (TRL's rewards/<name>/mean); a function that
    judged no row of the batch is left out rather than logged as nan. Pass rewards gathered from every process."""
    metrics = {}
    for name, rewards in per_function.items():
        scored = ~rewards.isnan()
        if scored.any():  # .item(): a host sync, once per function per step
            metrics[f"reward/{name}"] = rewards[scored].double().mean().item()
    return metrics


def load_prompt_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a prompt file with all their columns (reward functions read the extra ones by name).

    `prompt` must be a non-empty string, or a non-empty list of {role, content} messages with string values,
    the same kind in every row; no column may be named like an argument lora-rl passes itself.
    """
    rows = read_rows(path)
    problems = [f"{path}: no rows"] if not rows else []
    clashing = sorted({key for row in rows for key in row} & set(PASSED))
    if clashing:
        problems.append(f"{path}: column {clashing[0]!r} clashes with the reward-function argument of that name")
    chat = bool(rows) and isinstance(rows[0].get("prompt"), list)
    for number, row in enumerate(rows, start=1):
        problem = _prompt_problem(row.get("prompt"), chat)
        if problem:
            problems.append(f"{path}: row {number}: 'prompt' {problem}, got {_short(row.get('prompt'))}")
    if problems:
        extra = len(problems) - MAX_REPORTED
        raise DataError(problems[:MAX_REPORTED] + ([f"{path}: ... and {extra} more problems"] if extra > 0 else []))
    return rows


def _prompt_problem(prompt: Any, chat: bool) -> str | None:
    """What is wrong with one prompt, or None; `chat`: the file's first row holds messages."""
    if chat:
        good = is_conversational(prompt) and all(isinstance(m["content"], str) for m in prompt)
        return None if good else "must be a list of {role, content} messages like row 1"
    if isinstance(prompt, str) and prompt.strip():
        return None
    return "must be a non-empty string (or, in every row, a list of {role, content} messages)"
