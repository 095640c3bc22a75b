"""Data from local files via `datasets`: preference pairs, with row-numbered errors; tokenizing; padding.

Files: `.jsonl`, `.json`, `.parquet`, or a directory written by `Dataset.save_to_disk`. Rows are
checked before any model loads; every problem names the file and the row (1-based: the line of a
.jsonl file).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch

from lora_rl.recipe import one_line

MAX_REPORTED = 10  # row problems listed before "... and N more"


class DataError(Exception):
    """Bad data, one line per problem (file and row)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class Pair(NamedTuple):
    """One tokenized preference pair; `margin` is the optional required reward gap (TRL's margin column)."""

    chosen: list[int]
    rejected: list[int]
    margin: float


class PairBatch(NamedTuple):
    """B pairs for one forward pass: 2B rows (chosen, then rejected), or B packed rows (see pack_pairs)."""

    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T), 1 on real tokens; packed: (B, 1, T, T) bool, True where it may attend
    margin: torch.Tensor  # (B,)
    position_ids: torch.Tensor | None = None  # packed: (B, T)
    read_at: torch.Tensor | None = None  # packed: (2B, 2) (row, position) of each chosen, then rejected, EOS

    def model_inputs(self) -> tuple:
        return self.input_ids, self.attention_mask, self.position_ids, self.read_at


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a local data file or saved `datasets` directory, as dicts."""
    path = Path(path)
    if path.suffix == ".jsonl" and path.is_file():
        return _read_jsonl(path)
    builders = {".json": "json", ".parquet": "parquet"}
    if not path.is_dir() and path.suffix not in builders:
        raise DataError([f"{path}: unsupported file type {path.suffix!r}; expected .jsonl, .json, .parquet"])
    import datasets

    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own multi-line log of the error below
    try:
        if path.is_dir():
            return datasets.load_from_disk(str(path)).to_list()
        return datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train").to_list()
    except Exception as err:  # arrow, datasets and OS errors alike: the file is not data datasets can read
        what = "a directory saved by datasets" if path.is_dir() else f"valid {path.suffix[1:]} data"
        raise DataError([f"{path}: not {what} ({one_line(err)})"]) from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line (blank lines skipped), read here: datasets reports neither the line nor the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError([f"{path}: not UTF-8 text (byte {err.start})"]) from None
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError([f"{path}: row {number}: invalid JSON ({err.msg})"]) from None
        if not isinstance(row, dict):
            raise DataError([f"{path}: row {number}: expected a JSON object, got {type(row).__name__}"])
        rows.append(row)
    return rows


def check_pairs(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Every row has non-empty string `chosen` and `rejected`, an optional string `prompt`, and a
    number `margin` either in every row or in none."""
    problems = []
    with_margin = sum(row.get("margin") is not None for row in rows)
    for number, row in enumerate(rows, start=1):
        for name in ("chosen", "rejected"):
            value = row.get(name)
            if value is None:
                problems.append(f"{path}: row {number}: missing {name!r}")
            elif not isinstance(value, str) or not value.strip():
                problems.append(f"{path}: row {number}: {name!r} must be a non-empty string, got {value!r}")
        if row.get("prompt") is not None and not isinstance(row["prompt"], str):
            problems.append(f"{path}: row {number}: 'prompt' must be a string, got {row['prompt']!r}")
        margin = row.get("margin")
        if 0 < with_margin < len(rows) and margin is None:
            problems.append(f"{path}: row {number}: missing 'margin' (other rows have one: all or none)")
        elif margin is not None and (isinstance(margin, bool) or not isinstance(margin, int | float)):
            problems.append(f"{path}: row {number}: 'margin' must be a number, got {margin!r}")
    if not rows:
        problems.append(f"{path}: no rows")
    if len(problems) > MAX_REPORTED:
        problems = problems[:MAX_REPORTED] + [f"{path}: ... and {len(problems) - MAX_REPORTED} more problems"]
    if problems:
        raise DataError(problems)


@contextmanager
def rows_of(path: str | Path) -> Iterator[None]:
    """A DataError raised inside names the file `path` first: the rows its lines name are that file's."""
    try:
        yield
    except DataError as err:
        raise DataError([f"{path}: {problem}" for problem in err.problems]) from None


def load_pairs(path: str | Path) -> list[dict[str, Any]]:
    rows = read_rows(path)
    check_pairs(rows, path)
    return rows


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out) with round(fraction * n) rows held out (at least one when fraction > 0)."""
    if fraction <= 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = max(1, round(fraction * len(rows)))
    if held >= len(rows):
        raise DataError([f"data.eval_fraction: {fraction} of {len(rows)} rows leaves none to train on"])
    return [rows[i] for i in order[held:]], [rows[i] for i in order[:held]]


class Tokenized(NamedTuple):
    pairs: list[Pair]
    truncated: int  # pairs where chosen or rejected exceeded max_length
    dropped: int  # of those, how many were dropped (drop_long)
    longest: int = 0  # the longest prompt's (or kept pair's) length before truncation
    longest_row: int = 0  # its row number
    identical: tuple[int, ...] = ()  # tokenize_pairs: rows kept whose chosen and rejected ids are the same
    cut: int = 0  # of those, how many differed before truncation


def tokenize_pairs(rows: list[dict[str, Any]], tokenizer, max_length: int, drop_long: bool,
                   chat_template: bool = False, numbers: list[int] | None = None) -> Tokenized:  # fmt: skip
    """Tokenize prompt+chosen and prompt+rejected as reward_pair_ids does (plain: the prompt prepended as is, as
    TRL does; chat_template: as ppo and grpo show a completion to a reward adapter), each ending in the EOS its
    reward is read at; a long text keeps its first tokens and the EOS. `numbers`: the rows' numbers in their
    file, for messages (default 1, 2, ...). Pairs whose chosen and rejected end up the same ids are counted:
    they give loss log 2 and accuracy 0 whatever the model does."""
    if not rows:
        return Tokenized([], 0, 0)
    numbers = numbers or list(range(1, len(rows) + 1))
    prompts = [row.get("prompt") or "" for row in rows]
    if chat_template:
        check_chat_template(tokenizer, "data.chat_template is true")
        unprompted = [number for number, prompt in zip(numbers, prompts, strict=True) if not prompt]
        if unprompted:  # a templated user message needs one: an empty turn is not what ppo ever shows
            raise DataError([f"rows {_first(unprompted)}: no 'prompt'; data.chat_template: true formats each pair "
                             "as a prompt (a user message) and its answer"])  # fmt: skip
    chosen = reward_pair_ids(tokenizer, prompts, [row["chosen"] for row in rows], chat_template, numbers)
    rejected = reward_pair_ids(tokenizer, prompts, [row["rejected"] for row in rows], chat_template, numbers)
    empty = [number for number, c, r in zip(numbers, chosen, rejected, strict=True) if len(c) < 2 or len(r) < 2]
    if empty:  # nothing but the EOS to read a reward off; usually a tokenizer that does not fit the data
        raise DataError([f"rows {_first(empty)}: text tokenizes to zero tokens; check the tokenizer and the data"])
    pairs, truncated, identical, cut, longest = [], 0, [], 0, (0, 0)
    for number, row, c, r in zip(numbers, rows, chosen, rejected, strict=True):
        too_long = len(c) > max_length or len(r) > max_length
        truncated += too_long
        if too_long and drop_long:
            continue
        pair = Pair(_keep_last(c, max_length), _keep_last(r, max_length), float(row.get("margin") or 0.0))
        if pair.chosen == pair.rejected:
            identical.append(number)
            cut += c != r
        longest = max(longest, (max(len(c), len(r)), -number))  # the first row of that length
        pairs.append(pair)
    dropped = truncated if drop_long else 0
    return Tokenized(pairs, truncated, dropped, longest[0], -longest[1], tuple(identical), cut)


def with_eos(sequences: list[list[int]], eos_id: int) -> list[list[int]]:
    """Each sequence ending in EOS, appended unless it already ends with one: the position the reward is read at.

    A completion cut at max_new_tokens gets one too, so it is read as the same text with EOS would be (TRL reads
    it at its last token instead, a position the reward model never trained on)."""
    return [ids if ids and ids[-1] == eos_id else [*ids, eos_id] for ids in sequences]


def reward_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """The token ids a reward model reads for each text: the tokenizer's ids (special tokens included), then EOS."""
    return with_eos(tokenizer(texts)["input_ids"], _eos_id(tokenizer))


def reward_pair_ids(tokenizer, prompts: list, texts: list[str], chat_template: bool,
                    numbers: list[int] | None = None) -> list[list[int]]:  # fmt: skip
    """The token ids a reward model reads for each prompt and its answer `text`, then EOS.

    Plain: prompt + text as one string (reward_ids). chat_template: exactly what ppo's reward adapter reads,
    the prompt as the policy sees it (prompt_ids: a user message and the assistant header), then the answer's
    own tokens as the policy samples them (no special tokens added), then EOS."""
    if not chat_template:
        return reward_ids(tokenizer, [p + t for p, t in zip(prompts, texts, strict=True)])
    eos_id = _eos_id(tokenizer)
    answers = tokenizer(texts, add_special_tokens=False)["input_ids"]
    templated = prompt_ids(tokenizer, prompts, True, numbers)
    return with_eos([p + a for p, a in zip(templated, answers, strict=True)], eos_id)


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(["the tokenizer has no EOS token; a reward is read at an EOS appended to each text"])
    return tokenizer.eos_token_id


def check_chat_template(tokenizer, asked_by: str) -> None:
    """A chat template asked for (`asked_by` says by what) where the tokenizer has none: one line, exit 2."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError([f"{asked_by}, but the tokenizer has no chat template"])


def prompt_ids(tokenizer, prompts: list, chat_template: bool, numbers: list[int] | None = None,
               template: str = "the chat template") -> list[list[int]]:  # fmt: skip
    """Token ids per prompt as the policy sees it: a text as is (the tokenizer's special tokens included), or
    through the chat template as a user message followed by the assistant's header; a list of chat messages
    always goes through the template. A template that raises for some prompts (one refusing a system message,
    say) is one DataError naming their rows (`numbers`, default 1, 2, ...) and `template`, and its message."""
    if not chat_template and not (prompts and isinstance(prompts[0], list)):
        return tokenizer(prompts)["input_ids"]
    from jinja2 import TemplateError  # what transformers' templates raise, raise_exception() included

    ids, failed = [], {}
    for number, prompt in zip(numbers or range(1, len(prompts) + 1), prompts, strict=True):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        try:
            ids.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False))  # fmt: skip
        except TemplateError as err:
            failed.setdefault(one_line(err), []).append(number)
    if failed:
        raise DataError([f"{rows_named(rows)}: {template} fails on the prompt ({message})"
                         for message, rows in failed.items()])  # fmt: skip
    return ids


def _keep_last(ids: list[int], max_length: int) -> list[int]:
    """At most max_length ids, the last one (the EOS the reward is read at) kept."""
    return ids if len(ids) <= max_length else ids[: max_length - 1] + ids[-1:]


def _first(numbers: list[int], limit: int = 5) -> str:
    shown = ", ".join(map(str, numbers[:limit]))
    return shown + (f" and {len(numbers) - limit} more" if len(numbers) > limit else "")


def rows_named(numbers: list[int]) -> str:
    """'row 3', 'rows 3, 5', 'rows 1, 2, 3, 4, 5 and 3 more': rows in a message."""
    return f"row {numbers[0]}" if len(numbers) == 1 else f"rows {_first(numbers)}"


def pad(sequences: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (N, longest), padded on `side` ("right" or "left")."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(0, len(seq)) if side == "right" else slice(longest - len(seq), longest)
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


class PairCollator:
    """Pairs -> one PairBatch, so one forward pass scores chosen and rejected: packed (one row per pair)
    or padded (chosen and rejected rows padded together on `side`)."""

    def __init__(self, pad_id: int, side: str = "right", packed: bool = False):
        self.pad_id, self.side, self.packed = pad_id, side, packed

    def __call__(self, pairs: list[Pair]) -> PairBatch:
        if self.packed:
            return pack_pairs(pairs, self.pad_id)
        ids, mask = pad([p.chosen for p in pairs] + [p.rejected for p in pairs], self.pad_id, self.side)
        return PairBatch(ids, mask, _margins(pairs))


PROMPT, CHOSEN, REJECTED = 1, 2, 3  # which part of a packed row a token is (0: padding)


def pack_pairs(pairs: list[Pair], pad_id: int) -> PairBatch:
    """One row per pair: the tokens chosen and rejected share (usually the prompt), then the rest of chosen,
    then the rest of rejected, which sees the shared tokens but not chosen's and continues their positions.
    Each text is then read exactly as on a row of its own, and the shared part is computed once."""
    rows, parts, positions, read_chosen, read_rejected = [], [], [], [], []
    for row, pair in enumerate(pairs):
        shared = shared_prefix(pair.chosen, pair.rejected)
        rest = len(pair.rejected) - shared
        rows.append(pair.chosen + pair.rejected[shared:])
        parts.append([PROMPT] * shared + [CHOSEN] * (len(pair.chosen) - shared) + [REJECTED] * rest)
        positions.append(list(range(len(pair.chosen))) + list(range(shared, len(pair.rejected))))
        read_chosen.append((row, len(pair.chosen) - 1))
        read_rejected.append((row, len(pair.chosen) + rest - 1))
    ids, _ = pad(rows, pad_id, "right")
    part, _ = pad(parts, 0, "right")
    position_ids, _ = pad(positions, 0, "right")
    query, key = part[:, :, None], part[:, None, :]
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    visible = causal & (key != 0) & ((key == PROMPT) | (key == query))
    visible |= torch.eye(ids.shape[1], dtype=torch.bool)  # padding sees itself: no row without a key (no NaN)
    read_at = torch.tensor(read_chosen + read_rejected, dtype=torch.long)
    return PairBatch(ids, visible[:, None], _margins(pairs), position_ids, read_at)


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share, leaving each at least its last token (where it is read)."""
    limit, n = min(len(a), len(b)) - 1, 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def _margins(pairs: list[Pair]) -> torch.Tensor:
    return torch.tensor([p.margin for p in pairs], dtype=torch.float32)


def tokenize_prompts(prompts: list, tokenizer, max_length: int, chat_template: bool,
                     template: str = "the chat template") -> Tokenized:  # fmt: skip
    """Token ids per prompt (prompt_ids): a text (through the chat template as a user message when asked), or a
    list of chat messages (always through the chat template); longer prompts keep their last max_length tokens,
    since generation continues from the end. Returned as Tokenized(pairs=ids, ...), with the longest length."""
    if chat_template or (prompts and isinstance(prompts[0], list)):
        check_chat_template(tokenizer, "prompts are chat messages or generation.chat_template is true")
    ids = prompt_ids(tokenizer, prompts, chat_template, template=template)
    empty = [number for number, seq in enumerate(ids, start=1) if not seq]
    if empty:
        raise DataError([f"rows {_first(empty)}: prompt tokenizes to zero tokens; check the tokenizer and the data"])
    truncated = sum(len(seq) > max_length for seq in ids)
    lengths = [len(seq) for seq in ids]
    longest = max(lengths, default=0)
    row = lengths.index(longest) + 1 if lengths else 0
    return Tokenized([seq[-max_length:] for seq in ids], truncated, 0, longest, row)


class EpochSampler(torch.utils.data.Sampler):
    """A fresh seeded permutation per epoch, from a given offset: the data position is (epoch, offset),
    so a resumed run continues with exactly the examples an uninterrupted one would see."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.offset = 0, 0

    def set_position(self, epoch: int, offset: int = 0) -> None:
        self.epoch, self.offset = epoch, offset

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.offset, self.size))
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return iter(order[self.offset :].tolist())

    def __len__(self) -> int:
        return self.size - self.offset
