"""`lora-rl merge`: fold a LoRA adapter into its base and save a model plain transformers loads.

run(): read and check the adapter, its base and OUT_DIR -> plan (does the adapter fit the base?) -> merge,
in memory (peft's merge_and_unload on the base loaded in float32) or streaming (tensor by tensor, see
streaming_merge) -> check the merged model's outputs against the adapter model's -> rename into place.
Everything happens in a temporary directory next to OUT_DIR: a failure at any step leaves OUT_DIR untouched.
"""

from __future__ import annotations

import copy
import re
import shutil
import time
import warnings
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lora_rl import builtin, display
from lora_rl.adapters import streaming_merge
from lora_rl.adapters.streaming_merge import Plan, TensorInfo
from lora_rl.models.build import ModelError, base_fingerprint, load_tokenizer, quiet_transformers
from lora_rl.recipe import ModelConfig, trained_in_4bit
from lora_rl.training import checkpoint
from lora_rl.training.checkpoint import CheckpointError

TASKS = {None: "causal-lm", "CAUSAL_LM": "causal-lm", "SEQ_CLS": "reward"}
# Allowed max |logit diff|, relative to max(1, max |logit|). In float32 only the order of operations differs
# (~1e-6). Rounding the weights to bf16 moved the PPO demo's logits by 4.7% of their max (fp16: 0.5%), so
# these leave about 2x room; a wrong merge (transposed, unscaled delta) moves them by the adapter's effect.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
PROBES = (4, 16)  # probe sequences x tokens
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class AdapterSpec:
    """A checked adapter directory and the base it belongs to."""

    directory: Path
    config: dict  # adapter_config.json
    manifest: dict  # lora-rl's manifest.json ({} for adapters made by other tools)
    base: Path
    task: str  # "causal-lm" or "reward"
    weights: Path
    header: dict[str, TensorInfo]


def run(adapter_dir: Path, out_dir: Path, *, base: str | Path | None = None, dtype: str | None = None,
        force: bool = False, check: bool = True, streaming: bool | None = None) -> Path:  # fmt: skip
    """Merge the adapter in `adapter_dir` into its base, check it, and save it to `out_dir`."""
    from transformers import AutoConfig

    started = time.perf_counter()
    # 1. Inputs: every problem is found before anything is written.
    spec = read_adapter(Path(adapter_dir), base)
    out = Path(out_dir)
    refuse_working_dir(out)
    check_out_dir(out, force, [spec.directory, spec.base])
    refuse_replaced_later(out, spec.directory)
    config = AutoConfig.from_pretrained(spec.base)
    refuse_other_base(spec, config)
    plan = streaming_merge.plan_merge(spec.base, config, spec.task, spec.header, spec.config)
    tokenizer, tokenizer_source = output_tokenizer(spec)
    pad_token_id = classifier_pad_id(tokenizer, spec.task) if tokenizer else default_pad_token_id(config)
    out_dtype = getattr(torch, dtype) if dtype else plan.base_dtype
    budget = memory_budget()
    stream, fits = choose_mode(streaming, plan.float32_bytes, budget)
    if stream:
        refuse_unstreamable(spec, plan)
    print_start(spec, out, plan, stream, streaming is None and stream, out_dtype)
    if trained_in_4bit(spec.directory):
        say(
            "the adapter trained on a 4-bit (NF4) base (actor.model.load_in_4bit in its recipe.yaml): merged into the "
            "full-precision base, never into 4-bit weights; the merged model differs from the quantised one it "
            "trained on by the quantisation error, and the check compares it with the full-precision base + adapter"
        )
    say(f"tokenizer: {tokenizer_source}")
    if check and not fits:
        display.print_warnings([f"skipped the merged-vs-adapter check: running the models needs about "
                                f"{gib(plan.float32_bytes)} in float32, over the budget of {gib(budget)}"])  # fmt: skip
    probes = probe_ids(plan.config, tokenizer) if check and fits else None

    # 2. Merge into a temporary directory next to OUT_DIR, check, then rename it into place.
    def write(tmp: Path) -> None:
        if stream:
            streaming_merge.write_merged(plan, spec.weights, tmp, out_dtype)
            save_config(plan, spec, out_dtype, pad_token_id, tmp)
        reference = None if stream else merge_in_memory(spec, plan, pad_token_id, out_dtype, tmp, probes)
        save_extras(spec, tokenizer, tmp)
        if probes is not None:
            if reference is None:
                reference = logits(load_adapter_model(spec, plan, pad_token_id, untie=False), probes)
            print_check(*check_merged(tmp, spec.task, reference, probes, out_dtype))

    merged_from = {"adapter": str(spec.directory), "base": str(spec.base), "streaming": stream}
    clean_killed_merges(out)
    checkpoint.write_atomically(out, write, step=spec.manifest.get("step", 0), extra={"merged_from": merged_from})
    say(f"saved {out} in {time.perf_counter() - started:.1f}s")
    return out


# ---------------------------------------------------------------- inputs


def read_adapter(directory: Path, base: str | Path | None = None) -> AdapterSpec:
    """The adapter in `directory`, checked (config, manifest, safetensors weights, task) with its base's path.

    `base` overrides the adapter's base_model_name_or_path; a built-in model name is accepted.
    """
    config = checkpoint.read_adapter_config(directory)
    manifest = checkpoint.read_manifest(directory) or {}
    weights = directory / checkpoint.ADAPTER_WEIGHTS
    header = streaming_merge.read_header(weights)
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{directory}: a {config.get('peft_type')} adapter; only LoRA adapters are handled")
    if config.get("task_type") not in TASKS:
        raise ModelError(f"{directory}: task_type {config['task_type']}; expected CAUSAL_LM or SEQ_CLS")
    where = "--base" if base else "base_model_name_or_path in adapter_config.json"
    base_path = resolve_base(base or config.get("base_model_name_or_path"), where)
    return AdapterSpec(directory, config, manifest, base_path, TASKS[config.get("task_type")], weights, header)


def refuse_misfit(spec: AdapterSpec, config, layout: streaming_merge.Layout) -> None:
    """An adapter made for another base (`config`, `layout`: streaming_merge.model_layout) is refused before
    anything runs (peft would only warn)."""
    refuse_other_base(spec, config)
    problems = streaming_merge.adapter_parts(spec.header, spec.config, layout).problems
    if problems:
        raise ModelError(f"{spec.directory} does not fit the base: {streaming_merge.first_few(problems)}")


def resolve_base(name: str | Path | None, where: str) -> Path:
    """The base's local directory; nothing is downloaded."""
    if not name:
        raise ModelError(f"the adapter names no base model ({where} is empty); pass --base DIR")
    if str(name) in builtin.NAMES:
        if missing := builtin.missing_packages(str(name)):
            raise ModelError(missing)
        return builtin.materialize(str(name))
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ModelError(f"base model {name} (from {where}) not found: no config.json there; pass --base DIR")
    return path


def check_out_dir(out: Path, force: bool, inputs: list[Path]) -> None:
    """OUT_DIR must not hold an input, and must be empty, or with --force a lora-rl output (its manifest): what
    lora-rl did not write is never deleted."""
    for path in inputs:
        if out.resolve() == path.resolve() or out.resolve() in path.resolve().parents:
            raise CheckpointError(f"OUT_DIR {out} holds the input {path}; choose another directory")
    if out.is_symlink():
        raise CheckpointError(f"OUT_DIR {out} is a symbolic link; name the directory it points to")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"OUT_DIR {out} is a file")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise CheckpointError(f"OUT_DIR {out} is not empty; pass --force to replace it")
    if not checkpoint.has_own_manifest(out):
        held = streaming_merge.first_few(sorted(p.name for p in out.iterdir()))
        raise CheckpointError(f"OUT_DIR {out} is not a lora-rl output (no manifest.json of its own): --force replaces "
                              f"only those and empty directories; it would delete {held}")  # fmt: skip


def clean_killed_merges(out: Path) -> None:
    """Remove what merges to OUT_DIR that were killed left beside it (their temporary directory), once their
    process is certainly gone; name those whose writer lora-rl cannot tell (made by an older lora-rl)."""
    unproven = checkpoint.recover_interrupted_saves(out.parent, out.name)
    display.print_warnings([f"{path}: left by a merge to {out} that was killed (lora-rl's mark is in it); delete it "
                            "unless a merge to it is running" for path in unproven])  # fmt: skip


def refuse_replaced_later(out: Path, adapter: Path) -> None:
    """OUT_DIR must not lie where lora-rl later deletes or replaces a whole directory, taking the merged model with
    it unasked: inside a checkpoint or merged model (lora-rl's manifest: a run's --overwrite or a merge --force
    replaces it whole), at or under a run directory's checkpoint name (checkpoint-N, final: the run's --overwrite
    deletes them), or inside the adapter directory being merged."""
    resolved = out.resolve()
    for directory in resolved.parents:
        if checkpoint.has_own_manifest(directory):
            raise CheckpointError(f"OUT_DIR {out} is inside {directory}, a lora-rl checkpoint or output (its "
                                  f"{checkpoint.MANIFEST}), which a run's --overwrite or a merge --force replaces "
                                  "whole; choose a directory outside it")  # fmt: skip
    for directory in (resolved, *resolved.parents):
        if checkpoint.is_run_checkpoint(directory):
            where, choose = ("is", "another directory") if directory == resolved else (
                f"is inside {directory},", "a directory outside it")  # fmt: skip
            raise CheckpointError(f"OUT_DIR {out} {where} a checkpoint name (checkpoint-N, final) of the run in "
                                  f"{directory.parent} (its {checkpoint.RUN_RECORD}), which the run's --overwrite "
                                  f"deletes; choose {choose}")  # fmt: skip
    if adapter.resolve() in resolved.parents:
        raise CheckpointError(f"OUT_DIR {out} is inside the adapter directory {adapter}; choose a directory outside it")


def refuse_working_dir(out: Path) -> None:
    """OUT_DIR is replaced by renaming a new directory into place: not possible for the working directory, nor for a
    directory above it (`merge ADAPTER . --force`)."""
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        raise CheckpointError(f"OUT_DIR {out}: the working directory cannot be replaced, nor a directory above it; "
                              "choose another directory")  # fmt: skip


def refuse_other_base(spec: AdapterSpec, config) -> None:
    """An adapter whose manifest records another architecture is refused even where shapes happen to fit."""
    recorded, ours = spec.manifest.get("base_fingerprint"), base_fingerprint(config)
    if recorded is not None and recorded != ours:
        raise ModelError(f"{spec.directory} was made for another base ({recorded}); {spec.base} is {ours}")


def output_tokenizer(spec: AdapterSpec) -> tuple[object | None, str]:
    """The adapter's tokenizer when it saved one (it may have added tokens), else the base's, else none: a merge
    needs no tokenizer (bases saved by training code often have none). Also says which, for the user.

    Loaded as training loads it (model.load_tokenizer), so a reward model's pad token is the one it learnt with.
    """
    if any((spec.directory / name).is_file() for name in TOKENIZER_FILES):
        return load_tokenizer(spec.directory, ModelConfig(), "ADAPTER_DIR"), "the adapter's"
    try:
        return load_tokenizer(spec.base, ModelConfig(), "base"), f"the base's ({spec.base})"
    except ModelError:
        return None, "none (neither the adapter nor the base has one); the merged model has none"


def default_pad_token_id(config) -> int | None:
    """Without a tokenizer: the config's pad token, else EOS, as load_tokenizer would make it."""
    eos = [i for i in eos_ids(config) if i is not None]
    return config.pad_token_id if config.pad_token_id is not None else next(iter(eos), None)


def classifier_pad_id(tokenizer, task: str) -> int | None:
    """The merged reward model's pad_token_id. transformers reads a classifier's reward at the last token that is
    not the pad; with the EOS as pad that is the token before the EOS the reward is read at. None then: plain
    transformers reads an unpadded text + EOS at its EOS, and refuses a padded batch rather than misread it."""
    if task != "reward" or tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer.pad_token_id
    note = "the tokenizer pads with its EOS: the merged reward model has no pad_token_id, so plain transformers"
    display.print_warnings([f"{note} scores one text + EOS at a time (or give it a pad token of its own)"])
    return None


def memory_budget() -> int | None:
    """Half the memory this process can still get, in bytes: MemAvailable, or a container's (cgroup v2)
    limit when lower, which MemAvailable does not show. None when neither can be read."""
    available = []
    with suppress(OSError, TypeError, ValueError):
        meminfo = Path("/proc/meminfo").read_text()
        available.append(int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo)[1]) * 1024)
    with suppress(OSError, ValueError):  # memory.max is "max" when unlimited: int() refuses it
        cgroup = Path("/sys/fs/cgroup")
        available.append(int((cgroup / "memory.max").read_text()) - int((cgroup / "memory.current").read_text()))
    return min(available) // 2 if available else None


def refuse_unstreamable(spec: AdapterSpec, plan: Plan) -> None:
    """What only peft can merge is refused by name rather than written wrong."""
    unsupported = streaming_merge.unsupported_features(spec.config) or plan.unstreamable
    if unsupported:
        what = streaming_merge.first_few(unsupported)
        raise ModelError(f"{spec.directory}: the streaming merge does not support {what}; merge in memory with "
                         "--in-memory (peft)")  # fmt: skip


def choose_mode(streaming: bool | None, float32_bytes: int, budget: int | None) -> tuple[bool, bool]:
    """(stream?, do the models fit the budget?): as asked, else streaming when the models do not fit.

    An in-memory merge, like the check, holds the base in float32.
    """
    fits = budget is None or float32_bytes <= budget
    return (not fits if streaming is None else streaming), fits


# ---------------------------------------------------------------- merging


def load_adapter_model(spec: AdapterSpec, plan: Plan, pad_token_id: int | None, untie: bool) -> nn.Module:
    """The base in float32 with the adapter attached by peft: the model the adapter was trained as."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = {"dtype": torch.float32, "use_safetensors": True}
    if spec.task == "reward":  # a causal-LM base gets a fresh head here; the adapter's saved head replaces it
        kwargs |= {"num_labels": plan.config.num_labels, "pad_token_id": pad_token_id}
    cls = AutoModelForSequenceClassification if spec.task == "reward" else AutoModelForCausalLM
    with quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on tied and fan_in_fan_out layers: handled here
        model = cls.from_pretrained(spec.base, **kwargs)
        if untie:
            untie_weights(model, plan.untied)
        try:
            return PeftModel.from_pretrained(model, spec.directory)
        except RuntimeError as err:  # shapes the plan could not check (layers it does not know) end up here
            raise ModelError(f"{spec.directory} does not fit the base {spec.base}: {err}") from None


def untie_weights(model: nn.Module, groups: list[list[str]]) -> None:
    """Give each name in a tied group its own tensor, so a delta merged into one leaves the others as they were.

    peft's merge_and_unload would otherwise add lm_head's delta to the shared input embedding too.
    """
    for group in groups:
        for name in group[1:]:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            setattr(module, attr, nn.Parameter(getattr(module, attr).detach().clone(), requires_grad=False))
    if groups:
        model.config.tie_word_embeddings = False


def merge_in_memory(spec: AdapterSpec, plan: Plan, pad_token_id: int | None, dtype: torch.dtype, out: Path,
                    probes: torch.Tensor | None) -> torch.Tensor | None:  # fmt: skip
    """peft's merge_and_unload on the float32 base, cast once to `dtype` and saved to `out`.

    Returns the adapter model's logits on `probes`, taken before merging: the check's reference.
    """
    model = load_adapter_model(spec, plan, pad_token_id, untie=True)
    reference = logits(model, probes) if probes is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied-weights note: untied above
        merged = model.merge_and_unload()
    shards = {"max_shard_size": plan.largest_shard_bytes} if plan.sharded else {}
    merged.to(dtype).save_pretrained(out, **shards)
    return reference


def save_config(plan: Plan, spec: AdapterSpec, dtype: torch.dtype, pad_token_id: int | None, out: Path) -> None:
    """The merged model's config (streaming), and the base's generation config for a causal LM."""
    config = copy.deepcopy(plan.config)
    config.architectures = [plan.model_class]
    config.dtype = dtype
    if plan.untied:
        config.tie_word_embeddings = False
    if spec.task == "reward":  # the classifier reads each row's reward at its last non-pad token
        config.pad_token_id = pad_token_id
    config.save_pretrained(out)
    if spec.task == "causal-lm" and (spec.base / "generation_config.json").is_file():
        shutil.copyfile(spec.base / "generation_config.json", out / "generation_config.json")


def save_extras(spec: AdapterSpec, tokenizer, out: Path) -> None:
    """The tokenizer when there is one, and the adapter's recipe when it has one (the merged model describes
    itself)."""
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if (spec.directory / "recipe.yaml").is_file():
        shutil.copyfile(spec.directory / "recipe.yaml", out / "recipe.yaml")


# ---------------------------------------------------------------- check


def probe_ids(config, tokenizer) -> torch.Tensor:
    """(4, 16) seeded token ids without special tokens (a pad would move where a reward is read); without a
    tokenizer, those the config names."""
    if tokenizer is not None:
        size, special = min(len(tokenizer), config.vocab_size), tokenizer.all_special_ids
    else:
        size, special = config.vocab_size, special_ids(config)
    allowed = torch.ones(size, dtype=torch.bool)
    allowed[[i for i in special if i < len(allowed)]] = False
    ids = allowed.nonzero().squeeze(1)
    return ids[torch.randint(len(ids), PROBES, generator=torch.Generator().manual_seed(0))]


def special_ids(config) -> list[int]:
    """The pad, BOS and EOS ids a model config names (EOS may be a list)."""
    return [i for i in (config.pad_token_id, config.bos_token_id, *eos_ids(config)) if i is not None]


def eos_ids(config) -> list[int | None]:
    return config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(N, T, V) LM logits, or (N, num_labels) rewards, in float32; a row at a time, as a classifier without
    pad_token_id (classifier_pad_id) takes them."""
    model.eval()
    return torch.cat([model(input_ids=row[None]).logits.float() for row in ids])


def load_merged(directory: Path, task: str) -> nn.Module:
    """The merged model as users load it: plain transformers, no peft; computed in float32."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if task == "reward" else AutoModelForCausalLM
    with quiet_transformers():
        return cls.from_pretrained(directory, dtype=torch.float32)


def check_merged(directory: Path, task: str, reference: torch.Tensor, probes: torch.Tensor,
                 dtype: torch.dtype) -> tuple[float, float]:  # fmt: skip
    """(max |logit diff|, tolerance) of the merged model against the adapter model's `reference` logits."""
    got = logits(load_merged(directory, task), probes)
    return compare_logits(got, reference, dtype)


def compare_logits(got: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """Raise ModelError when `got` and `reference` differ by more than `dtype`'s tolerance."""
    diff = (got - reference).abs().max().item()
    tolerance = TOLERANCE[dtype] * max(1.0, reference.abs().max().item())
    if not diff <= tolerance:  # NaN fails too
        hint = "" if dtype == torch.float32 else " (--dtype float32 tells rounding from a wrong merge)"
        raise ModelError(f"check failed: merged and adapter logits differ by up to {diff:.3g}, over the "
                         f"{dtype_name(dtype)} tolerance {tolerance:.3g}; nothing was saved{hint}")  # fmt: skip
    return diff, tolerance


# ---------------------------------------------------------------- display


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def gib(size: int | None) -> str:
    return f"{(size or 0) / 2**30:.1f} GiB"


def say(line: str) -> None:
    """One plain line on stdout: paths and names are never read as rich markup."""
    display.console.print(line, markup=False, highlight=False, soft_wrap=True)


def print_start(spec: AdapterSpec, out: Path, plan: Plan, stream: bool, auto: bool, dtype: torch.dtype) -> None:
    mode = "streaming, tensor by tensor" if stream else "in memory, peft merge_and_unload"
    if auto:
        mode += f"; chosen as the base needs {gib(plan.float32_bytes)} in float32"
    say(f"merging {spec.directory} ({len(plan.parts.loras)} LoRA layers) into {spec.base} -> {out} "
        f"({mode}; {dtype_name(dtype)}; {plan.model_class})")  # fmt: skip
    if plan.parts.replacements:
        say(f"taken whole from the adapter: {', '.join(plan.parts.replacements)}")
    if plan.dropped:
        say(f"dropped: {', '.join(plan.dropped)} (no place in {plan.model_class})")
    display.print_warnings([f"{' and '.join(group)} are tied and the adapter changes one of them: the merged "
                            "model unties them (tie_word_embeddings: false)" for group in plan.untied])  # fmt: skip


def print_check(diff: float, tolerance: float) -> None:
    say(f"check: max |logit diff| merged vs adapter {diff:.2e} on {PROBES[0]}x{PROBES[1]} probe tokens "
        f"(tolerance {tolerance:.1e}): ok")  # fmt: skip
