"""`lora-rl ppo` and `lora-rl grpo`: one RL loop with a LoRA policy on one shared frozen base.

run(recipe, command): check everything -> one base serving policy, reference, critic (ppo) and reward -> for
each update: (1) sample (grpo: a group of completions per prompt) (2) score (3)-(4) advantages (ppo: KL-shaped
rewards, GAE, whitening; grpo: group-relative estimators; lora_rl.objectives) (5) epochs over micro-batches
(6) KL controller / group statistics (7) log (8) checkpoint. Non-finite values undo the whole update.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora_rl import checkpoint, display, ppo, run_lock, samples, train_state
from lora_rl.data import Tokenized, pad, tokenize_prompts
from lora_rl.model import (
    Built,
    base_fingerprint,
    build,
    materialize_builtins,
)
from lora_rl.objectives import Advantages, objective_for
from lora_rl.recipe import Recipe
from lora_rl.rewards import (
    RewardError,
    StepState,
    reward_metrics,
)
from lora_rl.rl_setup import Schedule, chat_template_warnings, check_inputs, check_launch, schedule_of, setup_roles
from lora_rl.roles import (
    CRITIC,
    ActorCritic,
    Roles,
)
from lora_rl.rollout import Rollout, collect
from lora_rl.train_state import BadUpdate, Interrupt, Interrupted, on_any_process


@run_lock.releases_lock
def run(recipe: Recipe, overwrite: bool = False, resume: str | None = None, allow_changes: bool = False,
        command: str = "ppo", recipe_dir: Path | None = None) -> Path:  # fmt: skip
    """Run the `ppo` or `grpo` recipe; returns the final policy adapter directory.

    `resume` (or train.resume): "auto", a checkpoint or a run directory to continue from. `recipe_dir`: where the
    recipe file is, searched first for reward.function's module.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # 1. Everything that can be wrong with the input, before any model loads.
    recipe, rows, terms = check_inputs(recipe, recipe_dir, command)
    schedule = schedule_of(recipe, command)
    if finished := train_state.finished_run(recipe, resume):
        return finished
    resume_dir = train_state.find_resume(recipe, resume, allow_changes)
    materialize_builtins(recipe)
    accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision,  # accumulation is handled below
                              **train_state.tracker_options(recipe))  # fmt: skip
    check_launch(accelerator, recipe, schedule, len(rows))
    main = accelerator.is_main_process
    if main:
        display.print_warnings(chat_template_warnings(recipe))
    out = train_state.start_output(accelerator, recipe, overwrite, resume_dir, resume, unit="update")
    train_state.start_trackers(accelerator, recipe)

    # 2. One base, every role (the policy, value head and critic from the checkpoint when resuming).
    set_seed(recipe.seed)
    built = build(train_state.resumed_recipe(recipe, resume_dir), "causal-lm")
    if main:
        display.print_model_report(built.report)
    objective = objective_for(command, recipe)
    roles = setup_roles(built, recipe, terms, schedule, objective, resume_dir)
    actor_critic = ActorCritic(roles, recipe.generation.temperature)
    params = [p for p in actor_critic.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.train.learning_rate, weight_decay=recipe.train.weight_decay)
    trained, optimizer = accelerator.prepare(actor_critic, optimizer)
    roles.place(accelerator.device)
    batches = PromptBatches(rows, built.tokenizer, recipe, schedule, accelerator)
    generators = {"minibatch": torch.Generator().manual_seed(recipe.seed)}
    position = Position()
    # Each process samples its own completions: same weights (DDP broadcast rank 0's), its own sampling stream.
    torch.manual_seed(recipe.seed + accelerator.process_index)
    if resume_dir:
        saved, optimizer_saved = train_state.read_state(resume_dir, generators, accelerator.process_index)
        train_state.load_optimizer_state(accelerator, trained, optimizer, optimizer_saved)
        position = Position(**saved["position"])
        objective.load_state_dict(saved)
        if main:  # lines past the checkpoint are written again
            train_state.trim_metrics(out / "metrics.jsonl", "update", position.update)
            train_state.trim_metrics(out / samples.FILE, "update", position.update)

    def save(name: str, update: int) -> Path:
        state = {"position": position.__dict__, **objective.state_dict()}
        rng = train_state.rng_states_of_all_ranks()
        optimizer_state = train_state.optimizer_state(accelerator, trained, optimizer)

        def write_state(tmp: Path) -> None:
            train_state.write_state(tmp, optimizer_state, state, generators, rng)

        directory = save_policy(accelerator, trained, roles, built, recipe, out / name, update, write_state)
        if main:
            train_state.rotate(out, recipe.train.save_total_limit)
        return directory

    total = schedule.updates
    with display.Progress(total, command, enabled=main) as progress, Interrupt(accelerator).installed() as interrupt:
        progress.update(position.update, {})
        while position.update < total:
            position.update += 1
            update = position.update
            prompt_rows, prompt_ids, prompt_mask = batches.next(position)
            snapshot = UpdateSnapshot(trained, optimizer, objective.moments)  # a skipped update is undone whole
            try:
                # (1)-(2) sample with the policy; old log-probs, values, reference log-probs, scores; inside the
                # prepared module's forward, where FSDP gathers the shared base's blocks
                sample = partial(collect, actor_critic, roles, built.tokenizer, prompt_rows, prompt_ids, prompt_mask,
                                 recipe.generation, objective.needs_reference,
                                 StepState(update - 1, total))  # fmt: skip
                rollout, timings = sample_everywhere(accelerator, trained, sample, schedule, update)
                check_finite(accelerator, update, rollout)
                # (3)-(4) advantages: ppo's KL-shaped rewards + GAE, or grpo's group-relative estimators
                found = objective.advantages(accelerator, rollout)
                # (5) epochs over micro-batches, an optimizer step per accumulation group
                started = time.perf_counter()
                stats = optimise(accelerator, trained, optimizer, rollout, found, objective, recipe,
                                 schedule.epochs, generators["minibatch"], update)  # fmt: skip
            except BadUpdate as err:
                snapshot.restore()
                position.bad_in_a_row += 1
                train_state.skip_or_stop(str(err), position.bad_in_a_row, schedule.max_bad_updates, "update",
                                         f"{command}.max_bad_updates", main)  # fmt: skip
                continue
            position.bad_in_a_row = 0
            # (6) KL controller (ppo), group statistics (grpo); (7) log, and what the policy wrote
            record = {"update": update, **rollout_metrics(accelerator, rollout),
                      **objective.after_update(accelerator, rollout, found), **stats,
                      "time_generate": timings.generate, "time_score": timings.score,
                      "time_train": time.perf_counter() - started}  # fmt: skip
            if main:
                display.log_metrics(accelerator, out, record, "update")
                if samples.due(update, recipe.train.samples_every):
                    written = samples.pick(rollout, prompt_rows, built.tokenizer, recipe.train.num_samples, update)
                    samples.log(accelerator, out, written)
            shown = {k: record[k] for k in ("reward", "kl") if k in record}
            progress.update(update, {**shown, "len": record["response_length"]})
            # (8) checkpoint, never from a skipped update
            if update < total and interrupt.requested_anywhere():
                raise Interrupted(save(f"checkpoint-{update}", update), update)
            if recipe.train.save_every and update - position.last_saved >= recipe.train.save_every and update < total:
                position.last_saved = update
                save(f"checkpoint-{update}", update)
    final = save("final", total)
    accelerator.end_training()  # the trackers flush and close
    if main:
        display.console.print(f"saved {final}", highlight=False)
    return final


@dataclass
class Position:
    """Where a run is: updates done, the next prompt's (epoch, offset), and the guards' counters."""

    update: int = 0
    epoch: int = 0
    offset: int = 0
    last_saved: int = 0
    bad_in_a_row: int = 0


class PromptBatches:
    """Each update's prompts for this process: a seeded order per epoch (full batches only), dealt out to
    the processes in turn, so the data position is (epoch, offset) for every process count. Each prompt
    comes `generations` times in a row (grpo's group; 1 for ppo)."""

    def __init__(self, rows: list[dict], tokenizer, recipe: Recipe, schedule: Schedule, accelerator):
        prompts = [row["prompt"] for row in rows]
        templated = recipe.generation.chat_template or bool(prompts and isinstance(prompts[0], list))
        tokenized = tokenize_prompts(prompts, tokenizer, recipe.data.max_length, templated)
        if tokenized.truncated and accelerator.is_main_process:
            display.print_warnings([truncation_warning(tokenized, recipe.data.max_length, templated)])
        self.rows, self.ids, self.pad_id = rows, tokenized.pairs, tokenizer.pad_token_id
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
    those rows out)."""
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

    def __init__(self, model: torch.nn.Module, optimizer, moments: ppo.RunningMoments | None):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.state = getattr(optimizer, "optimizer", optimizer).state  # accelerate wraps the torch optimizer
        self.device = "cpu" if sum(p.numel() for p in self.params) > 100_000_000 else None  # e.g. full FT
        self.weights = [self._copy(p.detach()) for p in self.params]
        self.optimizer_state = {p: {k: self._copy(v) for k, v in self.state[p].items()} for p in self.params
                                if p in self.state}  # fmt: skip
        self.moments, self.moments_state = moments, moments.state_dict() if moments else None

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


def optimise(accelerator, model, optimizer, rollout: Rollout, found: Advantages, objective, recipe: Recipe,
             epochs: int, generator: torch.Generator, update: int) -> dict[str, float]:  # fmt: skip
    """`epochs` passes over the rollout in micro-batches; one optimizer step per accumulation group; the
    objective gives each micro-batch's loss.

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
                if not train_state.clip_gradients(accelerator, model, recipe.train.max_grad_norm):
                    if accelerator.scaler is None:
                        optimizer.zero_grad(set_to_none=True)
                        raise BadUpdate(f"update {update}: non-finite gradient norm")
                    overflows += 1  # step() lets the scaler skip it and update its scale (else unscale_ fails next)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    averages = {name: total / counts[name] for name, total in sums.items()}
    return averages if accelerator.scaler is None else {**averages, "overflow_steps": overflows}


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
                write_state) -> Path:  # fmt: skip
    """The policy adapter (plain peft layout, loadable and mergeable), its value head, the critic adapter
    (in critic/), tokenizer, recipe and what resuming needs."""
    state = accelerator.get_state_dict(trained)  # every process takes part: FSDP gathers the shards on rank 0
    if accelerator.is_main_process:
        extra = {"base_fingerprint": base_fingerprint(built.model.config)}
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
