"""Writing files: an OSError says which path it is about, in one line.

Python names the path when opening a file fails, not when a write to it does: a full disk is `[Errno 28] No space
left on device`, nowhere. Each place lora-rl writes wraps the write in `writing(path)`, and the command line prints
`describe(err)`: `No space left on device: runs/x/recipe.yaml`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """An OSError the system raised inside (it has an errno) without a path gets `path`."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.strerror:  # OSError("message") would print "[Errno None] None: path"
            err.filename = str(path)
        raise


def describe(err: OSError) -> str:
    """The cause, then the path(s): `No space left on device: /path`, as shell tools say it."""
    cause = err.strerror or str(err) or type(err).__name__
    paths = " -> ".join(str(path) for path in (err.filename, err.filename2) if path is not None)
    return f"{cause}: {paths}" if paths else cause
