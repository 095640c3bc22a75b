"""`lora-rl ppo`: PPO with a LoRA policy on one shared frozen base.

run(recipe): check everything -> one base serving policy, reference, critic and reward -> for each
update: (1) sample (2) score (3) KL-shaped rewards (4) GAE + whitening (5) PPO epochs (6) KL controller
(7) log (8) checkpoint. Non-finite values skip an update's optimizer steps and its checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from lora_rl import checkpoint, display, ppo, run_lock, train_state
from lora_rl.data import load_prompts, pad, tokenize_prompts
from lora_rl.model import (
    Built,
    base_fingerprint,
    build,
    classifier_head_name,
    load_base,
    load_tokenizer,
    materialize_builtins,
    resolve_path,
)
from lora_rl.recipe import Recipe, RecipeError
from lora_rl.reward_model import RewardModel
from lora_rl.roles import (
    CRITIC,
    ActorCritic,
    Roles,
    attach_critic,
    attach_reference,
    attach_reward_adapter,
    import_reward_function,
)
from lora_rl.rollout import Rollout, collect
from lora_rl.train_state import Interrupt, Interrupted, on_any_process


class BadUpdate(Exception):
    """A non-finite value at an update: nothing from this update is applied or saved."""


@run_lock.releases_lock
def run(recipe: Recipe, overwrite: bool = False, resume: str | None = None, allow_changes: bool = False) -> Path:
    """Run the PPO recipe; returns the final policy adapter directory.

    `resume` (or train.resume): "auto", a checkpoint or a run directory to continue from.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # 1. Everything that can be wrong with the input, before any model loads.
    check_recipe(recipe)
    prompts = load_prompts(recipe.data.train_path)
    reward_function = import_reward(recipe)
    if finished := train_state.finished_run(recipe, resume):
        return finished
    resume_dir = train_state.find_resume(recipe, resume, allow_changes)
    materialize_builtins(recipe)
    accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision)  # accumulation is handled below
    check_launch(accelerator, recipe, len(prompts))
    main = accelerator.is_main_process
    out = train_state.start_output(accelerator, recipe, overwrite, resume_dir, resume)

    # 2. One base, every role (the policy, value head and critic from the checkpoint when resuming).
    set_seed(recipe.seed)
    built = build(train_state.resumed_recipe(recipe, resume_dir), "causal-lm")
    if main:
        display.print_model_report(built.report)
    roles = setup_roles(built, recipe, reward_function, resume_dir)
    actor_critic = ActorCritic(roles, recipe.generation.temperature)
    params = [p for p in actor_critic.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.train.learning_rate, weight_decay=recipe.train.weight_decay)
    trained, optimizer = accelerator.prepare(actor_critic, optimizer)
    batches = PromptBatches(prompts, built.tokenizer, recipe, accelerator.process_index, accelerator.num_processes)
    kl_control = kl_controller(recipe)
    moments = ppo.RunningMoments() if recipe.ppo.normalize_rewards else None
    generators = {"minibatch": torch.Generator().manual_seed(recipe.seed)}
    position = Position()
    # Each process samples its own completions: same weights (DDP broadcast rank 0's), its own sampling stream.
    torch.manual_seed(recipe.seed + accelerator.process_index)
    if resume_dir:
        saved, optimizer_saved = train_state.read_state(resume_dir, generators, accelerator.process_index)
        train_state.load_optimizer_state(accelerator, trained, optimizer, optimizer_saved)
        position = Position(**saved["position"])
        kl_control.load_state_dict(saved["kl_controller"])
        if moments is not None:
            moments.load_state_dict(saved["reward_moments"])
        if main:
            train_state.trim_metrics(out / "metrics.jsonl", "update", position.update)

    def save(name: str, update: int) -> Path:
        state = {"position": position.__dict__, "kl_controller": kl_control.state_dict(),
                 "reward_moments": moments.state_dict() if moments else None}  # fmt: skip
        rng = train_state.rng_states_of_all_ranks()
        optimizer_state = train_state.optimizer_state(accelerator, trained, optimizer)

        def write_state(tmp: Path) -> None:
            train_state.write_state(tmp, optimizer_state, state, generators, rng)

        directory = save_policy(accelerator, trained, roles, built, recipe, out / name, update, write_state)
        if main:
            train_state.rotate(out, recipe.train.save_total_limit)
        return directory

    total = recipe.ppo.num_updates
    with display.Progress(total, "ppo", enabled=main) as progress, Interrupt(accelerator).installed() as interrupt:
        progress.update(position.update, {})
        while position.update < total:
            position.update += 1
            update = position.update
            prompt_texts, prompt_ids, prompt_mask = batches.next(position)
            try:
                # (1)-(2) sample with the policy; old log-probs, values, reference log-probs, scores; inside the
                # prepared module's forward, where FSDP gathers the shared base's blocks
                sample = partial(collect, actor_critic, roles, built.tokenizer, prompt_texts, prompt_ids, prompt_mask,
                                 recipe.generation)  # fmt: skip
                with torch.no_grad():
                    rollout, timings = trained(within=sample)
                check_finite(accelerator, update, rollout)
                # (3)-(4) KL-shaped per-token rewards -> advantages and returns
                scores = shape_scores(rollout, recipe, moments)
                kl = ppo.kl_per_token(rollout.logprobs, rollout.ref_logprobs, recipe.ppo.kl_estimator)
                rewards = ppo.kl_shaped_rewards(scores, kl, rollout.mask, kl_control.value)
                advantages, returns = ppo.gae(rewards, rollout.values, rollout.mask, recipe.ppo.gamma, recipe.ppo.lam)
                if recipe.ppo.whiten_advantages:
                    advantages = ppo.masked_whiten(advantages, rollout.mask)
                # (5) PPO epochs over micro-batches, an optimizer step per accumulation group
                started = time.perf_counter()
                stats = optimise(accelerator, trained, optimizer, rollout, advantages, returns, recipe,
                                 generators["minibatch"], update)  # fmt: skip
            except BadUpdate as err:
                position.bad_in_a_row += 1
                if main:  # the same on every process
                    display.print_warnings([f"{err}; update skipped ({position.bad_in_a_row} in a row)"])
                if position.bad_in_a_row >= recipe.ppo.max_bad_updates:
                    raise BadUpdate(f"stopping: {position.bad_in_a_row} consecutive updates with non-finite values "
                                    f"(ppo.max_bad_updates: {recipe.ppo.max_bad_updates})") from None  # fmt: skip
                continue
            position.bad_in_a_row = 0
            # (6) KL controller: per-sequence KL summed over tokens, averaged over the batch
            sequence_kl = accelerator.reduce((kl * rollout.mask).sum(1).mean(), "mean").item()
            kl_control.update(sequence_kl, len(scores) * accelerator.num_processes)
            # (7) log
            record = update_metrics(accelerator, update, rollout, kl, sequence_kl, stats, timings, kl_control.value)
            record["time_train"] = time.perf_counter() - started
            if main:
                display.append_metrics(out / "metrics.jsonl", record)
            progress.update(update, {"reward": record["reward"], "kl": record["kl"], "len": record["response_length"]})
            # (8) checkpoint, never from a skipped update
            if update < total and interrupt.requested_anywhere():
                raise Interrupted(save(f"checkpoint-{update}", update), update)
            if recipe.train.save_every and update - position.last_saved >= recipe.train.save_every and update < total:
                position.last_saved = update
                save(f"checkpoint-{update}", update)
    final = save("final", total)
    if main:
        display.console.print(f"saved {final}", highlight=False)
    return final


@dataclass
class Position:
    """Where a PPO run is: updates done, the next prompt's (epoch, offset), and the guards' counters."""

    update: int = 0
    epoch: int = 0
    offset: int = 0
    last_saved: int = 0
    bad_in_a_row: int = 0


class PromptBatches:
    """Each update's prompts for this process: a seeded order per epoch (full batches only), dealt out to
    the processes in turn, so the data position is (epoch, offset) for every process count."""

    def __init__(self, prompts: list[str], tokenizer, recipe: Recipe, rank: int, world: int):
        tokenized = tokenize_prompts(prompts, tokenizer, recipe.data.max_length, recipe.generation.chat_template)
        if tokenized.truncated and rank == 0:
            display.print_warnings(
                [f"{tokenized.truncated} prompts exceed data.max_length: their last tokens are kept"]
            )
        self.texts, self.ids, self.pad_id = prompts, tokenized.pairs, tokenizer.pad_token_id
        self.size, self.seed, self.rank, self.world = recipe.ppo.rollout_batch_size, recipe.seed, rank, world

    def next(self, position: Position) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """(texts, (B, P) left-padded ids, mask) for this process; advances `position`."""
        per_update = self.size * self.world
        if position.offset + per_update > len(self.texts):
            position.epoch, position.offset = position.epoch + 1, 0
        order = torch.randperm(len(self.texts), generator=torch.Generator().manual_seed(self.seed + position.epoch))
        start = position.offset + self.rank * self.size
        chosen = order[start : start + self.size].tolist()
        position.offset += per_update
        ids, mask = pad([self.ids[i] for i in chosen], self.pad_id, "left")  # generation continues at the end
        return [self.texts[i] for i in chosen], ids, mask


# ---------------------------------------------------------------- checks and setup


def check_recipe(recipe: Recipe) -> None:
    """PPO-specific problems, all at once, before any model loads."""
    problems = []
    reward_keys = [k for k in ("adapter", "model", "function") if getattr(recipe.reward, k) is not None]
    if len(reward_keys) != 1:
        found = ", ".join(f"reward.{k}" for k in reward_keys) or "none"
        problems.append(f"reward: set exactly one of reward.adapter, reward.model, reward.function (found: {found})")
    if recipe.data.train_path is None:
        problems.append("data.train_path: got null; expected a file of prompts (a 'prompt' column)")
    micro, accumulation = recipe.train.batch_size, recipe.train.gradient_accumulation_steps
    if recipe.ppo.rollout_batch_size % (micro * accumulation):
        problems.append(
            f"ppo.rollout_batch_size: {recipe.ppo.rollout_batch_size} is not divisible by train.batch_size x "
            f"train.gradient_accumulation_steps = {micro} x {accumulation}; "
            f"expected a multiple of {micro * accumulation}"
        )
    model = recipe.actor.model
    if recipe.ppo.reference == "initial_adapter" and not (model.is_lora and model.lora_path):
        problems.append("ppo.reference: initial_adapter needs actor.model.lora_path (the adapter to start from)")
    if not model.is_lora and (recipe.reward.adapter or recipe.critic.mode == "adapter"):
        problems.append("reward.adapter and critic.mode: adapter share the policy's base: they need is_lora: true")
    if recipe.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        problems.append(
            "train.mixed_precision: got 'fp16'; fp16 needs a CUDA GPU, this machine has none: use bf16 or no"
        )
    if problems:
        raise RecipeError(problems)


def check_launch(accelerator, recipe: Recipe, prompts: int) -> None:
    """Problems that depend on how the command was launched."""
    problems = train_state.launch_problems(accelerator)
    if accelerator.distributed_type.value == "DEEPSPEED":
        problems.append("ppo: DeepSpeed is not supported yet (PPO accumulates gradients itself, DeepSpeed steps "
                        "inside backward): launch with recipes/accelerate/fsdp.yaml or multi_gpu.yaml")  # fmt: skip
    needed = recipe.ppo.rollout_batch_size * accelerator.num_processes
    if prompts < needed:
        problems.append(f"ppo.rollout_batch_size: {recipe.ppo.rollout_batch_size} x {accelerator.num_processes} "
                        f"process(es) needs {needed} prompts; {recipe.data.train_path} has {prompts}")  # fmt: skip
    if problems:
        raise RecipeError(problems)


def import_reward(recipe: Recipe):
    return import_reward_function(recipe.reward.function) if recipe.reward.function else None


def setup_roles(built: Built, recipe: Recipe, reward_function, resume_dir: Path | None = None) -> Roles:
    """Attach critic, reference and reward to the policy's base; freeze all but policy, critic and heads.
    When resuming, the value head and critic adapter come from the checkpoint."""
    model, cfg = built.model, recipe.actor.model
    if cfg.is_lora:
        value_head, critic = attach_critic(model, recipe.critic.mode)
        reference = recipe.ppo.reference or ("initial_adapter" if cfg.lora_path else "base")
        roles = Roles(model, value_head, critic, attach_reference(model, reference, cfg.lora_path))
    else:
        value_head, _ = attach_critic(model, "shared")
        reference_model = load_base(built.report.base_path, cfg, "causal-lm", built.tokenizer).requires_grad_(False)
        roles = Roles(model, value_head, None, None, reference_model=reference_model)
    if recipe.reward.adapter:
        roles.reward_head = attach_reward_adapter(model, recipe.reward.adapter)
    elif recipe.reward.model:
        roles.reward_model, roles.reward_tokenizer = load_reward_model(recipe)
    roles.reward_function = reward_function
    if resume_dir:
        load_critic(roles, resume_dir)
    roles.freeze_plan()
    return roles


def load_critic(roles: Roles, directory: Path) -> None:
    roles.value_head.load_state_dict(load_file(directory / "value_head.safetensors"))
    if roles.critic_adapter:
        weights = load_file(directory / CRITIC / "adapter_model.safetensors")
        set_peft_model_state_dict(roles.model, weights, adapter_name=CRITIC)


def load_reward_model(recipe: Recipe):
    """A separate sequence classifier, frozen; read at the last real token like train-reward's."""
    cfg = dataclasses.replace(recipe.actor.model, path=recipe.reward.model)
    path = resolve_path(cfg)
    tokenizer = load_tokenizer(path, cfg)
    model = load_base(path, cfg, "reward", tokenizer).requires_grad_(False).eval()
    return RewardModel(model, classifier_head_name(model)), tokenizer


def kl_controller(recipe: Recipe) -> ppo.FixedKLController:
    if recipe.ppo.adaptive_kl:
        return ppo.AdaptiveKLController(recipe.ppo.kl_coef, recipe.ppo.target_kl, recipe.ppo.kl_horizon)
    return ppo.FixedKLController(recipe.ppo.kl_coef)


# ---------------------------------------------------------------- one update


def check_finite(accelerator, update: int, rollout: Rollout) -> None:
    """Raise BadUpdate naming the first non-finite source of a rollout, on every process if on any."""
    mask = rollout.mask
    sources = {"reward": rollout.scores, "policy logits": rollout.logprobs[mask],
               "reference logits": rollout.ref_logprobs[mask], "values": rollout.values[mask]}  # fmt: skip
    counts = {name: (~torch.isfinite(values)).sum().item() for name, values in sources.items()}
    found = next((f"non-finite {name} ({n} of {sources[name].numel()})" for name, n in counts.items() if n), None)
    found = on_any_process(accelerator, found)
    if found:
        raise BadUpdate(f"update {update}: {found}")


def shape_scores(rollout: Rollout, recipe: Recipe, moments: ppo.RunningMoments | None) -> torch.Tensor:
    scores = rollout.scores
    if recipe.ppo.missing_eos_penalty:
        scores = ppo.penalize_missing_eos(scores, rollout.has_eos, recipe.ppo.missing_eos_penalty)
    return ppo.normalize_and_clip_scores(scores, moments, recipe.ppo.reward_clip)


def optimise(accelerator, model, optimizer, rollout: Rollout, advantages, returns, recipe: Recipe,
             generator: torch.Generator, update: int) -> dict[str, float]:  # fmt: skip
    """ppo_epochs passes over the rollout in micro-batches; one optimizer step per accumulation group.

    Every loss and gradient norm is checked before its step: a non-finite one raises BadUpdate with the
    step's gradients discarded.
    """
    micro, accumulation = recipe.train.batch_size, recipe.train.gradient_accumulation_steps
    model.train()
    sums: dict[str, float] = {}
    steps = 0
    for _ in range(recipe.ppo.ppo_epochs):
        order = torch.randperm(len(rollout.scores), generator=generator)
        for start in range(0, len(order), micro):
            index = order[start : start + micro]
            boundary = (start // micro + 1) % accumulation == 0
            with accelerator.no_sync(model) if not boundary else nullcontext():
                out = model(rollout.input_ids[index], rollout.attention_mask[index], rollout.prompt_width)
                mask = rollout.mask[index]
                policy = ppo.policy_loss(out.logprobs, rollout.logprobs[index], advantages[index], mask,
                                         recipe.ppo.clip_range)  # fmt: skip
                value = ppo.value_loss(out.values, rollout.values[index], returns[index], mask,
                                       recipe.ppo.clip_range_value)  # fmt: skip
                loss = policy.loss + recipe.ppo.vf_coef * value.loss
                found = None
                if not torch.isfinite(loss):
                    found = f"non-finite loss (policy {policy.loss.item()}, value {value.loss.item()})"
                found = on_any_process(accelerator, found)  # before backward, a collective under FSDP
                if found:
                    optimizer.zero_grad(set_to_none=True)
                    raise BadUpdate(f"update {update}: {found}")
                accelerator.backward(loss / accumulation)
            _accumulate(sums, policy, value, out, mask)
            steps += 1
            if boundary:
                # All the prepared model's parameters (frozen ones have no gradient): accelerate then uses FSDP's
                # own clipping, whose norm covers every rank's shard, not this rank's alone.
                norm = accelerator.clip_grad_norm_(model.parameters(), recipe.train.max_grad_norm or math.inf)
                if not torch.isfinite(norm):
                    optimizer.zero_grad(set_to_none=True)
                    raise BadUpdate(f"update {update}: non-finite gradient norm")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return {name: total / steps for name, total in sums.items()}


def _accumulate(sums: dict, policy, value, out, mask) -> None:
    values = {"policy_loss": policy.loss, "value_loss": value.loss, "clip_fraction": policy.clip_fraction,
              "value_clip_fraction": value.clip_fraction, "approx_kl": policy.approx_kl,
              "entropy": ppo.masked_mean(out.entropy, mask)}  # fmt: skip
    for name, tensor in values.items():
        sums[name] = sums.get(name, 0.0) + tensor.item()


def update_metrics(accelerator, update: int, rollout: Rollout, kl, sequence_kl: float, stats: dict, timings,
                   kl_coef: float) -> dict:  # fmt: skip
    """One metrics line: rollout statistics reduced over processes, optimisation averages of this process."""
    reduce = lambda t: accelerator.reduce(t.float().mean(), "mean").item()  # noqa: E731
    return {
        "update": update, "reward": reduce(rollout.scores), "reward_std": reduce(rollout.scores.std()),
        "kl": sequence_kl, "kl_coef": kl_coef, "response_length": reduce(rollout.mask.sum(1)),
        "eos_fraction": reduce(rollout.has_eos), **stats,
        "time_generate": timings.generate, "time_score": timings.score,
    }  # fmt: skip


def save_policy(accelerator, trained, roles: Roles, built: Built, recipe: Recipe, directory: Path, update: int,
                write_state) -> Path:  # fmt: skip
    """The policy adapter (plain peft layout, loadable and mergeable), its value head, the critic adapter
    (in critic/), tokenizer, recipe and what resuming needs."""
    state = accelerator.get_state_dict(trained)  # every process takes part: FSDP gathers the shards on rank 0
    if accelerator.is_main_process:
        extra = {"base_fingerprint": base_fingerprint(built.model.config)}
        weights = checkpoint.submodule_state(state, "model.")

        def value_head(tmp: Path) -> None:
            head = checkpoint.submodule_state(state, "value_head.")
            save_file({k: v.detach().contiguous().cpu() for k, v in head.items()}, tmp / "value_head.safetensors")
            if roles.critic_adapter:  # peft puts a non-default adapter in a sub-folder of its name
                roles.model.save_pretrained(tmp, selected_adapters=[CRITIC], save_embedding_layers=False,
                                            state_dict=weights)  # fmt: skip
            write_state(tmp)

        save = checkpoint.save_adapter if recipe.actor.model.is_lora else checkpoint.save_full_model
        save(roles.model, directory, step=update, tokenizer=built.tokenizer, recipe=recipe, extra=extra,
             also=value_head, state_dict=weights)  # fmt: skip
    accelerator.wait_for_everyone()
    return directory
