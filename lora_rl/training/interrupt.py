"""Stopping a run at a step boundary: Ctrl-C (SIGINT), SIGTERM (what schedulers send before they kill a job:
slurm on preemption, scancel or the time limit; Kubernetes on eviction) and SIGUSR1 (slurm's `--signal`
pre-warning). The first of them saves a checkpoint at the next step boundary on every process, then the run ends
(Interrupted) with exit code 128 + the signal's number, as a shell reports a command that signal ended: 130, 143,
138. A schedulers' stop signal is saved, not obeyed at once: what the run learned since its last checkpoint would
be lost; the scheduler's SIGKILL after its grace period bounds the wait, and cannot damage a checkpoint."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_rl.training.distributed import on_any_process

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class Interrupted(Exception):
    """A stop signal: a checkpoint was written at a step boundary; the run can be resumed from it."""

    def __init__(self, directory: Path, step: int, signum: int = signal.SIGINT):
        self.directory, self.step, self.signum = directory, step, signum
        super().__init__(directory, step)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        how = "interrupted" if self.signum == signal.SIGINT else f"{signal.Signals(self.signum).name}: stopped"
        return f"{how} at step {self.step}; saved {self.directory}; continue with --resume {self.directory}"


class Interrupt:
    """The first stop signal only sets `signum`: the loop saves at the next step boundary and exits. A second
    Ctrl-C interrupts at once, as usual; a second SIGTERM or SIGUSR1 changes nothing (a launcher forwards to each
    process what the scheduler may have sent it already)."""

    def __init__(self, accelerator) -> None:
        self.accelerator, self.signum = accelerator, None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def requested_anywhere(self) -> bool:
        """Whether any process got a stop signal (then `signum` is the first process's, everywhere). `accelerate
        launch` forwards Ctrl-C to each worker on its own, so two processes can see it a step apart; every
        process must save at the same step boundary."""
        note = on_any_process(self.accelerator, signal.Signals(self.signum).name if self.requested else None)
        if note is not None:
            self.signum = signal.Signals[note.split()[0]]  # the note may end with "(process N)"
        return note is not None

    @contextmanager
    def installed(self) -> Iterator[Interrupt]:
        """The stop signals' handlers, for the training loop; an Interrupted raised in it gets the signal."""

        def handler(signum, frame) -> None:
            if self.requested:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                return
            self.signum = signum
            if self.accelerator.is_main_process:  # a plain write: a handler may run in the middle of any print
                name, again = ("Ctrl-C", " (Ctrl-C again stops at once)") if signum == signal.SIGINT else \
                    (signal.Signals(signum).name, "")  # fmt: skip
                os.write(2, f"warning: {name}: saving a checkpoint at the end of this step, then stopping{again}\n"
                         .encode())  # fmt: skip

        previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
        try:
            yield self
        except Interrupted as stop:
            stop.signum = self.signum or signal.SIGINT
            raise
        finally:
            for signum, restored in previous.items():
                signal.signal(signum, restored)
