"""What the policy wrote: at the first update and every `train.samples_every` updates of ppo and grpo, a few
prompts with their completions and rewards, one JSON line each in `OUTPUT_DIR/samples.jsonl`, and as a table
for the trackers of train.report_to that have one (W&B, ClearML; TensorBoard gets a markdown text summary).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from lora_rl.files import writing
from lora_rl.rl.rollout import Rollout, decode

FILE = "samples.jsonl"
TABLE = "samples"  # the trackers' name for it


def due(update: int, every: int) -> bool:
    """The first update (the policy before it learned anything) and every `every`-th; never with `every` 0."""
    return every > 0 and (update == 1 or update % every == 0)


def pick(rollout: Rollout, rows: list[dict], tokenizer, count: int, update: int) -> list[dict[str, Any]]:
    """`count` of this process's completions, spread evenly over its batch (grpo: one per prompt while the batch has
    more prompts than samples), as records: update, prompt (as the data gives it), completion (decoded as the reward
    read it), reward (the score the reward gave; None where no function judged the row) and, for reward functions,
    each one's own unweighted reward/<name> (None where it returned None)."""
    index = _spread(len(rows), count)
    # a few device-to-host copies, on sampled updates only
    responses = rollout.input_ids[index, rollout.prompt_width :].cpu()
    texts = decode(tokenizer, responses, rollout.mask[index].cpu())
    scores, judged = _readable(rollout.scores[index]), rollout.judged[index].tolist()
    parts = {name: _readable(values[index]) for name, values in rollout.reward_parts.items()}
    records = []
    for k, i in enumerate(index):
        record = {"update": update, "prompt": rows[i]["prompt"], "completion": texts[k],
                  "reward": scores[k] if judged[k] else None}  # fmt: skip
        record |= {f"reward/{name}": None if math.isnan(values[k]) else values[k] for name, values in parts.items()}
        records.append(record)
    return records


def _spread(size: int, count: int) -> list[int]:
    """`count` (at most `size`) row indices evenly spaced over `size` rows, the first one included."""
    taken = min(count, size)
    return [i * size // taken for i in range(taken)]


def _readable(values: torch.Tensor) -> list[float]:
    """float32 rewards as the shortest decimals that read back as them: -0.2, not -0.20000000298023224."""
    return [float(str(value)) for value in values.float().cpu().numpy()]


def log(accelerator, out: Path, records: list[dict[str, Any]]) -> None:
    """Append the records to samples.jsonl and send them to the trackers. Main process only."""
    with writing(out / FILE), open(out / FILE, "a") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    to_trackers(accelerator.trackers, records)


def to_trackers(trackers: list, records: list[dict[str, Any]], table: str = TABLE) -> None:
    """One table per sampled update, at that update: to accelerate's trackers with `log_table` (W&B, ClearML),
    and to TensorBoard, which has no table, as a markdown table in its text plugin. Others get nothing. `table`: its
    name (samples; eval_samples for the held-out prompts' completions)."""
    columns = list(records[0])  # every record of an update has the same keys
    data = [[_cell(record[column]) for column in columns] for record in records]
    update = records[0]["update"]
    for tracker in trackers:
        if hasattr(tracker, "log_table"):
            tracker.log_table(table, columns=columns, data=data, step=update)
        elif tracker.name == "tensorboard":  # accelerate's tracker holds the SummaryWriter
            tracker.tracker.add_text(table, markdown_table(columns, data), global_step=update)


def _cell(value: Any) -> Any:
    """A table cell: chat prompts (message lists) as their JSON text."""
    return value if value is None or isinstance(value, str | int | float) else json.dumps(value)


def markdown_table(columns: list[str], data: list[list[Any]]) -> str:
    """A markdown table whose cells keep their text: pipes escaped, line breaks as <br>."""
    escape = lambda v: "" if v is None else str(v).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    lines = [columns, ["---"] * len(columns), *data]
    return "\n".join("| " + " | ".join(escape(v) for v in line) + " |" for line in lines)
