"""Rich output: recipe, pre-flight table, parameter summary, errors; metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from lora_rl.model import ModelReport
from lora_rl.recipe import Recipe

console = Console()
errors = Console(stderr=True)


def print_problems(problems: list[str]) -> None:
    for line in problems:
        errors.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)


def print_warnings(lines: list[str]) -> None:
    for line in lines:
        errors.print(f"[bold yellow]warning:[/] {line}", highlight=False, soft_wrap=True)


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
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
