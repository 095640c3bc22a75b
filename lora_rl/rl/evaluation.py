"""Evaluation during ppo and grpo: after every `train.eval_every`-th update and after the last, the policy
completes every held-out prompt (data.eval_path, or data.eval_fraction of train_path) — greedily, or
`eval.num_samples` times with the generation section's sampling — and the recipe's reward scores the completions
as in training (rollout.generate and rollout.score; each eval row's columns reach the reward functions). The
metrics join that update's metrics.jsonl line; every completion goes to `OUTPUT_DIR/eval_samples.jsonl`.

A completion passes when its reward (the weighted sum, or `eval.pass_function`'s own) is >= `eval.pass_threshold`;
not judged (None) never passes. A prompt passes@k when any of its k completions passes; `eval/pass@k` is the share
of prompts that do, and with k > 1 `eval/pass@1` is the share of all completions that pass (the unbiased estimate
of pass@1 from k samples, Chen et al. 2021).

Several processes: the prompts are cut into batches in their order, the same batches for every process count, and
dealt out to the processes in turn; a sampled batch draws from a seed of its own (the run's sampling streams are
left as they were). Each batch is computed the same wherever it runs, and the results, gathered and put back in
order, equal one process's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lora_rl.data import pad
from lora_rl.recipe import EvalConfig, GenerationConfig, Recipe
from lora_rl.rl import ppo, samples
from lora_rl.rl.loop import warn_truncated
from lora_rl.rl.rewards import RewardError, StepState
from lora_rl.rl.roles import POLICY, Roles
from lora_rl.rl.rollout import decode, generate, score
from lora_rl.rl.setup import tokenize_rows
from lora_rl.training.distributed import on_any_process, reshard

FILE = "eval_samples.jsonl"
TABLE = "eval_samples"  # the trackers' name for it
Completion = dict[str, Any]  # row, sample, completion, reward (None: not judged), parts {name: reward or None}, length


def due(update: int, total: int, every: int) -> bool:
    """After every `every`-th update (0: none) and after the last."""
    return update == total or (every > 0 and update % every == 0)


class EvalSet:
    """The held-out prompt rows, tokenized once, cut into batches of whole prompts (each `samples` times in a row);
    `mine`: the numbers of this process's batches."""

    def __init__(self, rows: list[dict], tokenizer, recipe: Recipe, completions_per_update: int, accelerator):
        tokenized = tokenize_rows(rows, tokenizer, recipe)
        warn_truncated(tokenized, recipe, accelerator.is_main_process, "eval: ")
        self.rows, self.ids, self.pad_id = rows, tokenized.pairs, tokenizer.pad_token_id
        self.samples = recipe.eval.num_samples
        self.batches = batches(len(rows), recipe.eval.batch_size or completions_per_update, self.samples)
        rank, world = accelerator.process_index, accelerator.num_processes
        self.mine = list(range(rank, len(self.batches), world))
        # FSDP gathers every block's weights in a collective at each forward: every process must run as many
        # batches (generate keeps the processes' decoding steps in step itself), so one with fewer runs a batch
        # more whose results are dropped
        self.rounds = -(-len(self.batches) // world) if accelerator.distributed_type.value == "FSDP" else 0


def batches(prompts: int, completions: int, samples: int) -> list[range]:
    """Prompt indices per batch: `completions // samples` prompts each (at least one), in order."""
    size = max(1, completions // samples)
    return [range(start, min(start + size, prompts)) for start in range(0, prompts, size)]


def complete(roles: Roles, tokenizer, evalset: EvalSet, cfg: GenerationConfig, seed: int, state: StepState,
             device: torch.device, progress: Callable[[int, int], None] | None = None,
             adapter: str | None = POLICY) -> list[Completion]:  # fmt: skip
    """This process's batches: generated (by `adapter`; None: the base) and scored. Run inside the prepared module's
    forward (FSDP)."""
    numbers = evalset.mine + [(evalset.mine or [0])[-1]] * max(0, evalset.rounds - len(evalset.mine))
    found: list[Completion] = []
    for done, number in enumerate(numbers, start=1):
        results = complete_batch(roles, tokenizer, evalset, number, cfg, seed, state, device, adapter)
        if done <= len(evalset.mine):  # not a repeat run only to keep FSDP's processes in step
            found += results
        if progress is not None:
            progress(done, len(numbers))
    return found


@torch.no_grad()
def complete_batch(roles: Roles, tokenizer, evalset: EvalSet, number: int, cfg: GenerationConfig, seed: int,
                   state: StepState, device: torch.device, adapter: str | None = POLICY,
                   ) -> list[Completion]:  # fmt: skip
    """Batch `number`: each prompt's completions (greedy, or sampled from seed + number), scored."""
    k = evalset.samples
    chosen = [i for i in evalset.batches[number] for _ in range(k)]
    prompt_ids, prompt_mask = (t.to(device) for t in pad([evalset.ids[i] for i in chosen], evalset.pad_id, "left"))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the run's streams untouched
        torch.manual_seed(seed + number)
        responses, _ = generate(roles, tokenizer, prompt_ids, prompt_mask, cfg, greedy=k == 1, hidden=False,
                                adapter=adapter)  # fmt: skip
    eos = ppo.response_mask(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    input_ids = torch.cat([prompt_ids, responses], dim=1)
    attention_mask = torch.cat([prompt_mask, eos.mask.long()], dim=1)
    rows = [evalset.rows[i] for i in chosen]
    total, judged, parts = score(roles, tokenizer, rows, responses, eos.mask, input_ids, attention_mask, state)
    texts = decode(tokenizer, responses.cpu(), eos.mask.cpu())
    totals, judged, lengths = readable(total), judged.tolist(), eos.mask.sum(1).tolist()
    parts = {name: readable(values) for name, values in parts.items()}
    return [{"row": row, "sample": n % k, "completion": texts[n], "reward": totals[n] if judged[n] else None,
             "parts": {name: None if math.isnan(values[n]) else values[n] for name, values in parts.items()},
             "length": lengths[n]} for n, row in enumerate(chosen)]  # fmt: skip


def readable(values: torch.Tensor) -> list[float]:
    """float32 rewards as the shortest decimals that read back as them: -0.2, not -0.20000000298023224."""
    return [float(str(value)) for value in values.float().cpu().numpy()]


def everywhere(accelerator, trained, run: Callable[[], list[Completion]]) -> list[Completion]:
    """`run` on every process inside the prepared module's forward, gathered in prompt order on every process. A
    reward function failing on any process stops all of them (RewardError naming it), as in training."""
    from accelerate.utils import gather_object

    failure, found = None, []
    try:
        with torch.no_grad():
            found = trained(within=run)
    except RewardError as err:
        failure = f"evaluation: {err}"
    reshard(trained)  # no backward follows
    failure = on_any_process(accelerator, failure)
    if failure:
        raise RewardError(failure)
    if accelerator.num_processes > 1:
        found = gather_object(found)
    return sorted(found, key=lambda c: (c["row"], c["sample"]))


def passes(completion: Completion, cfg: EvalConfig) -> bool:
    """The completion's reward (or pass_function's own) is a number >= pass_threshold."""
    value = completion["parts"].get(cfg.pass_function) if cfg.pass_function else completion["reward"]
    return value is not None and value >= cfg.pass_threshold


def summarise(completions: list[Completion], cfg: EvalConfig) -> dict[str, float]:
    """eval/reward (mean over the judged completions), eval/reward/<fn> (each function's own, over the rows it
    judged), eval/pass@1 (k > 1: the share of completions that pass), eval/pass@k (the share of prompts with a
    passing completion), eval/response_length (tokens); a reward no completion got is left out."""
    mean = lambda values: math.fsum(values) / len(values)  # noqa: E731 (same order, same sum, on any process count)
    metrics = {}
    rewards = [c["reward"] for c in completions if c["reward"] is not None]
    if rewards:
        metrics["eval/reward"] = mean(rewards)
    for name in completions[0]["parts"] if completions else []:
        judged = [c["parts"][name] for c in completions if c["parts"][name] is not None]
        if judged:
            metrics[f"eval/reward/{name}"] = mean(judged)
    passed = [passes(c, cfg) for c in completions]
    by_prompt: dict[int, bool] = {}
    for completion, ok in zip(completions, passed, strict=True):
        by_prompt[completion["row"]] = by_prompt.get(completion["row"], False) or ok
    if cfg.num_samples > 1:
        metrics["eval/pass@1"] = mean(passed)
    metrics[f"eval/pass@{cfg.num_samples}"] = mean(list(by_prompt.values()))
    metrics["eval/response_length"] = mean([c["length"] for c in completions])
    return metrics


def records(completions: list[Completion], rows: list[dict], cfg: EvalConfig, update: int) -> list[dict[str, Any]]:
    """eval_samples.jsonl's lines: update, prompt (as the data gives it), completion (decoded as the reward read it),
    reward (None: not judged), reward/<name> (each function's own, unweighted) and passed."""
    return [{"update": update, "prompt": rows[c["row"]]["prompt"], "completion": c["completion"],
             "reward": c["reward"], **{f"reward/{name}": value for name, value in c["parts"].items()},
             "passed": passes(c, cfg)} for c in completions]  # fmt: skip


def write(accelerator, out: Path, lines: list[dict[str, Any]]) -> None:
    """Append to eval_samples.jsonl, and send them to the trackers as a table named eval_samples (as samples.jsonl's
    lines go). Main process only."""
    with open(out / FILE, "a") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    if lines:
        samples.to_trackers(accelerator.trackers, lines, TABLE)


def summary_line(update: int, metrics: dict[str, float], prompts: int, samples: int) -> str:
    """`update 10: eval reward 0.625  pass@4 0.75  len 3.5  (8 prompts x 4, 1.23 s)`, above the progress bar."""
    shown = {"reward": metrics.get("eval/reward"), f"pass@{samples}": metrics[f"eval/pass@{samples}"],
             "len": metrics["eval/response_length"]}  # fmt: skip
    text = "  ".join(f"{name} {value:.3g}" for name, value in shown.items() if value is not None)
    times = f" x {samples}" if samples > 1 else ""
    return f"update {update}: eval {text}  ({prompts} prompts{times}, {metrics['time_eval']:.3g} s)"
