"""Batch-level advantages on several processes (tests/test_distributed.py): each process holds its share of one
batch, computes the objective's advantages and saves them; together they must equal one process's on the whole.

    accelerate launch ... -m tests.distributed_advantages OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from lora_rl.recipe import GenerationConfig, GRPOConfig
from lora_rl.rl.objectives import GRPOObjective
from tests.test_kl_reward import rollout

SETTINGS = {  # the two batch-level normalisations
    "grpo-batch": {"advantage": "grpo", "scale_rewards": "batch"},
    "reinforce_pp": {"advantage": "reinforce_pp", "beta": 0.1},
}
ROWS, GROUP, WIDTH = 8, 2, 6


def objective(name: str) -> GRPOObjective:
    cfg = GRPOConfig(num_generations=GROUP, **SETTINGS[name])
    return GRPOObjective(SimpleNamespace(grpo=cfg, generation=GenerationConfig()))


def whole_batch():
    """(logprobs, ref_logprobs, mask, scores): the second half's scores spread far wider than the first's."""
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(ROWS, WIDTH, generator=generator) * 3
    ref_logprobs = logprobs + torch.randn(ROWS, WIDTH, generator=generator) * 0.5
    lengths = torch.tensor([6, 2, 5, 3, 4, 1, 3, 2])
    mask = torch.arange(WIDTH) < lengths[:, None]
    scores = torch.randn(ROWS, generator=generator) * torch.tensor([0.1] * 4 + [3.0] * 4) + torch.arange(ROWS)
    return logprobs, ref_logprobs, mask, scores


def part(rank: int, processes: int):
    """This process's rows (whole groups), cut to their own width, as each process pads its rollout to its own."""
    logprobs, ref_logprobs, mask, scores = whole_batch()
    rows = slice(rank * ROWS // processes, (rank + 1) * ROWS // processes)
    width = int(mask[rows].sum(1).max())
    return logprobs[rows, :width], ref_logprobs[rows, :width], mask[rows, :width], scores[rows]


def main(out: Path) -> None:
    from accelerate import Accelerator

    from lora_rl.training.distributed import end_distributed_run

    accelerator = Accelerator()
    found = {}
    for name in SETTINGS:
        batch = rollout(*part(accelerator.process_index, accelerator.num_processes))
        found[name] = objective(name).advantages(accelerator, batch).advantages
    torch.save(found, out / f"rank{accelerator.process_index}.pt")
    # as the commands end: together, then os._exit; left to interpreter shutdown, gloo's threads can abort a
    # process (SIGABRT, pytorch/pytorch#179291) after everything was saved, failing the launch (seen in CI)
    end_distributed_run(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
