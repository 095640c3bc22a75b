"""What a run needs beyond its weights to resume exactly: optimizer, scheduler, RNG, counters, data position.

Written into each checkpoint directory next to the adapter, without pickle: tensors in safetensors
(`optimizer.safetensors`, `rng.safetensors`), everything else in `trainer_state.json`. On CPU a resumed
run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lora_rl import checkpoint, display, run_lock
from lora_rl.recipe import Recipe, RecipeError, load_recipe

STATE = "trainer_state.json"
# Keys whose change makes a resumed run a different run (data order, batch composition, schedule).
PINNED_KEYS = (
    "seed", "train.batch_size", "train.gradient_accumulation_steps", "train.num_epochs", "train.max_steps",
    "train.learning_rate", "train.lr_scheduler", "train.warmup_ratio", "ppo.rollout_batch_size",
    "ppo.num_updates", "ppo.ppo_epochs", "grpo.num_steps", "grpo.prompts_per_step", "grpo.num_generations",
    "grpo.num_iterations",
)  # fmt: skip


# ---------------------------------------------------------------- writing


def rng_states_of_all_ranks() -> list[dict[str, torch.Tensor]]:
    """Every process's torch RNG states: the CPU's and its own GPU's (each process samples its own stream);
    all processes must call it."""
    from accelerate.utils import gather_object

    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()  # the process's current device: its own GPU
    return gather_object([states])


def optimizer_state(accelerator, model: torch.nn.Module, optimizer) -> dict:
    """The optimizer's whole state_dict, parameters numbered as one process numbers them; all processes must
    call it. FSDP shards the state across processes: it is gathered (on rank 0; the others get no state)."""
    if accelerator.distributed_type.value != "FSDP":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    whole = get_optimizer_state_dict(model, optimizer.optimizer, options=options)  # by parameter name
    number = {name: i for i, name in enumerate(_names(whole))}
    groups = [{**group, "params": [number[n] for n in group["params"]]} for group in whole.get("param_groups", [])]
    return {"state": {number[name]: values for name, values in whole.get("state", {}).items()}, "param_groups": groups}


def load_optimizer_state(accelerator, model: torch.nn.Module, optimizer, state: dict) -> None:
    """Inverse of `optimizer_state`: under FSDP each process keeps its own shard of the whole state."""
    if accelerator.distributed_type.value != "FSDP":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    names = _names(get_optimizer_state_dict(model, optimizer.optimizer))  # no state yet: only the names
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]]
    whole = {"state": {names[i]: values for i, values in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer.optimizer, whole, options=StateDictOptions(full_state_dict=True))


def _names(state_dict: dict) -> list[str]:
    return [name for group in state_dict.get("param_groups", []) for name in group["params"]]


def launch_problems(accelerator) -> list[str]:
    """What the sharded setups cannot run (both commands)."""
    plugin = accelerator.state.fsdp_plugin if accelerator.distributed_type.value == "FSDP" else None
    if plugin is not None and plugin.fsdp_version == 1:
        return ["FSDP: fsdp_version 1 cannot save the adapter (peft 0.21 misses the LoRA weights of blocks FSDP1 "
                "wraps one by one): use fsdp_version: 2, as recipes/accelerate/fsdp.yaml does"]  # fmt: skip
    return []


def write_state(directory: Path, optimizer: dict, state: dict[str, Any], generators: dict[str, torch.Generator],
                torch_rng: list[dict[str, torch.Tensor]]) -> None:  # fmt: skip
    """Optimizer tensors (`optimizer`: from `optimizer_state`), RNG states (`torch_rng`: from
    `rng_states_of_all_ranks`, saved as torch.RANK and cuda.RANK) and `state` (JSON: counters, scheduler,
    controllers) into `directory`."""
    tensors, groups = _flatten_optimizer(optimizer)
    save_file(tensors, directory / "optimizer.safetensors")
    rng = {**{f"{kind}.{rank}": s for rank, states in enumerate(torch_rng) for kind, s in states.items()},
           **{f"generator.{k}": g.get_state() for k, g in generators.items()}}  # fmt: skip
    save_file(rng, directory / "rng.safetensors")
    numpy_state = np.random.get_state()
    payload = {**state, "optimizer_param_groups": groups, "python_rng": _jsonable(random.getstate()),
               "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]}  # fmt: skip
    (directory / STATE).write_text(json.dumps(payload, indent=1) + "\n")


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            tensors[f"{index}.{name}"] = torch.as_tensor(value).contiguous()
    return tensors, state_dict["param_groups"]


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


# ---------------------------------------------------------------- reading


def read_state(directory: Path, generators: dict[str, torch.Generator], rank: int = 0) -> tuple[dict, dict]:
    """Restore RNG states from `directory` (this process's torch RNG, if it was saved with as many
    processes); return the JSON state (counters etc.) and the optimizer's state_dict."""
    payload = json.loads((directory / STATE).read_text())
    tensors = load_file(directory / "optimizer.safetensors")
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    rng = load_file(directory / "rng.safetensors")
    torch.set_rng_state(rng.get(f"torch.{rank}", rng["torch.0"]))
    for name, generator in generators.items():
        generator.set_state(rng[f"generator.{name}"])
    if torch.cuda.is_available() and f"cuda.{rank}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.{rank}"])  # this process's own GPU
    random.setstate(_tuples(payload["python_rng"]))
    kind, keys, *rest = payload["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    return payload, {"state": per_param, "param_groups": payload["optimizer_param_groups"]}


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


# ---------------------------------------------------------------- choosing and checking a checkpoint


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint-N directories (with a trainer state), oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted((p for p in found if (p / STATE).is_file()), key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(resume: str | None, output_dir: str) -> Path | None:
    """The checkpoint to resume from: a checkpoint directory, a run directory (its newest intact checkpoint), or
    "auto" (output_dir's newest intact checkpoint, or None to start fresh)."""
    if resume is None:
        return None
    path = Path(output_dir if resume == "auto" else resume)
    if (path / STATE).is_file():
        _verify_checkpoint(path)  # named by the user: damaged is an error
        return path
    found = checkpoints(path)
    if found:
        return newest_intact(found)
    if resume == "auto":
        return None
    raise RecipeError([f"resume: {resume!r} holds no checkpoint with {STATE}; expected a checkpoint or run directory"])


def newest_intact(found: list[Path]) -> Path:
    """The newest of `found` (oldest first) whose files match its manifest; a warning names the damaged newer
    ones (a kill cannot damage a checkpoint, but a disk or a copy can)."""
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
    raise checkpoint.CheckpointError(f"no intact checkpoint to resume from: {'; '.join(damaged)}")


def _verify_checkpoint(directory: Path) -> None:
    if checkpoint.verify(directory) is None:
        raise checkpoint.CheckpointError(f"{directory}: no {checkpoint.MANIFEST}; not a complete lora-rl checkpoint")


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
        checkpoint.start_run_dir(out, recipe, overwrite, resuming=resume_dir is not None, restart=restart)
        if resume_dir is not None:
            step = (checkpoint.read_manifest(resume_dir) or {}).get("step", "?")
            display.console.print(f"resuming from {resume_dir} ({unit} {step})", highlight=False, soft_wrap=True)
    accelerator.wait_for_everyone()
    return out


def check_trackers(recipe: Recipe) -> None:
    """Every tracker in train.report_to is installed (accelerate would fail only once the model is loaded)."""
    missing = [name for name in recipe.train.report_to if importlib.util.find_spec(name) is None]
    if missing:
        raise RecipeError([f"train.report_to: {name} is not installed; pip install {name}" for name in missing])


def tracker_options(recipe: Recipe) -> dict[str, Any]:
    """Accelerator keywords for train.report_to: the trackers, logging under output_dir."""
    if not recipe.train.report_to:
        return {}
    return {"log_with": list(recipe.train.report_to), "project_dir": recipe.output_dir}


def start_trackers(accelerator, recipe: Recipe) -> None:
    """One tracker run per training run (named after output_dir) with the resolved recipe as its flat config:
    TensorBoard's hyper-parameters take only scalars, so lists and nulls go as text."""
    flat = {}

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for name, inner in value.items():
                flatten(f"{prefix}{name}.", inner)
        else:
            flat[prefix[:-1]] = value if isinstance(value, int | float | str | bool) else str(value)

    flatten("", recipe.to_dict())
    # accelerate's W&B tracker ignores project_dir: without `dir` its files land in the working directory
    wandb = {"name": Path(recipe.output_dir).name, "dir": str(recipe.output_dir)}
    accelerator.init_trackers("lora-rl", config=flat, init_kwargs={"wandb": wandb})


def check_mixed_precision(precision: str) -> None:
    """fp16 needs a GPU; bf16 runs on CPUs and on GPUs that support it."""
    if precision == "fp16" and not torch.cuda.is_available():
        raise RecipeError(
            ["train.mixed_precision: got 'fp16'; fp16 needs a CUDA GPU, this machine has none: use bf16 or no"]
        )
    if precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise RecipeError(["train.mixed_precision: got 'bf16'; this GPU does not support bf16: use fp16 or no"])


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


# ---------------------------------------------------------------- non-finite values


class BadUpdate(Exception):
    """A non-finite value at an update or optimizer step: nothing from it is applied or saved."""


def clip_gradients(accelerator, model: torch.nn.Module, max_norm: float | None) -> bool:
    """Clip the gradients to `max_norm` (None: only measure them); whether their norm is finite.

    All the prepared model's parameters (frozen ones have no gradient): accelerate then uses FSDP's own clipping,
    whose norm covers every rank's shard, not this rank's alone, so every process gets the same answer. DeepSpeed
    clips (and steps) inside backward and may report no norm: taken as finite here.
    """
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm or math.inf)
    return norm is None or math.isfinite(float(norm))


def skip_or_stop(problem: str, in_a_row: int, limit: int, unit: str, key: str, main: bool) -> None:
    """After an update or step skipped for `problem` (`in_a_row` so far): warn, and stop the run at `limit`."""
    if main:  # the same on every process
        display.print_warnings([f"{problem}; {unit} skipped ({in_a_row} in a row)"])
    if in_a_row >= limit:
        raise BadUpdate(f"stopping: {in_a_row} consecutive {unit}s with non-finite values ({key}: {limit})")


# ---------------------------------------------------------------- Ctrl-C


class Interrupted(Exception):
    """Ctrl-C: a checkpoint was written at a step boundary; the run can be resumed from it."""

    def __init__(self, directory: Path, step: int):
        self.directory, self.step = directory, step
        super().__init__(f"interrupted at step {step}; saved {directory}; continue with --resume {directory}")


class Interrupt:
    """The first SIGINT only sets `requested`: the loop saves at the next step boundary and exits.
    A second SIGINT interrupts at once, as usual."""

    def __init__(self, accelerator) -> None:
        self.accelerator, self.requested = accelerator, False

    def requested_anywhere(self) -> bool:
        """Whether any process got SIGINT. `accelerate launch` forwards Ctrl-C to each worker on its own, so
        two processes can see it a step apart; every process must save at the same step boundary."""
        return on_any_process(self.accelerator, "SIGINT" if self.requested else None) is not None

    @contextmanager
    def installed(self) -> Iterator[Interrupt]:
        def handler(signum, frame) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------- several processes


def on_any_process(accelerator, note: str | None) -> str | None:
    """The first process's `note` (e.g. what went wrong there), on every process. Processes that take
    different branches (one skips an update, one stops for Ctrl-C) would wait in a collective forever."""
    from accelerate.utils import gather_object

    if accelerator.num_processes == 1:
        return note
    notes = gather_object([note])
    return next((f"{n} (process {rank})" for rank, n in enumerate(notes) if n is not None), None)


def end_distributed_run(exit_code: int) -> None:
    """With several processes, once all finished together (the last save done): leave the process group and
    exit at once. Left to interpreter shutdown, gloo's threads outlive destroy_process_group and can abort
    the process ("terminate called without an active exception", SIGABRT; pytorch/pytorch#179291) after
    everything was saved, and the launcher then reports the whole run as failed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
