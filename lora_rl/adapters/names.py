"""Naming the adapters put side by side on one base (`lora-rl load`, `lora-rl eval`): `--adapter DIR` (named after
its directory) or `--adapter NAME=DIR`. peft keeps adapters in ModuleDicts, whose keys cannot hold dots."""

from __future__ import annotations

import re
from pathlib import Path

from lora_rl.data import DataError

NAME = re.compile(r"[A-Za-z0-9_-]+")


def name_of(directory: Path) -> str:
    """The directory's name, with anything peft cannot take made an underscore."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(directory).resolve().name)


def parse_adapters(items: list[str]) -> list[tuple[str, Path]]:
    """(name, directory) of each `DIR` or `NAME=DIR`; every malformed one is reported at once."""
    named, problems = [], []
    for item in items:
        name, sep, directory = item.partition("=")
        if not sep:
            name, directory = name_of(Path(item)), item
        if not NAME.fullmatch(name) or not directory:
            problems.append(f"--adapter {item}: expected DIR or NAME=DIR, NAME made of letters, digits, _ and -")
        else:
            named.append((name, Path(directory)))
    if problems:
        raise DataError(problems)
    return named


def refuse_duplicates(names: list[str], reserved: set[str]) -> None:
    """Each adapter its own name, none of the `reserved` ones (the base's column, peft's own adapters)."""
    taken = set(reserved)
    for name in names:
        if name in taken:
            raise DataError([f"--adapter {name}: the name is taken; give each adapter its own name (NAME=DIR; not "
                             f"{', '.join(sorted(reserved))})"])  # fmt: skip
        taken.add(name)
