"""One frozen base in memory serving every PPO role.

- policy    = the base with the policy LoRA adapter (peft's "default": it saves flat, loads with plain peft);
- reference = the base with adapters off, or a frozen copy of the starting adapter ("reference");
- critic    = a value head on the policy's last hidden state (shared), or its own adapter ("critic") + head;
- reward    = a reward adapter from train-reward ("reward") + its score head, a separate sequence
              classifier, or a Python function.

Every switch of the active adapter goes through `Roles.use`, which restores the previous adapter in a
`finally` and re-applies which parameters train: peft's `set_adapter` (and leaving `disable_adapter`) marks the
adapter it activates trainable and all others frozen, even an adapter loaded for inference.

Gradient checkpointing recomputes each block's forward during backward, after the scope that ran it has ended:
`Roles.checkpoint_contexts` makes every recomputation run under the adapter its forward ran with, so a forward
under the critic adapter is differentiated through the critic's weights, not the policy's.
"""

from __future__ import annotations

import copy
import importlib
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch
from safetensors.torch import load_file
from torch import nn

from lora_rl.data import pad, with_eos
from lora_rl.models.build import ModelError, base_contradictions
from lora_rl.models.lm_head import lm_logits
from lora_rl.models.reward_model import at_last_token, hidden_states, no_split_modules, transformers_model
from lora_rl.recipe import one_line
from lora_rl.rl.ppo import entropy_from_logits, gather_logprobs
from lora_rl.rl.rewards import RewardTerm
from lora_rl.training import checkpoint

POLICY, CRITIC, REWARD, REFERENCE = "default", "critic", "reward", "reference"
RewardFunction = Callable[..., list[float | None]]
T = TypeVar("T")


@dataclass
class Roles:
    """The shared base (a PeftModel) and what each role adds to it."""

    model: nn.Module  # PeftModel with the policy adapter, and maybe critic / reward / reference adapters
    value_head: nn.Linear | None  # (H -> 1), on the policy's or the critic adapter's hidden state; None: no critic
    critic_adapter: str | None  # None: shared critic (one forward gives logits and values)
    reference_adapter: str | None  # None: the base with adapters off
    reward_head: nn.Linear | None = None  # the reward adapter's score layer
    reward_model: nn.Module | None = None  # a separate sequence classifier (lora_rl.models.reward_model.RewardModel)
    reward_tokenizer: object = None
    reward_chat_template: bool = False  # the separate reward model reads prompts in the chat template
    reward_terms: list[RewardTerm] | None = None  # reward functions with their weights
    reference_model: nn.Module | None = None  # full fine-tuning only: the frozen base
    trainable: list[tuple[nn.Parameter, bool]] = field(default_factory=list)
    adapters_off: bool = False  # inside use(None)

    def freeze_plan(self) -> None:
        """Record which LoRA parameters train (policy, critic) now, to re-apply after every switch."""
        self.trainable = [(p, _trains(n)) for n, p in self.model.named_parameters() if "lora_" in n]
        self._apply_plan()

    def _apply_plan(self) -> None:
        for param, trains in self.trainable:
            param.requires_grad_(trains)

    @contextmanager
    def use(self, adapter: str | None) -> Iterator[None]:
        """Run the block with `adapter` active (None: every adapter off); always restore the previous one."""
        if not hasattr(self.model, "peft_config") or adapter == self.model.active_adapter:
            yield  # full fine-tuning (nothing to switch), or already active: set_adapter walks every module
            return
        if adapter is None:
            self.adapters_off = True
            try:
                with self.model.disable_adapter():  # re-enables in its own finally; the active adapter is untouched
                    yield
            finally:
                self.adapters_off = False
                self._apply_plan()  # re-enabling made only the active adapter trainable
            return
        previous = self.model.active_adapter
        try:
            self.model.set_adapter(adapter)
            self._apply_plan()
            yield
        finally:
            self.model.set_adapter(previous)
            self._apply_plan()

    def place(self, device: torch.device) -> None:
        """Move the modules that live outside the prepared (accelerate-wrapped) module to `device`: the reward
        adapter's score head, a separate reward model, full fine-tuning's reference copy."""
        for module in (self.reward_head, self.reward_model, self.reference_model):
            if module is not None:
                module.to(device)

    @property
    def active(self) -> str | None:
        """The adapter forwards run under now (None: adapters off)."""
        if not hasattr(self.model, "peft_config"):
            return None
        return None if self.adapters_off else self.model.active_adapter

    def checkpoint_contexts(self) -> tuple[AbstractContextManager, AbstractContextManager]:
        """torch.utils.checkpoint's `context_fn`, called at each checkpointed forward: (around the forward, around
        its recomputation in backward). The recomputation runs under the adapter active now."""
        return nullcontext(), self.use(self.active)  # entered only when backward recomputes


def _trains(name: str) -> bool:
    return f".{POLICY}." in name or f".{CRITIC}." in name


def attach_critic(model: nn.Module, mode: str) -> tuple[nn.Linear, str | None]:
    """A zero-initialised value head (values start at 0: no random bias in the first advantages), and for
    mode "adapter" a critic adapter with the policy's LoRA settings."""
    hidden = transformers_model(model).config.hidden_size
    head = nn.Linear(hidden, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    if mode == "shared":
        return head, None
    config = copy.deepcopy(model.peft_config[POLICY])
    config.inference_mode = False
    model.add_adapter(CRITIC, config)
    return head, CRITIC


def attach_reference(model: nn.Module, reference: str, lora_path: str | None, allow_pickle: bool) -> str | None:
    """The KL reference: None (adapters off), or a frozen copy of the starting adapter on the same base."""
    if reference == "base":
        return None
    checkpoint.read_adapter_config(Path(lora_path), allow_pickle)  # when resuming, read here only
    model.load_adapter(lora_path, adapter_name=REFERENCE, is_trainable=False)
    return REFERENCE


def attach_reward_adapter(model: nn.Module, adapter_dir: str) -> nn.Linear:
    """Load a train-reward adapter onto the causal-LM base, plus its score head.

    peft keeps the adapter's LoRA weights but drops its score layer (a causal LM has no `score` module),
    so the head is read from the adapter's safetensors here.
    """
    directory = Path(adapter_dir)
    saved = checkpoint.read_adapter_config(directory)  # the score head is read from its safetensors: no opt-in
    if saved.get("task_type") != "SEQ_CLS":
        raise ModelError(f"reward.adapter: {directory} is a {saved.get('task_type')} adapter; expected SEQ_CLS")
    problems = base_contradictions(saved, transformers_model(model), directory)
    if problems:
        raise ModelError(f"reward.adapter: {directory} does not fit the policy's base: {problems[0]}")
    model.load_adapter(str(directory), adapter_name=REWARD, is_trainable=False)
    return _score_head(load_file(directory / "adapter_model.safetensors"), directory)


def _score_head(weights: dict[str, torch.Tensor], directory: Path) -> nn.Linear:
    names = [k for k in weights if k.endswith((".score.weight", ".classifier.weight")) and "lora_" not in k]
    if not names:
        raise ModelError(f"reward.adapter: {directory} holds no score head; was it trained with lora-rl train-reward?")
    weight = weights[names[0]]
    bias = weights.get(names[0].replace(".weight", ".bias"))
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    return head.requires_grad_(False)


def import_reward_function(spec: str, recipe_dir: Path | None = None) -> RewardFunction:
    """`package.module:function` -> the callable; a clear error when it cannot be imported.

    The module is looked up in the recipe's directory, then the working directory, then the installed packages:
    the same under every entry point (`python -m lora_rl` puts the working directory on sys.path, the `lora-rl`
    script does not).
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"reward.function: got {spec!r}; expected package.module:function")
    importlib.invalidate_caches()  # a module written since the last import (as tests do) is found too
    try:
        with search_path([*([recipe_dir] if recipe_dir else []), Path.cwd()]):
            function = getattr(importlib.import_module(module_name), attr)
    except Exception as err:  # the module is the user's code: whatever it raises on import is their error
        raise ModelError(f"reward.function: cannot import {spec!r} ({one_line(err)})") from None
    if not callable(function):
        raise ModelError(f"reward.function: {spec!r} is not callable")
    return function


@contextmanager
def search_path(directories: list[Path]) -> Iterator[None]:
    """sys.path with `directories` first, for the block only."""
    saved = list(sys.path)
    sys.path[:0] = [str(Path(d).resolve()) for d in directories]
    try:
        yield
    finally:
        sys.path[:] = saved


@torch.no_grad()
def adapter_rewards(roles: Roles, input_ids: torch.Tensor, attention_mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B,) scores from the reward adapter: its hidden state at an EOS after each row's real tokens (the sampled
    one, or one appended to a completion cut without it) -> score head."""
    ids, mask = (t.to(input_ids.device) for t in pad(reward_rows(input_ids, attention_mask, eos_id), eos_id, "right"))
    with roles.use(REWARD):
        last = at_last_token(hidden_states(roles.model, ids, mask), mask)
    return roles.reward_head(last.to(roles.reward_head.weight.dtype)).squeeze(-1).float()


def reward_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, eos_id: int) -> list[list[int]]:
    """The ids the reward adapter reads for each (B, P+R) rollout row: its real prompt and response tokens, then
    an EOS unless the response ends with one (data.reward_pair_ids gives train-reward the same ids)."""
    rows = [row[real.bool()].tolist() for row, real in zip(input_ids, attention_mask, strict=True)]  # B syncs: small
    return with_eos(rows, eos_id)


class ActorCriticOutput(NamedTuple):
    logprobs: torch.Tensor  # (B, R) float32 log-probs of the response tokens under the policy
    entropy: torch.Tensor | None  # (B, R) float32, no grad: a statistic; None when not asked for
    values: torch.Tensor  # (B, R) float32 value of the state before each response token


class ActorCritic(nn.Module):
    """Policy log-probs and values for prompt+response sequences, as one module so that accelerate/DDP/FSDP
    wrap its forward. With the shared critic one forward gives both; with a critic adapter, two."""

    def __init__(self, roles: Roles, temperature: float):
        super().__init__()
        self.model, self.value_head = roles.model, roles.value_head  # registered: optimised and synchronised
        self.roles, self.temperature = roles, temperature
        self._no_split_modules = no_split_modules(roles.model)  # FSDP wraps (and gathers) block by block

    def forward(self, *inputs, within: Callable[[], T] | None = None, entropy: bool = True) -> ActorCriticOutput | T:
        """`outputs(*inputs, entropy)`; or, given `within`, its result, computed inside this module's forward.

        Under FSDP the base's shards are gathered only inside the wrapped module's forward (each block by its
        own hook), so everything else that runs the shared base (generation, the reference and the reward
        adapter) goes through here too.
        """
        return within() if within is not None else self.outputs(*inputs, entropy=entropy)

    def outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                entropy: bool = True) -> ActorCriticOutput:  # fmt: skip
        with self.roles.use(POLICY):
            hidden = response_hidden(self.roles.model, input_ids, attention_mask, prompt_width)
        return self.from_hidden(hidden, input_ids, attention_mask, prompt_width, entropy)

    def from_hidden(self, policy_hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    prompt_width: int, entropy: bool = True) -> ActorCriticOutput:  # fmt: skip
        """Log-probs, entropy (None unless asked: a statistic, a softmax over the vocabulary at every response
        token) and values from the policy's (B, R, H) hidden states before each response token."""
        with self.roles.use(POLICY):  # the LM head too may carry LoRA
            logits = lm_logits(self.roles.model, policy_hidden)  # (B, R, V): the LM head only where needed
        logprobs = gather_logprobs(logits, input_ids[:, prompt_width:], self.temperature)
        with torch.no_grad():
            entropy = entropy_from_logits(logits, self.temperature) if entropy else None
        hidden = policy_hidden
        if self.roles.critic_adapter is not None:
            with self.roles.use(self.roles.critic_adapter):
                hidden = response_hidden(self.roles.model, input_ids, attention_mask, prompt_width)
        if self.value_head is None:  # no critic (grpo)
            return ActorCriticOutput(logprobs, entropy, torch.zeros_like(logprobs))
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return ActorCriticOutput(logprobs, entropy, values)


def response_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int):
    """(B, R, H): the hidden state that predicts each response token (the one at the position before it)."""
    return hidden_states(model, input_ids, attention_mask)[:, prompt_width - 1 : -1]


@torch.no_grad()
def reference_logprobs(
    roles: Roles, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int, temperature: float
) -> torch.Tensor:
    """(B, R) log-probs of the response tokens under the reference (adapters off, or the starting adapter;
    with full fine-tuning, the frozen copy of the base)."""
    model = roles.reference_model or roles.model
    with roles.use(roles.reference_adapter):  # the LM head too may carry LoRA: keep it inside the scope
        logits = lm_logits(model, response_hidden(model, input_ids, attention_mask, prompt_width))
    return gather_logprobs(logits, input_ids[:, prompt_width:], temperature)
