"""`lora-rl ppo`: PPO with a LoRA policy on one shared frozen base.

run(recipe): check everything -> one base serving policy, reference, critic and reward -> for each
update: (1) sample (2) score (3) KL-shaped rewards (4) GAE + whitening (5) PPO epochs (6) KL controller
(7) log (8) checkpoint. Non-finite values skip an update's optimizer steps and its checkpoint.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lora_rl import checkpoint, display, ppo
from lora_rl.data import load_prompts, pad, tokenize_prompts
from lora_rl.model import Built, ModelError, base_fingerprint, build
from lora_rl.recipe import Recipe, RecipeError
from lora_rl.roles import POLICY, ActorCritic, Roles, attach_critic, attach_reference, attach_reward_adapter
from lora_rl.rollout import Rollout, collect


class BadUpdate(Exception):
    """A non-finite value at an update: nothing from this update is applied or saved."""


def run(recipe: Recipe, overwrite: bool = False) -> Path:
    """Run the PPO recipe; returns the final policy adapter directory."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # 1. Everything that can be wrong with the input, before any model loads.
    check_recipe(recipe)
    prompts = load_prompts(recipe.data.train_path)
    if len(prompts) < recipe.ppo.rollout_batch_size:
        raise RecipeError([f"ppo.rollout_batch_size: {recipe.ppo.rollout_batch_size} exceeds the {len(prompts)} "
                           f"prompts in {recipe.data.train_path}"])  # fmt: skip
    reward_function = import_reward(recipe)
    accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision)  # accumulation is handled below
    main = accelerator.is_main_process
    out = checkpoint.start_run_dir(recipe.output_dir, recipe, overwrite) if main else Path(recipe.output_dir)

    # 2. One base, every role.
    set_seed(recipe.seed)
    built = build(recipe, "causal-lm")
    if main:
        display.print_model_report(built.report)
    roles = setup_roles(built, recipe, reward_function)
    actor_critic = ActorCritic(roles, recipe.generation.temperature)
    params = [p for p in actor_critic.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.train.learning_rate, weight_decay=recipe.train.weight_decay)
    loader = prompt_loader(prompts, built.tokenizer, recipe)
    trained, optimizer, loader = accelerator.prepare(actor_critic, optimizer, loader)
    kl_control = kl_controller(recipe)
    moments = ppo.RunningMoments() if recipe.ppo.normalize_rewards else None
    generator = torch.Generator().manual_seed(recipe.seed)

    def save(name: str, update: int) -> Path:
        return save_policy(accelerator, roles, built, recipe, out / name, update)

    bad_in_a_row, last_saved, batches = 0, 0, cycle(loader)
    with display.Progress(recipe.ppo.num_updates, "ppo", enabled=main) as progress:
        for update in range(1, recipe.ppo.num_updates + 1):
            prompt_texts, prompt_ids, prompt_mask = next(batches)
            try:
                # (1)-(2) sample with the policy; old log-probs, values, reference log-probs, scores
                rollout, timings = collect(actor_critic, roles, built.tokenizer, prompt_texts, prompt_ids, prompt_mask,
                                           recipe.generation)  # fmt: skip
                check_finite(update, rollout)
                # (3)-(4) KL-shaped per-token rewards -> advantages and returns
                scores = shape_scores(rollout, recipe, moments)
                kl = ppo.kl_per_token(rollout.logprobs, rollout.ref_logprobs, recipe.ppo.kl_estimator)
                rewards = ppo.kl_shaped_rewards(scores, kl, rollout.mask, kl_control.value)
                advantages, returns = ppo.gae(rewards, rollout.values, rollout.mask, recipe.ppo.gamma, recipe.ppo.lam)
                if recipe.ppo.whiten_advantages:
                    advantages = ppo.masked_whiten(advantages, rollout.mask)
                # (5) PPO epochs over micro-batches, an optimizer step per accumulation group
                started = time.perf_counter()
                stats = optimise(accelerator, trained, optimizer, params, rollout, advantages, returns, recipe,
                                 generator, update)  # fmt: skip
            except BadUpdate as err:
                bad_in_a_row += 1
                display.print_warnings([f"{err}; update skipped ({bad_in_a_row} in a row)"])
                if bad_in_a_row >= recipe.ppo.max_bad_updates:
                    raise BadUpdate(f"stopping: {bad_in_a_row} consecutive updates with non-finite values "
                                    f"(ppo.max_bad_updates: {recipe.ppo.max_bad_updates})") from None  # fmt: skip
                continue
            bad_in_a_row = 0
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
            if (
                recipe.train.save_every
                and update - last_saved >= recipe.train.save_every
                and update < recipe.ppo.num_updates
            ):
                save(f"checkpoint-{update}", update)
                last_saved = update
    final = save("final", recipe.ppo.num_updates)
    if main:
        display.console.print(f"saved {final}", highlight=False)
    return final


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


def import_reward(recipe: Recipe):
    from lora_rl.roles import import_reward_function

    return import_reward_function(recipe.reward.function) if recipe.reward.function else None


def setup_roles(built: Built, recipe: Recipe, reward_function) -> Roles:
    """Attach critic, reference and reward to the policy's base; freeze all but policy, critic and heads."""
    model, cfg = built.model, recipe.actor.model
    if cfg.is_lora:
        value_head, critic = attach_critic(model, recipe.critic.mode)
        reference = recipe.ppo.reference or ("initial_adapter" if cfg.lora_path else "base")
        roles = Roles(model, value_head, critic, attach_reference(model, reference, cfg.lora_path))
    else:
        from lora_rl.model import load_base

        value_head, _ = attach_critic(model, "shared")
        reference_model = load_base(built.report.base_path, cfg, "causal-lm", built.tokenizer).requires_grad_(False)
        roles = Roles(model, value_head, None, None, reference_model=reference_model)
    if recipe.reward.adapter:
        roles.reward_head = attach_reward_adapter(model, recipe.reward.adapter)
    elif recipe.reward.model:
        roles.reward_model, roles.reward_tokenizer = load_reward_model(recipe)
    roles.reward_function = reward_function
    roles.freeze_plan()
    return roles


def load_reward_model(recipe: Recipe):
    """A separate sequence classifier, frozen; read at the last real token like train-reward's."""
    import dataclasses

    from lora_rl.model import load_base, load_tokenizer, resolve_path
    from lora_rl.reward_model import RewardModel

    cfg = dataclasses.replace(recipe.actor.model, path=recipe.reward.model)
    path = resolve_path(cfg)
    tokenizer = load_tokenizer(path, cfg)
    model = load_base(path, cfg, "reward", tokenizer).requires_grad_(False).eval()
    from lora_rl.model import classifier_head_name

    return RewardModel(model, classifier_head_name(model)), tokenizer


def kl_controller(recipe: Recipe) -> ppo.FixedKLController:
    if recipe.ppo.adaptive_kl:
        return ppo.AdaptiveKLController(recipe.ppo.kl_coef, recipe.ppo.target_kl, recipe.ppo.kl_horizon)
    return ppo.FixedKLController(recipe.ppo.kl_coef)


def prompt_loader(prompts: list[str], tokenizer, recipe: Recipe) -> DataLoader:
    """Batches of (texts, (B, P) left-padded ids, mask), reshuffled every pass; full batches only."""
    tokenized = tokenize_prompts(prompts, tokenizer, recipe.data.max_length, recipe.generation.chat_template)
    if tokenized.truncated:
        display.print_warnings([f"{tokenized.truncated} prompts exceed data.max_length: their last tokens are kept"])

    def collate(items: list[tuple[str, list[int]]]):
        ids, mask = pad([seq for _, seq in items], tokenizer.pad_token_id, "left")  # generation continues at the end
        return [text for text, _ in items], ids, mask

    generator = torch.Generator().manual_seed(recipe.seed)
    return DataLoader(list(zip(prompts, tokenized.pairs, strict=True)), recipe.ppo.rollout_batch_size, shuffle=True,
                      drop_last=True, collate_fn=collate, generator=generator)  # fmt: skip


def cycle(loader: DataLoader):
    while True:
        yield from loader


# ---------------------------------------------------------------- one update


def check_finite(update: int, rollout: Rollout) -> None:
    """Raise BadUpdate naming the first non-finite source of a rollout."""
    mask = rollout.mask
    sources = {"reward": rollout.scores, "policy logits": rollout.logprobs[mask],
               "reference logits": rollout.ref_logprobs[mask], "values": rollout.values[mask]}  # fmt: skip
    for name, values in sources.items():
        bad = (~torch.isfinite(values)).sum().item()
        if bad:
            raise BadUpdate(f"update {update}: non-finite {name} ({bad} of {values.numel()})")


def shape_scores(rollout: Rollout, recipe: Recipe, moments: ppo.RunningMoments | None) -> torch.Tensor:
    scores = rollout.scores
    if recipe.ppo.missing_eos_penalty:
        scores = ppo.penalize_missing_eos(scores, rollout.has_eos, recipe.ppo.missing_eos_penalty)
    return ppo.normalize_and_clip_scores(scores, moments, recipe.ppo.reward_clip)


def optimise(accelerator, model, optimizer, params, rollout: Rollout, advantages, returns, recipe: Recipe,
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
            with accelerator.no_sync(model) if not boundary else _nullcontext():
                out = model(rollout.input_ids[index], rollout.attention_mask[index], rollout.prompt_width)
                mask = rollout.mask[index]
                policy = ppo.policy_loss(out.logprobs, rollout.logprobs[index], advantages[index], mask,
                                         recipe.ppo.clip_range)  # fmt: skip
                value = ppo.value_loss(out.values, rollout.values[index], returns[index], mask,
                                       recipe.ppo.clip_range_value)  # fmt: skip
                loss = policy.loss + recipe.ppo.vf_coef * value.loss
                if not torch.isfinite(loss):
                    optimizer.zero_grad(set_to_none=True)
                    raise BadUpdate(
                        f"update {update}: non-finite loss (policy {policy.loss.item()}, value {value.loss.item()})"
                    )
                accelerator.backward(loss / accumulation)
            _accumulate(sums, policy, value, out, mask)
            steps += 1
            if boundary:
                norm = accelerator.clip_grad_norm_(params, recipe.train.max_grad_norm or math.inf)
                if not torch.isfinite(norm):
                    optimizer.zero_grad(set_to_none=True)
                    raise BadUpdate(f"update {update}: non-finite gradient norm")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return {name: total / steps for name, total in sums.items()}


def _nullcontext():
    from contextlib import nullcontext

    return nullcontext()


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


def save_policy(accelerator, roles: Roles, built: Built, recipe: Recipe, directory: Path, update: int) -> Path:
    """The policy adapter (plain peft layout, loadable and mergeable), its value head, tokenizer and recipe."""
    from safetensors.torch import save_file

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        extra = {"base_fingerprint": base_fingerprint(built.model.config)}

        def value_head(tmp: Path) -> None:
            state = {k: v.detach().contiguous().cpu() for k, v in roles.value_head.state_dict().items()}
            save_file(state, tmp / "value_head.safetensors")

        if recipe.actor.model.is_lora:
            checkpoint.save_adapter(roles.model, directory, step=update, tokenizer=built.tokenizer, recipe=recipe,
                                    adapter_name=POLICY, extra=extra, also=value_head)  # fmt: skip
        else:
            checkpoint.save_full_model(roles.model, directory, step=update, tokenizer=built.tokenizer, recipe=recipe,
                                       extra=extra, also=value_head)  # fmt: skip
    accelerator.wait_for_everyone()
    return directory


__all__ = ["run", "check_recipe", "BadUpdate", "ModelError"]
