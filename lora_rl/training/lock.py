"""The output directory's lock: one run at a time writes to an output directory.

`.lora-rl.lock` holds the process, host and start time of the run that writes there; a second run is refused
with a message naming it. The lock goes when the run ends (returned, raised, Ctrl-C, SIGTERM); one left by a
killed run is taken over when that run is certainly gone (same host and no such process, or an earlier start
of the same requeued slurm job). Only the main process takes it; it is never part of a checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from lora_rl import display
from lora_rl.files import writing
from lora_rl.training.checkpoint import CheckpointError

LOCK = ".lora-rl.lock"
_held: set[Path] = set()  # lock files this process holds


def take_lock(directory: Path) -> None:
    """Lock `directory` for this process, or raise naming the run that holds it. A lock whose run is certainly
    gone is taken over, with a warning."""
    path = Path(directory) / LOCK
    mine = _lock_content()
    for _ in range(3):  # another process may take over the same stale lock at the same moment: look again
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            content = path.read_bytes()
            holder = _holder(content)
            if not _stale(holder, mine):
                raise CheckpointError(_in_use(directory, holder)) from None
            if holder["pid"] != mine["pid"]:
                display.print_warnings([f"output_dir {directory}: took over the lock of a run that is no longer "
                                        f"running ({_describe(holder)})"])  # fmt: skip
            _remove_if_unchanged(path, content)
            continue
        try:
            with writing(path), os.fdopen(fd, "w") as f:
                json.dump(mine, f)
        except BaseException:  # a full disk: a half-written lock would hold the directory until deleted by hand
            path.unlink(missing_ok=True)
            raise
        _held.add(path)
        return
    raise CheckpointError(_in_use(directory, _holder(path.read_bytes())))


def release_lock(directory: Path) -> None:
    """Remove `directory`'s lock if this process holds it (never anyone else's)."""
    path = Path(directory) / LOCK
    if path in _held:
        _held.discard(path)
        with suppress(FileNotFoundError):
            holder = _holder(path.read_bytes())
            if holder and (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname()):
                path.unlink()


def release_all_locks() -> None:
    for path in list(_held):
        release_lock(path.parent)


def refuse_locked(directory: Path) -> None:
    """Raise when a live run holds `directory`; takes nothing (a check before its checkpoints are read)."""
    with suppress(FileNotFoundError):
        holder = _holder((Path(directory) / LOCK).read_bytes())
        if not _stale(holder, _lock_content()):
            raise CheckpointError(_in_use(directory, holder))


def releases_lock(run: Callable) -> Callable:
    """Release the locks `run` takes when it ends: returned, raised, Ctrl-C, or SIGTERM (what slurm sends a
    cancelled or preempted job: the lock goes, then the process ends as SIGTERM ends it)."""

    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        in_main_thread = threading.current_thread() is threading.main_thread()  # where signals can be handled
        default = in_main_thread and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        if default:
            signal.signal(signal.SIGTERM, _release_and_terminate)
        try:
            return run(*args, **kwargs)
        finally:
            release_all_locks()
            if default:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return wrapper


def _release_and_terminate(signum, frame) -> None:
    release_all_locks()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _lock_content() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", 0))}  # fmt: skip


def _holder(content: bytes) -> dict[str, Any]:
    """The lock file's content; {} while its writer has not written it yet, or when unreadable."""
    try:
        holder = json.loads(content)
        return {**holder, "pid": int(holder["pid"]), "host": str(holder["host"])}
    except (ValueError, KeyError, TypeError):
        return {}


def _stale(holder: dict[str, Any], mine: dict[str, Any]) -> bool:
    """Whether the lock's run is certainly gone: its process on this host has ended (or is this process), or it
    was an earlier start of this same slurm job (requeued, possibly on another node)."""
    if not holder:
        return False
    if holder["host"] == mine["host"]:
        return holder["pid"] == mine["pid"] or not _alive(holder["pid"])
    same_job = mine["slurm_job"] is not None and holder.get("slurm_job") == mine["slurm_job"]
    return same_job and int(holder.get("slurm_restart") or 0) < mine["slurm_restart"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a run whose lock file is being written, or unreadable"
    return f"pid {holder['pid']} on {holder['host']} since {holder.get('since', '?')}"


def _in_use(directory: Path, holder: dict[str, Any]) -> str:
    return (
        f"output_dir {directory} is in use by another run: {_describe(holder)} ({Path(directory) / LOCK}); "
        "wait for it to end or choose another output_dir (if that run is not running, delete the lock file)"
    )


def _remove_if_unchanged(path: Path, content: bytes) -> None:
    with suppress(FileNotFoundError):
        if path.read_bytes() == content:
            path.unlink()
