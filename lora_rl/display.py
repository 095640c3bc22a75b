"""Rich output: recipe, pre-flight table, parameter summary, errors; metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

from lora_rl.files import writing
from lora_rl.recipe import Recipe

if TYPE_CHECKING:  # for the annotation only: display imports no model code
    from lora_rl.models.build import ModelReport

console = Console()
errors = Console(stderr=True)


# Messages are plain text: escaped, so that `pip install "lora-rl[plot]"` or a path with brackets prints as written.
def print_problems(problems: list[str]) -> None:
    for line in problems:
        errors.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)


def print_warnings(lines: list[str]) -> None:
    for line in lines:
        errors.print(f"[bold yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)


def print_recipe(recipe: Recipe) -> None:
    text = yaml.safe_dump(recipe.to_dict(), sort_keys=False)
    console.print(Syntax(text, "yaml", background_color="default"))


def print_model_report(report: ModelReport) -> None:
    """The pre-flight table (each target entry and what it matched) and the parameter summary."""
    if report.is_lora:
        table = Table(title=f"LoRA targets on {report.base_path}", title_justify="left")
        table.add_column("target entry")
        table.add_column("matched modules")
        for match in report.matches:
            table.add_row(match.entry, _shorten(match.modules) if match.modules else "[dim]no match[/]")
        console.print(table)
    percent = 100 * report.trainable / max(report.total, 1)
    mode = "LoRA" if report.is_lora else "full fine-tuning"
    console.print(f"[bold]{mode}[/] ({report.head}): trainable parameters {report.trainable:,} "
                  f"of {report.total:,} ({percent:.2f}%)", highlight=False)  # fmt: skip
    print_warnings(report.warnings)


def _shorten(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, … ({len(names)} modules)" if len(names) > limit else shown


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """One JSON line per record: `metrics.jsonl` is read by scripts, so keys stay stable."""
    with writing(path), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def log_metrics(accelerator, out: Path, record: dict[str, Any], counter: str) -> None:
    """metrics.jsonl's line, and the same numbers to train.report_to's trackers at `counter` (update or step);
    a split (train-reward's train, eval) prefixes the names. Main process only."""
    append_metrics(out / "metrics.jsonl", record)
    prefix = f"{record['split']}/" if "split" in record else ""
    scalars = {prefix + name: value for name, value in record.items() if name not in (counter, "split")}
    accelerator.log(scalars, step=record[counter])


class Progress:
    """A rich progress bar whose trailing text shows the latest metrics; silent on non-main processes.

    Without a terminal (nohup, slurm, a pipe) a bar shows only its final state, at the end: there each update
    with metrics is one plain line instead, `DESCRIPTION N/TOTAL  name value ...`, the numbers the bar shows."""

    def __init__(self, total: int, description: str, enabled: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.plain = enabled and not console.is_terminal
        self.bar = RichProgress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"), console=console,
            disable=not enabled or self.plain,
        )  # fmt: skip
        self.task = self.bar.add_task(description, total=total, metrics="")
        self.enabled, self.description, self.total = enabled, description, total

    def __enter__(self) -> Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def update(self, completed: int, metrics: dict[str, float]) -> None:
        if self.plain and metrics:
            console.print(f"{self.description} {completed}/{self.total}  {format_metrics(metrics)}", highlight=False)
        self.bar.update(self.task, completed=completed, metrics=format_metrics(metrics))

    def status(self, text: str) -> None:
        """Text in place of the metrics after the bar for a while (e.g. an evaluation's progress); the next update
        puts the metrics back. Nothing without a terminal: there the line that follows says what happened."""
        if not self.plain:
            self.bar.update(self.task, metrics=text)

    def note(self, text: str) -> None:
        """A line printed above the bar (e.g. an evaluation), kept in the scrollback."""
        if self.enabled:
            self.bar.console.print(text, highlight=False)


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{name} {value:.3g}" for name, value in metrics.items())
