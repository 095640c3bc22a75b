"""`lora-rl eval RECIPE_OR_RUN`: ppo's and grpo's held-out evaluation on its own, for the base and any adapters side
by side, so a user can measure the base before training and every checkpoint after.

run(): the recipe (a recipe file, or the recipe.yaml a run or adapter directory holds, with overrides) -> its
held-out prompts, reward and eval settings, checked as ppo and grpo check them -> the adapters (given, or every
checkpoint-N/, best/ and final/ of a run), each checked against the base -> one base, every adapter loaded onto it
by name, the reward attached as in training -> for the base (adapters off) and each adapter in turn:
rl.evaluation's completions and metrics (the same batches and seeds as the run's own evaluations, sharded over the
processes of `accelerate launch`) -> one table, or one JSON line per model; every completion to the
--completions file when given.
"""

from __future__ import annotations

import json
import re
import time
from functools import partial
from pathlib import Path

from rich.table import Table

from lora_rl import display
from lora_rl.adapters import merge, names
from lora_rl.adapters.streaming_merge import meta_model, model_layout
from lora_rl.data import DataError
from lora_rl.models.build import ModelError, build, materialize_builtins
from lora_rl.recipe import GRPOConfig, Recipe, load_recipe
from lora_rl.rl import evaluation
from lora_rl.rl.rewards import StepState
from lora_rl.rl.roles import Roles
from lora_rl.rl.setup import attach_reward, check_eval_inputs, schedule_of
from lora_rl.training import checkpoint

BASE = "base"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def run(recipe_or_run: Path, overrides: list[str], adapters: list[str], as_json: bool = False,
        completions_file: Path | None = None) -> list[dict]:  # fmt: skip
    """Evaluate the base and each adapter; print a table (or JSON lines) and return one record per model.
    `completions_file`: a new file for every completion (model, prompt, completion, rewards, passed)."""
    # 1. Inputs, all checked before the base loads.
    refuse_existing(completions_file)
    source = Path(recipe_or_run)
    recipe_file, named = recipe_and_adapters(source)
    if adapters and not (source / checkpoint.ADAPTER_CONFIG).is_file():
        named = []  # --adapter replaces a run directory's own adapters
    named += names.parse_adapters(adapters)
    names.refuse_duplicates([name for name, _ in named], {BASE, "default"})  # default: the recipe's own adapter
    recipe, eval_rows, terms = check_eval_inputs(load_recipe(recipe_file, overrides), recipe_file.parent)
    if named and not recipe.actor.model.is_lora:
        raise ModelError("eval compares LoRA adapters on one base; the recipe fine-tunes the whole model "
                         "(actor.model.is_lora: false): point actor.model.path at the model to evaluate")  # fmt: skip
    materialize_builtins(recipe)
    specs = {name: merge.read_adapter(path) for name, path in named}
    check_adapters(specs, recipe)

    # 2. One base, every adapter and the reward on it.
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision)
    main = accelerator.is_main_process
    built = build(recipe, "causal-lm")
    for name, spec in specs.items():
        built.model.load_adapter(str(spec.directory), adapter_name=name, is_trainable=False)
    roles = Roles(built.model.eval().requires_grad_(False), None, None, None)
    attach_reward(roles, recipe, terms)
    built.model.to(accelerator.device)
    roles.place(accelerator.device)
    evalset = evaluation.EvalSet(eval_rows, built.tokenizer, recipe, completions_per_update(recipe, specs),
                                 accelerator)  # fmt: skip

    def in_autocast(within):  # as the training's evaluation runs: inside the prepared module's forward
        with accelerator.autocast():
            return within()

    # 3. The base (adapters off), then each adapter.
    results, written = [], []
    for name in [BASE, *specs]:
        started, spec = time.perf_counter(), specs.get(name)
        with display.Progress(len(evalset.mine), f"eval {name}", enabled=main and not as_json) as bar:
            complete = partial(evaluation.complete, roles, built.tokenizer, evalset, recipe.generation, recipe.seed,
                               StepState(0, 1), accelerator.device, lambda done, _: bar.update(done, {}),
                               adapter=None if name == BASE else name)  # fmt: skip
            completions = evaluation.everywhere(accelerator, in_autocast, complete)
        results.append({"model": name, "adapter": str(spec.directory) if spec else None,
                        "update": spec.manifest.get("step") if spec else None,
                        **evaluation.summarise(completions, recipe.eval),
                        "time_eval": round(time.perf_counter() - started, 3)})  # fmt: skip
        written += [{"model": name, **line} for line in evaluation.records(completions, eval_rows, recipe.eval, 0)]
    if main:
        print_results(results, recipe, len(eval_rows), as_json)
        if completions_file is not None:
            lines = [{k: v for k, v in line.items() if k != "update"} for line in written]
            checkpoint.write_file_atomically(completions_file, "".join(json.dumps(line) + "\n" for line in lines))
    return results


# ---------------------------------------------------------------- inputs


def refuse_existing(completions_file: Path | None) -> None:
    """--completions writes a new file, never over one (eval deletes nothing it did not write)."""
    if completions_file is None:
        return
    if completions_file.exists():
        raise DataError([f"--completions: {completions_file} exists; give a new file"])
    if not completions_file.parent.is_dir():
        raise DataError([f"--completions: {completions_file.parent} is not a directory"])


def recipe_and_adapters(path: Path) -> tuple[Path, list[tuple[str, Path]]]:
    """RECIPE_OR_RUN -> (the recipe file, the adapters it names): a recipe file names none; an adapter directory
    (final/, best/, checkpoint-N/) names itself and holds its recipe.yaml; a run directory names every adapter in
    it, checkpoints by update, then best/ and final/, and holds the run's recipe.yaml."""
    if path.is_file():
        return path, []
    if not path.is_dir():
        raise DataError([f"RECIPE_OR_RUN: {path} not found; expected a recipe file, a run directory or an adapter"])
    recipe_file = path / "recipe.yaml"
    if not recipe_file.is_file():
        raise DataError([f"RECIPE_OR_RUN: {path} holds no recipe.yaml; expected a run directory (output_dir of ppo or "
                         "grpo) or an adapter directory saved by one"])  # fmt: skip
    if (path / checkpoint.ADAPTER_CONFIG).is_file():
        return recipe_file, [(names.name_of(path), path)]
    if (path / "config.json").is_file() and not (path / checkpoint.ADAPTER_CONFIG).is_file():
        raise ModelError(f"{path} is a fully fine-tuned model; eval compares LoRA adapters: point actor.model.path "
                         "at it in a recipe file")  # fmt: skip
    found = [child for child in path.iterdir() if (child / checkpoint.ADAPTER_CONFIG).is_file()]
    return recipe_file, [(names.name_of(child), child) for child in sorted(found, key=run_order)]


def run_order(directory: Path) -> tuple[int, int, str]:
    """checkpoint-N by N, then best/, final/ and anything else by name."""
    if number := CHECKPOINT.fullmatch(directory.name):
        return 0, int(number.group(1)), ""
    return 1, {"best": 0, "final": 1}.get(directory.name, 2), directory.name


def check_adapters(specs: dict[str, merge.AdapterSpec], recipe: Recipe) -> None:
    """Each adapter is a causal-LM (policy) adapter made for the recipe's base."""
    from transformers import AutoConfig

    if not specs:
        return
    base = merge.resolve_base(recipe.actor.model.path, "actor.model.path")
    config = AutoConfig.from_pretrained(base)
    layout = model_layout(meta_model(config, "causal-lm"))
    for name, spec in specs.items():
        if spec.task != "causal-lm":
            raise ModelError(f"adapter {name} ({spec.directory}) is a reward (SEQ_CLS) adapter; eval takes policies")
        merge.refuse_misfit(spec, config, layout)


def completions_per_update(recipe: Recipe, specs: dict[str, merge.AdapterSpec]) -> int:
    """eval.batch_size's default, as the run used it: the completions one update samples, of the command the
    adapters' manifests name (ppo or grpo); without one, grpo when the recipe sets its grpo section, else ppo."""
    commands = [spec.manifest["command"] for spec in specs.values() if spec.manifest.get("command")]
    command = commands[0] if commands else "grpo" if recipe.grpo != GRPOConfig() else "ppo"
    return schedule_of(recipe, command).completions


# ---------------------------------------------------------------- output


def print_results(results: list[dict], recipe: Recipe, prompts: int, as_json: bool) -> None:
    """One JSON line per model, or one table: a column per model, a row per metric."""
    if as_json:
        for result in results:
            print(json.dumps(result), flush=True)
        return
    k = recipe.eval.num_samples
    names = [name for name in results[0] if name.startswith("eval/")]
    how = "greedy" if k == 1 else f"{k} samples each at temperature {recipe.generation.temperature}"
    passing = f"{recipe.eval.pass_function or 'the reward'} >= {recipe.eval.pass_threshold}"
    table = Table(title=f"{prompts} held-out prompts, {how}; a completion passes when {passing}")
    table.add_column("", no_wrap=True)
    for result in results:  # a column per model, as `lora-rl load` puts them side by side
        table.add_column(result["model"], justify="right", no_wrap=True)
    table.add_row("update", *("" if r["update"] is None else str(r["update"]) for r in results))
    for name in names:
        table.add_row(name.removeprefix("eval/"), *(f"{r[name]:.4g}" for r in results))
    table.add_row("seconds", *(f"{r['time_eval']:.3g}" for r in results))
    display.console.print(table)
