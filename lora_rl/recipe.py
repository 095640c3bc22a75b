"""Typed recipe schema, YAML loading and strict validation.

Every recipe key is a field of a frozen dataclass below, with its default and a one-line doc
(`key(default, doc)`). `load_recipe` reads the YAML (safe_load, duplicate keys refused), applies
dotted command-line overrides, checks every key and value, and raises one `RecipeError` that lists
every problem at once, before any model is loaded. This module imports no torch: validation is instant.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lora_rl import builtin
from lora_rl.files import writing

# RLinf's list, matched against each module's leaf name; entries a model lacks are skipped.
DEFAULT_TARGET_MODULES = (
    "proj", "qkv", "fc1", "fc2", "q", "kv", "fc3",
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
)  # fmt: skip


class RecipeError(Exception):
    """Every problem found in a recipe, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def one_line(err: BaseException) -> str:
    """`Type: first line of the message`, for a library's error whose message runs over several lines."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0].strip()}" if lines else type(err).__name__


COMMANDS = ("train-reward", "ppo", "grpo")  # the commands that train from a recipe
RL = ("ppo", "grpo")
REWARD = ("train-reward",)


def key(default: Any, doc: str, check: tuple[typing.Callable[[Any], bool], str] | None = None,
        commands: tuple[str, ...] | None = None) -> Any:  # fmt: skip
    """A recipe field: its default, a one-line doc, an optional (predicate, expectation) range check, and the
    commands that read it (None: as its section; a section without it: every command). A command refuses a key it
    does not read that is set away from its default (unread_settings): accepted and ignored, it would mislead."""
    factory = (lambda: list(default)) if isinstance(default, list) else None
    meta = {"doc": doc, "check": check, "commands": commands}
    if factory:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# accelerate's trackers; each name is also the package to install
Tracker = Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"]
POSITIVE = (lambda v: v > 0, "a number > 0")
POSITIVE_INT = (lambda v: v > 0, "an integer > 0")
NON_NEGATIVE = (lambda v: v >= 0, "a number >= 0")
NON_NEGATIVE_INT = (lambda v: v >= 0, "an integer >= 0")
UNIT_INTERVAL_OPEN = (lambda v: 0 <= v < 1, "a number in [0, 1)")


@dataclass(frozen=True)
class ModelConfig:
    path: str = key("tiny-llama", f"local model directory, or a built-in model: {', '.join(builtin.NAMES)}")
    trust_remote_code: bool = key(False, "run Python code shipped with the model directory (off unless you trust it)")
    dtype: Literal["float32", "bfloat16", "float16"] = key("float32", "precision the base weights are loaded in")
    allow_pickle_weights: bool = key(False, "also read .bin/.pt (pickle) weights; only safetensors otherwise")
    is_lora: bool = key(True, "train LoRA adapters on a frozen base; false means full fine-tuning")
    lora_rank: int = key(32, "LoRA rank r", POSITIVE_INT)
    lora_alpha: int | None = key(None, "LoRA alpha; null means 2 x lora_rank", POSITIVE_INT)
    lora_dropout: float = key(0.0, "dropout on the LoRA input", UNIT_INTERVAL_OPEN)
    lora_path: str | None = key(None, "existing adapter directory to continue training from")
    target_modules: list[str] | Literal["all-linear"] | None = key(
        None, "module leaf names to adapt; null means the default list, matched loosely; or all-linear"
    )
    init_lora_weights: bool | Literal["gaussian", "olora", "pissa"] = key(
        "gaussian", "LoRA init: gaussian (RLinf), true (peft default), olora or pissa"
    )
    use_rslora: bool = key(False, "rank-stabilised scaling alpha/sqrt(r) instead of alpha/r")
    load_in_4bit: bool = key(
        False,
        "QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, double quantisation, bf16 compute), with LoRA; needs a "
        "CUDA GPU and bitsandbytes; a reward.model loads so too; merge folds the adapter into the full-precision base",
    )
    num_layers_unfrozen: int = key(
        -1,
        "full fine-tuning only: train just the top N layers; -1 trains all",
        (lambda v: v >= -1, "-1 (all layers) or an integer >= 0"),
    )


@dataclass(frozen=True)
class ActorConfig:
    model: ModelConfig = key(ModelConfig(), "the policy (or reward) model and its adapter")


@dataclass(frozen=True)
class DataConfig:
    train_path: str | None = key(None, "training data: a .jsonl, .json or .parquet file, or a datasets directory")
    eval_path: str | None = key(None, "evaluation data in train_path's format (train-reward: pairs; ppo, grpo: "
                                "prompts with the columns the reward functions read); null holds out eval_fraction "
                                "instead")  # fmt: skip
    eval_fraction: float = key(0.0, "fraction of train_path's rows held out for evaluation (with the seed) when "
                               "eval_path is null; training uses the rest", UNIT_INTERVAL_OPEN)  # fmt: skip
    max_length: int = key(512, "tokens per sequence; longer ones are truncated", POSITIVE_INT)
    drop_long: bool = key(False, "drop pairs longer than max_length instead of truncating them (both are counted)",
                          commands=REWARD)  # fmt: skip
    chat_template: bool = key(
        False,
        "train-reward: each pair's prompt as a user message of the tokenizer's chat template, then the answer, as "
        "ppo/grpo show a completion to the reward; match the policy's generation.chat_template",
        commands=REWARD,
    )


@dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = key(1e-4, "peak AdamW learning rate", POSITIVE)
    batch_size: int = key(8, "examples per process per micro-batch", POSITIVE_INT)
    gradient_accumulation_steps: int = key(1, "micro-batches per optimizer step", POSITIVE_INT)
    num_epochs: int = key(1, "passes over the training data (unless max_steps is set)", POSITIVE_INT, REWARD)
    max_steps: int | None = key(None, "optimizer steps to run; overrides num_epochs", POSITIVE_INT, REWARD)
    lr_scheduler: Literal["linear", "cosine", "constant"] = key(
        "linear", "decay after warmup, over the run's optimizer steps (every command)"
    )
    warmup_ratio: float = key(0.0, "fraction of optimizer steps with linear warmup", UNIT_INTERVAL_OPEN)
    weight_decay: float = key(0.0, "AdamW weight decay", NON_NEGATIVE)
    max_grad_norm: float | None = key(1.0, "gradient clipping norm; null disables it", POSITIVE)
    mixed_precision: Literal["no", "bf16", "fp16"] = key("no", "autocast precision (accelerate's names)")
    gradient_checkpointing: bool = key(True, "recompute activations in backward to save memory")
    checkpoint_every_n_layers: int = key(
        1, "with gradient_checkpointing: recompute only every N-th layer (faster, more memory); 1: all", POSITIVE_INT
    )
    pack_pairs: bool = key(
        True,
        "reward model: one row per pair, the tokens chosen and rejected share (the prompt) computed once; "
        "needs sdpa or eager attention (otherwise chosen and rejected are padded rows)",
        commands=REWARD,
    )
    center_rewards_coefficient: float | None = key(
        None,
        "reward model: weight of mean((r_chosen + r_rejected)^2) in the loss (TRL); null disables it",
        NON_NEGATIVE,
        REWARD,
    )
    max_bad_steps: int = key(3, "reward model: stop after this many consecutive optimizer steps with a non-finite "
                             "loss or gradient norm (each is skipped)", POSITIVE_INT, REWARD)  # fmt: skip
    log_every: int = key(1, "reward model: optimizer steps between metric lines (ppo, grpo log every update)",
                         POSITIVE_INT, REWARD)  # fmt: skip
    report_to: list[Tracker] = key([], "experiment trackers (accelerate's) that get each metrics line too; "
                                   "their logs go under output_dir")  # fmt: skip
    samples_every: int = key(10, "ppo, grpo: write a few prompts, completions and rewards to samples.jsonl (and the "
                             "trackers) at update 1 and every N-th; 0: never", NON_NEGATIVE_INT, RL)  # fmt: skip
    num_samples: int = key(4, "ppo, grpo: completions written per sampled update, spread over the main process's "
                           "batch", POSITIVE_INT, RL)  # fmt: skip
    eval_every: int = key(0, "optimizer steps (ppo, grpo: updates) between evaluations on the eval data; 0 "
                          "evaluates only at the end", NON_NEGATIVE_INT)  # fmt: skip
    save_best: str | None = key(None, "ppo, grpo: keep best/, the policy of the evaluation with the highest value of "
                                "this metric (eval/reward, eval/pass@K, eval/reward/NAME); null: none",
                                commands=RL)  # fmt: skip
    save_every: int = key(0, "optimizer steps (ppo: updates) between checkpoints; 0 saves only at the end",
                          NON_NEGATIVE_INT)  # fmt: skip
    save_total_limit: int | None = key(None, "keep only the newest N checkpoints (older ones go once a new one is "
                                       "complete); null keeps all", POSITIVE_INT)  # fmt: skip
    resume: str | None = key(
        None, "auto (the latest checkpoint in output_dir, if any), or a checkpoint or run directory"
    )


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = key(32, "tokens sampled per prompt (generation stops earlier at EOS)", POSITIVE_INT)
    temperature: float = key(1.0, "sampling temperature; the policy's log-probs use the same one", POSITIVE)
    top_k: int = key(0, "sample among the k likeliest tokens; 0 disables", NON_NEGATIVE_INT)
    top_p: float = key(1.0, "nucleus sampling mass; 1.0 disables", (lambda v: 0 < v <= 1, "a number in (0, 1]"))
    chat_template: bool = key(False, "wrap each prompt in the tokenizer's chat template as a user message")
    engine: Literal["hf", "vllm"] = key(
        "hf", "what samples: hf (transformers' generate on the policy), or vllm (refused until built: README, On a GPU)"
    )
    # TRL's GRPOConfig default for vLLM colocated with training; vLLM's own 0.9 assumes it has the GPU alone
    vllm_gpu_memory_utilization: float = key(
        0.3,
        "vllm: share of the GPU's memory the engine, colocated with training, may take (TRL's default)",
        (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    )
    sync_check: Literal["error", "warn"] = key(
        "error",
        "vllm: each update, the engine's log-probs of a few sampled tokens against ours: closer to the base or the "
        "previous adapter than to the current policy stops the run (error) or warns",
    )
    importance_correction: Literal["sequence_mask", "sequence_truncate", "token_mask", "token_truncate", "none"] = key(
        "sequence_mask",
        "vllm: weight the loss by exp(ours - engine log-probs), per token or per sequence (summed), masked above "
        "importance_cap or truncated at it (TRL's vllm_importance_sampling_mode); none: no weight",
    )
    importance_cap: float = key(
        3.0,
        "vllm: importance_correction's cap C (TRL's vllm_importance_sampling_clip_max)",
        (lambda v: v >= 1, "a number >= 1 (agreeing log-probs, a ratio of 1, must pass)"),
    )


@dataclass(frozen=True)
class PPOConfig:
    num_updates: int = key(100, "PPO updates (rollout + optimisation) to run", POSITIVE_INT)
    rollout_batch_size: int = key(16, "prompts per update per process; divisible by batch_size x accumulation",
                                  POSITIVE_INT)  # fmt: skip
    ppo_epochs: int = key(1, "passes over each rollout batch", POSITIVE_INT)
    reference: Literal["base", "initial_adapter"] | None = key(
        None, "KL reference: the base (adapters off) or the starting adapter; null: initial_adapter with lora_path"
    )
    kl_coef: float = key(0.05, "initial coefficient of the per-token KL penalty", NON_NEGATIVE)
    kl_estimator: Literal["k1", "k3"] = key(
        "k1",
        "per-token KL estimator in the rewards: k1 = log ratio (in expectation, the KL's exact gradient); k3 = "
        "Schulman's low-variance estimate of the KL's value, biased as a reward",
    )
    adaptive_kl: bool = key(False, "adapt kl_coef towards target_kl (Ziegler et al. 2019)")
    target_kl: float = key(6.0, "adaptive KL: target KL per sequence", POSITIVE)
    kl_horizon: int = key(10000, "adaptive KL: horizon in rollout samples", POSITIVE_INT)
    gamma: float = key(1.0, "discount", (lambda v: 0 <= v <= 1, "a number in [0, 1]"))
    lam: float = key(0.95, "GAE lambda", (lambda v: 0 <= v <= 1, "a number in [0, 1]"))
    clip_range: float = key(0.2, "policy ratio clip epsilon", POSITIVE)
    clip_range_value: float = key(0.2, "value clip around the rollout's values", POSITIVE)
    vf_coef: float = key(0.1, "weight of the value loss", NON_NEGATIVE)
    whiten_advantages: bool = key(True, "normalise advantages to mean 0, std 1 per rollout batch")
    missing_eos_penalty: float | None = key(None, "subtracted from the score of a completion without EOS",
                                            NON_NEGATIVE)  # fmt: skip
    normalize_rewards: bool = key(False, "scale scores by a running std and centre them by a running mean")
    reward_clip: float | None = key(None, "clip scores (after normalisation) to [-c, c]", POSITIVE)
    max_bad_updates: int = key(3, "stop after this many consecutive updates with non-finite values", POSITIVE_INT)
    max_update_kl: float | None = key(
        None, "undo an update whose KL(sampling policy || updated policy) per token on its rollout exceeds this "
        "(one more forward per update); null: off", POSITIVE,
    )
    disable_dropout: bool = key(
        True,
        "zero every dropout (the model config's and lora_dropout) while training: rollouts sample without "
        "it, so with it the policy ratio would measure dropout noise (TRL does the same); false keeps it",
    )


@dataclass(frozen=True)
class CriticConfig:
    mode: Literal["shared", "adapter"] = key(
        "shared", "shared: value head on the policy's hidden state; adapter: own LoRA adapter + value head"
    )


@dataclass(frozen=True)
class GRPOConfig:
    num_steps: int = key(100, "steps (sample a group per prompt -> score -> update) to run", POSITIVE_INT)
    prompts_per_step: int = key(8, "prompts per step per process; each gets num_generations completions",
                                POSITIVE_INT)  # fmt: skip
    num_generations: int = key(8, "completions per prompt (a group)",
                               (lambda v: v >= 2, "an integer >= 2 (a group of one has no baseline)"))  # fmt: skip
    advantage: Literal["grpo", "rloo", "reinforce_pp"] = key(
        "grpo", "grpo: reward - group mean, scaled; rloo: leave-one-out baseline; reinforce_pp: REINFORCE++"
    )
    scale_rewards: Literal["group", "batch", "none"] = key(
        "group", "grpo advantage divided by the group's std, the batch's, or none (Dr. GRPO)"
    )
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = key(
        "dapo",
        "dapo: mean over every token of the batch (TRL's default); grpo: per sequence, then over "
        "sequences; dr_grpo: sum / (sequences x max_new_tokens)",
    )
    epsilon: float = key(0.2, "policy ratio clip: [1 - epsilon, 1 + epsilon_high]", POSITIVE)
    epsilon_high: float | None = key(None, "upper clip (DAPO's clip-higher); null: epsilon", POSITIVE)
    num_iterations: int = key(1, "passes over each generation batch (1: the policy that sampled is the one updated)",
                              POSITIVE_INT)  # fmt: skip
    beta: float = key(
        0.0,
        "KL coefficient against the reference (k3 in the loss; reinforce_pp: k1 in the rewards); 0 runs no "
        "reference forward at all",
        NON_NEGATIVE,
    )
    reference: Literal["base", "initial_adapter"] | None = key(
        None, "KL reference (beta > 0): the base or the starting adapter; null: initial_adapter with lora_path"
    )
    max_bad_updates: int = key(3, "stop after this many consecutive steps with non-finite values", POSITIVE_INT)
    max_update_kl: float | None = key(None, "undo an update that moved the policy further (see ppo.max_update_kl)",
                                      POSITIVE)  # fmt: skip
    disable_dropout: bool = key(True, "zero every dropout while training (see ppo.disable_dropout)")


@dataclass(frozen=True)
class EvalConfig:
    num_samples: int = key(1, "completions per held-out prompt: 1 is greedy; k > 1 samples k with the generation "
                           "section's temperature, top_k and top_p (pass@k)", POSITIVE_INT)  # fmt: skip
    pass_threshold: float = key(1.0, "a completion passes when its reward (or pass_function's own) is >= this; a "
                                "prompt passes@k when any of its k completions does")  # fmt: skip
    pass_function: str | None = key(None, "the reward function (its name, as in the metric reward/NAME) whose own "
                                    "reward decides a pass; null: the summed reward")  # fmt: skip
    batch_size: int | None = key(None, "completions generated at once per process (whole prompts, at least one); "
                                 "null: as many as one update samples", POSITIVE_INT)  # fmt: skip


@dataclass(frozen=True)
class RewardFunctionConfig:
    function: str = key("", "package.module:function; called as TRL's GRPOTrainer calls reward functions")
    weight: float = key(1.0, "its weight in the summed reward")


@dataclass(frozen=True)
class RewardConfig:
    adapter: str | None = key(None, "reward adapter directory (from train-reward) on the same base")
    model: str | None = key(None, "a separate sequence-classifier directory (any base), or a built-in model")
    function: str | None = key(None, "package.module:function(prompts, completions, **columns) -> list of floats")
    functions: list[RewardFunctionConfig] | None = key(
        None, "several functions, summed with weights: [{function: pkg.mod:f, weight: 1.0}, ...]"
    )


@dataclass(frozen=True)
class Recipe:
    # numpy takes seeds in [0, 2**32 - 1] only
    seed: int = key(42, "seed for data order, held-out split, initialisation and sampling",
                    (lambda v: 0 <= v < 2**32, f"an integer in [0, {2**32 - 1}]"))  # fmt: skip
    output_dir: str | None = key(None, "where checkpoints, metrics and the resolved recipe go; null: runs/RECIPE_NAME")
    actor: ActorConfig = key(ActorConfig(), "the trained model")
    data: DataConfig = key(DataConfig(), "data files")
    train: TrainConfig = key(TrainConfig(), "optimisation hyper-parameters")
    generation: GenerationConfig = key(GenerationConfig(), "ppo, grpo: sampling of completions", commands=RL)
    ppo: PPOConfig = key(PPOConfig(), "ppo: algorithm hyper-parameters", commands=("ppo",))
    critic: CriticConfig = key(CriticConfig(), "ppo: the value function", commands=("ppo",))
    grpo: GRPOConfig = key(GRPOConfig(), "grpo: algorithm hyper-parameters", commands=("grpo",))
    reward: RewardConfig = key(RewardConfig(), "ppo, grpo: where scores come from; exactly one key", commands=RL)
    eval: EvalConfig = key(EvalConfig(), "ppo, grpo: evaluation on held-out prompts", commands=RL)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        """Write the resolved recipe as YAML, atomically (temp file + rename); a failed write (a full disk)
        leaves no temp file and names `path`."""
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with writing(path):
                tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
                os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


# ---------------------------------------------------------------- loading


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key written twice in one mapping (YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):  # `? [1, 2]` makes a list a key: not hashable, not a name
                kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
                raise yaml.constructor.ConstructorError(
                    None, None, f"a recipe key must be a name, got a {kind}", key_node.start_mark
                )
            name = self.construct_object(key_node, deep=deep)
            if name in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {name!r} appears twice", key_node.start_mark)
            seen.add(name)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """The YAML mapping in `path`; a RecipeError naming the file when it is missing or malformed."""
    if not path.is_file():
        raise RecipeError([f"{path}: recipe file not found"])
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except UnicodeDecodeError as err:
        raise RecipeError([f"{path}: not UTF-8 text (byte {err.start}); expected a YAML file"]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError([f"{path}: invalid YAML{where}: {getattr(err, 'problem', err)}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError([f"{path}: expected a mapping of recipe keys at the top level"])
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> list[str]:
    """Set each `dotted.key=value` (value parsed as YAML) into `data`; returns the problems found."""
    problems = []
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep or not dotted or any(not part for part in dotted.split(".")):
            problems.append(f"override {item!r}: expected KEY=VALUE, e.g. actor.model.lora_rank=16")
            continue
        *parents, leaf = dotted.split(".")
        node = data
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r}: {'.'.join(parents[: depth + 1])} is not a section")
                break
        else:
            try:
                node[leaf] = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError:
                problems.append(f"override {item!r}: the value is not valid YAML")
    return problems


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override, validate and resolve a recipe; raises RecipeError listing every problem."""
    path = Path(path)
    data = read_yaml(path)
    problems = apply_overrides(data, overrides or [])
    recipe = _build(Recipe, data, "", problems)
    problems += _check_paths(recipe)  # keys that failed above hold their defaults here
    if problems:
        raise RecipeError(problems)
    return _resolve(recipe, path)


def _resolve(recipe: Recipe, path: Path) -> Recipe:
    """Fill defaults that depend on other keys, so the saved recipe reproduces the run exactly."""
    model = recipe.actor.model
    if model.lora_alpha is None:
        model = dataclasses.replace(model, lora_alpha=2 * model.lora_rank)
    if model.target_modules == ["all-linear"]:  # the one-item list means the same as the string
        model = dataclasses.replace(model, target_modules="all-linear")
    output_dir = recipe.output_dir or str(Path("runs") / path.stem)
    return dataclasses.replace(recipe, output_dir=output_dir, actor=dataclasses.replace(recipe.actor, model=model))


def recipe_warnings(recipe: Recipe) -> list[str]:
    """Keys that are valid but will be ignored, as users of RLinf and trlx expect."""
    model, default = recipe.actor.model, ModelConfig()
    if model.is_lora:
        if model.num_layers_unfrozen != default.num_layers_unfrozen:
            return ["actor.model.num_layers_unfrozen is ignored when is_lora is true (LoRA trains adapters only)"]
        return []
    lora_keys = ["lora_rank", "lora_dropout", "lora_path", "target_modules", "init_lora_weights", "use_rslora"]
    changed = [k for k in lora_keys if getattr(model, k) != getattr(default, k)]
    if model.lora_alpha != 2 * model.lora_rank:
        changed.append("lora_alpha")
    if changed:
        return [f"actor.model.{', '.join(changed)}: ignored because is_lora is false (full fine-tuning)"]
    return []


def trained_chat_template(directory: str | Path, dotted: str) -> bool | None:
    """The chat-template setting `dotted` (data.chat_template: a reward model; generation.chat_template: a policy)
    in the recipe.yaml lora-rl saved with the adapter or model in `directory`; None when there is none (made by
    another tool). A recipe saved before the key existed trained with its default, false."""
    if not (Path(directory) / "recipe.yaml").is_file():
        return None
    return saved_setting(directory, dotted) is True


def trained_in_4bit(directory: str | Path) -> bool:
    """Whether the adapter in `directory` trained on a 4-bit base: actor.model.load_in_4bit in its saved recipe.yaml
    (an adapter without one, or saved before the key existed, trained on the base as it is)."""
    return saved_setting(directory, "actor.model.load_in_4bit") is True


def saved_setting(directory: str | Path, dotted: str) -> Any:
    """The value of `dotted` in the recipe.yaml lora-rl saved with the adapter or model in `directory`; None when
    there is no such file or key."""
    path = Path(directory) / "recipe.yaml"
    if not path.is_file():
        return None
    node: Any = read_yaml(path)
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


# ---------------------------------------------------------------- validation


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """An instance of dataclass `cls` from `data`; problems are appended, defaults fill their places."""
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or '<top level>'}: got {data!r}; expected a mapping of keys")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in data:
        if name not in fields:
            problems.append(f"{prefix}{name}: unknown key{_did_you_mean(str(name), list(fields))}")
    values = {}
    for name, f in fields.items():
        if name not in data:
            continue
        keypath = f"{prefix}{name}"
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], data[name], keypath + ".", problems)
            continue
        item = _dataclass_items(hints[name])
        if item is not None and isinstance(data[name], list):  # e.g. reward.functions: [{function, weight}, ...]
            values[name] = [_build(item, entry, f"{keypath}[{i}].", problems) for i, entry in enumerate(data[name])]
            continue
        ok, value = _coerce(data[name], hints[name])
        check = f.metadata.get("check")
        if not ok:
            problems.append(f"{keypath}: got {data[name]!r}; expected {_describe(hints[name])}")
        elif isinstance(value, float) and not math.isfinite(value):  # YAML reads .inf and .nan as floats
            problems.append(f"{keypath}: got {value!r}; expected a finite number")
        elif check and value is not None and not check[0](value):
            problems.append(f"{keypath}: got {value!r}; expected {check[1]}")
        else:
            values[name] = value
    return cls(**values)


def _dataclass_items(hint: Any) -> type | None:
    """D for a `list[D] | None` hint whose D is a dataclass, else None."""
    for option in typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,):
        if typing.get_origin(option) is list and dataclasses.is_dataclass(typing.get_args(option)[0]):
            return typing.get_args(option)[0]
    return None


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(choices)}"


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """(True, value converted to `hint`) when it fits, else (False, None). No silent str->int etc."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(hint):
            ok, converted = _coerce(value, option)
            if ok:
                return True, converted
        return False, None
    if origin is Literal:
        return (value in typing.get_args(hint) and type(value) is not bool), value
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str) and item is str:  # `target_modules: q_proj` means one entry
            return False, None
        items = [_coerce(v, item) for v in value] if isinstance(value, list) else [(False, None)]
        return all(ok for ok, _ in items), [v for _, v in items]
    if hint is type(None):
        return value is None, None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        return _as_float(value)
    if hint is str:
        return isinstance(value, str), value
    raise TypeError(f"recipe schema uses an unsupported type {hint!r}")


def _as_float(value: Any) -> tuple[bool, Any]:
    # YAML 1.1 reads 1e-5 (no dot) as a string; accept it as the number the user meant.
    if isinstance(value, bool):
        return False, None
    if isinstance(value, int | float):
        return True, float(value)
    if isinstance(value, str):
        try:
            return True, float(value)
        except ValueError:
            return False, None
    return False, None


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(str(v) for v in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        if typing.get_origin(item) is Literal:
            return "a list, each " + _describe(item)
        return "a list of mappings" if dataclasses.is_dataclass(item) else "a list of strings"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names[hint]


def _missing_packages(name: str | None) -> list[str]:
    """What to install for built-in model `name`, when building it needs packages that are absent."""
    missing = builtin.missing_packages(name) if name in builtin.NAMES else None
    return [missing] if missing else []


def _check_paths(recipe: Recipe) -> list[str]:
    """Files and directories the recipe names must exist: checked here, before any model loads."""
    problems = []
    model = recipe.actor.model
    problems += [f"actor.model.path: {missing}" for missing in _missing_packages(model.path)]
    if model.path not in builtin.NAMES and not Path(model.path).is_dir():
        problems.append(
            f"actor.model.path: {model.path!r} is not a directory; expected a local model directory "
            f"or one of the built-in models: {', '.join(builtin.NAMES)}"
        )
    if model.lora_path is not None and not (Path(model.lora_path) / "adapter_config.json").is_file():
        problems.append(
            f"actor.model.lora_path: {model.lora_path!r} has no adapter_config.json; expected an adapter directory"
        )
    if recipe.reward.adapter is not None and not (Path(recipe.reward.adapter) / "adapter_config.json").is_file():
        problems.append(
            f"reward.adapter: {recipe.reward.adapter!r} has no adapter_config.json; expected an adapter directory"
        )
    reward_model = recipe.reward.model
    built_in = reward_model in builtin.NAMES
    problems += [f"reward.model: {missing}" for missing in _missing_packages(reward_model)]
    if reward_model is not None and not built_in and not (Path(reward_model) / "config.json").is_file():
        problems.append(
            f"reward.model: {reward_model!r} has no config.json; expected a model directory or a built-in model"
        )
    if recipe.output_dir is not None:  # the first part of it that exists must be a directory
        out = Path(recipe.output_dir)
        existing = next((p for p in (out, *out.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            problems.append(f"output_dir: {str(existing)!r} is a file; expected a directory")
    for name in ("train_path", "eval_path"):
        value = getattr(recipe.data, name)
        if value is not None and not Path(value).exists():
            problems.append(f"data.{name}: {value!r} does not exist; expected a data file or directory")
    return problems


def held_out_problems(data: DataConfig, settings: list[str], what: str) -> list[str]:
    """The held-out `what` (prompts, pairs) come from one source, and each of `settings` (keys set that evaluate
    on them) finds some."""
    if data.eval_path and data.eval_fraction:
        return [f"data.eval_path and data.eval_fraction: both set ({data.eval_path}, {data.eval_fraction}); the "
                f"held-out {what} come from one of them: remove the other"]  # fmt: skip
    if data.eval_path or data.eval_fraction:
        return []
    return [f"{name}: set, but there are no held-out {what} to evaluate on: set data.eval_path or data.eval_fraction"
            for name in settings]  # fmt: skip


def unread_settings(recipe: Recipe, command: str) -> list[str]:
    """One line per key set away from its default that `command` does not read (see `key`'s commands)."""
    problems: list[str] = []

    def walk(config: Any, default: Any, prefix: str, inherited: tuple[str, ...] | None) -> None:
        for f in dataclasses.fields(config):
            commands = f.metadata.get("commands") or inherited
            value, default_value = getattr(config, f.name), getattr(default, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, default_value, f"{prefix}{f.name}.", commands)
            elif commands and command not in commands and value != default_value:
                shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
                problems.append(f"{prefix}{f.name}: set to {shown}, but {command} does not read it (only "
                                f"{', '.join(commands)}); remove it")  # fmt: skip

    walk(recipe, Recipe(), "", None)
    return problems


def commands_reading(dotted: str) -> tuple[str, ...]:
    """The commands that read the recipe key `dotted` (e.g. "train.pack_pairs")."""
    config, commands = Recipe, COMMANDS
    for name in dotted.split("."):
        f = next(f for f in dataclasses.fields(config) if f.name == name)
        commands = f.metadata.get("commands") or commands
        config = f.type if isinstance(f.type, type) else typing.get_type_hints(config)[name]
    return commands


def describe_keys(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every recipe key: the reference printed by the README."""
    rows = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or dataclasses.is_dataclass(f.default):
            rows += describe_keys(type(f.default), f"{prefix}{f.name}.")
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rows.append((f"{prefix}{f.name}", yaml.safe_dump(default).split("\n")[0], f.metadata["doc"]))
    return rows
