"""Which checkpoint a run continues from (--resume, train.resume), whether it may, and the run files trimmed to it."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from lora_rl import display
from lora_rl.recipe import Recipe, RecipeError, load_recipe
from lora_rl.training import checkpoint, run_dir
from lora_rl.training import lock as run_lock
from lora_rl.training.state import STATE

# Keys whose change makes a resumed run a different run (data order, batch composition, schedule).
PINNED_KEYS = (
    "seed", "train.batch_size", "train.gradient_accumulation_steps", "train.num_epochs", "train.max_steps",
    "train.learning_rate", "train.lr_scheduler", "train.warmup_ratio", "ppo.rollout_batch_size",
    "ppo.num_updates", "ppo.ppo_epochs", "grpo.num_steps", "grpo.prompts_per_step", "grpo.num_generations",
    "grpo.num_iterations", "data.eval_fraction",  # which of train_path's rows train
)  # fmt: skip


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint-N directories (with a trainer state), oldest first: what rotation counts."""
    return [p for p in checkpoint_dirs(output_dir) if (p / STATE).is_file()]


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Every checkpoint-N entry, complete or not, oldest first: what resuming considers."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(resume: str | None, output_dir: str) -> Path | None:
    """The checkpoint to resume from: a checkpoint directory, a run directory (its newest intact checkpoint), or
    "auto" (output_dir's newest intact checkpoint, or None to start fresh: only when it holds no checkpoint-N at
    all). A checkpoint-N that is incomplete in any way is damaged, never absent: starting fresh would delete it."""
    if resume is None:
        return None
    path = Path(output_dir if resume == "auto" else resume)
    if (path / STATE).is_file() or checkpoint.has_own_manifest(path):
        _verify_checkpoint(path)  # named by the user: damaged is an error
        return path
    found = checkpoint_dirs(path)
    if found:
        return newest_intact(found)
    if resume == "auto":
        return None
    raise RecipeError([f"resume: {resume!r} holds no checkpoint with {STATE}; expected a checkpoint or run directory"])


def newest_intact(found: list[Path]) -> Path:
    """The newest of `found` (oldest first) that is complete (its state there, its files matching its manifest); a
    warning names the damaged newer ones (a kill cannot damage a checkpoint, but a disk or a copy can). None
    intact: an error, and nothing is deleted."""
    damaged = []
    for directory in reversed(found):
        try:
            _verify_checkpoint(directory)
        except checkpoint.CheckpointError as err:
            damaged.append(f"{directory} is damaged ({err})")
            continue
        if damaged:
            display.print_warnings([f"{'; '.join(damaged)}; resuming from {directory}"])
        return directory
    raise checkpoint.CheckpointError(f"no intact checkpoint to resume from: {'; '.join(damaged)}; nothing was deleted: "
                                     "repair or move them away, or pass --overwrite to start afresh")  # fmt: skip


def _verify_checkpoint(directory: Path) -> None:
    """Raise unless `directory` is a complete checkpoint: its manifest, every file it lists, and the trainer state."""
    if checkpoint.verify(directory) is None:
        raise checkpoint.CheckpointError(f"{directory}: no {checkpoint.MANIFEST}; not a complete lora-rl checkpoint")
    if not (directory / STATE).is_file():
        raise checkpoint.CheckpointError(f"{directory / STATE}: missing; the checkpoint is incomplete")


def finished_run(recipe: Recipe, resume: str | None) -> Path | None:
    """With `--resume auto` (or train.resume: auto): the final/ directory of a run that already finished, else
    None. A finished run is left as it is: nothing to trim, re-run or overwrite. Finished means final/ is intact
    and was made with the recipe's seed, batch sizes and schedule: with more updates or epochs, or other
    settings, there is more to do (or a change to refuse), as for any checkpoint."""
    out = Path(recipe.output_dir)
    if (resume or recipe.train.resume) != "auto" or not checkpoint.has_own_manifest(out / "final"):
        return None
    run_lock.refuse_locked(out)  # a live run's final/ is not a finished run's
    try:
        manifest = checkpoint.verify(out / "final")
    except checkpoint.CheckpointError as err:
        display.print_warnings([f"{out / 'final'} is damaged ({err}); resuming the run"])
        return None
    if changed_settings(out / "final", recipe):
        return None
    if os.environ.get("RANK", "0") == "0":  # before accelerate starts: one line, not one per process
        display.console.print(f"{out} holds a finished run ({out / 'final'}, step {manifest['step']}); nothing to do",
                              highlight=False, soft_wrap=True)  # fmt: skip
    return out / "final"


def find_resume(recipe: Recipe, resume: str | None, allow_changes: bool) -> Path | None:
    """The checkpoint this run continues from (`--resume`, else train.resume), checked against the recipe."""
    if resume or recipe.train.resume:
        run_lock.refuse_locked(Path(recipe.output_dir))  # a live run's checkpoints come and go
    directory = resolve_resume(resume or recipe.train.resume, recipe.output_dir)
    if directory:
        check_compatible(directory, recipe, allow_changes)
    return directory


def start_output(accelerator, recipe: Recipe, overwrite: bool, resume_dir: Path | None, resume: str | None,
                 unit: str = "step") -> Path:  # fmt: skip
    """The run's output directory, locked and prepared by the main process while the others wait. `--resume auto`
    without a checkpoint to continue starts afresh, replacing the earlier run's files. A resumed run says where it
    continues from (`unit`: what the run counts, step or update)."""
    out = Path(recipe.output_dir)
    if accelerator.is_main_process:
        restart = resume_dir is None and (resume or recipe.train.resume) == "auto"
        run_dir.start_run_dir(out, recipe, overwrite, resuming=resume_dir is not None, restart=restart)
        if resume_dir is not None:
            step = (checkpoint.read_manifest(resume_dir) or {}).get("step", "?")
            display.console.print(f"resuming from {resume_dir} ({unit} {step})", highlight=False, soft_wrap=True)
    accelerator.wait_for_everyone()
    return out


def check_compatible(directory: Path, recipe: Recipe, allow_changes: bool) -> None:
    """Refuse to resume a run whose seed, batch sizes or schedule changed, unless the user says so."""
    changed = changed_settings(directory, recipe)
    if changed and not allow_changes:
        raise RecipeError([f"resume: {directory} was made with other settings ({'; '.join(changed)}); "
                           "the resumed run would not continue it. Pass --allow-changes to resume anyway"])  # fmt: skip


def changed_settings(directory: Path, recipe: Recipe) -> list[str]:
    """The pinned keys (seed, batch sizes, schedule) whose values differ between `directory`'s recipe and `recipe`."""
    saved = load_recipe(directory / "recipe.yaml").to_dict()
    ours = recipe.to_dict()
    return [f"{key}: {_get(saved, key)!r} -> {_get(ours, key)!r}" for key in PINNED_KEYS
            if _get(saved, key) != _get(ours, key)]  # fmt: skip


def _get(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def trim_metrics(path: Path, key: str, last: int) -> None:
    """Drop the lines of a run's JSON-lines file (metrics.jsonl, samples.jsonl) whose `key` is past `last`, the
    checkpoint being resumed (they will be written again), atomically: a kill meanwhile leaves the file as it was.
    A last line cut short (a kill while it was written) is dropped."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if number < len(lines):
                raise checkpoint.CheckpointError(f"{path}: line {number} is not JSON; fix or remove it") from None
            display.print_warnings([f"{path}: dropped its last line, cut short (the run was killed writing it)"])
    kept = "".join(line + "\n" for line, record in records if record.get(key, 0) <= last)
    checkpoint.write_file_atomically(path, kept)


def rotate(output_dir: Path, keep: int | None) -> None:
    """Delete the oldest checkpoints beyond `keep` — only ever called after a new one is complete, and only
    lora-rl's own (with its manifest)."""
    if keep:
        for old in checkpoints(output_dir)[:-keep]:
            if checkpoint.has_own_manifest(old):
                shutil.rmtree(old, ignore_errors=True)


def resumed_recipe(recipe: Recipe, resume_dir: Path | None) -> Recipe:
    """The recipe to build the model from: when resuming, the trained weights come from the checkpoint
    (the original lora_path stays in the run's own recipe, e.g. for PPO's initial_adapter reference)."""
    if resume_dir is None:
        return recipe
    model = recipe.actor.model
    changed = {"lora_path": str(resume_dir)} if model.is_lora else {"path": str(resume_dir)}
    return dataclasses.replace(
        recipe, actor=dataclasses.replace(recipe.actor, model=dataclasses.replace(model, **changed))
    )
