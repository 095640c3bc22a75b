"""Atomic checkpoints: written to a temporary directory, sealed with a manifest, renamed into place.

A checkpoint directory is complete only if its `manifest.json` (written last) lists every file with its
sha256; `verify` checks that, so a truncated or altered file is reported by name instead of loading
silently. Weights are safetensors only: pickle-based `.bin`/`.pt` weights are refused unless the user
opts in (`actor.model.allow_pickle_weights`), since unpickling runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = "lora-rl-checkpoint/1"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The safetensors weights peft (adapters) and transformers (models, use_safetensors) read.
SAFE_WEIGHTS = (ADAPTER_WEIGHTS, "model.safetensors", "model.safetensors.index.json")


class CheckpointError(Exception):
    """A checkpoint that is missing, incomplete, altered or unsafe to read."""


def write_atomically(final: Path, write: Callable[[Path], None], step: int, extra: dict | None = None) -> Path:
    """Run `write(tmp_dir)`, seal it with a manifest, then rename it to `final`.

    A crash or exception at any point leaves `final` as it was (absent, or the previous checkpoint):
    the new directory appears under its name only once complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        _write_manifest(tmp, step, extra or {})
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_manifest(directory: Path, step: int, extra: dict) -> None:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        _fsync(path)  # data on disk before the manifest vouches for it
        files[path.relative_to(directory).as_posix()] = sha256(path)
    manifest = {"format": FORMAT, "step": step, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "versions": library_versions(), "files": files, **extra}  # fmt: skip
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _fsync(directory / MANIFEST)


def _replace_dir(new: Path, final: Path) -> None:
    """Move `new` to `final`; an existing `final` is moved aside first and deleted only afterwards."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(new, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    import lora_rl

    return {"lora_rl": lora_rl.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}  # fmt: skip


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The directory's manifest, or None when it has none (e.g. an adapter made by another tool)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: corrupt manifest ({err.msg})") from None


def verify(directory: Path) -> dict[str, Any] | None:
    """Check every file the manifest lists; raise CheckpointError naming the first bad one."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    for name, expected in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {MANIFEST} but missing; the checkpoint is incomplete")
        if sha256(path) != expected:
            raise CheckpointError(f"{path}: sha256 differs from {MANIFEST}; the file is truncated or altered")
    return manifest


def refuse_pickle(directory: Path, allow_pickle: bool) -> None:
    """Raise when the weights transformers or peft would read from `directory` are pickle files and the user did
    not opt in. Only the weight files themselves count: a checkpoint's optimizer.safetensors makes no
    adapter_model.bin safe."""
    directory = Path(directory)
    if allow_pickle or any((directory / name).is_file() for name in SAFE_WEIGHTS):
        return
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise CheckpointError(
            f"{directory}: the weights are pickle ({', '.join(pickled)}), which can run arbitrary code; convert them "
            "to safetensors (or, in a recipe, set actor.model.allow_pickle_weights: true if you trust them)"
        )


def read_adapter_config(directory: Path, allow_pickle: bool = False) -> dict[str, Any]:
    """The adapter_config.json of the adapter in `directory`, once what loading it reads is checked: the
    manifest (when lora-rl wrote one), the config, and the weights peft would read (adapter_model.safetensors,
    whole; adapter_model.bin only when `allow_pickle`). Every path that reads an adapter goes through here."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"adapter directory {directory} not found")
    config_path = directory / "adapter_config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no adapter_config.json; not a peft adapter directory")
    verify(directory)
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: corrupt JSON ({getattr(err, 'msg', err)})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object of adapter settings")
    refuse_pickle(directory, allow_pickle)
    weights = directory / ADAPTER_WEIGHTS
    if weights.is_file():
        check_safetensors(weights)
    elif not (allow_pickle and (directory / "adapter_model.bin").is_file()):
        raise CheckpointError(f"{weights}: weights file missing")
    return config


def check_safetensors(path: Path) -> None:
    """A readable safetensors file: its header parses and its tensors lie within the file (no truncation)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({err})") from None


def save_adapter(model, directory: Path, *, step: int, tokenizer=None, recipe=None, extra: dict | None = None,
                 also: Callable[[Path], None] | None = None, state_dict: dict | None = None) -> Path:  # fmt: skip
    """Save the model's "default" peft adapter (the one trained) so that `PeftModel.from_pretrained(base,
    directory)` loads it; other adapters on the same base (reward, reference, critic) are left out.

    Writes adapter_config.json, adapter_model.safetensors, the tokenizer, the resolved recipe.yaml,
    whatever `also(tmp_dir)` adds (e.g. a value head), then the manifest; atomically. `state_dict`: the
    weights gathered from every rank when FSDP/ZeRO-3 shard them.
    """

    def write(tmp: Path) -> None:
        # save_embedding_layers=False: with lm_head targeted peft would also save the whole frozen head, which
        # never changes here (no vocabulary resizing) and is the largest matrix of most models.
        model.save_pretrained(tmp, selected_adapters=["default"], safe_serialization=True, state_dict=state_dict,
                              save_embedding_layers=False)  # fmt: skip
        _write_common(tmp, tokenizer, recipe, also)

    return write_atomically(directory, write, step, extra)


def save_full_model(model, directory: Path, *, step: int, tokenizer=None, recipe=None, extra: dict | None = None,
                    also: Callable[[Path], None] | None = None, state_dict: dict | None = None) -> Path:  # fmt: skip
    """Save a fully fine-tuned model (safetensors) the same atomic way as an adapter."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        _write_common(tmp, tokenizer, recipe, also)

    return write_atomically(directory, write, step, extra)


def _write_common(tmp: Path, tokenizer, recipe, also: Callable[[Path], None] | None) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if recipe is not None:
        recipe.save(tmp / "recipe.yaml")
    if also is not None:
        also(tmp)


def gathered_state_dict(accelerator, wrapper, prefix: str = "model.") -> dict:
    """The full state dict of `wrapper.model`, gathered from every rank (FSDP / ZeRO-3 shard it): every
    process must call this; only the main process then writes."""
    return submodule_state(accelerator.get_state_dict(wrapper), prefix)


def submodule_state(state: dict, prefix: str) -> dict:
    """The entries of `state` under `prefix` ("model."), with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def start_run_dir(output_dir: str | Path, recipe, overwrite: bool, resuming: bool = False) -> Path:
    """Create the run's output directory and save the resolved recipe in it.

    A directory that already holds a run (metrics.jsonl) is refused unless `overwrite`, which clears
    that run's metrics and checkpoints first, or the run is being resumed: a new run never appends to an
    old one's metrics silently.
    """
    out = Path(output_dir)
    if (out / "metrics.jsonl").exists() and not resuming:
        if not overwrite:
            raise CheckpointError(
                f"output_dir: {out} already holds a run (metrics.jsonl); choose another output_dir, "
                "or pass --overwrite to replace it"
            )
        (out / "metrics.jsonl").unlink()
        for old in [*out.glob("checkpoint-*"), out / "final"]:
            shutil.rmtree(old, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    recover_interrupted_saves(out)
    recipe.save(out / "recipe.yaml")
    return out


def recover_interrupted_saves(directory: Path) -> None:
    """Clean up after a save that was killed: its temporary directory goes; a checkpoint moved aside to be
    replaced (`.NAME.old-PID`) is put back when its replacement never arrived, else deleted."""
    for tmp in directory.glob(".*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in directory.glob(".*.old-*"):
        name = old.name[1:].rsplit(".old-", 1)[0]
        if (directory / name).exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, directory / name)
