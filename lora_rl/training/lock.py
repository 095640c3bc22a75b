"""The output directory's lock: one run at a time writes to an output directory.

`.lora-rl.lock` holds the process, host and start time of the run that writes there; a second run is refused
with a message naming it. The lock appears whole or not at all (written aside, then linked to its name), so a
failed write (a full disk) leaves none. The lock goes when the run ends (returned, raised, Ctrl-C, SIGTERM,
SIGUSR1); one left by a killed run is taken over when that run is certainly gone (the lock empty or unreadable,
same host and no such process, or an earlier start of the same requeued slurm job). Only the main process takes
it; it is never part of a checkpoint.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from lora_rl import display
from lora_rl.training.checkpoint import CheckpointError, process_alive, umask

LOCK = ".lora-rl.lock"
# What link(2) answers on a filesystem without hard links (some FUSE and SMB mounts).
NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}
# Signals that end a process by default, which a scheduler sends a job: the lock is released first.
TERMINATING = (signal.SIGTERM, signal.SIGUSR1)
_held: set[Path] = set()  # lock files this process holds


def take_lock(directory: Path) -> None:
    """Lock `directory` for this process, or raise naming the run that holds it. A lock whose run is certainly
    gone is taken over, with a warning."""
    path = Path(directory) / LOCK
    mine = _lock_content()
    content = json.dumps(mine).encode()
    for _ in range(3):  # another process may take over the same stale lock at the same moment: look again
        try:
            if _create(path, content):
                _held.add(path)
                return
        except OSError as err:  # a full disk, a read-only directory: no lock was left behind
            raise CheckpointError(f"output_dir {directory}: cannot write {LOCK}: {err.strerror or err}") from None
        found = _read(path)
        if found is None:  # its run ended meanwhile
            continue
        holder = _holder(found)
        if not _stale(holder, mine):
            raise CheckpointError(_in_use(directory, holder)) from None
        if holder.get("pid") != mine["pid"]:
            display.print_warnings([f"output_dir {directory}: took over the lock of a run that is no longer "
                                    f"running ({_describe(holder)})"])  # fmt: skip
        _remove_if_unchanged(path, found)
    raise CheckpointError(_in_use(directory, _holder(_read(path) or b"")))


def _create(path: Path, content: bytes) -> bool:
    """Create the lock file `path` holding `content`, unless it exists (False), so that it never exists without
    its content: written to a temporary file, then hard-linked to its name, which like O_EXCL fails when the name
    is taken. A failed write (ENOSPC) leaves nothing. Where hard links are not supported, O_EXCL, written at once."""
    fd, tmp = tempfile.mkstemp(prefix=f"{LOCK}.tmp-", dir=path.parent)
    try:
        _write(fd, content)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in NO_HARD_LINKS:
                raise
            return _create_in_place(path, content)
        return True
    finally:
        os.unlink(tmp)


def _create_in_place(path: Path, content: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    try:
        _write(fd, content)
    except BaseException:
        os.unlink(path)  # ours, just created: a lock without its content must not stay
        raise
    return _read(path) == content  # a process that found it empty meanwhile may have taken it over


def _write(fd: int, content: bytes) -> None:
    os.fchmod(fd, 0o666 & ~umask())  # readable by the teammates the umask allows, as any file (mkstemp: 0600)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def _read(path: Path) -> bytes | None:
    """The lock file's bytes; None when there is none (its run ended: nothing holds the directory)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:  # e.g. another user's lock, not readable: whose it is cannot be told
        raise CheckpointError(f"output_dir {path.parent}: cannot read {LOCK} ({err.strerror}); if no run is "
                              "writing there, delete it") from None  # fmt: skip


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
    found = _read(Path(directory) / LOCK)
    if found is not None and not _stale(holder := _holder(found), _lock_content()):
        raise CheckpointError(_in_use(directory, holder))


def releases_lock(run: Callable) -> Callable:
    """Release the locks `run` takes when it ends: returned, raised, Ctrl-C, or SIGTERM / SIGUSR1 (what slurm sends
    a cancelled or preempted job, and its --signal pre-warning) outside the training loop, whose own handlers save
    a checkpoint first (lora_rl.training.interrupt): the lock goes, then the process ends as the signal ends it."""

    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        in_main_thread = threading.current_thread() is threading.main_thread()  # where signals can be handled
        ours = [s for s in TERMINATING if in_main_thread and signal.getsignal(s) == signal.SIG_DFL]
        for signum in ours:
            signal.signal(signum, _release_and_terminate)
        try:
            return run(*args, **kwargs)
        finally:
            release_all_locks()
            for signum in ours:
                signal.signal(signum, signal.SIG_DFL)

    return wrapper


def _release_and_terminate(signum, frame) -> None:
    release_all_locks()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _lock_content() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", 0))}  # fmt: skip


def _holder(content: bytes) -> dict[str, Any]:
    """The lock file's content; {} when empty or unreadable (a run that failed or was killed writing it: lora-rl
    writes its lock whole, never in place)."""
    try:
        holder = json.loads(content)
        return {**holder, "pid": int(holder["pid"]), "host": str(holder["host"])}
    except (ValueError, KeyError, TypeError):
        return {}


def _stale(holder: dict[str, Any], mine: dict[str, Any]) -> bool:
    """Whether the lock's run is certainly gone: the lock is empty or unreadable (its writer failed or died
    writing it), its process on this host has ended (or is this process), or it was an earlier start of this same
    slurm job (requeued, possibly on another node)."""
    if not holder:
        return True
    if holder["host"] == mine["host"]:
        return holder["pid"] == mine["pid"] or not process_alive(holder["pid"])
    same_job = mine["slurm_job"] is not None and holder.get("slurm_job") == mine["slurm_job"]
    return same_job and int(holder.get("slurm_restart") or 0) < mine["slurm_restart"]


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "its lock file is empty or unreadable"
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
