"""Is the inference engine sampling with the current adapter? The sync check's decision, as a pure function.

Each update the engine (vLLM) gets the policy's LoRA weights; if they never arrive it keeps sampling with the base
(adapters off) or the previous adapter, and the run trains on the wrong policy's samples without an error. Every
update a few sampled completions give the engine's log-probs of their tokens and ours: under the current adapter,
with adapters off, and under the previous adapter when kept. The engine is stale when it is closer to the base or
the previous adapter than to the current policy, on tokens where the two differ by more than the engine's own
mismatch can explain.

When a decision is made, chosen by simulation (per-token log-probs; the engine's mismatch Gaussian with mean
|error| eps; the candidate at mean |distance| s from the current policy; 3000 draws per case):
- never at update 0: before the first optimizer step the adapter is the one the engine started with;
- only when the current policy and the candidate differ by more than SEPARATION x the engine's distance to the
  nearer of the two, and by more than NOISE_FLOOR (an absolute floor for an engine that matches ours exactly): an
  update too small to tell from the engine's own mismatch (current ~ base after a tiny step) decides nothing.
  With a factor of 1 an engine serving the current policy was called stale in 5% of draws (8 tokens, s = eps);
- only over at least MIN_TOKENS valid tokens: over 4 tokens the rule above still erred in 1.5% of draws, over 8
  in 0.1%, over 32 in none, and there it caught every stale engine from s = 4 eps (98% at s = 3 eps, half at
  s = 2 eps). A stale engine missed at one update is caught once the policy has moved further from what it holds.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

MIN_TOKENS = 32
SEPARATION = 2.0
NOISE_FLOOR = 1e-3  # nats per token
Match = Literal["current", "base", "previous adapter", "undecided"]


class EngineOutOfSync(Exception):
    """The engine sampled with another adapter than the policy being trained (generation.sync_check: error)."""


class SyncVerdict(NamedTuple):
    update: int  # the adapter version the engine should hold: optimizer updates applied so far
    matches: Match  # what the engine's log-probs match; "undecided": too close to tell (see the module's doc)
    tokens: int  # valid tokens compared
    distances: dict[str, float]  # mean |engine - ours| per candidate: "current", "base" (, "previous adapter")

    @property
    def stale(self) -> bool:
        return self.matches in ("base", "previous adapter")

    def metrics(self) -> dict[str, float]:
        """engine/logprob_diff: mean |engine - ours under the current adapter| over the valid tokens."""
        return {"engine/logprob_diff": self.distances["current"], "engine/adapter_version": float(self.update)}


def mean_distance(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """mean_t |a_t - b_t| over the valid entries of (B, T) `mask`; 0.0 when none is valid."""
    mask = mask.bool()
    return (torch.where(mask, (a.float() - b.float()).abs(), 0).sum() / mask.sum().clamp(min=1)).item()


def sync_verdict(engine: torch.Tensor, current: torch.Tensor, base: torch.Tensor, mask: torch.Tensor, update: int,
                 previous: torch.Tensor | None = None) -> SyncVerdict:  # fmt: skip
    """(B, T) log-probs of the sampled tokens: the engine's, ours under the current adapter, with adapters off, and
    (optionally) under the previous adapter; `update`: optimizer updates applied so far -> what the engine matches.

    Candidate X (base, previous adapter) is decidable when s_X = d(current, X) > max(NOISE_FLOOR, SEPARATION x
    min(d(engine, current), d(engine, X))); the engine matches the nearest decidable X with d(engine, X) <
    d(engine, current), else the current policy when some X was decidable, else nothing is decided.
    """
    candidates = {"base": base, "previous adapter": previous}
    distances = {"current": mean_distance(engine, current, mask)}
    distances |= {name: mean_distance(engine, ours, mask) for name, ours in candidates.items() if ours is not None}
    tokens = int(mask.bool().sum())
    if update == 0 or tokens < MIN_TOKENS:
        return SyncVerdict(update, "undecided", tokens, distances)
    here = distances["current"]
    decidable = [name for name, ours in candidates.items() if ours is not None and mean_distance(current, ours, mask)
                 > max(NOISE_FLOOR, SEPARATION * min(here, distances[name]))]  # fmt: skip
    closer = sorted((distances[name], name) for name in decidable if distances[name] < here)
    matches = closer[0][1] if closer else ("current" if decidable else "undecided")
    return SyncVerdict(update, matches, tokens, distances)


def act_on(verdict: SyncVerdict, sync_check: Literal["error", "warn"]) -> str | None:
    """Raise EngineOutOfSync for a stale engine (sync_check error), or return its warning line (warn); None when
    the engine is not found stale."""
    if not verdict.stale:
        return None
    held = "the base (adapters off)" if verdict.matches == "base" else f"the adapter of update {verdict.update - 1}"
    line = (f"update {verdict.update}: the inference engine is sampling with {held}, not the current policy: its "
            f"log-probs of {verdict.tokens} sampled tokens are {verdict.distances[verdict.matches]:.3g} from it and "
            f"{verdict.distances['current']:.3g} from the policy's (mean |diff|); the adapter did not reach the "
            "engine")  # fmt: skip
    if sync_check == "error":
        raise EngineOutOfSync(f"{line}; stopping (generation.sync_check: warn only warns)")
    return line
