"""Live warnings that a ppo or grpo run is dying, from the metrics it logs each update.

Two signatures, each warned once per episode (again only after the run recovered):
- collapse: the mean reward of the last WINDOW updates lost more than half of what the run had gained (best
  window over the first one, a gain larger than half the rewards' spread) while approx_kl or the entropy jumped:
  the step is too large;
- stuck (grpo): frac_reward_zero_std 1.0 with an unchanged reward for WINDOW updates: every group's rewards are
  equal, no advantage is left to learn from.
"""

from __future__ import annotations

import statistics

WINDOW = 5  # updates per window
JUMP = 3.0  # approx_kl above this multiple of its earlier median counts as a jump
MIN_APPROX_KL = 0.02  # ... and above this many nats per token: tinier moves are noise
ENTROPY_SHIFT = 0.5  # entropy moving by this fraction of its earlier median counts as a jump


class RunHealth:
    def __init__(self, command: str) -> None:
        self.command = command
        self.rewards: list[float] = []
        self.approx_kl: list[float] = []
        self.entropy: list[float] = []
        self.reward_std: list[float] = []
        self.best = (float("-inf"), 0)  # (window mean, its last update)
        self.collapse_warned = self.stuck_warned = False
        self.stuck_since: int | None = None

    def check(self, record: dict) -> list[str]:
        """Feed one update's metrics record; the warnings it raises (usually none)."""
        self.rewards.append(record["reward"])
        self.approx_kl.append(record.get("approx_kl", 0.0))
        self.entropy.append(record.get("entropy", 0.0))
        self.reward_std.append(record.get("reward_std", 0.0))
        return [line for line in (self._collapse(record["update"]), self._stuck(record)) if line]

    def _collapse(self, update: int) -> str | None:
        if len(self.rewards) < 2 * WINDOW:
            if len(self.rewards) >= WINDOW:
                self._track_best(update)
            return None
        self._track_best(update)
        first = statistics.fmean(self.rewards[:WINDOW])
        current = statistics.fmean(self.rewards[-WINDOW:])
        best, best_at = self.best
        gain = best - first
        noise = 0.5 * statistics.median(self.reward_std)  # a gain within the rewards' spread proves nothing
        if gain <= noise or best - current <= 0.5 * gain:
            self.collapse_warned = self.collapse_warned and best - current > 0.25 * gain  # recovered: re-arm
            return None
        jump = self._jump()
        if self.collapse_warned or jump is None:
            return None
        self.collapse_warned = True
        return (f"update {update}: reward {current:.3g} (mean of the last {WINDOW} updates) is far below its best "
                f"{best:.3g} (updates {best_at - WINDOW + 1}-{best_at}) while {jump}: the policy is collapsing; "
                f"lower train.learning_rate or set {self.command}.max_update_kl (README: When a run collapses)")

    def _track_best(self, update: int) -> None:
        current = statistics.fmean(self.rewards[-WINDOW:])
        if current > self.best[0]:
            self.best = (current, update)

    def _jump(self) -> str | None:
        """What jumped in the last window against the updates before it, in words; None if nothing did."""
        before_kl = statistics.median(self.approx_kl[:-WINDOW])
        recent_kl = max(self.approx_kl[-WINDOW:])
        if recent_kl > JUMP * before_kl and recent_kl > MIN_APPROX_KL:
            return f"approx_kl jumped to {recent_kl:.3g} (median {before_kl:.3g} before)"
        before_entropy = statistics.median(self.entropy[:-WINDOW])
        recent_entropy = statistics.fmean(self.entropy[-WINDOW:])
        if before_entropy > 0 and abs(recent_entropy - before_entropy) > ENTROPY_SHIFT * before_entropy:
            return f"the entropy moved to {recent_entropy:.3g} (median {before_entropy:.3g} before)"
        return None

    def _stuck(self, record: dict) -> str | None:
        flat = record.get("frac_reward_zero_std") == 1.0
        same = len(self.rewards) > 1 and self.rewards[-1] == self.rewards[-2]
        if not flat or (self.stuck_since is not None and not same):
            self.stuck_since, self.stuck_warned = (record["update"] if flat else None), False
            return None
        if self.stuck_since is None:
            self.stuck_since = record["update"]
        if self.stuck_warned or record["update"] - self.stuck_since + 1 < WINDOW:
            return None
        self.stuck_warned = True
        return (f"updates {self.stuck_since}-{record['update']}: every group's rewards are equal "
                f"(frac_reward_zero_std 1.0, reward {record['reward']:.3g}): no advantage is left to learn from; "
                "the policy may have collapsed (README: When a run collapses)")
