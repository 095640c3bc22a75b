"""Several processes: what sharded setups cannot run, agreeing on one process's note, ending the group cleanly."""

from __future__ import annotations

import logging
import os
import sys

import torch


def launch_problems(accelerator) -> list[str]:
    """What the sharded setups cannot run (both commands)."""
    plugin = accelerator.state.fsdp_plugin if accelerator.distributed_type.value == "FSDP" else None
    if plugin is not None and plugin.fsdp_version == 1:
        return ["FSDP: fsdp_version 1 cannot save the adapter (peft 0.21 misses the LoRA weights of blocks FSDP1 "
                "wraps one by one): use fsdp_version: 2, as recipes/accelerate/fsdp.yaml does"]  # fmt: skip
    return []


def on_any_process(accelerator, note: str | None) -> str | None:
    """The first process's `note` (e.g. what went wrong there), on every process. Processes that take
    different branches (one skips an update, one stops for Ctrl-C) would wait in a collective forever."""
    from accelerate.utils import gather_object

    if accelerator.num_processes == 1:
        return note
    notes = gather_object([note])
    return next((f"{n} (process {rank})" for rank, n in enumerate(notes) if n is not None), None)


def reshard(model) -> None:
    """After a forward with no backward (generation, a measurement): FSDP2 leaves the root module's weights gathered,
    for the backward that usually follows, in place of the sharded parameters the optimizer holds, so saving the
    optimizer's state (by parameter) or copying weights back would miss them. Shard them again; no-op without FSDP2."""
    if hasattr(model, "reshard"):
        model.reshard()


_kept_until_exit: list = []


def keep_until_exit(parts: object) -> None:
    """With several processes, keep a finished run's parts (its DDP-wrapped model) alive until end_distributed_run's
    os._exit. Freed earlier, when the command returns, DDP's reducer destroys its gloo process group, whose
    destructor joins threads waiting on a peer that may have exited already: the process hung there for ever
    (seen in CI, 2 CPU processes, after final/ was saved)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        _kept_until_exit.append(parts)


def end_distributed_run(exit_code: int) -> None:
    """With several processes, once all finished together (the last save done): leave the process group and
    exit at once. Left to interpreter shutdown, gloo's threads outlive destroy_process_group and can abort
    the process ("terminate called without an active exception", SIGABRT; pytorch/pytorch#179291) after
    everything was saved, and the launcher then reports the whole run as failed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.barrier()  # no process leaves while another still needs it
    torch.distributed.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
