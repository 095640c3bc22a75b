"""`lora-rl load`: one base in memory, several adapters on it, compared side by side.

run(): read prompts and NAME=DIR adapters -> check every adapter and that it fits the base -> how each column
formats its prompts (the chat template or not, from each adapter's saved recipe.yaml) -> load the base once,
attach each adapter (peft load_adapter) -> for the base (adapters disabled) and each adapter in turn
(set_adapter): completions (greedy, or sampled with a seed), or with --score the rewards of reward adapters ->
one rich table.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
from rich.markup import escape
from rich.table import Table
from torch import nn

from lora_rl import display
from lora_rl.adapters import merge, names
from lora_rl.adapters.merge import AdapterSpec
from lora_rl.adapters.streaming_merge import model_layout, reward_labels
from lora_rl.data import DataError, check_chat_template, pad, prompt_ids, reward_pair_ids
from lora_rl.models.build import (
    ModelError,
    classifier_head_name,
    four_bit_options,
    four_bit_unavailable,
    load_tokenizer,
    quiet_transformers,
)
from lora_rl.models.lm_head import only_given_sampling
from lora_rl.models.reward_model import RewardModel
from lora_rl.recipe import ModelConfig, trained_chat_template, trained_in_4bit

BASE = "base"


class Sampling(NamedTuple):
    """How completions are drawn: greedy at temperature 0 (the default); otherwise sampled, each cell from
    `seed` (the same draw for every column, and the same table on every run)."""

    temperature: float = 0.0
    top_p: float = 1.0  # 1.0: off
    top_k: int = 0  # 0: off
    seed: int = 0

    def problems(self) -> list[str]:
        found = []
        if self.temperature < 0:
            found.append(f"--temperature: got {self.temperature}; expected 0 (greedy) or a number > 0 (sampling)")
        if not 0 < self.top_p <= 1:
            found.append(f"--top-p: got {self.top_p}; expected a number in (0, 1]")
        if self.top_k < 0:
            found.append(f"--top-k: got {self.top_k}; expected an integer >= 0 (0: off)")
        if not 0 <= self.seed < 2**32:
            found.append(f"--seed: got {self.seed}; expected an integer in [0, {2**32 - 1}]")
        if self.temperature == 0 and (self.top_p != 1 or self.top_k != 0):
            found.append("--top-p and --top-k shape sampling; generation is greedy unless --temperature > 0")
        return found

    def generate_options(self) -> dict:
        """generate()'s options; nothing else shapes sampling (lm_head.only_given_sampling)."""
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}

    def describe(self) -> str:
        if self.temperature == 0:
            return "greedy completions"
        shaped = [f"top-p {self.top_p}"] * (self.top_p != 1) + [f"top-k {self.top_k}"] * (self.top_k != 0)
        return f"sampled completions (temperature {self.temperature}, {', '.join([*shaped, f'seed {self.seed}'])})"


GREEDY = Sampling()


def run(base_or_adapter: str | Path, adapters: list[str], prompts: list[str], prompts_file: Path | None,
        max_new_tokens: int = 32, score: bool = False, sampling: Sampling = GREEDY,
        chat_template: bool | None = None, completions: list[str] | None = None) -> dict[str, list]:  # fmt: skip
    """Print the base's and each adapter's completions (or rewards) of the prompts; return them by column.

    chat_template: None formats each column's prompts as its adapter trained (its recipe.yaml); True or False
    applies to every column. completions (--score only): the answer scored after each prompt."""
    # 1. Inputs, all checked before the base loads.
    problems = sampling.problems()
    if max_new_tokens < 1:
        problems.insert(0, f"--max-new-tokens: got {max_new_tokens}; expected an integer > 0")
    if problems:
        raise DataError(problems)
    texts = read_prompts(prompts, prompts_file)
    answers = read_completions(completions or [], texts, score)
    named = names.parse_adapters(adapters)
    first = Path(base_or_adapter)
    if (first / "adapter_config.json").is_file():  # an adapter: its base is the base
        named.insert(0, (names.name_of(first), first))
        base = merge.read_adapter(first).base
    else:
        base = merge.resolve_base(base_or_adapter, "BASE_OR_ADAPTER")
    names.refuse_duplicates([name for name, _ in named], {BASE})
    specs = {name: merge.read_adapter(path, base) for name, path in named}
    check_tasks(specs, score)
    templated = chat_templates(specs, chat_template, score)
    if score:
        refuse_unanswered(templated, specs, answers, chat_template)
    tokenizer = load_tokenizer(base, ModelConfig(), "base")
    for name, uses in templated.items():
        if uses:
            check_chat_template(tokenizer, template_source(name, specs, chat_template, score))
    quantised = four_bit_base(specs)

    # 2. The base, once; every adapter checked against it, then attached.
    model = load_base(base, tokenizer, specs, score, quantised)
    layout = model_layout(model)
    for spec in specs.values():
        merge.refuse_misfit(spec, model.config, layout)
    head = classifier_head_name(model) if score else None  # found before peft wraps the head
    model = attach(model, specs)

    # 3. Base first (adapters disabled), then each adapter in turn.
    if score:
        columns = {name: rewards(model, tokenizer, texts, answers, name, head, templated[name]) for name in specs}
    else:
        columns = generations(model, tokenizer, texts, templated, max_new_tokens, sampling)
    what = "rewards" if score else f"{sampling.describe()}, up to {max_new_tokens} new tokens"
    print_table(f"{base}: {what}; {template_note(templated)}", texts, answers, columns, score)
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


def read_completions(completions: list[str], texts: list[str], score: bool) -> list[str] | None:
    """--completion: with --score, the answer scored after each prompt (one per prompt, in order)."""
    if not completions:
        return None
    if not score:
        raise DataError(["--completion goes with --score (the answer scored after each prompt)"])
    if len(completions) != len(texts):
        raise DataError([f"--completion: got {len(completions)} for {len(texts)} prompts; expected one per prompt"])
    return completions


def check_tasks(specs: dict[str, AdapterSpec], score: bool) -> None:
    """--score takes reward (SEQ_CLS) adapters only; generation takes causal-LM ones only."""
    for name, spec in specs.items():
        if spec.task == "reward" and not score:
            raise ModelError(f"adapter {name} ({spec.directory}) is a reward (SEQ_CLS) adapter: pass --score")
        if spec.task != "reward" and score:
            raise ModelError(f"adapter {name} ({spec.directory}) is a causal-LM adapter; --score takes reward adapters")
    if score and not specs:
        raise ModelError("--score needs at least one reward adapter (--adapter NAME=DIR)")


def chat_templates(specs: dict[str, AdapterSpec], override: bool | None, score: bool) -> dict[str, bool]:
    """Column -> whether its prompts go through the chat template: `override` for every column when given, else
    as each adapter trained (generation.chat_template of a policy's recipe.yaml, data.chat_template of a reward
    adapter's; no recipe.yaml: plain text). The base column follows the first adapter, so the base and the
    adapter given first see the same input."""
    key = "data.chat_template" if score else "generation.chat_template"
    own = {name: override if override is not None else bool(trained_chat_template(spec.directory, key))
           for name, spec in specs.items()}  # fmt: skip
    if score:
        return own
    base = override if override is not None else next(iter(own.values()), False)
    return {BASE: base, **own}


def template_source(name: str, specs: dict[str, AdapterSpec], override: bool | None, score: bool) -> str:
    """What asked for column `name`'s chat template, for messages."""
    if override is not None:
        return "--chat-template"
    if name == BASE:
        name = next(iter(specs))  # the base follows the first adapter
    key = "data" if score else "generation"
    return f"adapter {name} was trained with {key}.chat_template: true (its recipe.yaml)"


def refuse_unanswered(templated: dict[str, bool], specs: dict[str, AdapterSpec], answers: list[str] | None,
                      override: bool | None) -> None:  # fmt: skip
    """A reward trained on chat-templated pairs reads a prompt (a user message) and its answer: both are needed."""
    for name, uses in templated.items():
        if uses and answers is None:
            raise DataError([f"{template_source(name, specs, override, True)}: a templated reward reads a prompt and "
                             "its answer; give each --prompt its --completion"])  # fmt: skip


def template_note(templated: dict[str, bool]) -> str:
    """Which columns' prompts went through the chat template, for the table's caption."""
    on = [name for name, uses in templated.items() if uses]
    off = [name for name, uses in templated.items() if not uses]
    if not on:
        return "prompts as plain text"
    if not off:
        return "prompts in the chat template"
    return f"prompts in the chat template for {', '.join(on)}, as plain text for {', '.join(off)}"


# ---------------------------------------------------------------- model


def four_bit_base(specs: dict[str, AdapterSpec]) -> bool:
    """Whether the base loads in 4-bit NF4: when every adapter trained on a 4-bit base (its recipe.yaml) and this
    machine can load one (CUDA, bitsandbytes). Otherwise the full-precision base, said in one line when an adapter
    trained on 4-bit: its outputs then differ from the quantised model's by the quantisation error, not refused."""
    trained = [name for name, spec in specs.items() if trained_in_4bit(spec.directory)]
    if not trained:
        return False
    reason = four_bit_unavailable()
    others = [name for name in specs if name not in trained]
    if reason is None and not others:
        merge.say(f"loading the base in 4-bit (NF4), as {', '.join(trained)} trained on it")
        return True
    why = reason or f"{', '.join(others)} trained on the full-precision base"
    merge.say(f"{', '.join(trained)} trained on a 4-bit (NF4) base: loading the full-precision base instead ({why}); "
              "outputs differ from the quantised model's by the quantisation error")  # fmt: skip
    return False


def load_base(base: Path, tokenizer, specs: dict[str, AdapterSpec], score: bool, quantised: bool = False) -> nn.Module:
    """The base, once: a causal LM, or with --score a sequence classifier for the adapters' reward heads; in 4-bit
    NF4 when `quantised` (on this process's GPU, where bitsandbytes places it)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"dtype": torch.float32 if device == "cpu" else "auto", "use_safetensors": True}
    kwargs |= four_bit_options() if quantised else {}
    with quiet_transformers():  # the classifier's head is reported "missing": each adapter brings its own
        if score:
            first = next(iter(specs.values()))
            labels = reward_labels(first.header, first.config)
            model = AutoModelForSequenceClassification.from_pretrained(
                base, num_labels=labels, pad_token_id=tokenizer.pad_token_id, **kwargs
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    return (model if quantised else model.to(device)).eval()  # quantised weights cannot be moved


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
def complete(model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int,
             sampling: Sampling) -> list[str]:  # fmt: skip
    """Completions of token-id prompts, one at a time: no padding, so each is what that prompt alone gives; sampled
    ones each from the seed, so a cell does not depend on the prompts or columns before it."""
    device = next(model.parameters()).device
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        torch.manual_seed(sampling.seed)
        # quiet: its padding notice fires when a model generates the pad token; no padding here
        with quiet_transformers(), only_given_sampling(model):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, **sampling.generate_options())  # fmt: skip
        outputs.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return outputs


def generations(model: nn.Module, tokenizer, texts: list[str], templated: dict[str, bool], max_new_tokens: int,
                sampling: Sampling) -> dict[str, list[str]]:  # fmt: skip
    """Column per model: the base with adapters disabled, then each adapter made active in turn; each column's
    prompts formatted as `templated` says."""
    ids = {uses: prompt_ids(tokenizer, texts, uses) for uses in set(templated.values())}
    names = [name for name in templated if name != BASE]
    with model.disable_adapter() if names else nullcontext():
        columns = {BASE: complete(model, tokenizer, ids[templated[BASE]], max_new_tokens, sampling)}
    for name in names:
        model.set_adapter(name)
        columns[name] = complete(model, tokenizer, ids[templated[name]], max_new_tokens, sampling)
    return columns


@torch.no_grad()
def rewards(model: nn.Module, tokenizer, texts: list[str], answers: list[str] | None, name: str, head: str,
            chat_template: bool) -> list[float]:  # fmt: skip
    """Reward adapter `name`'s reward for each text (and its answer), formatted as that adapter trained and read
    at an EOS after it (data.reward_pair_ids), as training reads it."""
    model.set_adapter(name)  # switches the LoRA layers and the saved score head together
    device = next(model.parameters()).device
    read = reward_pair_ids(tokenizer, texts, answers or [""] * len(texts), chat_template)
    ids, mask = pad(read, tokenizer.pad_token_id, tokenizer.padding_side)
    return RewardModel(model, head)(ids.to(device), mask.to(device)).tolist()


def print_table(caption: str, texts: list[str], answers: list[str] | None, columns: dict[str, list],
                score: bool) -> None:  # fmt: skip
    display.console.print(caption, markup=False, highlight=False, soft_wrap=True)
    table = Table(show_lines=True)
    table.add_column("prompt")
    if answers:
        table.add_column("completion")
    for name in columns:
        table.add_column(name, justify="right" if score else "left")
    for i, text in enumerate(texts):  # prompts and completions are plain text, never rich markup
        given = [escape(text)] + ([escape(answers[i])] if answers else [])
        table.add_row(*given, *(f"{col[i]:.4f}" if score else escape(col[i]) for col in columns.values()))
    display.console.print(table)
