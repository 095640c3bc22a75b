"""Ctrl-C: the first SIGINT saves at the next step boundary on every process, then the run ends (Interrupted)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_rl.training.distributed import on_any_process


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
