"""`lora-rl load`: one base in memory, several adapters on it, compared side by side.

run(): read prompts and NAME=DIR adapters -> check every adapter and that it fits the base -> load the base
once, attach each adapter (peft load_adapter) -> for the base (adapters disabled) and each adapter in turn
(set_adapter): greedy completions, or with --score the rewards of reward adapters -> one rich table.
"""

from __future__ import annotations

import re
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.markup import escape
from rich.table import Table
from torch import nn

from lora_rl import display, merge
from lora_rl.data import DataError, pad, reward_ids
from lora_rl.merge import AdapterSpec
from lora_rl.model import ModelError, classifier_head_name, load_tokenizer, quiet_transformers
from lora_rl.recipe import ModelConfig
from lora_rl.reward_model import RewardModel
from lora_rl.streaming_merge import adapter_parts, first_few, model_layout, reward_labels

NAME = re.compile(r"[A-Za-z0-9_-]+")  # peft keeps adapters in ModuleDicts, whose keys cannot hold dots
BASE = "base"


def run(base_or_adapter: str | Path, adapters: list[str], prompts: list[str], prompts_file: Path | None,
        max_new_tokens: int = 32, score: bool = False) -> dict[str, list]:  # fmt: skip
    """Print the base's and each adapter's completions (or rewards) of the prompts; return them by column."""
    # 1. Inputs, all checked before the base loads.
    if max_new_tokens < 1:
        raise DataError([f"--max-new-tokens: got {max_new_tokens}; expected an integer > 0"])
    texts = read_prompts(prompts, prompts_file)
    named = parse_adapters(adapters)
    first = Path(base_or_adapter)
    if (first / "adapter_config.json").is_file():  # an adapter: its base is the base
        named.insert(0, (re.sub(r"[^A-Za-z0-9_-]", "_", first.resolve().name), first))
        base = merge.read_adapter(first).base
    else:
        base = merge.resolve_base(base_or_adapter, "BASE_OR_ADAPTER")
    refuse_duplicates([name for name, _ in named])
    specs = {name: merge.read_adapter(path, base) for name, path in named}
    check_tasks(specs, score)

    # 2. The base, once; every adapter checked against it, then attached.
    model, tokenizer = load_base(base, specs, score)
    for spec in specs.values():
        refuse_misfit(spec, model)
    head = classifier_head_name(model) if score else None  # found before peft wraps the head
    model = attach(model, specs)

    # 3. Base first (adapters disabled), then each adapter in turn.
    if score:
        columns = {name: rewards(model, tokenizer, texts, name, head) for name in specs}
    else:
        columns = completions(model, tokenizer, texts, list(specs), max_new_tokens)
    print_table(base, texts, columns, score, max_new_tokens)
    return columns


# ---------------------------------------------------------------- inputs


def read_prompts(prompts: list[str], prompts_file: Path | None) -> list[str]:
    """The prompts: from --prompt, or one per non-blank line of --prompts-file."""
    if prompts and prompts_file:
        raise DataError(["give prompts with --prompt or --prompts-file, not both"])
    if prompts_file is not None:
        if not Path(prompts_file).is_file():
            raise DataError([f"--prompts-file: {prompts_file} not found"])
        prompts = [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()]
        if not prompts:
            raise DataError([f"--prompts-file: {prompts_file} holds no prompt"])
    if not prompts:
        raise DataError(["no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE"])
    return prompts


def parse_adapters(adapters: list[str]) -> list[tuple[str, Path]]:
    """NAME=DIR pairs; every malformed one is reported at once."""
    named, problems = [], []
    for item in adapters:
        name, sep, directory = item.partition("=")
        if not sep or not NAME.fullmatch(name) or not directory:
            problems.append(f"--adapter {item}: expected NAME=DIR, NAME made of letters, digits, _ and -")
        else:
            named.append((name, Path(directory)))
    if problems:
        raise DataError(problems)
    return named


def refuse_duplicates(names: list[str]) -> None:
    taken = {BASE}
    for name in names:
        if name in taken:
            raise DataError([f"--adapter {name}: the name is taken; give each adapter its own name (not {BASE!r})"])
        taken.add(name)


def check_tasks(specs: dict[str, AdapterSpec], score: bool) -> None:
    """--score takes reward (SEQ_CLS) adapters only; generation takes causal-LM ones only."""
    for name, spec in specs.items():
        if spec.task == "reward" and not score:
            raise ModelError(f"adapter {name} ({spec.directory}) is a reward (SEQ_CLS) adapter: pass --score")
        if spec.task != "reward" and score:
            raise ModelError(f"adapter {name} ({spec.directory}) is a causal-LM adapter; --score takes reward adapters")
    if score and not specs:
        raise ModelError("--score needs at least one reward adapter (--adapter NAME=DIR)")


# ---------------------------------------------------------------- model


def load_base(base: Path, specs: dict[str, AdapterSpec], score: bool) -> tuple[nn.Module, object]:
    """The base, once: a causal LM, or with --score a sequence classifier for the adapters' reward heads."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer = load_tokenizer(base, ModelConfig(), "base")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"dtype": torch.float32 if device == "cpu" else "auto", "use_safetensors": True}
    with quiet_transformers():  # the classifier's head is reported "missing": each adapter brings its own
        if score:
            first = next(iter(specs.values()))
            labels = reward_labels(first.header, first.config)
            model = AutoModelForSequenceClassification.from_pretrained(
                base, num_labels=labels, pad_token_id=tokenizer.pad_token_id, **kwargs
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    return model.to(device).eval(), tokenizer


def refuse_misfit(spec: AdapterSpec, model: nn.Module) -> None:
    """An adapter made for another base is refused before anything runs (peft would only warn)."""
    merge.refuse_other_base(spec, model.config)
    problems = adapter_parts(spec.header, spec.config, model_layout(model)).problems
    if problems:
        raise ModelError(f"{spec.directory} does not fit the base: {first_few(problems)}")


def attach(model: nn.Module, specs: dict[str, AdapterSpec]) -> nn.Module:
    """Wrap the base with every adapter, each under its name; the base itself is not copied."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on tied and Conv1D layers: nothing to act on here
        for i, (name, spec) in enumerate(specs.items()):
            if i == 0:
                model = PeftModel.from_pretrained(model, spec.directory, adapter_name=name)
            else:
                model.load_adapter(spec.directory, adapter_name=name)
    return model.eval()


@torch.no_grad()
def complete(model: nn.Module, tokenizer, texts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions, one prompt at a time: no padding, so each is what that prompt alone gives."""
    device = next(model.parameters()).device
    outputs = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
        with quiet_transformers():  # its padding notice fires when a model generates the pad token; no padding here
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        outputs.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return outputs


def completions(model: nn.Module, tokenizer, texts: list[str], names: list[str],
                max_new_tokens: int) -> dict[str, list[str]]:  # fmt: skip
    """Column per model: the base with adapters disabled, then each adapter made active in turn."""
    with model.disable_adapter() if names else nullcontext():
        columns = {BASE: complete(model, tokenizer, texts, max_new_tokens)}
    for name in names:
        model.set_adapter(name)
        columns[name] = complete(model, tokenizer, texts, max_new_tokens)
    return columns


@torch.no_grad()
def rewards(model: nn.Module, tokenizer, texts: list[str], name: str, head: str) -> list[float]:
    """Reward adapter `name`'s reward for each text, read at an EOS after it as training reads it."""
    model.set_adapter(name)  # switches the LoRA layers and the saved score head together
    device = next(model.parameters()).device
    ids, mask = pad(reward_ids(tokenizer, texts), tokenizer.pad_token_id, tokenizer.padding_side)
    return RewardModel(model, head)(ids.to(device), mask.to(device)).tolist()


def print_table(base: Path, texts: list[str], columns: dict[str, list], score: bool, max_new_tokens: int) -> None:
    what = "rewards" if score else f"greedy completions, up to {max_new_tokens} new tokens"
    display.console.print(f"{base}: {what}", markup=False, highlight=False, soft_wrap=True)
    table = Table(show_lines=True)
    table.add_column("prompt")
    for name in columns:
        table.add_column(name, justify="right" if score else "left")
    for i, text in enumerate(texts):  # prompts and completions are plain text, never rich markup
        table.add_row(escape(text), *(f"{col[i]:.4f}" if score else escape(col[i]) for col in columns.values()))
    display.console.print(table)
