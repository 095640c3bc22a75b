"""Print the recipe key reference (markdown table) that README.md embeds; tests check they agree.

python scripts/recipe_reference.py
"""

from __future__ import annotations

from lora_rl.recipe import describe_keys


def reference() -> str:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{key}` | `{default}` | {doc} |" for key, default, doc in describe_keys()]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
