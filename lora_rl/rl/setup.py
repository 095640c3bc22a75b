"""Before the RL loop runs (train_ppo.run, for ppo and grpo): the recipe's checks, all made before any model
loads (also by `validate --for ppo|grpo`), the loop's sizes (Schedule), and the one base with every role
attached: policy, reference (when the objective needs one), critic (ppo) and reward."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import NamedTuple

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from lora_rl import builtin
from lora_rl.data import Tokenized, check_chat_template, prompt_ids, rows_of, split_rows, tokenize_prompts
from lora_rl.models.build import (
    Built,
    check_model_dir,
    check_model_files,
    classifier_head_name,
    disable_dropout,
    enable_gradient_checkpointing,
    four_bit_problems,
    load_base,
    load_tokenizer,
    resolve_path,
)
from lora_rl.models.context import refuse_overlong
from lora_rl.models.reward_model import RewardModel
from lora_rl.recipe import (
    EvalConfig,
    GenerationConfig,
    Recipe,
    RecipeError,
    TrainConfig,
    held_out_problems,
    trained_chat_template,
    unread_settings,
)
from lora_rl.rl.rewards import RewardError, RewardTerm, check_terms, data_columns, load_prompt_rows
from lora_rl.rl.roles import (
    CRITIC,
    Roles,
    attach_critic,
    attach_reference,
    attach_reward_adapter,
    import_reward_function,
)
from lora_rl.training import checkpoint, distributed, trackers


class Schedule(NamedTuple):
    """The loop's sizes and switches, read from the ppo or the grpo section."""

    command: str
    updates: int
    prompts: int  # distinct prompts per update per process
    generations: int  # completions per prompt (grpo's group)
    epochs: int  # passes over each rollout batch
    reference: str | None
    max_bad_updates: int
    max_update_kl: float | None  # undo an update that moved the policy further than this
    disable_dropout: bool
    batch_key: str  # what the recipe calls the batch, for messages

    @property
    def completions(self) -> int:
        return self.prompts * self.generations

    def optimizer_steps(self, train: TrainConfig) -> int:
        """The run's optimizer steps: each update's epochs over its completions, one step per accumulation group
        (check_recipe makes the completions a multiple of the group)."""
        group = train.batch_size * train.gradient_accumulation_steps
        return self.updates * self.epochs * (self.completions // group)


def schedule_of(recipe: Recipe, command: str) -> Schedule:
    if command == "ppo":
        c = recipe.ppo
        batch = f"ppo.rollout_batch_size: {c.rollout_batch_size}"
        return Schedule("ppo", c.num_updates, c.rollout_batch_size, 1, c.ppo_epochs, c.reference, c.max_bad_updates,
                        c.max_update_kl, c.disable_dropout, batch)  # fmt: skip
    c = recipe.grpo
    batch = f"grpo.prompts_per_step x grpo.num_generations: {c.prompts_per_step} x {c.num_generations}"
    return Schedule("grpo", c.num_steps, c.prompts_per_step, c.num_generations, c.num_iterations, c.reference,
                    c.max_bad_updates, c.max_update_kl, c.disable_dropout, batch)  # fmt: skip


class Inputs(NamedTuple):
    recipe: Recipe  # as it will run (see `with_chat_prompts`)
    rows: list[dict]  # the training prompts
    prompts: Tokenized  # their token ids, as the policy reads them (tokenize_rows)
    eval_rows: list[dict]  # the held-out prompts (data.eval_path or data.eval_fraction); [] without
    terms: list[RewardTerm] | None  # the reward functions, or None (a reward adapter or model)


def check_inputs(recipe: Recipe, recipe_dir: Path | None = None, command: str = "ppo") -> Inputs:
    """Every check `command` (ppo or grpo) makes before it loads a model, also run by `validate --for`: its
    settings, the model and adapter files, the prompts (training and held-out) and the reward functions' import
    (and their arguments against each data file's columns)."""
    check_recipe(recipe, command)
    trackers.check_trackers(recipe)
    check_model_and_reward_files(recipe)
    rows, eval_rows = load_split(recipe)
    check_reward_model_reads_the_prompts(recipe, rows)
    resolved = with_chat_prompts(recipe, rows)
    prompts = check_prompts(resolved, rows)
    terms = import_rewards(recipe, rows, recipe_dir)
    if eval_rows and recipe.data.eval_path:
        check_eval_rows(recipe, rows, eval_rows, terms)
    return Inputs(resolved, rows, prompts, eval_rows, terms)


def check_eval_inputs(recipe: Recipe, recipe_dir: Path | None = None,
                      ) -> tuple[Recipe, list[dict], list[RewardTerm] | None]:  # fmt: skip
    """What `lora-rl eval` reads of a ppo or grpo recipe, checked as those commands check it, before any model
    loads: the model and reward files, one reward source, the held-out prompts (required) and the reward functions'
    arguments against their columns. The training settings are not read. -> (the recipe as it will run, the
    held-out rows, the reward functions or None)"""
    problems = reward_problems(recipe) + eval_problems(recipe) + engine_problems(recipe.generation)
    problems += four_bit_problems(recipe.actor.model)
    if not (recipe.data.eval_path or recipe.data.eval_fraction):
        problems.append("data.eval_path: got null; eval needs held-out prompts: set data.eval_path (a file of "
                        "prompts) or data.eval_fraction (of data.train_path)")  # fmt: skip
    elif recipe.data.eval_fraction and recipe.data.train_path is None:
        problems.append("data.eval_fraction: holds out a share of data.train_path, which is null")
    if problems:
        raise RecipeError(problems)
    check_model_and_reward_files(recipe)
    rows, eval_rows = load_split(recipe)
    check_reward_model_reads_the_prompts(recipe, eval_rows)
    resolved = with_chat_prompts(recipe, eval_rows)
    return resolved, eval_rows, import_rewards(recipe, eval_rows, recipe_dir)


def check_model_and_reward_files(recipe: Recipe) -> None:
    """The base, the adapter to continue, and the reward adapter or model: each readable and fitting."""
    check_model_files(recipe, causal_lm=True)
    if recipe.reward.adapter:
        checkpoint.read_adapter_config(Path(recipe.reward.adapter))
    if recipe.reward.model:
        check_model_dir(recipe.reward.model, recipe.actor.model, "reward.model")


def tokenize_rows(rows: list[dict], tokenizer, recipe: Recipe, template: str = "the chat template") -> Tokenized:
    """The rows' prompts as the policy reads them: through the chat template when the resolved recipe says so
    (with_chat_prompts sets it for chat-message prompts), cut to data.max_length."""
    return tokenize_prompts([row["prompt"] for row in rows], tokenizer, recipe.data.max_length,
                            recipe.generation.chat_template, template)  # fmt: skip


def check_prompts(recipe: Recipe, rows: list[dict]) -> Tokenized:
    """Every prompt as the policy and a chat-templated reward.model will read it, before any weights load (the
    tokenizers are cheap): each chat template rendered (one that raises for a prompt names its rows), and the
    longest sequence against the policy's context window. Returns the policy's token ids: the loop trains on them."""
    cfg, path = recipe.actor.model, recipe.data.train_path
    prompts, tokenizer = [row["prompt"] for row in rows], load_tokenizer(resolve_path(cfg), cfg)
    with rows_of(path):
        tokenized = tokenize_rows(rows, tokenizer, recipe, "the chat template of actor.model.path")
    reward = dataclasses.replace(cfg, path=recipe.reward.model) if recipe.reward.model else None
    if reward and trained_chat_template(resolve_path(reward), "data.chat_template"):  # how load_reward_model reads
        with rows_of(path):
            prompt_ids(load_tokenizer(resolve_path(reward), reward, "reward.model"), prompts, True,
                       template="the chat template of reward.model")  # fmt: skip
    check_context(recipe, tokenized)
    return tokenized


def check_context(recipe: Recipe, prompts: Tokenized) -> None:
    """The longest sequence the loop makes, the longest prompt (cut to data.max_length) + max_new_tokens (+ the
    EOS a reward adapter reads after a completion cut short), against the policy's context window."""
    cut, new = prompts.longest > recipe.data.max_length, recipe.generation.max_new_tokens
    length = min(prompts.longest, recipe.data.max_length)
    source = "data.max_length" if cut else f"the longest prompt, {recipe.data.train_path} row {prompts.longest_row}"
    eos = 1 if recipe.reward.adapter else 0
    detail = f"{length} prompt tokens: {source}; {new} new" + ("; the EOS the reward adapter reads" if eos else "")

    def fix(window: int) -> str:
        if window - new - eos < 1:
            return f"generation.max_new_tokens leaves no room for a prompt: set it below {window - eos}"
        return (f"set data.max_length to at most {window - new - eos} (longer prompts keep their last tokens) or "
                "lower generation.max_new_tokens")  # fmt: skip

    refuse_overlong("data.max_length + generation.max_new_tokens", "a sequence", length + new + eos, detail, fix,
                    recipe.actor.model)  # fmt: skip


def load_split(recipe: Recipe) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): data.eval_path's prompts, or a seeded data.eval_fraction of train_path's rows
    (as train-reward holds out pairs), or none."""
    rows = load_prompt_rows(recipe.data.train_path)
    if recipe.data.eval_path:
        return rows, load_prompt_rows(recipe.data.eval_path)
    return split_rows(rows, recipe.data.eval_fraction, recipe.seed)


def check_eval_rows(recipe: Recipe, rows: list[dict], eval_rows: list[dict], terms: list[RewardTerm] | None) -> None:
    """data.eval_path's prompts as training's: the same form (text or chat messages) and every column the reward
    functions ask for."""
    path = recipe.data.eval_path
    chat, eval_chat = (isinstance(r[0]["prompt"], list) for r in (rows, eval_rows))
    if chat != eval_chat:
        form = {True: "chat messages", False: "text"}
        raise RecipeError([f"data.eval_path: {path}'s prompts are {form[eval_chat]}, data.train_path's are "
                           f"{form[chat]}; give both in the same form"])  # fmt: skip
    try:
        check_terms(terms or [], data_columns(eval_rows))
    except RewardError as err:
        raise RecipeError([f"data.eval_path: {path}: {err}"]) from None


def check_reward_model_reads_the_prompts(recipe: Recipe, rows: list[dict]) -> None:
    """A separate reward model re-reads prompt + completion as text unless it was trained with the chat template:
    chat message prompts have no such text."""
    model = recipe.reward.model
    chat = any(isinstance(row["prompt"], list) for row in rows)
    if model and chat and not trained_chat_template(model, "data.chat_template"):
        raise RecipeError([f"reward.model: {model} reads plain text (it was not trained with data.chat_template: "
                           "true), but the prompts are chat messages; train it with data.chat_template: true, "
                           "or give the prompts as text"])  # fmt: skip


def with_chat_prompts(recipe: Recipe, rows: list[dict]) -> Recipe:
    """Prompts given as chat message lists always go through the chat template: the resolved recipe says so
    (generation.chat_template: true), since it is saved with every checkpoint and read back by `lora-rl load`
    and by the reward-template check to know how the policy saw its prompts."""
    if recipe.generation.chat_template or not any(isinstance(row["prompt"], list) for row in rows):
        return recipe
    return dataclasses.replace(recipe, generation=dataclasses.replace(recipe.generation, chat_template=True))


def check_recipe(recipe: Recipe, command: str = "ppo") -> None:
    """The command's problems with the recipe, all at once, before any model loads."""
    problems = unread_settings(recipe, command) + reward_problems(recipe)
    if recipe.data.train_path is None:
        problems.append("data.train_path: got null; expected a file of prompts (a 'prompt' column)")
    schedule = schedule_of(recipe, command)
    micro, accumulation = recipe.train.batch_size, recipe.train.gradient_accumulation_steps
    if schedule.completions % (micro * accumulation):
        problems.append(
            f"{schedule.batch_key} is not divisible by train.batch_size x train.gradient_accumulation_steps = "
            f"{micro} x {accumulation}; expected a multiple of {micro * accumulation}"
        )
    model = recipe.actor.model
    if schedule.reference == "initial_adapter" and not (model.is_lora and model.lora_path):
        problems.append(f"{command}.reference: initial_adapter needs actor.model.lora_path (the adapter to start from)")
    critic_adapter = command == "ppo" and recipe.critic.mode == "adapter"
    if not model.is_lora and (recipe.reward.adapter or critic_adapter):
        problems.append("reward.adapter and critic.mode: adapter share the policy's base: they need is_lora: true")
    problems += eval_problems(recipe)
    problems += engine_problems(recipe.generation)
    problems += four_bit_problems(model)
    if recipe.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        problems.append(
            "train.mixed_precision: got 'fp16'; fp16 needs a CUDA GPU, this machine has none: use bf16 or no"
        )
    if problems:
        raise RecipeError(problems)


def reward_problems(recipe: Recipe) -> list[str]:
    """The reward comes from exactly one source."""
    reward_keys = [k for k in ("adapter", "model", "function", "functions") if getattr(recipe.reward, k) is not None]
    if len(reward_keys) == 1:
        return []
    found = ", ".join(f"reward.{k}" for k in reward_keys) or "none"
    return [f"reward: set exactly one of reward.adapter, reward.model, reward.function, reward.functions (found: "
            f"{found})"]  # fmt: skip


# the generation keys only the vLLM engine reads (importance weights and the sync check: rl.engine_sync)
VLLM_ONLY = ("vllm_gpu_memory_utilization", "sync_check", "importance_correction", "importance_cap")


def engine_problems(generation: GenerationConfig) -> list[str]:
    """generation.engine: vllm, refused with one line saying why on this machine (the engine is not built yet);
    with hf, a key only the vllm engine reads that is set away from its default."""
    if generation.engine == "hf":
        changed = [name for name in VLLM_ONLY if getattr(generation, name) != getattr(GenerationConfig(), name)]
        return [f"generation.{name}: set to {getattr(generation, name)!r}, but only generation.engine: vllm reads "
                "it; remove it" for name in changed]  # fmt: skip
    refused = "generation.engine: got 'vllm'; "
    if not torch.cuda.is_available():
        return [refused + "vLLM needs a CUDA GPU, this machine has none: use hf"]
    not_built = "the vLLM engine is not built yet in this version (README, On a GPU): use hf"
    if importlib.util.find_spec("vllm") is None:  # finds the package without importing it
        return [refused + f'vllm is not installed (pip install "lora-rl[vllm]"), and {not_built}']
    return [refused + not_built]


def eval_problems(recipe: Recipe) -> list[str]:
    """The evaluation's settings: held-out prompts from one source, evaluation settings only with them, and a
    pass_function that names one of the reward functions."""
    default = EvalConfig()
    changed = [f"train.{name}" for name in ("eval_every", "save_best") if getattr(recipe.train, name)]
    changed += [f"eval.{f.name}" for f in dataclasses.fields(EvalConfig)
                if getattr(recipe.eval, f.name) != getattr(default, f.name)]  # fmt: skip
    if problems := held_out_problems(recipe.data, changed, "prompts"):
        return problems
    if not (recipe.data.eval_path or recipe.data.eval_fraction):
        return []
    wanted = recipe.eval.pass_function
    names = [spec.rpartition(":")[2] for spec, _ in reward_specs(recipe)]
    if wanted is not None and wanted not in names:
        found = f"the reward functions are {', '.join(names)}" if names else "the reward is not a function"
        return [f"eval.pass_function: got {wanted!r}; expected the name of a reward function ({found})"]
    logged = ["eval/reward", "eval/pass@1", f"eval/pass@{recipe.eval.num_samples}"]
    logged += [f"eval/reward/{name}" for name in names]
    best = recipe.train.save_best
    if best is not None and best not in logged:
        return [f"train.save_best: got {best!r}; expected a metric the evaluation logs, where higher is better: "
                f"{', '.join(dict.fromkeys(logged))}"]  # fmt: skip
    return []


def check_launch(accelerator, recipe: Recipe, schedule: Schedule, prompts: int) -> None:
    """Problems that depend on how the command was launched."""
    problems = distributed.launch_problems(accelerator)
    if accelerator.distributed_type.value == "DEEPSPEED":
        problems.append(f"{schedule.command}: DeepSpeed is not supported yet (the loop accumulates gradients itself, "
                        "DeepSpeed steps inside backward): launch with recipes/accelerate/fsdp.yaml or "
                        "multi_gpu.yaml")  # fmt: skip
    needed = schedule.prompts * accelerator.num_processes
    if prompts < needed:
        what = "ppo.rollout_batch_size" if schedule.command == "ppo" else "grpo.prompts_per_step"
        problems.append(f"{what}: {schedule.prompts} x {accelerator.num_processes} process(es) needs {needed} "
                        f"prompts; {recipe.data.train_path} has {prompts}")  # fmt: skip
    if problems:
        raise RecipeError(problems)


def reward_specs(recipe: Recipe) -> list[tuple[str, float]]:
    """(module:function, weight) of reward.function or each of reward.functions; [] for an adapter or model."""
    reward = recipe.reward
    return [(reward.function, 1.0)] if reward.function else [(f.function, f.weight) for f in reward.functions or []]


def import_rewards(recipe: Recipe, rows: list[dict], recipe_dir: Path | None = None) -> list[RewardTerm] | None:
    """reward.function or reward.functions, imported (recipe_dir first) and checked against the data's columns."""
    specs = reward_specs(recipe)
    if not specs:
        return None
    terms = [RewardTerm(import_reward_function(spec, recipe_dir), weight, spec.rpartition(":")[2])
             for spec, weight in specs]  # fmt: skip
    try:
        check_terms(terms, data_columns(rows))
    except RewardError as err:  # found before training: an input problem
        raise RecipeError([str(err)]) from None
    return terms


def setup_roles(built: Built, recipe: Recipe, terms: list[RewardTerm] | None, schedule: Schedule, objective,
                resume_dir: Path | None = None) -> Roles:  # fmt: skip
    """Attach critic (ppo), reference (when the objective needs one) and reward to the policy's base; freeze all
    but policy, critic and heads. When resuming, the value head and critic adapter come from the checkpoint."""
    model, cfg = built.model, recipe.actor.model
    if cfg.is_lora:
        value_head, critic = attach_critic(model, recipe.critic.mode) if objective.critic else (None, None)
        reference = schedule.reference or ("initial_adapter" if cfg.lora_path else "base")
        adapter = None
        if objective.needs_reference:
            adapter = attach_reference(model, reference, cfg.lora_path, cfg.allow_pickle_weights)
        roles = Roles(model, value_head, critic, adapter)
    else:
        value_head = attach_critic(model, "shared")[0] if objective.critic else None
        reference_model = None
        if objective.needs_reference:
            reference_model = load_base(built.report.base_path, cfg, "causal-lm", built.tokenizer).requires_grad_(False)
        roles = Roles(model, value_head, None, None, reference_model=reference_model)
    attach_reward(roles, recipe, terms)
    if resume_dir:
        load_critic(roles, resume_dir)
    roles.freeze_plan()
    if recipe.train.gradient_checkpointing and cfg.is_lora:  # recompute each block under the adapter it ran with
        enable_gradient_checkpointing(model, recipe.train.checkpoint_every_n_layers, roles.checkpoint_contexts)
    if schedule.disable_dropout:
        disable_dropout(model)  # the critic adapter has its own lora_dropout modules: after attach_critic
    return roles


def attach_reward(roles: Roles, recipe: Recipe, terms: list[RewardTerm] | None) -> None:
    """The recipe's one reward source on `roles`: a reward adapter on the shared base (+ its score head), a separate
    reward model, or the reward functions."""
    if recipe.reward.adapter:
        roles.reward_head = attach_reward_adapter(roles.model, recipe.reward.adapter)
    elif recipe.reward.model:
        roles.reward_model, roles.reward_tokenizer, roles.reward_chat_template = load_reward_model(recipe)
    roles.reward_terms = terms


def load_critic(roles: Roles, directory: Path) -> None:
    if roles.value_head is None:
        return
    roles.value_head.load_state_dict(load_file(directory / "value_head.safetensors"))
    if roles.critic_adapter:
        weights = load_file(directory / CRITIC / "adapter_model.safetensors")
        set_peft_model_state_dict(roles.model, weights, adapter_name=CRITIC)


def load_reward_model(recipe: Recipe):
    """A separate sequence classifier, frozen; read at an EOS after each text, as train-reward reads it, and with
    the prompt in the chat template when its saved recipe says it trained so."""
    cfg = dataclasses.replace(recipe.actor.model, path=recipe.reward.model)
    path = resolve_path(cfg)
    tokenizer = load_tokenizer(path, cfg)
    chat_template = bool(trained_chat_template(path, "data.chat_template"))
    if chat_template:
        check_chat_template(tokenizer, f"reward.model: {path}/recipe.yaml says data.chat_template: true")
    model = load_base(path, cfg, "reward", tokenizer).requires_grad_(False).eval()
    return RewardModel(model, classifier_head_name(model)), tokenizer, chat_template


def chat_template_warnings(recipe: Recipe) -> list[str]:
    """A reward adapter or model trained with another chat-template setting than the policy samples with, from
    its saved recipe.yaml. The adapter reads the policy's own token ids, so it scores text formatted unlike its
    training; a separate model re-tokenizes, and gets its prompts formatted as it was trained."""
    policy = recipe.generation.chat_template
    reward = recipe.reward
    source = reward.adapter or (reward.model if reward.model not in builtin.NAMES else None)
    trained = trained_chat_template(source, "data.chat_template") if source else None
    if trained is None or trained == policy:
        return []
    key = "reward.adapter" if reward.adapter else "reward.model"
    mismatch = (f"{key} {source} was trained with data.chat_template: {str(trained).lower()} (its recipe.yaml), the "
                f"policy samples with generation.chat_template: {str(policy).lower()}")  # fmt: skip
    if reward.adapter:
        return [f"{mismatch}: it reads the policy's tokens, formatted unlike its training pairs; train it with "
                f"data.chat_template: {str(policy).lower()}"]  # fmt: skip
    return [f"{mismatch}: its prompts are formatted for it as it was trained"]
