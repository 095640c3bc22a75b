"""`python -m tests.fsdp_on_cpu MODULE ARGS...`: run MODULE with accelerate's FSDP on the CPU, for tests.

accelerate 1.15 runs FSDP on GPUs only: with ACCELERATE_USE_CPU=1 it silently makes an FSDP launch plain
DDP (MULTI_CPU). Launched by `accelerate launch --config_file recipes/accelerate/fsdp.yaml` with
ACCELERATE_USE_CPU=1, this puts the FSDP plugin that accelerate built back in place, on the gloo process
group accelerate started, then runs MODULE as `python -m MODULE` would.
"""

from __future__ import annotations

import runpy
import sys

import torch
from accelerate import state
from accelerate.utils import DistributedType

accelerator_state_init = state.AcceleratorState.__init__


def init(self, *args, fsdp_plugin=None, **kwargs) -> None:
    accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # Every AcceleratorState() copies PartialState's shared dict into its own: change both.
        for shared in (state.PartialState._shared_state, self.__dict__):
            shared["distributed_type"] = DistributedType.FSDP
            shared["device"] = torch.device("cpu")  # not cpu:0, which FSDP rejects for a module on "cpu"
        self.fsdp_plugin = fsdp_plugin
        print(f"fsdp_on_cpu: FSDP{fsdp_plugin.fsdp_version}", file=sys.stderr)


state.AcceleratorState.__init__ = init
if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
