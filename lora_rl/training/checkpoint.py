"""Atomic checkpoints: written to a temporary directory, sealed with a manifest, renamed into place.

A checkpoint directory is complete only if its `manifest.json` (written last) lists every file with its
sha256; `verify` checks that, so a truncated or altered file is reported by name instead of loading
silently. Weights are safetensors only: pickle-based `.bin`/`.pt` weights are refused unless the user
opts in (`actor.model.allow_pickle_weights`), since unpickling runs arbitrary code.

lora-rl removes or replaces only what it can prove it wrote: a directory holding its manifest (or, while a save
is unfinished, its mark), and the run files its run record (`.lora-rl-run.json`) lists. Temporaries carry their
writer's PID@HOST in their name: what a killed save left is removed by a later one, never a live writer's. While
a run writes to its output directory, the directory is locked (lora_rl.training.lock); run_dir prepares it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from lora_rl.files import writing

MANIFEST = "manifest.json"
FORMAT = "lora-rl-checkpoint/1"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The safetensors weights peft (adapters) and transformers (models, use_safetensors) read.
SAFE_WEIGHTS = (ADAPTER_WEIGHTS, "model.safetensors", "model.safetensors.index.json")
PARTIAL = ".lora-rl-partial"  # in a temporary checkpoint directory from its creation until its manifest is written
RUN_RECORD = ".lora-rl-run.json"  # the run files lora-rl wrote in an output directory
RUN_FILES = ("recipe.yaml", "metrics.jsonl", "samples.jsonl", "eval_samples.jsonl")


class CheckpointError(Exception):
    """A checkpoint that is missing, incomplete, altered or unsafe to read."""


def write_atomically(final: Path, write: Callable[[Path], None], step: int, extra: dict | None = None) -> Path:
    """Run `write(tmp_dir)`, seal it with a manifest, then rename it to `final`.

    A crash or exception at any point leaves `final` as it was (absent, or the previous checkpoint):
    the new directory appears under its name only once complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{writer()}-", dir=final.parent))
    try:
        (tmp / PARTIAL).touch()  # first: a kill at any later moment leaves a directory provably lora-rl's
        with writing(final):  # a library's write that fills the disk names no path
            write(tmp)
            _honour_umask(tmp)
            _write_manifest(tmp, step, extra or {})
        (tmp / PARTIAL).unlink()  # the manifest marks it from now on
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def umask() -> int:
    mask = os.umask(0o077)  # the only way to read it is to set it: set it back at once
    os.umask(mask)
    return mask


def _honour_umask(directory: Path) -> None:
    """Give everything under `directory` the mode the umask gives new files: mkdtemp makes directories 0700
    and safetensors writes files 0600, which teammates on a shared cluster could not read."""
    mask = umask()
    for path in [directory, *directory.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _write_manifest(directory: Path, step: int, extra: dict) -> None:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p != directory / PARTIAL):
        _fsync(path)  # data on disk before the manifest vouches for it
        files[path.relative_to(directory).as_posix()] = sha256(path)
    manifest = {"format": FORMAT, "step": step, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "versions": library_versions(), "files": files, **extra}  # fmt: skip
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _fsync(directory / MANIFEST)


def _replace_dir(new: Path, final: Path) -> None:
    """Move `new` to `final`; an existing `final` (lora-rl's own, or empty) is moved aside first and deleted only
    afterwards."""
    old = None
    if final.exists() or final.is_symlink():
        refuse_foreign([final], allow_empty=True)
        old = final.with_name(f".{final.name}.old-{writer()}")
        os.replace(final, old)
    os.replace(new, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_file_atomically(path: Path, text: str) -> None:
    """Replace the file `path` by one holding `text`: a kill at any moment leaves the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with writing(path), os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync(path.parent)


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


def has_own_manifest(path: Path) -> bool:
    """Whether lora-rl wrote the directory `path`: its manifest is there. Never a symlink (lora-rl makes none, and
    what a link points to is not ours to replace)."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        manifest = read_manifest(path)
    except (CheckpointError, ValueError):  # not JSON, not UTF-8: not a manifest lora-rl wrote
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def is_run_checkpoint(path: Path) -> bool:
    """Whether `path` has the name of a checkpoint (checkpoint-N, final) in a run directory (one with lora-rl's run
    record): what a run there writes, and its --overwrite deletes."""
    return bool(re.fullmatch(r"checkpoint-\d+|final", path.name)) and (path.parent / RUN_RECORD).is_file()


def refuse_foreign(paths: list[Path], recorded: set[str] = frozenset(), allow_empty: bool = False) -> None:
    """Raise naming the first of `paths` lora-rl cannot prove it wrote: a directory without its manifest, a file
    not in the run record (`recorded`), anything behind a symlink."""
    for path in paths:
        ours = path.name in recorded and path.is_file() and not path.is_symlink()
        empty = allow_empty and path.is_dir() and not path.is_symlink() and not any(path.iterdir())
        if not (ours or empty or has_own_manifest(path)):
            raise CheckpointError(
                f"{path}: not written by lora-rl (no manifest.json or run record of its own), "
                "and lora-rl replaces only what it wrote: move it away or use another directory"
            )


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


def recover_interrupted_saves(directory: Path, name: str | None = None) -> list[Path]:
    """Clean up after saves that were killed: in a run directory (under its lock), or only those of entry `name`
    (a merge's OUT_DIR, in its parent). A temporary directory goes; a directory moved aside to be replaced
    (`.NAME.old-...`) is put back when its replacement never arrived, else deleted. Only lora-rl's (its mark or
    manifest inside) and only once their writer is certainly gone (`writer_gone`). Names without a writer (made
    before lora-rl named one) are cleaned only under a run directory's lock, and otherwise returned, for the
    caller to name. In a run directory, the temporary run files of a killed run go too."""
    locked, pattern = name is None, glob.escape(name) if name else "*"
    unproven = []
    for tmp in directory.glob(f".{pattern}.tmp-*"):
        marked = has_own_manifest(tmp) or (not tmp.is_symlink() and (tmp / PARTIAL).is_file())
        if marked and _abandoned(tmp, _WRITTEN_BY_TMP, locked, unproven):
            shutil.rmtree(tmp, ignore_errors=True)
    for old in directory.glob(f".{pattern}.old-*"):
        if not has_own_manifest(old) or not _abandoned(old, _WRITTEN_BY_OLD, locked, unproven):
            continue
        entry = directory / old.name[1:].rsplit(".old-", 1)[0]
        if entry.exists() or entry.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, entry)
    if locked:
        _remove_run_file_temporaries(directory)
    return unproven


# Temporaries name their writer, PID@HOST: `.NAME.tmp-PID@HOST-XXXXXXXX` (mkdtemp's suffix), `.NAME.old-PID@HOST`.
_WRITTEN_BY_TMP = re.compile(r"\.tmp-(\d+)@([^@/]+)-[a-z0-9_]{8}$")
_WRITTEN_BY_OLD = re.compile(r"\.old-(\d+)@([^@/]+)$")


def writer() -> str:
    """This process as temporaries name their writer."""
    return f"{os.getpid()}@{socket.gethostname()}"


def writer_gone(pid: int, host: str) -> bool:
    """Whether a temporary's writer is certainly gone: it ran on this host and runs no more, or it is this very
    process (which is not writing one while it looks for leftovers). A pid on another host (a shared filesystem)
    tells nothing here."""
    if host != socket.gethostname():
        return False
    return pid == os.getpid() or not process_alive(pid)


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host; another user's process counts as running (it cannot be told)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _abandoned(path: Path, written_by: re.Pattern, locked: bool, unproven: list[Path]) -> bool:
    """Whether `path`'s writer is gone; a name without one counts as gone only under the run directory's lock
    (else it joins `unproven`)."""
    match = written_by.search(path.name)
    if match:
        return writer_gone(int(match[1]), match[2])
    if not locked:
        unproven.append(path)
    return locked


def _remove_run_file_temporaries(directory: Path) -> None:
    """The temporary files a run killed while (re)writing a run file leaves (`.recipe.yaml.tmp`,
    `.metrics.jsonl.tmp-XXXXXXXX`): removed in a directory holding lora-rl's run record, by the run that holds its
    lock now (so no run is writing them)."""
    if not (directory / RUN_RECORD).is_file():
        return
    for name in (*RUN_FILES, RUN_RECORD):
        for tmp in directory.glob(f".{glob.escape(name)}.tmp*"):
            if re.fullmatch(rf"\.{re.escape(name)}\.tmp(-[a-z0-9_]{{8}})?", tmp.name) and not tmp.is_symlink():
                with suppress(FileNotFoundError, IsADirectoryError):
                    tmp.unlink()
