"""`lora-rl train-reward`: a pairwise (Bradley-Terry) reward model, LoRA or full fine-tuning.

run(recipe): check data -> build model -> Bradley-Terry loop (accumulation, clipping, warmup/decay,
periodic eval and checkpoints) -> save the final adapter. Reads top to bottom; helpers below.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader

from lora_rl import display
from lora_rl.data import (
    DataError,
    EpochSampler,
    Pair,
    PairCollator,
    Tokenized,
    load_pairs,
    rows_named,
    rows_of,
    split_rows,
    tokenize_pairs,
)
from lora_rl.models.build import (
    Built,
    base_fingerprint,
    build,
    check_model_files,
    four_bit_problems,
    load_tokenizer,
    materialize_builtins,
    resolve_path,
)
from lora_rl.models.context import refuse_overlong
from lora_rl.models.reward_model import PACKABLE_ATTENTION, RewardModel, bradley_terry, transformers_model
from lora_rl.recipe import Recipe, RecipeError, held_out_problems, unread_settings
from lora_rl.training import checkpoint, distributed, guards, trackers
from lora_rl.training import lock as run_lock
from lora_rl.training import resume as resuming
from lora_rl.training import state as run_state
from lora_rl.training.interrupt import Interrupt, Interrupted
from lora_rl.training.optimizer import make_optimizer, make_scheduler


@run_lock.releases_lock
def run(recipe: Recipe, overwrite: bool = False, resume: str | None = None, allow_changes: bool = False) -> Path:
    """Train the reward model the recipe describes; returns the final checkpoint directory.

    `resume` (or train.resume): "auto", a checkpoint or a run directory to continue from.
    """
    # 1. Everything that can be wrong with the input is found before any model loads.
    inputs = check_inputs(recipe)
    if finished := resuming.finished_run(recipe, resume):
        return finished
    resume_dir = resuming.find_resume(recipe, resume, allow_changes)
    # 2. Model (from the checkpoint when resuming), data, optimizer.
    trainer = setup(recipe, inputs, overwrite, resume, resume_dir)
    # 3. Train: one optimizer step per `gradient_accumulation_steps` micro-batches.
    trainer.train()
    # 4. Final evaluation and adapter.
    trainer.evaluate()
    final = trainer.save("final", trainer.position.step)
    trainer.accelerator.end_training()  # the trackers flush and close
    distributed.keep_until_exit(trainer)
    if trainer.main:
        display.console.print(f"saved {final} ({time.perf_counter() - trainer.started:.0f}s)", highlight=False)
    return final


def setup(recipe: Recipe, inputs: Inputs, overwrite: bool, resume: str | None, resume_dir: Path | None) -> Trainer:
    """The accelerator and output directory, the reward model, the data loaders, optimizer and schedule;
    restored from `resume_dir` when resuming."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    materialize_builtins(recipe)
    accelerator = Accelerator(
        gradient_accumulation_steps=recipe.train.gradient_accumulation_steps,
        mixed_precision=recipe.train.mixed_precision,
        **trackers.tracker_options(recipe),
    )
    if problems := distributed.launch_problems(accelerator):
        raise RecipeError(problems)
    main = accelerator.is_main_process
    out = resuming.start_output(accelerator, recipe, overwrite, resume_dir, resume)
    trackers.start_trackers(accelerator, recipe)

    set_seed(recipe.seed)
    built = build(resuming.resumed_recipe(recipe, resume_dir), "reward")
    if main:
        display.print_model_report(built.report)
        display.print_warnings(inputs.warnings)
    collate = PairCollator(built.tokenizer.pad_token_id, built.tokenizer.padding_side, packs(built, recipe, main))
    sampler = EpochSampler(len(inputs.train), recipe.seed)
    # Own generators: a DataLoader iterator otherwise draws its seed from the global RNG, which dropout uses,
    # and a resumed run (one more iterator) would no longer match the uninterrupted one.
    train_loader = DataLoader(inputs.train, recipe.train.batch_size, sampler=sampler, collate_fn=collate,
                              generator=torch.Generator())  # fmt: skip
    eval_loader = (
        DataLoader(inputs.eval, recipe.train.batch_size, collate_fn=collate, generator=torch.Generator())
        if inputs.eval
        else None
    )
    model = RewardModel(built.model, built.report.head_module)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, recipe.train)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    steps_per_epoch = math.ceil(len(train_loader) / recipe.train.gradient_accumulation_steps)
    total_steps = recipe.train.max_steps or recipe.train.num_epochs * steps_per_epoch
    scheduler = make_scheduler(optimizer, recipe.train, total_steps)
    trainer = Trainer(accelerator, recipe, out, built, model, optimizer, scheduler, sampler, train_loader,
                      eval_loader, len(inputs.train), total_steps)  # fmt: skip
    if resume_dir:
        trainer.restore(resume_dir)
    return trainer


@dataclass
class Trainer:
    """The parts of one train-reward run, and its loop: `train` runs the steps, `save` writes a checkpoint."""

    accelerator: object
    recipe: Recipe
    out: Path
    built: Built
    model: torch.nn.Module  # the RewardModel as accelerate prepared it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: EpochSampler
    train_loader: DataLoader
    eval_loader: DataLoader | None
    train_pairs: int
    total_steps: int

    def __post_init__(self) -> None:
        self.main = self.accelerator.is_main_process
        self.position = Position()
        self.window = Window()
        self.pending: list = []  # this step's micro-batch results: into the window once the step proves finite
        self.started = time.perf_counter()

    def restore(self, resume_dir: Path) -> None:
        """Optimizer, schedule, RNG and data position from a checkpoint."""
        saved, optimizer_saved = run_state.read_state(resume_dir, {}, self.accelerator.process_index)
        run_state.load_optimizer_state(self.accelerator, self.model, self.optimizer, optimizer_saved)
        self.scheduler.load_state_dict(saved["scheduler"])
        self.position = Position(**saved["position"])
        if self.main:
            resuming.trim_metrics(self.out / "metrics.jsonl", "step", self.position.step)

    def save(self, name: str, step: int) -> Path:
        """checkpoint-N/ or final/: the adapter (or model) and what resuming needs; old checkpoints rotated out."""
        rng = run_state.rng_states_of_all_ranks()
        optimizer_state = run_state.optimizer_state(self.accelerator, self.model, self.optimizer)

        def state(tmp: Path) -> None:
            saved = {"position": self.position.__dict__, "scheduler": self.scheduler.state_dict()}
            run_state.write_state(tmp, optimizer_state, saved, {}, rng)

        directory = save_checkpoint(self.accelerator, self.model, self.built, self.recipe, self.out / name, step,
                                    also=state)  # fmt: skip
        if self.main:
            resuming.rotate(self.out, self.recipe.train.save_total_limit)
        return directory

    def evaluate(self, progress: display.Progress | None = None) -> None:
        log(self.accelerator, self.out, evaluate(self.model, self.eval_loader, self.accelerator, self.position.step),
            self.main, progress)  # fmt: skip

    def train(self) -> None:
        """Every step left; Ctrl-C, SIGTERM or SIGUSR1 saves at the next step boundary (Interrupted)."""
        position, per_micro_batch = self.position, self.recipe.train.batch_size * self.accelerator.num_processes
        self.window.load(position.window)
        with (
            display.Progress(self.total_steps, "train", enabled=self.main) as progress,
            Interrupt(self.accelerator).installed() as interrupt,
        ):
            progress.update(position.step, {})
            while position.step < self.total_steps:
                self.sampler.set_position(position.epoch, position.offset)
                for batch in self.train_loader:
                    bad = self.micro_batch(batch)
                    position.offset += per_micro_batch
                    if not self.accelerator.sync_gradients:
                        continue
                    if self.step_done(bad, progress, interrupt):
                        break
                else:  # accelerate steps at the end of the loader, so an epoch normally ends on a step boundary
                    if position.offset:
                        position.epoch, position.offset = position.epoch + 1, 0

    def micro_batch(self, batch) -> str | None:
        """Forward and backward of one micro-batch; at an accumulation group's end, the optimizer step unless a
        non-finite loss or gradient norm makes it bad (the problem, in words)."""
        accelerator, model, optimizer = self.accelerator, self.model, self.optimizer
        model.train()
        with accelerator.accumulate(model):
            rewards = model(*batch.model_inputs())
            chosen, rejected = rewards.chunk(2)
            out = bradley_terry(chosen, rejected, batch.margin, self.recipe.train.center_rewards_coefficient)
            accelerator.backward(out.loss)
            self.pending.append((out, len(chosen)))
            bad = step_problem(accelerator, model, self.recipe, self.pending) if accelerator.sync_gradients else None
            if bad is None or accelerator.scaler is not None:  # a GradScaler skips non-finite steps itself
                optimizer.step()  # accelerate steps only at the end of an accumulation group
            optimizer.zero_grad(set_to_none=True)
        return bad

    def step_done(self, bad: str | None, progress: display.Progress, interrupt) -> bool:
        """After an optimizer step: guards, metrics, evaluation, the epoch's end, checkpoints. Whether the run's
        last step is done."""
        position, train = self.position, self.recipe.train
        position.step += 1
        self.scheduler.step()
        if bad:  # the weights did not change: the step counts, its metrics do not
            position.bad_in_a_row += 1
            guards.skip_or_stop(f"step {position.step}: {bad}", position.bad_in_a_row, train.max_bad_steps, "step",
                                "train.max_bad_steps", self.main)  # fmt: skip
        else:
            position.bad_in_a_row = 0
            for result, pairs in self.pending:
                self.window.add(result, pairs)
        self.pending.clear()
        step = position.step
        if (step % train.log_every == 0 or step == self.total_steps) and self.window.pairs:
            record = self.window.flush(self.accelerator, step, self.scheduler.get_last_lr()[0], time.perf_counter())
            log(self.accelerator, self.out, record, self.main)
            metrics = {"loss": record["loss"], "acc": record["accuracy"], "pairs/s": record["pairs_per_s"]}
            progress.update(step, metrics)
        mid_run = not bad and step < self.total_steps  # a skipped step is neither evaluated nor saved
        if mid_run and train.eval_every and step % train.eval_every == 0:
            self.evaluate(progress)
        if position.offset >= self.train_pairs:  # the epoch is over: the next step starts a new one
            position.epoch, position.offset = position.epoch + 1, 0
        position.window = self.window.state()
        if mid_run and interrupt.requested_anywhere():
            raise Interrupted(self.save(f"checkpoint-{step}", step), step)
        if mid_run and train.save_every and step % train.save_every == 0:
            self.save(f"checkpoint-{step}", step)
        return step >= self.total_steps


@dataclass
class Position:
    """Where a run is: optimizer steps done, the next example's (epoch, offset) in the data order, the guard's count."""

    step: int = 0
    epoch: int = 0
    offset: int = 0
    window: dict = field(default_factory=dict)  # metric sums since the last log line
    bad_in_a_row: int = 0  # non-finite steps skipped since the last good one


def step_problem(accelerator, model, recipe: Recipe, results: list) -> str | None:
    """Clip the step's gradients; what is not finite in its losses or gradient norm (None: nothing), the same on
    every process (one skipping a step the others take would leave their weights apart). With fp16 loss scaling
    an inf gradient norm is an overflow, not a problem: the GradScaler skips that step and lowers its scale (as
    ppo's optimise does; several overflows in a row are usual while the scale settles)."""
    found = None
    if not torch.isfinite(torch.stack([result.loss.detach() for result, _ in results])).all():
        found = "non-finite loss"
    finite = guards.clip_gradients(accelerator, model, recipe.train.max_grad_norm)
    if not finite and accelerator.scaler is None:
        found = found or "non-finite gradient norm"
    return distributed.on_any_process(accelerator, found)


class Inputs(NamedTuple):
    """The pairs as the model will read them, found good before it loads, and what to warn about."""

    train: list[Pair]
    eval: list[Pair]
    warnings: list[str]


def check_inputs(recipe: Recipe) -> Inputs:
    """Every check train-reward makes before it loads a model, also run by `validate --for train-reward`: mixed
    precision, the model and adapter files, the preference pairs, tokenized (the tokenizer is cheap to load) and
    checked against the model's context window; pairs that read the same for chosen and rejected are counted."""
    evaluating = ["train.eval_every"] if recipe.train.eval_every else []
    problems = unread_settings(recipe, "train-reward") + held_out_problems(recipe.data, evaluating, "pairs")
    if problems := problems + four_bit_problems(recipe.actor.model):
        raise RecipeError(problems)
    guards.check_mixed_precision(recipe.train.mixed_precision)
    trackers.check_trackers(recipe)
    check_model_files(recipe)
    cfg = recipe.actor.model
    tokenizer = load_tokenizer(resolve_path(cfg), cfg)
    train_split, eval_split = load_split(recipe)
    train, held_out = tokenize(train_split, tokenizer, recipe), tokenize(eval_split, tokenizer, recipe)
    if not train.pairs:
        raise DataError(["data.train_path: no pairs left to train on after dropping long pairs"])
    check_context(recipe, [(train_split, train), (eval_split, held_out)])
    warnings = [
        truncation_warning("train", train, recipe),
        truncation_warning("eval", held_out, recipe),
        identical_pairs(train_split, train, recipe, refuse_all=True),
        identical_pairs(eval_split, held_out, recipe),
    ]
    return Inputs(train.pairs, held_out.pairs, [line for line in warnings if line])


class Split(NamedTuple):
    """Rows of preference pairs and where they come from: the file, and each row's number in it."""

    path: str
    rows: list[dict]
    numbers: list[int]


def load_split(recipe: Recipe) -> tuple[Split, Split]:
    """(train, eval): eval_path when given, else a seeded eval_fraction of train_path."""
    data = recipe.data
    if data.train_path is None:
        raise RecipeError(["data.train_path: got null; expected a file of preference pairs (chosen, rejected)"])
    numbered = list(enumerate(load_pairs(data.train_path), start=1))
    if data.eval_path:
        held_out = list(enumerate(load_pairs(data.eval_path), start=1))
        return _split(data.train_path, numbered), _split(data.eval_path, held_out)
    train, held_out = split_rows(numbered, data.eval_fraction, recipe.seed)
    return _split(data.train_path, train), _split(data.train_path, held_out)


def _split(path: str, numbered: list[tuple[int, dict]]) -> Split:
    return Split(path, [row for _, row in numbered], [number for number, _ in numbered])


def tokenize(split: Split, tokenizer, recipe: Recipe) -> Tokenized:
    data = recipe.data
    with rows_of(split.path):
        return tokenize_pairs(split.rows, tokenizer, data.max_length, data.drop_long, data.chat_template,
                              split.numbers)  # fmt: skip


def truncation_warning(name: str, found: Tokenized, recipe: Recipe) -> str | None:
    if not found.truncated:
        return None
    action = "dropped" if recipe.data.drop_long else "truncated"
    total = len(found.pairs) + found.dropped
    return f"{name}: {found.truncated} of {total} pairs exceed max_length {recipe.data.max_length}: {action}"


def check_context(recipe: Recipe, splits: list[tuple[Split, Tokenized]]) -> None:
    """The longest pair the model reads (cut to data.max_length) against its context window. A packed row holds
    chosen and rejected, but each keeps its own positions: the longer text counts."""
    split, found = max(splits, key=lambda pair: pair[1].longest)
    cut = found.longest > recipe.data.max_length
    where = f"the longest pair, {split.path} row {found.longest_row}"
    detail = f"data.max_length; {where}, has {found.longest} tokens" if cut else where
    refuse_overlong("data.max_length", "a pair", min(found.longest, recipe.data.max_length), detail,
                    lambda window: f"set data.max_length to at most {window} (longer pairs are truncated, or "
                    "dropped with data.drop_long)", recipe.actor.model)  # fmt: skip


def identical_pairs(split: Split, found: Tokenized, recipe: Recipe, refuse_all: bool = False) -> str | None:
    """Pairs whose chosen and rejected read as the same ids (equal texts, or cut by data.max_length before they
    differ) score alike whatever the model learns: loss log 2, accuracy 0. A warning counting them, or, when
    every pair is one and `refuse_all` (the training split), an error: the run would end as if it had worked."""
    same, total = found.identical, len(found.pairs)
    if not same:
        return None
    equal, cut = len(same) - found.cut, found.cut
    causes = [f"{equal} {'is' if equal == 1 else 'are'} the same in full (equal texts, or text the tokenizer cannot "
              "tell apart)"] if equal else []  # fmt: skip
    if cut:
        limit = f"past data.max_length {recipe.data.max_length}"
        causes.append(f"they differ only {limit}: raise it" if cut == len(same) else
                      f"{cut} differ{'s' if cut == 1 else ''} only {limit}")  # fmt: skip
    start = f"{split.path}: chosen and rejected tokenize to the same ids in"
    if refuse_all and len(same) == total:
        raise DataError([f"{start} all {total} pairs ({rows_named(list(same))}): nothing to learn (loss log 2, "
                         f"accuracy 0); {', '.join(causes)}"])  # fmt: skip
    return (f"{start} {len(same)} of {total} pairs ({rows_named(list(same))}): they teach nothing (loss log 2, "
            f"accuracy 0); {', '.join(causes)}")  # fmt: skip


def packs(built: Built, recipe: Recipe, main: bool) -> bool:
    """Whether pairs go packed (train.pack_pairs, when the model's attention takes a custom mask)."""
    attention = transformers_model(built.model).config._attn_implementation
    if not recipe.train.pack_pairs:
        return False
    if attention not in PACKABLE_ATTENTION and main:
        display.print_warnings([f"train.pack_pairs: {attention} attention takes no custom mask; pairs go unpacked"])
    return attention in PACKABLE_ATTENTION


class Window:
    """Sums of loss, accuracy and margin over the micro-batches since the last log line."""

    def __init__(self):
        self.sums, self.pairs, self.since = torch.zeros(4), 0, time.perf_counter()

    def state(self) -> dict:
        return {"sums": self.sums.tolist(), "pairs": self.pairs}

    def load(self, state: dict) -> None:
        if state:
            self.sums, self.pairs = torch.tensor(state["sums"]), state["pairs"]

    def add(self, out, pairs: int) -> None:
        """Summed where the outputs are (a GPU's): no host sync per micro-batch."""
        loss = out.loss.detach().float()
        values = torch.stack([loss, out.accuracy.float(), out.margin.detach().float(), torch.ones_like(loss)])
        self.sums = self.sums.to(values.device) + values
        self.pairs += pairs

    def flush(self, accelerator, step: int, lr: float, now: float) -> dict:
        sums = accelerator.reduce(self.sums.to(accelerator.device), "sum").cpu()
        pairs = self.pairs * accelerator.num_processes
        loss, accuracy, margin = (sums[:3] / sums[3]).tolist()
        record = {"step": step, "split": "train", "loss": loss, "accuracy": accuracy, "margin": margin, "lr": lr,
                  "pairs_per_s": pairs / (now - self.since)}  # fmt: skip
        self.__init__()
        return record


@torch.no_grad()
def evaluate(model, loader, accelerator, step: int) -> dict:
    """Loss, accuracy and mean margin over the whole eval set (all processes), defined as in training;
    {} without an eval set."""
    if loader is None:
        return {}
    model.eval()
    chosen, rejected, margins = [], [], []
    for batch in loader:
        rewards = model(*batch.model_inputs()).chunk(2)
        for kept, value in zip((chosen, rejected, margins), (*rewards, batch.margin), strict=True):
            kept.append(accelerator.gather_for_metrics(value))
    out = bradley_terry(torch.cat(chosen), torch.cat(rejected), torch.cat(margins))
    return {"step": step, "split": "eval", "loss": out.loss.item(), "accuracy": out.accuracy.item(),
            "margin": out.margin.item(), "pairs": sum(len(c) for c in chosen)}  # fmt: skip


def log(accelerator, out: Path, record: dict, main: bool, progress: display.Progress | None = None) -> None:
    if not record or not main:
        return
    display.log_metrics(accelerator, out, record, "step")
    if record["split"] == "eval":
        line = f"step {record['step']}: eval accuracy {record['accuracy']:.3f}  margin {record['margin']:.3f}"
        (progress.note if progress else display.console.print)(line)


def save_checkpoint(accelerator, model, built: Built, recipe: Recipe, directory: Path, step: int, also=None) -> Path:
    """The adapter (or the full model) with tokenizer and recipe, written by the main process only."""
    state = checkpoint.gathered_state_dict(accelerator, model)
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(model).model
        extra = {"base_fingerprint": base_fingerprint(inner.config)}
        save = checkpoint.save_adapter if recipe.actor.model.is_lora else checkpoint.save_full_model
        save(inner, directory, step=step, tokenizer=built.tokenizer, recipe=recipe, extra=extra, also=also,
             state_dict=state)  # fmt: skip
    accelerator.wait_for_everyone()
    return directory
