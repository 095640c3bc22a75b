"""The parts of the one RL loop (lora_rl.commands.rl runs it): prompt batches and the data position, sampling
on every process, finiteness checks, the undo snapshot of an update, the optimisation epochs, metrics, saving.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora_rl import display
from lora_rl.data import Tokenized, pad
from lora_rl.models.build import (
    Built,
    base_fingerprint,
)
from lora_rl.recipe import Recipe
from lora_rl.rl import ppo
from lora_rl.rl.objectives import Advantages
from lora_rl.rl.rewards import (
    RewardError,
    check_judged,
    reward_metrics,
)
from lora_rl.rl.roles import (
    CRITIC,
    Roles,
)
from lora_rl.rl.rollout import Rollout
from lora_rl.rl.setup import Schedule
from lora_rl.training import checkpoint, guards
from lora_rl.training.distributed import on_any_process, reshard
from lora_rl.training.guards import BadUpdate


@dataclass
class Position:
    """Where a run is: updates done, the next prompt's (epoch, offset), and the guards' counters."""

    update: int = 0
    epoch: int = 0
    offset: int = 0
    last_saved: int = 0
    bad_in_a_row: int = 0
    updates_undone: int = 0  # by max_update_kl
    best: float | None = None  # train.save_best: the best value of the metric so far
    best_update: int = 0  # and the update it came from (best/)


class PromptBatches:
    """Each update's prompts for this process: a seeded order per epoch (full batches only), dealt out to
    the processes in turn, so the data position is (epoch, offset) for every process count. Each prompt
    comes `generations` times in a row (grpo's group; 1 for ppo)."""

    def __init__(self, rows: list[dict], prompts: Tokenized, pad_id: int, recipe: Recipe, schedule: Schedule,
                 accelerator):  # fmt: skip
        """`prompts`: the rows' token ids (setup.tokenize_rows, done once by check_inputs)."""
        warn_truncated(prompts, recipe, accelerator.is_main_process)
        self.rows, self.ids, self.pad_id = rows, prompts.pairs, pad_id
        self.size, self.repeat, self.seed = schedule.prompts, schedule.generations, recipe.seed
        self.rank, self.world, self.device = accelerator.process_index, accelerator.num_processes, accelerator.device

    def next(self, position: Position) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
        """(rows, (B, P) left-padded ids, mask) for this process, B = prompts x generations; advances `position`."""
        per_update = self.size * self.world
        if position.offset + per_update > len(self.rows):
            position.epoch, position.offset = position.epoch + 1, 0
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed + position.epoch))
        start = position.offset + self.rank * self.size
        chosen = [i for i in order[start : start + self.size].tolist() for _ in range(self.repeat)]
        position.offset += per_update
        ids, mask = pad([self.ids[i] for i in chosen], self.pad_id, "left")  # generation continues at the end
        return [self.rows[i] for i in chosen], ids.to(self.device), mask.to(self.device)


def warn_truncated(tokenized: Tokenized, recipe: Recipe, main: bool, what: str = "") -> None:
    """On the main process, the truncation warning when prompts exceed data.max_length (`what`: a prefix)."""
    if tokenized.truncated and main:
        templated = recipe.generation.chat_template
        display.print_warnings([what + truncation_warning(tokenized, recipe.data.max_length, templated)])


def truncation_warning(tokenized: Tokenized, max_length: int, templated: bool) -> str:
    """Prompts keep their last max_length tokens; in the chat template that cuts the template's start."""
    if not templated:
        return f"{tokenized.truncated} prompts exceed data.max_length: their last tokens are kept"
    return (f"{tokenized.truncated} prompts exceed data.max_length ({max_length}) in the chat template (the longest: "
            f"{tokenized.longest} tokens): their last tokens are kept, so the template's start (system prompt, role "
            f"header) is cut; raise data.max_length to {tokenized.longest}")  # fmt: skip


# ---------------------------------------------------------------- one update


def sample_everywhere(accelerator, trained, sample, schedule: Schedule, update: int) -> tuple[Rollout, object]:
    """Run the rollout inside the prepared module's forward; a reward function that fails on any process stops
    every process (RewardError naming it): one alone would leave the others waiting in a collective forever.
    ppo needs a score for every completion: a reward function returning None there is such a failure (grpo leaves
    those rows out, but not every row of the batch)."""
    failure = None
    try:
        with torch.no_grad():
            rollout, timings = trained(within=sample)
        if schedule.command == "ppo" and not rollout.judged.all():
            missing = int((~rollout.judged).sum())
            failure = (f"update {update}: the reward function returned None for {missing} of {len(rollout.judged)} "
                       "completions; ppo needs a score for every one")  # fmt: skip
    except RewardError as err:
        failure = str(err)
    failure = on_any_process(accelerator, failure)
    if failure:
        raise RewardError(failure)
    check_judged(accelerator.gather(rollout.judged), list(rollout.reward_parts), update)
    return rollout, timings


def check_finite(accelerator, update: int, rollout: Rollout) -> None:
    """Raise BadUpdate naming the first non-finite source of a rollout, on every process if on any."""
    mask = rollout.mask
    sources = {"reward": rollout.scores, "policy logits": rollout.logprobs[mask], "values": rollout.values[mask]}
    if rollout.ref_logprobs is not None:
        sources["reference logits"] = rollout.ref_logprobs[mask]
    counts = {name: (~torch.isfinite(values)).sum().item() for name, values in sources.items()}
    found = next((f"non-finite {name} ({n} of {sources[name].numel()})" for name, n in counts.items() if n), None)
    found = on_any_process(accelerator, found)
    if found:
        raise BadUpdate(f"update {update}: {found}")


class UpdateSnapshot:
    """What an update changes (trained weights, optimizer state, running reward statistics), copied before it,
    so that a skipped update leaves no trace. With LoRA a few MB on the device; above 100M trained parameters
    (full fine-tuning) a copy of the weights and their optimizer state in CPU memory."""

    def __init__(self, model: torch.nn.Module, optimizer, moments: ppo.RunningMoments | None, scheduler=None):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.state = getattr(optimizer, "optimizer", optimizer).state  # accelerate wraps the torch optimizer
        self.device = "cpu" if sum(p.numel() for p in self.params) > 100_000_000 else None  # e.g. full FT
        self.weights = [self._copy(p.detach()) for p in self.params]
        self.optimizer_state = {p: {k: self._copy(v) for k, v in self.state[p].items()} for p in self.params
                                if p in self.state}  # fmt: skip
        self.moments, self.moments_state = moments, moments.state_dict() if moments else None
        self.scheduler, self.scheduler_state = scheduler, copy.deepcopy(scheduler.state_dict()) if scheduler else None

    def _copy(self, value):
        return value.to(self.device or value.device, copy=True) if torch.is_tensor(value) else value

    @torch.no_grad()
    def restore(self) -> None:
        for param, weight in zip(self.params, self.weights, strict=True):
            param.copy_(weight)
            if param in self.optimizer_state:
                self.state[param] = {k: v.to(param.device) if torch.is_tensor(v) else v
                                     for k, v in self.optimizer_state[param].items()}  # fmt: skip
            else:
                self.state.pop(param, None)  # its first step came in the skipped update
        if self.moments is not None:
            self.moments.load_state_dict(self.moments_state)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(self.scheduler_state)
            for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
                group["lr"] = lr  # load_state_dict restores the schedule's position, not the rate it set


def optimise(accelerator, model, optimizer, rollout: Rollout, found: Advantages, objective, recipe: Recipe,
             epochs: int, generator: torch.Generator, update: int, scheduler=None) -> dict[str, float]:  # fmt: skip
    """`epochs` passes over the rollout in micro-batches; one optimizer step per accumulation group; the
    objective gives each micro-batch's loss; `scheduler` (the learning-rate schedule) steps with the optimizer.

    Every loss and gradient norm is checked before its step: a non-finite one raises BadUpdate with the
    step's gradients discarded (the caller undoes the steps already taken). With fp16 loss scaling an inf
    gradient norm is an overflow instead: the GradScaler skips that step and lowers its scale, as usual.
    """
    micro, accumulation = recipe.train.batch_size, recipe.train.gradient_accumulation_steps
    model.train()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    overflows = 0
    for epoch in range(epochs):
        order = torch.randperm(len(rollout.scores), generator=generator)
        for start in range(0, len(order), micro):
            index = order[start : start + micro]
            if start // micro % accumulation == 0:  # a group's first micro-batch: its token count, if needed
                group = order[start : start + micro * accumulation]
                normalizer = objective.normalizer(accelerator, rollout.mask[group], accumulation)
            boundary = (start // micro + 1) % accumulation == 0
            with accelerator.no_sync(model) if not boundary else nullcontext():
                # entropy, a statistic, once per completion: the first epoch covers every one (the profile of
                # a SmolLM2 update showed the vocabulary-wide softmax of later epochs as 4% of its time)
                out = model(rollout.input_ids[index], rollout.attention_mask[index], rollout.prompt_width,
                            entropy=epoch == 0)  # fmt: skip
                loss, stats = objective.loss(out, rollout, index, found, normalizer)
                bad = None
                if not torch.isfinite(loss):
                    bad = "non-finite loss (" + ", ".join(f"{k} {v.item():.4g}" for k, v in stats.items()) + ")"
                bad = on_any_process(accelerator, bad)  # before backward, a collective under FSDP
                if bad:
                    optimizer.zero_grad(set_to_none=True)
                    raise BadUpdate(f"update {update}: {bad}")
                accelerator.backward(loss / accumulation)
            if out.entropy is not None:
                stats["entropy"] = ppo.masked_mean(out.entropy, rollout.mask[index])
            for name, value in stats.items():
                sums[name] = sums.get(name, 0.0) + value.item()
                counts[name] = counts.get(name, 0) + 1
            if boundary:
                if not guards.clip_gradients(accelerator, model, recipe.train.max_grad_norm):
                    if accelerator.scaler is None:
                        optimizer.zero_grad(set_to_none=True)
                        raise BadUpdate(f"update {update}: non-finite gradient norm")
                    overflows += 1  # step() lets the scaler skip it and update its scale (else unscale_ fails next)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if scheduler is not None:
                    scheduler.step()
    averages = {name: total / counts[name] for name, total in sums.items()}
    return averages if accelerator.scaler is None else {**averages, "overflow_steps": overflows}


@torch.no_grad()
def update_kl(accelerator, model, rollout: Rollout, micro: int) -> float:
    """How far an update moved the policy on its own rollout: KL(sampling policy || updated policy) per response
    token, over every process. The k3 estimate E_old[r - 1 - log r], r = p_new / p_old, is the exact KL in
    expectation and never negative; it costs one more forward over the rollout."""
    total = torch.zeros((), device=rollout.logprobs.device)
    count = torch.zeros((), device=rollout.logprobs.device)
    for start in range(0, len(rollout.scores), micro):
        index = slice(start, start + micro)
        out = model(rollout.input_ids[index], rollout.attention_mask[index], rollout.prompt_width, entropy=False)
        log_ratio = out.logprobs - rollout.logprobs[index]
        mask = rollout.mask[index]
        total += ((torch.expm1(log_ratio) - log_ratio) * mask).sum()
        count += mask.sum()
    reshard(model)  # no backward follows (FSDP2)
    return (accelerator.reduce(total, "sum") / accelerator.reduce(count, "sum").clamp(min=1)).item()


def rollout_metrics(accelerator, rollout: Rollout) -> dict[str, float]:
    """The rollout's statistics over every process: reward (mean and std over the scored completions, and each
    reward function's own mean), response length, EOS fraction."""
    reduce = lambda t: accelerator.reduce(t.float().mean(), "mean").item()  # noqa: E731
    scores, judged = accelerator.gather(rollout.scores), accelerator.gather(rollout.judged)
    parts = {name: accelerator.gather(values) for name, values in rollout.reward_parts.items()}
    return {"reward": scores[judged].mean().item(), "reward_std": scores[judged].std().item(),
            **reward_metrics(parts), "response_length": reduce(rollout.mask.sum(1)),
            "eos_fraction": reduce(rollout.has_eos)}  # fmt: skip


def save_policy(accelerator, trained, roles: Roles, built: Built, recipe: Recipe, directory: Path, update: int,
                write_state, extra: dict | None = None) -> Path:  # fmt: skip
    """The policy adapter (plain peft layout, loadable and mergeable), its value head, the critic adapter
    (in critic/), tokenizer, recipe and what resuming needs (write_state); `extra`: more for the manifest."""
    state = accelerator.get_state_dict(trained)  # every process takes part: FSDP gathers the shards on rank 0
    if accelerator.is_main_process:
        extra = {"base_fingerprint": base_fingerprint(built.model.config), **(extra or {})}
        weights = checkpoint.submodule_state(state, "model.")

        def value_head(tmp: Path) -> None:
            head = checkpoint.submodule_state(state, "value_head.")
            if head:  # ppo's critic; grpo has none
                save_file({k: v.detach().contiguous().cpu() for k, v in head.items()}, tmp / "value_head.safetensors")
            if roles.critic_adapter:  # peft puts a non-default adapter in a sub-folder of its name
                roles.model.save_pretrained(tmp, selected_adapters=[CRITIC], save_embedding_layers=False,
                                            state_dict=weights)  # fmt: skip
            write_state(tmp)

        save = checkpoint.save_adapter if recipe.actor.model.is_lora else checkpoint.save_full_model
        save(roles.model, directory, step=update, tokenizer=built.tokenizer, recipe=recipe, extra=extra,
             also=value_head, state_dict=weights)  # fmt: skip
    accelerator.wait_for_everyone()
    return directory
