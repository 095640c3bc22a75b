"""Print the recipe key reference (markdown table) that README.md embeds; tests check they agree.

python scripts/recipe_reference.py
"""

from __future__ import annotations

from lora_rl.recipe import COMMANDS, commands_reading, describe_keys


def reference() -> str:
    rows = ["| key | default | read by | meaning |", "|---|---|---|---|"]
    for key, default, doc in describe_keys():
        commands = commands_reading(key)
        read_by = "all" if commands == COMMANDS else ", ".join(commands)
        rows.append(f"| `{key}` | `{default}` | {read_by} | {doc} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
