"""A run's output directory: locked, checked (only lora-rl's own run files and checkpoints), cleared when
--overwrite (or a fresh --resume auto) asks, its run record (`.lora-rl-run.json`) and resolved recipe written."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from lora_rl import display
from lora_rl.training.checkpoint import (
    RUN_FILES,
    RUN_RECORD,
    CheckpointError,
    recover_interrupted_saves,
    refuse_foreign,
    write_file_atomically,
)
from lora_rl.training.lock import LOCK, release_lock, take_lock

# What a fresh start of `--resume auto` may delete: a run's lines written before its first checkpoint.
DISCARDABLE = ("metrics.jsonl", "samples.jsonl")
# The output directory's own files, rewritten by every start: not worth naming as kept.
BOOKKEEPING = (LOCK, RUN_RECORD, "recipe.yaml")


def start_run_dir(output_dir: str | Path, recipe, overwrite: bool, resuming: bool = False,
                  restart: bool = False) -> Path:  # fmt: skip
    """Lock the run's output directory (creating it), check what is in it, and save the resolved recipe there.

    What the run writes (RUN_FILES, checkpoint-N/, final/, best/) must be absent or lora-rl's, else nothing is touched
    and the error names it. A previous run there is refused unless the run is resumed, or
    `overwrite` (or `restart`: `--resume auto` found no checkpoint to continue) deletes it first.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    take_lock(out)
    try:
        recover_interrupted_saves(out)
        recorded = read_run_record(out)
        entries = [out / name for name in RUN_FILES if (out / name).exists() or (out / name).is_symlink()]
        entries += [p for p in out.iterdir() if re.fullmatch(r"checkpoint-\d+|final|best", p.name)]
        refuse_foreign(entries, recorded)
        previous = [p for p in entries if p.name != "recipe.yaml"]
        if previous and not resuming:
            _clear_previous_run(out, previous, overwrite, restart)
        write_file_atomically(out / RUN_RECORD, json.dumps({"files": sorted({*recorded, *RUN_FILES})}) + "\n")
        recipe.save(out / "recipe.yaml")
    except BaseException:
        release_lock(out)
        raise
    return out


def _clear_previous_run(out: Path, previous: list[Path], overwrite: bool, restart: bool) -> None:
    names = ", ".join(sorted(p.name for p in previous))
    if not (overwrite or restart):
        raise CheckpointError(f"output_dir: {out} already holds a run ({names}); choose another output_dir, "
                              "or pass --overwrite to replace it")  # fmt: skip
    if restart and not overwrite:
        _check_fresh_start(out, previous)
    for path in previous:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _check_fresh_start(out: Path, previous: list[Path]) -> None:
    """`--resume auto` found no checkpoint: only the lines a run wrote before its first checkpoint (metrics.jsonl,
    samples.jsonl) may go, as they hold nothing to continue from. Anything else of a run (a final/ made with other
    settings, or damaged) is refused and kept. Says what it deletes and what it keeps."""
    valuable = sorted(p.name for p in previous if p.name not in DISCARDABLE)
    if valuable:
        raise CheckpointError(f"resume auto: {out} holds {', '.join(valuable)} but no checkpoint to continue from; "
                              "nothing deleted: move it away, or pass --overwrite to replace the run")  # fmt: skip
    others = sorted(p.name for p in out.iterdir() if p not in previous and p.name not in BOOKKEEPING)
    kept = f"; keeping {', '.join(others)}" if others else ""
    display.print_warnings([f"resume auto: {out} holds no checkpoint; starting fresh (deleting "
                            f"{', '.join(sorted(p.name for p in previous))}: lines of a run stopped before its first "
                            f"checkpoint{kept})"])  # fmt: skip


def read_run_record(directory: Path) -> set[str]:
    """The run files lora-rl recorded writing in `directory` (none when there is no readable record)."""
    try:
        return set(json.loads((Path(directory) / RUN_RECORD).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()
