"""`lora-rl ppo` and `lora-rl grpo`: one RL loop with a LoRA policy on one shared frozen base.

run(recipe, command): check everything -> one base serving policy, reference, critic (ppo) and reward -> for
each update: (1) sample (grpo: a group of completions per prompt) (2) score (3)-(4) advantages (ppo: KL-shaped
rewards, GAE, whitening; grpo: group-relative estimators; lora_rl.rl.objectives) (5) epochs over micro-batches
(6) KL controller / group statistics (7) evaluation on held-out prompts when due, log (8) checkpoint. Non-finite
values undo the whole update.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from lora_rl import display
from lora_rl.models.build import Built, build, materialize_builtins
from lora_rl.recipe import Recipe
from lora_rl.rl import evaluation, samples
from lora_rl.rl.health import RunHealth
from lora_rl.rl.loop import (
    Position,
    PromptBatches,
    UpdateSnapshot,
    check_finite,
    optimise,
    rollout_metrics,
    sample_everywhere,
    save_policy,
    update_kl,
)
from lora_rl.rl.objectives import objective_for
from lora_rl.rl.rewards import StepState
from lora_rl.rl.roles import ActorCritic, Roles
from lora_rl.rl.rollout import collect
from lora_rl.rl.setup import (
    Inputs,
    Schedule,
    chat_template_warnings,
    check_inputs,
    check_launch,
    schedule_of,
    setup_roles,
)
from lora_rl.training import checkpoint, distributed, guards, trackers
from lora_rl.training import lock as run_lock
from lora_rl.training import resume as resuming
from lora_rl.training import state as run_state
from lora_rl.training.guards import BadUpdate
from lora_rl.training.interrupt import Interrupt, Interrupted
from lora_rl.training.optimizer import make_optimizer, make_scheduler

BEST = "best"  # train.save_best's directory


@run_lock.releases_lock
def run(recipe: Recipe, overwrite: bool = False, resume: str | None = None, allow_changes: bool = False,
        command: str = "ppo", recipe_dir: Path | None = None) -> Path:  # fmt: skip
    """Run the `ppo` or `grpo` recipe; returns the final policy adapter directory.

    `resume` (or train.resume): "auto", a checkpoint or a run directory to continue from. `recipe_dir`: where the
    recipe file is, searched first for reward.function's module.
    """
    # 1. Everything that can be wrong with the input, before any model loads.
    inputs = check_inputs(recipe, recipe_dir, command)
    recipe, schedule = inputs.recipe, schedule_of(inputs.recipe, command)
    if finished := resuming.finished_run(recipe, resume):
        return finished
    resume_dir = resuming.find_resume(recipe, resume, allow_changes)
    # 2. One base, every role (the policy, value head and critic from the checkpoint when resuming).
    trainer = setup(inputs, schedule, overwrite, resume, resume_dir)
    # 3. The updates, then the final adapter.
    trainer.train()
    final = trainer.save("final", schedule.updates)
    trainer.accelerator.end_training()  # the trackers flush and close
    distributed.keep_until_exit(trainer)
    if trainer.main:
        display.console.print(f"saved {final}", highlight=False)
        position = trainer.position
        if recipe.train.save_best and position.best is not None:
            line = f"best {recipe.train.save_best}: {position.best:.4g} at update {position.best_update}"
            display.console.print(f"{line} ({trainer.out / BEST})", highlight=False)
    return final


def setup(inputs: Inputs, schedule: Schedule, overwrite: bool, resume: str | None, resume_dir: Path | None) -> Trainer:
    """The accelerator, the output directory, the model serving every role, the optimizer, the prompt batches and
    the held-out prompts (from check_inputs' `inputs`); restored from `resume_dir` when resuming."""
    recipe, rows, eval_rows, terms = inputs.recipe, inputs.rows, inputs.eval_rows, inputs.terms
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    materialize_builtins(recipe)
    accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision,  # accumulation is handled below
                              **trackers.tracker_options(recipe))  # fmt: skip
    check_launch(accelerator, recipe, schedule, len(rows))
    if accelerator.is_main_process:
        display.print_warnings(chat_template_warnings(recipe))
    out = resuming.start_output(accelerator, recipe, overwrite, resume_dir, resume, unit="update")
    trackers.start_trackers(accelerator, recipe)

    set_seed(recipe.seed)
    built = build(resuming.resumed_recipe(recipe, resume_dir), "causal-lm")
    if accelerator.is_main_process:
        display.print_model_report(built.report)
    objective = objective_for(schedule.command, recipe)
    roles = setup_roles(built, recipe, terms, schedule, objective, resume_dir)
    actor_critic = ActorCritic(roles, recipe.generation.temperature)
    params = [p for p in actor_critic.parameters() if p.requires_grad]
    trained, optimizer = accelerator.prepare(actor_critic, make_optimizer(params, recipe.train))
    scheduler = make_scheduler(optimizer, recipe.train, schedule.optimizer_steps(recipe.train))
    roles.place(accelerator.device)
    batches = PromptBatches(rows, inputs.prompts, built.tokenizer.pad_token_id, recipe, schedule, accelerator)
    trainer = Trainer(accelerator, recipe, schedule, out, built, roles, actor_critic, trained, optimizer, scheduler,
                      objective, batches)  # fmt: skip
    if eval_rows:
        trainer.evalset = evaluation.EvalSet(eval_rows, built.tokenizer, recipe, schedule.completions, accelerator)
    # Each process samples its own completions: same weights (DDP broadcast rank 0's), its own sampling stream.
    torch.manual_seed(recipe.seed + accelerator.process_index)
    if resume_dir:
        trainer.restore(resume_dir)
    return trainer


@dataclass
class Trainer:
    """The parts of one ppo or grpo run, and its loop: `train` runs the updates, `save` writes a checkpoint."""

    accelerator: object
    recipe: Recipe
    schedule: Schedule
    out: Path
    built: Built
    roles: Roles
    actor_critic: ActorCritic
    trained: torch.nn.Module  # actor_critic as accelerate prepared it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped with the optimizer
    objective: object  # PPOObjective | GRPOObjective
    batches: PromptBatches
    position: Position = None
    evalset: evaluation.EvalSet | None = None  # the held-out prompts, when the recipe has some

    def __post_init__(self) -> None:
        self.generators = {"minibatch": torch.Generator().manual_seed(self.recipe.seed)}
        self.position = self.position or Position()
        self.main = self.accelerator.is_main_process
        self.health = RunHealth(self.schedule.command)
        self.progress: display.Progress | None = None  # while train() runs

    def restore(self, resume_dir: Path) -> None:
        """Optimizer, RNG, data position and the objective's statistics from a checkpoint."""
        saved, optimizer_saved = run_state.read_state(resume_dir, self.generators, self.accelerator.process_index)
        run_state.load_optimizer_state(self.accelerator, self.trained, self.optimizer, optimizer_saved)
        self.position = Position(**saved["position"])
        self.objective.load_state_dict(saved)
        if "scheduler" in saved:
            self.scheduler.load_state_dict(saved["scheduler"])
        else:  # a checkpoint from before ppo and grpo honoured the schedule: continue it where the run is
            steps_per_update = self.schedule.optimizer_steps(self.recipe.train) // self.schedule.updates
            with warnings.catch_warnings():  # torch warns of a schedule stepped without an optimizer step
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(self.position.update * steps_per_update):
                    self.scheduler.step()
        if self.main:  # lines past the checkpoint are written again
            resuming.trim_metrics(self.out / "metrics.jsonl", "update", self.position.update)
            resuming.trim_metrics(self.out / samples.FILE, "update", self.position.update)
            resuming.trim_metrics(self.out / evaluation.FILE, "update", self.position.update)
            display.print_warnings(self.later_best())

    def later_best(self) -> list[str]:
        """best/ saved past the checkpoint being resumed (by the run that stopped) stays until this run's evaluations
        beat the best before the checkpoint: a warning says so."""
        directory = self.out / BEST
        manifest = checkpoint.read_manifest(directory) if checkpoint.has_own_manifest(directory) else None
        best = (manifest or {}).get("best") or {}
        position = self.position
        if best.get("update", 0) <= position.update:
            return []
        before = (f"{position.best:.4g} (update {position.best_update})" if position.best is not None else
                  "nothing yet")  # fmt: skip
        past = f"the policy of update {best['update']}, past the checkpoint resumed (update {position.update})"
        return [f"{directory} is {past}: it stays until an evaluation beats the best before the checkpoint, {before}"]

    def save(self, name: str, update: int) -> Path:
        """checkpoint-N/ or final/: the policy and what resuming needs; old checkpoints rotated out."""
        state = {"position": self.position.__dict__, "scheduler": self.scheduler.state_dict(),
                 **self.objective.state_dict()}
        rng = run_state.rng_states_of_all_ranks()
        optimizer_state = run_state.optimizer_state(self.accelerator, self.trained, self.optimizer)

        def write_state(tmp: Path) -> None:
            run_state.write_state(tmp, optimizer_state, state, self.generators, rng)

        directory = save_policy(self.accelerator, self.trained, self.roles, self.built, self.recipe, self.out / name,
                                update, write_state, extra={"command": self.schedule.command})  # fmt: skip
        if self.main:
            resuming.rotate(self.out, self.recipe.train.save_total_limit)
        return directory

    def train(self) -> None:
        """Every update left; Ctrl-C saves at the next update boundary (Interrupted)."""
        total, position = self.schedule.updates, self.position
        with display.Progress(total, self.schedule.command, enabled=self.main) as progress, \
                Interrupt(self.accelerator).installed() as interrupt:  # fmt: skip
            self.progress = progress
            progress.update(position.update, {})
            while position.update < total:
                position.update += 1
                update = position.update
                record = self.update(update)
                if record is None:
                    continue
                shown = {k: record[k] for k in ("reward", "kl") if k in record}
                progress.update(update, {**shown, "len": record["response_length"]})
                # (8) checkpoint, never from a skipped update
                if update < total and interrupt.requested_anywhere():
                    raise Interrupted(self.save(f"checkpoint-{update}", update), update)
                every = self.recipe.train.save_every
                if every and update - position.last_saved >= every and update < total:
                    position.last_saved = update
                    self.save(f"checkpoint-{update}", update)

    def undo_if_too_far(self, update: int, rollout, snapshot: UpdateSnapshot, stats: dict) -> bool:
        """With max_update_kl: measure how far the update moved the policy (stats["update_kl"]) and undo it whole
        when too far; the rollout's metrics are still logged, with update_undone."""
        limit = self.schedule.max_update_kl
        if limit is None:
            return False
        stats["update_kl"] = update_kl(self.accelerator, self.trained, rollout, self.recipe.train.batch_size)
        if stats["update_kl"] <= limit:
            return False
        snapshot.restore()
        self.position.updates_undone += 1
        stats["update_undone"] = 1
        if self.main:
            display.print_warnings([f"update {update}: KL(sampling policy || updated policy) {stats['update_kl']:.3g} "
                                    f"> {self.schedule.command}.max_update_kl {limit}; update undone "
                                    f"({self.position.updates_undone} so far)"])  # fmt: skip
        return True

    def eval_due(self, update: int) -> bool:
        return self.evalset is not None and evaluation.due(update, self.schedule.updates, self.recipe.train.eval_every)

    def evaluate(self, update: int) -> dict[str, float]:
        """Every held-out prompt completed by the policy (sharded over the processes) and scored as in training ->
        the eval/ metrics and time_eval (every process); eval_samples.jsonl and a line above the progress bar."""
        started, evalset = time.perf_counter(), self.evalset
        shown = None
        if self.main and self.progress is not None:
            shown = lambda done, total: self.progress.status(f"eval {done}/{total} batches")  # noqa: E731
        state = StepState(update, self.schedule.updates)  # trainer_state: the updates done
        run = partial(evaluation.complete, self.roles, self.built.tokenizer, evalset, self.recipe.generation,
                      self.recipe.seed, state, self.accelerator.device, shown)  # fmt: skip
        completions = evaluation.everywhere(self.accelerator, self.trained, run)
        found = {**evaluation.summarise(completions, self.recipe.eval), "time_eval": time.perf_counter() - started}
        if self.main:
            written = evaluation.records(completions, evalset.rows, self.recipe.eval, update)
            evaluation.write(self.accelerator, self.out, written)
            line = evaluation.summary_line(update, found, len(evalset.rows), evalset.samples)
            (self.progress.note if self.progress else display.console.print)(line)
        return found

    def keep_best(self, update: int, found: dict[str, float]) -> None:
        """train.save_best: best/ holds the policy of the evaluation with the metric's highest value (the first of
        equal ones); its manifest says which update and value. Every process decides alike (the metrics are over
        every process's completions)."""
        name, position = self.recipe.train.save_best, self.position
        value = found.get(name) if name else None
        if value is None or (position.best is not None and value <= position.best):
            return
        position.best, position.best_update = value, update
        best = {"metric": name, "value": value, "update": update}
        save_policy(self.accelerator, self.trained, self.roles, self.built, self.recipe, self.out / BEST, update,
                    lambda tmp: None, extra={"best": best, "command": self.schedule.command})  # fmt: skip
        if self.main:
            line = f"update {update}: best {name} so far ({value:.4g}); saved {self.out / BEST}"
            (self.progress.note if self.progress else display.console.print)(line)

    def update(self, update: int) -> dict | None:
        """One update, (1)-(7); its metrics record, or None when a non-finite value undid it."""
        recipe, objective, accelerator = self.recipe, self.objective, self.accelerator
        prompt_rows, prompt_ids, prompt_mask = self.batches.next(self.position)
        # a skipped update is undone whole: weights, optimizer, schedule, running statistics
        snapshot = UpdateSnapshot(self.trained, self.optimizer, objective.moments, self.scheduler)
        try:
            # (1)-(2) sample with the policy; old log-probs, values, reference log-probs, scores; inside the
            # prepared module's forward, where FSDP gathers the shared base's blocks
            sample = partial(collect, self.actor_critic, self.roles, self.built.tokenizer, prompt_rows, prompt_ids,
                             prompt_mask, recipe.generation, objective.needs_reference,
                             StepState(update - 1, self.schedule.updates))  # fmt: skip
            rollout, timings = sample_everywhere(accelerator, self.trained, sample, self.schedule, update)
            check_finite(accelerator, update, rollout)
            # (3)-(4) advantages: ppo's KL-shaped rewards + GAE, or grpo's group-relative estimators
            found = objective.advantages(accelerator, rollout)
            # (5) epochs over micro-batches, an optimizer step per accumulation group
            started = time.perf_counter()
            stats = optimise(accelerator, self.trained, self.optimizer, rollout, found, objective, recipe,
                             self.schedule.epochs, self.generators["minibatch"], update, self.scheduler)  # fmt: skip
        except BadUpdate as err:
            snapshot.restore()
            self.position.bad_in_a_row += 1
            guards.skip_or_stop(str(err), self.position.bad_in_a_row, self.schedule.max_bad_updates, "update",
                                f"{self.schedule.command}.max_bad_updates", self.main)  # fmt: skip
            if self.eval_due(update):  # evaluated all the same (the policy of the update before): a line of its own
                found = self.evaluate(update)
                if self.main:
                    display.log_metrics(accelerator, self.out, {"update": update, **found}, "update")
                self.keep_best(update, found)
            return None
        self.position.bad_in_a_row = 0
        undone = self.undo_if_too_far(update, rollout, snapshot, stats)
        # (6) KL controller (ppo), group statistics (grpo), not for an undone update; (7) log, what the policy wrote
        after = {} if undone else objective.after_update(accelerator, rollout, found)
        record = {"update": update, **rollout_metrics(accelerator, rollout), **after, **stats,
                  "lr": self.scheduler.get_last_lr()[0], "time_generate": timings.generate,
                  "time_score": timings.score, "time_train": time.perf_counter() - started}  # fmt: skip
        if self.eval_due(update):  # (7) the held-out prompts, on the updated policy; best/ when it is the best yet
            record |= self.evaluate(update)
            self.keep_best(update, record)
        if self.main:
            display.log_metrics(accelerator, self.out, record, "update")
            display.print_warnings(self.health.check(record))
            if samples.due(update, recipe.train.samples_every):
                written = samples.pick(rollout, prompt_rows, self.built.tokenizer, recipe.train.num_samples, update)
                samples.log(accelerator, self.out, written)
        return record
