"""Model building shared by every command: load a base, attach or continue a LoRA adapter.

`build(recipe, head)` returns the model ready to train and a `ModelReport` (what the target
entries matched, parameter counts, warnings) that `validate` and the training commands print.
`head` is "causal-lm" (policy) or "reward" (sequence classifier with one output).
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lora_rl import builtin
from lora_rl.models import lm_head
from lora_rl.recipe import DEFAULT_TARGET_MODULES, ModelConfig, Recipe, one_line
from lora_rl.training import checkpoint

Head = Literal["causal-lm", "reward"]
PEFT_TASK = {"causal-lm": "CAUSAL_LM", "reward": "SEQ_CLS"}


class ModelError(Exception):
    """A model, adapter or target list that cannot serve the recipe; the message says why."""


@dataclass(frozen=True)
class TargetMatch:
    entry: str  # as written in target_modules (or "all-linear")
    modules: list[str]  # full names of the modules it matched


@dataclass
class ModelReport:
    base_path: Path
    head: Head
    is_lora: bool
    head_module: str | None = None  # the reward model's classification layer, e.g. "score"
    matches: list[TargetMatch] = field(default_factory=list)
    trainable: int = 0
    total: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class Built:
    model: nn.Module
    tokenizer: object
    report: ModelReport


def build(recipe: Recipe, head: Head) -> Built:
    """Load the base named by the recipe and make it trainable as the recipe says."""
    cfg = recipe.actor.model
    path = resolve_path(cfg)
    tokenizer = load_tokenizer(path, cfg)
    if head == "causal-lm":
        refuse_logit_processing(path, cfg)
    model = load_base(path, cfg, head, tokenizer)
    if cfg.load_in_4bit:  # peft's QLoRA preparation: base frozen, its other weights in float32; checkpointing below
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    report = ModelReport(base_path=path, head=head, is_lora=cfg.is_lora)
    if head == "reward":
        report.head_module = classifier_head_name(model)
    if cfg.is_lora:
        user_wrote = cfg.target_modules is not None
        report.matches = match_targets(model, cfg.target_modules or list(DEFAULT_TARGET_MODULES), head, user_wrote)
        report.warnings += target_warnings(model, report.matches, user_wrote)
        if cfg.lora_path:
            model = load_trainable_adapter(model, cfg, head, report.matches)
        else:
            model = attach_lora(model, cfg, head, report.matches)
    else:
        freeze_bottom_layers(model, cfg.num_layers_unfrozen)
    if recipe.train.gradient_checkpointing:
        enable_gradient_checkpointing(model, recipe.train.checkpoint_every_n_layers)
    report.trainable, report.total = count_parameters(model)
    return Built(model, tokenizer, report)


# ---------------------------------------------------------------- base model


def materialize_builtins(recipe: Recipe) -> None:
    """Build the recipe's built-in models now, before accelerate starts a process group: from then on
    transformers writes a model only on rank 0, and another rank would save a directory without it."""
    for name in (recipe.actor.model.path, recipe.reward.model):
        if name in builtin.NAMES:
            builtin.materialize(name)


def resolve_path(cfg: ModelConfig) -> Path:
    """The local directory of the base: a built-in model is materialised first."""
    return builtin.materialize(cfg.path) if cfg.path in builtin.NAMES else Path(cfg.path)


def check_model_files(recipe: Recipe, causal_lm: bool = False) -> None:
    """The files `build` reads, checked before anything loads: the base (for a causal LM, first its logit
    processing: refuse_logit_processing), and the adapter to continue (lora_path)."""
    cfg = recipe.actor.model
    if causal_lm and cfg.path not in builtin.NAMES and (Path(cfg.path) / "config.json").is_file():
        refuse_logit_processing(Path(cfg.path), cfg)
    check_model_dir(cfg.path, cfg, "actor.model.path")
    if cfg.is_lora and cfg.lora_path:
        checkpoint.read_adapter_config(Path(cfg.lora_path), cfg.allow_pickle_weights)


def check_model_dir(path: str, cfg: ModelConfig, key: str) -> None:
    """The model directory at `path` holds what `build` reads: weights it may read (safetensors, or pickle when
    allowed) and a tokenizer. Checked before anything loads; built-in models are always whole."""
    if path in builtin.NAMES:
        return
    directory = Path(path)
    checkpoint.refuse_pickle(directory, cfg.allow_pickle_weights)
    readable = MODEL_WEIGHTS + (PICKLE_MODEL_WEIGHTS if cfg.allow_pickle_weights else ())
    if not any((directory / name).is_file() for name in readable):
        raise ModelError(f"{key}: {directory} has no weights: expected {' or '.join(readable)}")
    load_tokenizer(directory, cfg, key)


MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_MODEL_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def load_tokenizer(path: Path, cfg: ModelConfig, key: str = "actor.model.path"):
    """The base's tokenizer, with a pad token (the EOS token when the model defines none); `key` names the
    directory in the error when there is none."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if _saved_tokenizer_class(path) in GENERIC_TOKENIZERS and (Path(path) / "tokenizer.json").is_file():
            # transformers 5 picks the tokenizer class from the model type and ignores a saved generic one:
            # a custom tokenizer.json on, say, a Qwen2 model would load as Qwen2's BPE and encode nothing.
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, TypeError) as err:  # which one depends on the files that are missing
        raise ModelError(f"{key}: {path} has no tokenizer that transformers can load ({one_line(err)})") from None
    # transformers 5 picks the class from the model type and makes a tokenizer without reading any file when the
    # class needs none (GPT-2's BPE: an empty vocabulary, <|endoftext|> alone): not a tokenizer of this model
    vocabulary = {"tokenizer.json", *type(tokenizer).vocab_files_names.values()}
    if not any((Path(path) / name).is_file() for name in vocabulary):
        files = " or ".join(sorted(vocabulary))
        raise ModelError(f"{key}: {path} has no tokenizer that transformers can load (no {files})")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


GENERIC_TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend")


def _saved_tokenizer_class(path: Path) -> str | None:
    config = Path(path) / "tokenizer_config.json"
    return json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None


def load_base(path: Path, cfg: ModelConfig, head: Head, tokenizer) -> nn.Module:
    """The base model from `path`: a causal LM, or a sequence classifier with one output (the reward)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    checkpoint.refuse_pickle(path, cfg.allow_pickle_weights)
    kwargs = {"dtype": getattr(torch, cfg.dtype), "trust_remote_code": cfg.trust_remote_code,
              "use_safetensors": None if cfg.allow_pickle_weights else True}  # fmt: skip
    if cfg.load_in_4bit:
        kwargs |= four_bit_options()
    if head == "reward":
        # pad_token_id lets the classifier find each row's last real token in a padded batch.
        with quiet_transformers():  # it reports the new head as "missing": expected, it is new
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, pad_token_id=tokenizer.pad_token_id, **kwargs
            )
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


# ---------------------------------------------------------------- 4-bit base (QLoRA)


def four_bit_problems(cfg: ModelConfig) -> list[str]:
    """Why the recipe's 4-bit base cannot load here, one line each; checked with the recipe, before any model loads."""
    if not cfg.load_in_4bit:
        return []
    problems = []
    if not cfg.is_lora:
        problems.append("actor.model.load_in_4bit: 4-bit weights cannot be trained themselves; set is_lora: true "
                        "(QLoRA trains LoRA adapters on the 4-bit base)")  # fmt: skip
    if reason := four_bit_unavailable():
        problems.append(f"actor.model.load_in_4bit: {reason}")
    return problems


def four_bit_unavailable() -> str | None:
    """Why this machine cannot load a 4-bit base (bitsandbytes runs on CUDA); None when it can. Imports nothing."""
    if not torch.cuda.is_available():
        return "4-bit (bitsandbytes NF4) needs a CUDA GPU, this machine has none"
    if importlib.util.find_spec("bitsandbytes") is None:
        return '4-bit needs bitsandbytes, which is not installed: pip install "lora-rl[qlora]"'
    return None


def four_bit_options() -> dict:
    """from_pretrained's options for a 4-bit base: QLoRA's NF4 with double quantisation and bf16 compute (Dettmers
    et al. 2023, as peft and TRL configure it), on this process's GPU. Not yet verified on a GPU (README, On a GPU)."""
    from accelerate import PartialState
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    # quantised weights cannot move to another device: load them where this process computes (TRL's kbit device map)
    return {"quantization_config": config, "device_map": {"": PartialState().local_process_index}}


def refuse_logit_processing(path: Path, cfg: ModelConfig) -> None:
    """A causal LM whose forward changes its LM head's output in a way lora-rl's log-probs would not
    (lm_head.lm_logits) is refused before its weights load."""
    from transformers import AutoConfig

    problem = lm_head.unapplied_setting(AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code))
    if problem:
        raise ModelError(f"actor.model.path: {problem}")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(before)


def classifier_head_name(model: nn.Module) -> str:
    """Name of a sequence classifier's output layer (`score` for Llama and GPT-2, `classifier` elsewhere).

    Found as the top-level linear layer with num_labels outputs, rather than assumed.
    """
    num_labels = model.config.num_labels
    for name, module in model.named_children():
        if isinstance(module, nn.Linear) and module.out_features == num_labels:
            return name
    raise ModelError(f"{type(model).__name__}: found no top-level linear head with {num_labels} output(s)")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def enable_gradient_checkpointing(model: nn.Module, every_n_layers: int = 1, context_fn=None) -> None:
    """Recompute activations in backward (every layer, or every N-th: less recomputation, more memory).

    context_fn: torch.utils.checkpoint's (called at each checkpointed forward; returns the contexts of the forward
    and of its recomputation), e.g. roles.Roles.checkpoint_contexts."""
    # With a frozen base the embedding output has no grad; enable_input_require_grads gives it one,
    # otherwise checkpointed blocks would see no input needing grad and skip the adapters' gradients.
    kwargs = {"use_reentrant": False, **({"context_fn": context_fn} if context_fn else {})}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 renamed it
        model.activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers)
    elif every_n_layers == 1:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ModelError("train.checkpoint_every_n_layers > 1 needs transformers with activation_checkpointing_enable")
    model.enable_input_require_grads()
    model.config.use_cache = False  # a KV cache is useless when training and conflicts with recomputation


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout: nn.Dropout modules (GPT-2's, peft's lora_dropout) and the float `attention_dropout`
    that Llama-style attention passes to its kernel while training."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def freeze_bottom_layers(model: nn.Module, num_layers_unfrozen: int) -> None:
    """Full fine-tuning: train every parameter, or (trlx's num_layers_unfrozen) only the top N layers.

    With N >= 0 the embeddings and all but the top N transformer layers are frozen; the final norm and
    head stay trainable (a head tied to the embedding is frozen with it).
    """
    model.requires_grad_(True)
    if num_layers_unfrozen < 0:
        return
    layers = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len)
    for layer in list(layers)[: max(len(layers) - num_layers_unfrozen, 0)]:
        layer.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.requires_grad_(False)


# ---------------------------------------------------------------- target modules


def adaptable_modules(model: nn.Module, head: Head) -> dict[str, nn.Module]:
    """Full name -> module for every layer LoRA can wrap (Linear, transformers' Conv1D).

    A reward model's classification head is left out: it is trained whole (modules_to_save).
    """
    from transformers.pytorch_utils import Conv1D

    skip = classifier_head_name(model) if head == "reward" else None
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear | Conv1D) and name != skip}  # fmt: skip


def leaf_names(model: nn.Module, head: Head) -> list[str]:
    """The distinct leaf names of the model's adaptable layers, in model order."""
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in adaptable_modules(model, head)))


def match_targets(model: nn.Module, targets: list[str] | str, head: Head, user_wrote: bool) -> list[TargetMatch]:
    """Match each target entry against the model's layer names (leaf name, or a dotted suffix).

    The default list is matched loosely (entries the architecture lacks are skipped); in a list the
    user wrote, each entry that matches nothing is an error, and an empty match is always one.
    """
    modules = adaptable_modules(model, head)
    if targets == "all-linear":  # peft's meaning: every linear layer except the output layer
        output = model.get_output_embeddings()
        names = [n for n, m in modules.items() if m is not output]
        return [TargetMatch("all-linear", names)]
    matches = [TargetMatch(entry, [n for n in modules if n == entry or n.endswith("." + entry)])
               for entry in targets]  # fmt: skip
    layer_names = ", ".join(leaf_names(model, head))
    unmatched = [m.entry for m in matches if not m.modules]
    if user_wrote and unmatched:
        raise ModelError(
            f"actor.model.target_modules: {', '.join(unmatched)} matched no layer of this model; "
            f"its linear layers are: {layer_names}"
        )
    if not any(m.modules for m in matches):
        raise ModelError(
            f"actor.model.target_modules: no entry matched a layer of this model; its linear layers are: {layer_names}"
        )
    return matches


def target_warnings(model: nn.Module, matches: list[TargetMatch], user_wrote: bool) -> list[str]:
    """Things users need to know before training on these targets."""
    notes = []
    output = model.get_output_embeddings()
    wrapped = {n for m in matches for n in m.modules}
    head_wrapped = output is not None and any(model.get_submodule(n) is output for n in wrapped)
    if head_wrapped and getattr(model.config, "tie_word_embeddings", False):
        notes.append(
            "lm_head is tied to the input embeddings: vLLM cannot serve a LoRA adapter on it, and merging must "
            "untie it (lora-rl merge does); consider leaving lm_head out of target_modules"
        )
    if not user_wrote and head_wrapped and len(wrapped) == 1:
        notes.append(
            "the default target list matched only the output layer on this architecture; set "
            f"actor.model.target_modules from its linear layers: {', '.join(leaf_names(model, 'causal-lm'))}"
        )
    return notes


def peft_target_names(matches: list[TargetMatch]) -> list[str]:
    """The entries to hand to peft: each matched entry, or the leaf names behind all-linear."""
    if matches and matches[0].entry == "all-linear":
        return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in matches[0].modules))
    return [m.entry for m in matches if m.modules]


# ---------------------------------------------------------------- adapters


def lora_config(cfg: ModelConfig, model: nn.Module, head: Head, matches: list[TargetMatch]):
    """The peft LoraConfig for the recipe's LoRA keys and the matched targets."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    modules = adaptable_modules(model, head)
    conv1d = any(isinstance(modules[n], Conv1D) for m in matches for n in m.modules)
    return LoraConfig(
        task_type=PEFT_TASK[head],
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=peft_target_names(matches),
        init_lora_weights=cfg.init_lora_weights,
        use_rslora=cfg.use_rslora,
        fan_in_fan_out=conv1d,  # Conv1D stores weights (in, out); peft sets it per layer anyway
        # The reward head starts random: it must train whole, or the reward means nothing.
        modules_to_save=[classifier_head_name(model)] if head == "reward" else None,
    )


def attach_lora(model: nn.Module, cfg: ModelConfig, head: Head, matches: list[TargetMatch]):
    """Wrap `model` (in place) with a fresh trainable LoRA adapter."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        # GPT-2 mixes Conv1D blocks with a Linear lm_head; peft fixes fan_in_fan_out per layer and warns.
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", message=".*ensure_weight_tying.*")  # target_warnings says it better
        return get_peft_model(model, lora_config(cfg, model, head, matches))


def load_trainable_adapter(model: nn.Module, cfg: ModelConfig, head: Head, matches: list[TargetMatch]):
    """Continue training the adapter at `cfg.lora_path`, after checking it fits the recipe and the base."""
    from peft import PeftModel

    adapter_dir = Path(cfg.lora_path)
    saved = checkpoint.read_adapter_config(adapter_dir, cfg.allow_pickle_weights)
    problems = adapter_contradictions(saved, cfg, model, head, matches)
    problems += base_contradictions(saved, model, adapter_dir)
    if problems:
        raise ModelError(f"actor.model.lora_path: {adapter_dir} does not fit the recipe: " + "; ".join(problems))
    try:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    except RuntimeError as err:  # shape mismatches surface here as "size mismatch for ..."
        raise ModelError(f"actor.model.lora_path: {adapter_dir} does not fit the base model: {err}") from None


def adapter_contradictions(saved: dict, cfg: ModelConfig, model: nn.Module, head: Head,
                           matches: list[TargetMatch]) -> list[str]:  # fmt: skip
    """How the saved adapter_config contradicts the recipe (rank, alpha, scaling, targets, task)."""
    problems = []
    if saved.get("peft_type") != "LORA":
        problems.append(f"it is a {saved.get('peft_type')} adapter, not LoRA")
    if saved.get("task_type") not in (None, PEFT_TASK[head]):
        problems.append(f"its task_type is {saved['task_type']}, this command needs {PEFT_TASK[head]}")
    for recipe_key, saved_key in (("lora_rank", "r"), ("lora_alpha", "lora_alpha"), ("use_rslora", "use_rslora")):
        if saved.get(saved_key) is not None and saved[saved_key] != getattr(cfg, recipe_key):
            problems.append(
                f"its {saved_key} is {saved[saved_key]}, the recipe's {recipe_key} is {getattr(cfg, recipe_key)}"
            )
    saved_targets = saved.get("target_modules") or []
    saved_targets = "all-linear" if saved_targets == "all-linear" else sorted(saved_targets)
    try:
        theirs = {n for m in match_targets(model, saved_targets, head, user_wrote=False) for n in m.modules}
    except ModelError:
        theirs = set()
    ours = {n for m in matches for n in m.modules}
    if theirs != ours:
        problems.append(f"its target_modules {saved_targets} wrap other layers than the recipe's target_modules")
    return problems


def base_fingerprint(config) -> dict:
    """The architecture facts an adapter depends on, to tell a wrong base from a moved one."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    return {k: getattr(config, k, None) for k in keys}


def base_contradictions(saved: dict, model: nn.Module, adapter_dir: Path) -> list[str]:
    """Whether the adapter was made for another base: compared by architecture, so a moved base still fits."""
    from transformers import AutoConfig

    ours = base_fingerprint(model.config)
    manifest = checkpoint.read_manifest(adapter_dir) or {}
    theirs = manifest.get("base_fingerprint")
    base_dir = Path(saved.get("base_model_name_or_path") or "")
    if theirs is None and (base_dir / "config.json").is_file():
        theirs = base_fingerprint(AutoConfig.from_pretrained(base_dir))
    if theirs is None or theirs == ours:
        return []  # nothing recorded to compare; peft's shape check below still applies
    return [f"it was made for base {base_dir} ({theirs}), the recipe's base is {ours}"]
