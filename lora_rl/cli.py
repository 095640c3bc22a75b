"""The `lora-rl` command line. Each command: load the recipe, then run. No ML here."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

import lora_rl
from lora_rl import display, files
from lora_rl.recipe import Recipe, RecipeError, load_recipe, one_line, recipe_warnings

app = typer.Typer(
    help="Fine-tune language models with LoRA adapters for RLHF, driven by YAML recipes.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

RecipeArg = Annotated[Path, typer.Argument(metavar="RECIPE", help="YAML recipe file.", show_default=False)]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="OVERRIDES",
        help="Dotted overrides, e.g. actor.model.lora_rank=16 train.learning_rate=1e-5.",
        show_default=False,
    ),
]


OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace the run already in output_dir (its metrics and checkpoints).")
]


ResumeOpt = Annotated[
    str | None,
    typer.Option("--resume", help="Continue from a checkpoint, or a run directory's latest one; 'auto': output_dir's."),
]
AllowChangesOpt = Annotated[
    bool, typer.Option("--allow-changes", help="Resume even though seed, batch sizes or schedule changed.")
]


INTERRUPTED = "interrupted (Ctrl-C)"


class Purpose(str, Enum):
    ppo = "ppo"
    grpo = "grpo"
    train_reward = "train-reward"


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input ends the command with its one-line messages and exit code 2; anything else with one line and
    exit code 1; Ctrl-C where no step boundary is awaited (loading, a second Ctrl-C) with one line and 130. Never a
    traceback, unless LORA_RL_DEBUG is set."""
    from lora_rl.data import DataError
    from lora_rl.models.build import ModelError
    from lora_rl.training.checkpoint import CheckpointError

    try:
        yield
    except (RecipeError, DataError) as err:
        display.print_problems(err.problems)
        raise typer.Exit(2) from None
    except (ModelError, CheckpointError) as err:
        display.print_problems([str(err)])
        raise typer.Exit(2) from None
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        display.print_warnings([INTERRUPTED])
        raise typer.Exit(130) from None
    except OSError as err:  # a full disk, a directory it may not write: the cause and the path, one line
        if os.environ.get("LORA_RL_DEBUG"):
            raise
        display.print_problems([files.describe(err)])
        raise typer.Exit(1) from None
    except Exception as err:  # not a problem we know (a bug, a CUDA error): one line; the traceback on request
        if os.environ.get("LORA_RL_DEBUG"):
            raise
        display.print_problems([f"unexpected {one_line(err)} (LORA_RL_DEBUG=1 shows the traceback)"])
        raise typer.Exit(1) from None


@contextmanager
def processes_end_together() -> Iterator[None]:
    """How a command that may run on several processes ends (train-reward, ppo, grpo, eval): finished, a stop
    signal that saved a checkpoint at a step boundary (then: say where, exit 128 + the signal's number like a shell
    command that signal ended: Ctrl-C 130, SIGTERM 143, SIGUSR1 138; see lora_rl.training.interrupt), or a run
    stopped by non-finite values (exit 1). Every process got there together and leaves through
    end_distributed_run; left to interpreter shutdown, gloo can abort a process after its work is done."""
    from lora_rl.training.distributed import end_distributed_run
    from lora_rl.training.guards import BadUpdate
    from lora_rl.training.interrupt import Interrupted

    try:
        yield
    except Interrupted as err:
        display.print_warnings([str(err)])
        end_distributed_run(err.exit_code)
        raise typer.Exit(err.exit_code) from None
    except BadUpdate as err:  # every process stopped at the same step or update
        display.print_problems([str(err)])
        end_distributed_run(1)
        raise typer.Exit(1) from None
    end_distributed_run(0)


def _load(recipe: Path, overrides: list[str] | None) -> Recipe:
    resolved = load_recipe(recipe, overrides or [])
    display.print_warnings(recipe_warnings(resolved))
    return resolved


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lora-rl {lora_rl.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Fine-tune language models with LoRA adapters for RLHF, driven by YAML recipes."""
    import warnings

    with user_errors():  # Ctrl-C while transformers (and torch) load: one line
        from transformers.utils import logging

    logging.disable_progress_bar()  # our own rich progress is the one display
    # peft still calls transformers APIs renamed in 5.x; the notice is not actionable by our users.
    warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6.*", category=FutureWarning)


@app.command()
def validate(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    purpose: Annotated[
        Purpose, typer.Option("--for", help="Which command the recipe is for: decides the model head.")
    ] = Purpose.ppo,
) -> None:
    """Validate RECIPE, print it resolved, build the model and print the LoRA pre-flight table. No training.

    Runs every check the command (--for) makes before it loads a model: data (tokenized: chat templates rendered,
    lengths against the model's context), model and adapter files, and for ppo the reward source (reward.function
    is imported).
    """

    with user_errors():
        from lora_rl.commands import validate as command

        command.run(_load(recipe, overrides), purpose.value, recipe.parent)


@app.command("train-reward")
def train_reward(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = None,
    allow_changes: AllowChangesOpt = False,
) -> None:
    """Train a pairwise (Bradley-Terry) reward model with LoRA from RECIPE.

    Reads preference pairs (chosen, rejected, optional prompt and margin) from data.train_path; writes
    metrics.jsonl, checkpoint-N/ every train.save_every steps, and final/ (a peft adapter) to output_dir.
    """

    with user_errors(), processes_end_together():
        from lora_rl.commands import train_reward as command

        command.run(_load(recipe, overrides), overwrite=overwrite, resume=resume, allow_changes=allow_changes)


@app.command()
def ppo(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = None,
    allow_changes: AllowChangesOpt = False,
) -> None:
    """Run PPO with a LoRA policy on one shared frozen base, from RECIPE.

    Prompts come from data.train_path (a 'prompt' column); scores from reward.adapter, reward.model or
    reward.function. Writes metrics.jsonl, samples.jsonl (prompts, completions, rewards every
    train.samples_every updates), checkpoint-N/ every train.save_every updates and final/ (the policy adapter,
    loadable with plain peft) to output_dir.
    """
    _rl("ppo", recipe, overrides, overwrite, resume, allow_changes)


@app.command()
def grpo(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = None,
    allow_changes: AllowChangesOpt = False,
) -> None:
    """Run critic-free RL (GRPO, Dr. GRPO, RLOO, REINFORCE++) with a LoRA policy on one frozen base, from RECIPE.

    Each step samples grpo.num_generations completions for each of grpo.prompts_per_step prompts from
    data.train_path; scores come from reward.functions (TRL-style reward functions, weighted), reward.function,
    reward.adapter or reward.model. Writes metrics.jsonl, samples.jsonl (prompts, completions, rewards),
    checkpoint-N/ and final/ (the policy adapter).
    """
    _rl("grpo", recipe, overrides, overwrite, resume, allow_changes)


def _rl(command: str, recipe: Path, overrides, overwrite: bool, resume: str | None, allow_changes: bool) -> None:
    """ppo and grpo: one loop. A reward function that fails is the user's code failing mid-run: exit 1."""
    with user_errors(), processes_end_together():  # the imports too: Ctrl-C while torch loads is one line
        from lora_rl.commands import rl as rl_command
        from lora_rl.rl.rewards import RewardError
        from lora_rl.training.distributed import end_distributed_run

        resolved = _load(recipe, overrides)
        try:
            rl_command.run(resolved, overwrite=overwrite, resume=resume, allow_changes=allow_changes, command=command,
                          recipe_dir=recipe.parent)  # fmt: skip
        except RewardError as err:  # the user's reward function failed mid-run
            display.print_problems([str(err)])
            end_distributed_run(1)
            raise typer.Exit(1) from None


class Dtype(str, Enum):
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


@app.command()
def merge(
    adapter_dir: Annotated[
        Path, typer.Argument(metavar="ADAPTER_DIR", help="Adapter directory (adapter_config.json + safetensors).")
    ],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="Where the merged model is written.")],
    base: Annotated[Path | None, typer.Option(help="Base model directory; default: the adapter's base.")] = None,
    dtype: Annotated[Dtype | None, typer.Option(help="Output precision; default: the base's.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty OUT_DIR.")] = False,
    no_check: Annotated[bool, typer.Option("--no-check", help="Skip the merged-vs-adapter output check.")] = False,
    streaming: Annotated[
        bool | None,
        typer.Option(
            "--streaming/--in-memory",
            help="Merge tensor by tensor over the base's safetensors shards, or in memory with peft; "
            "default: streaming when the base in float32 needs more than half the available memory.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Fold the adapter in ADAPTER_DIR into its base and save a plain transformers model to OUT_DIR.

    Works for causal-LM adapters and reward (SEQ_CLS) adapters; the merged model is checked against the
    adapter on probe inputs unless --no-check, and nothing is written to OUT_DIR unless every step succeeds.
    """

    with user_errors():
        from lora_rl.adapters import merge as command

        command.run(adapter_dir, out_dir, base=base, dtype=dtype.value if dtype else None, force=force,
                    check=not no_check, streaming=streaming)  # fmt: skip


@app.command()
def load(
    base_or_adapter: Annotated[
        Path, typer.Argument(metavar="BASE_OR_ADAPTER", help="Base model directory, or an adapter directory.")
    ],
    adapter: Annotated[
        list[str] | None, typer.Option("--adapter", help="DIR or NAME=DIR: an adapter to attach; repeatable.")
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="A prompt; repeatable.")] = None,
    prompts_file: Annotated[Path | None, typer.Option(help="A file with one prompt per line.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 32,
    temperature: Annotated[float, typer.Option(help="0: greedy; > 0: sample at this temperature.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Sampling: nucleus mass; 1.0 is off.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sampling: the k likeliest tokens only; 0 is off.")] = 0,
    seed: Annotated[int, typer.Option(help="Sampling: each completion is drawn from this seed.")] = 0,
    chat_template: Annotated[
        bool | None,
        typer.Option(
            "--chat-template/--no-chat-template",
            help="Format every prompt with the tokenizer's chat template, or none; default: as each adapter's "
            "recipe.yaml says (the base column as the first adapter).",
            show_default=False,
        ),
    ] = None,
    score: Annotated[bool, typer.Option("--score", help="Print rewards (reward adapters) instead.")] = False,
    completion: Annotated[
        list[str] | None,
        typer.Option("--completion", help="With --score: the answer scored after each prompt; one per prompt."),
    ] = None,
) -> None:
    """Load a base once, attach adapters, and compare the base and each adapter side by side.

    Completions of the prompts by the base (adapters disabled) and by each adapter in turn, greedy unless
    --temperature > 0; each prompt formatted as that adapter was trained (its recipe.yaml's chat_template). With
    --score, the rewards that each reward adapter gives the prompts (and their --completion).
    """
    with user_errors():
        from lora_rl.commands import load as command

        sampling = command.Sampling(temperature, top_p, top_k, seed)
        command.run(base_or_adapter, adapter or [], prompt or [], prompts_file, max_new_tokens, score, sampling,
                    chat_template, completion)  # fmt: skip


@app.command("eval")
def evaluate(
    recipe_or_run: Annotated[
        Path,
        typer.Argument(metavar="RECIPE_OR_RUN", help="A ppo/grpo recipe file, a run directory, or an adapter in one.",
                       show_default=False),
    ],
    overrides: OverridesArg = None,
    adapter: Annotated[
        list[str] | None, typer.Option("--adapter", help="DIR or NAME=DIR: a policy adapter to evaluate; repeatable.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line per model instead of the table.")] = False,
    completions: Annotated[
        Path | None, typer.Option("--completions", help="A new JSON-lines file for every completion, by model.")
    ] = None,
) -> None:
    """Evaluate the base and policy adapters on the recipe's held-out prompts, side by side.

    The evaluation ppo and grpo run every train.eval_every updates, on its own: data.eval_path (or
    data.eval_fraction), greedy or eval.num_samples completions each, scored by the recipe's reward; eval/reward,
    eval/reward/<fn>, eval/pass@k, eval/response_length for the base (adapters off) and each adapter. A run
    directory brings its recipe.yaml and every adapter in it (checkpoint-N/, best/, final/); --adapter replaces
    those. Writes nothing unless --completions FILE.
    """
    with user_errors(), processes_end_together():
        from lora_rl.commands import evaluate as command

        command.run(recipe_or_run, overrides or [], adapter or [], as_json, completions)


@app.command()
def plot(
    run_dirs: Annotated[
        list[Path], typer.Argument(metavar="RUN_DIR", help="Run directories, each with its metrics.jsonl.")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="PNG to write; default: the first RUN_DIR's metrics.png.")
    ] = None,
) -> None:
    """Draw reward, KL, entropy, losses and response length from each run's metrics.jsonl, runs side by side.

    One panel per metric a run logged (train-reward: loss, accuracy, margin, train and eval); one line per run.
    Needs matplotlib: pip install "lora-rl[plot]".
    """

    with user_errors():
        from lora_rl.commands import plot as command

        typer.echo(f"wrote {command.run(run_dirs, out)}")
