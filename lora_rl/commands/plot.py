"""`lora-rl plot`: training curves from runs' metrics.jsonl, one panel per metric, one line per run (and split)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from lora_rl.data import DataError

# The panels, in order, of whichever metrics a run logged: ppo/grpo log one line per `update`, train-reward
# one per `step` with split train or eval. ppo/grpo's held-out evaluation (eval/reward, eval/response_length,
# eval/pass@k) is drawn as the eval split of the same panel, pass@k in panels of their own after these.
METRICS = ("reward", "kl", "entropy", "policy_loss", "value_loss", "response_length", "loss", "accuracy", "margin")
EVAL_PREFIX, PASS_AT = "eval/", "pass@"
COLUMNS, PANEL_INCHES, DPI = 3, (4.0, 3.0), 100  # a fixed size per panel: the PNG's pixel size is predictable
INSTALL = 'plotting needs matplotlib: pip install "lora-rl[plot]"'

Series = dict[tuple[str, str, str], tuple[list[float], list[float]]]  # (metric, split, x's name) -> (x, y)


def run(run_dirs: list[Path], out: Path | None) -> Path:
    """Read every run's metrics.jsonl, draw the metrics any of them logged, write the PNG; returns its path."""
    out = out or run_dirs[0] / "metrics.png"
    if out.suffix.lower() != ".png":
        raise DataError([f"--out: expected a .png file, got {out}"])
    if not out.parent.is_dir():
        raise DataError([f"--out: directory {out.parent} does not exist"])
    runs = {name: read_series(path / "metrics.jsonl") for name, path in zip(labels(run_dirs), run_dirs, strict=True)}
    logged = {key[0] for series in runs.values() for key in series}
    passes = sorted((m for m in logged if m.startswith(PASS_AT)), key=lambda m: int(m[len(PASS_AT) :]))
    panels = [m for m in METRICS if m in logged] + passes
    if not panels:
        raise DataError([f"{run_dirs[0] / 'metrics.jsonl'}: none of the metrics {', '.join(METRICS)}"])
    try:
        import matplotlib  # noqa: F401 (an optional extra)
    except ImportError:
        raise DataError([INSTALL]) from None
    figure = draw(runs, panels)
    partial = out.with_name(f".{out.name}.partial")  # a failed save leaves no half-written PNG under the name
    try:
        figure.savefig(partial, format="png", dpi=DPI)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def labels(run_dirs: list[Path]) -> list[str]:
    """Each run's legend label: its directory's name, or the path as given where two names coincide."""
    names = [path.resolve().name for path in run_dirs]
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, run_dirs, strict=True)]


def read_series(path: Path) -> Series:
    """metrics.jsonl -> {(metric, split, x's name): (x, y)}, x a record's `update` (ppo, grpo) or `step`
    (train-reward)."""
    if not path.is_file() or path.stat().st_size == 0:
        raise DataError([f"{path}: {'empty' if path.is_file() else 'not found'}; expected a run's metrics.jsonl"])
    series: Series = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
            axis = "update" if "update" in record else "step"
            x = record[axis]
        except (ValueError, TypeError, KeyError):
            raise DataError([f"{path}: line {number} is not a metrics record (JSON with 'update' or 'step')"]) from None
        for name, value in record.items():
            metric, split = name, record.get("split", "")
            if name.startswith(EVAL_PREFIX):  # ppo, grpo: the held-out prompts' metrics on the update's line
                metric, split = name[len(EVAL_PREFIX) :], "eval"
            plotted = metric in METRICS or (split == "eval" and re.fullmatch(r"pass@\d+", metric))
            if plotted and isinstance(value, int | float) and not isinstance(value, bool):
                xs, ys = series.setdefault((metric, split, axis), ([], []))
                xs.append(x)
                ys.append(value)
    return series


def draw(runs: dict[str, Series], panels: list[str]):
    """One panel per metric; a colour per run; eval (sparse points) dashed with markers."""
    from matplotlib.figure import Figure  # without pyplot: no GUI backend, no global figure state
    from matplotlib.ticker import MaxNLocator

    rows = math.ceil(len(panels) / COLUMNS)
    columns = min(COLUMNS, len(panels))
    figure = Figure(figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for ax, metric in zip(axes, panels, strict=False):
        axis_names = set()
        for colour, (name, series) in enumerate(runs.items()):
            for (logged, split, axis), (xs, ys) in series.items():
                if logged == metric:
                    style = {"linestyle": "--", "marker": "o", "markersize": 3} if split == "eval" else {}
                    ax.plot(xs, ys, color=f"C{colour}", label=f"{name} {split}".strip(), **style)
                    axis_names.add(axis)
        ax.set_title(metric)
        ax.set_xlabel(" / ".join(sorted(axis_names)))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # updates and steps are whole numbers
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return figure
