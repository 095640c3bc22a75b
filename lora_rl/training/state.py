"""What a run needs beyond its weights to resume exactly: optimizer, scheduler, RNG, counters, data position.

Written into each checkpoint directory next to the adapter, without pickle: tensors in safetensors
(`optimizer.safetensors`, `rng.safetensors`), everything else in `trainer_state.json`. On CPU a resumed
run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE = "trainer_state.json"


def rng_states_of_all_ranks() -> list[dict[str, torch.Tensor]]:
    """Every process's torch RNG states: the CPU's and its own GPU's (each process samples its own stream);
    all processes must call it."""
    from accelerate.utils import gather_object

    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()  # the process's current device: its own GPU
    return gather_object([states])


def optimizer_state(accelerator, model: torch.nn.Module, optimizer) -> dict:
    """The optimizer's whole state_dict, parameters numbered as one process numbers them; all processes must
    call it. FSDP shards the state across processes: it is gathered (on rank 0; the others get no state)."""
    if accelerator.distributed_type.value != "FSDP":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    whole = get_optimizer_state_dict(model, optimizer.optimizer, options=options)  # by parameter name
    number = {name: i for i, name in enumerate(_names(whole))}
    groups = [{**group, "params": [number[n] for n in group["params"]]} for group in whole.get("param_groups", [])]
    return {"state": {number[name]: values for name, values in whole.get("state", {}).items()}, "param_groups": groups}


def load_optimizer_state(accelerator, model: torch.nn.Module, optimizer, state: dict) -> None:
    """Inverse of `optimizer_state`: under FSDP each process keeps its own shard of the whole state."""
    if accelerator.distributed_type.value != "FSDP":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    names = _names(get_optimizer_state_dict(model, optimizer.optimizer))  # no state yet: only the names
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]]
    whole = {"state": {names[i]: values for i, values in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer.optimizer, whole, options=StateDictOptions(full_state_dict=True))


def _names(state_dict: dict) -> list[str]:
    return [name for group in state_dict.get("param_groups", []) for name in group["params"]]


def write_state(directory: Path, optimizer: dict, state: dict[str, Any], generators: dict[str, torch.Generator],
                torch_rng: list[dict[str, torch.Tensor]]) -> None:  # fmt: skip
    """Optimizer tensors (`optimizer`: from `optimizer_state`), RNG states (`torch_rng`: from
    `rng_states_of_all_ranks`, saved as torch.RANK and cuda.RANK) and `state` (JSON: counters, scheduler,
    controllers) into `directory`."""
    tensors, groups = _flatten_optimizer(optimizer)
    save_file(tensors, directory / "optimizer.safetensors")
    rng = {**{f"{kind}.{rank}": s for rank, states in enumerate(torch_rng) for kind, s in states.items()},
           **{f"generator.{k}": g.get_state() for k, g in generators.items()}}  # fmt: skip
    save_file(rng, directory / "rng.safetensors")
    numpy_state = np.random.get_state()
    payload = {**state, "optimizer_param_groups": groups, "python_rng": _jsonable(random.getstate()),
               "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]}  # fmt: skip
    (directory / STATE).write_text(json.dumps(payload, indent=1) + "\n")


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            tensors[f"{index}.{name}"] = torch.as_tensor(value).contiguous()
    return tensors, state_dict["param_groups"]


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def read_state(directory: Path, generators: dict[str, torch.Generator], rank: int = 0) -> tuple[dict, dict]:
    """Restore RNG states from `directory` (this process's torch RNG, if it was saved with as many
    processes); return the JSON state (counters etc.) and the optimizer's state_dict."""
    payload = json.loads((directory / STATE).read_text())
    tensors = load_file(directory / "optimizer.safetensors")
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    rng = load_file(directory / "rng.safetensors")
    torch.set_rng_state(rng.get(f"torch.{rank}", rng["torch.0"]))
    for name, generator in generators.items():
        generator.set_state(rng[f"generator.{name}"])
    if torch.cuda.is_available() and f"cuda.{rank}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.{rank}"])  # this process's own GPU
    random.setstate(_tuples(payload["python_rng"]))
    kind, keys, *rest = payload["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    return payload, {"state": per_param, "param_groups": payload["optimizer_param_groups"]}


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
