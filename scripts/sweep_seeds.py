"""Run one ppo/grpo recipe over seeds and torch thread counts, per setting; print whether each run learned.

    python scripts/sweep_seeds.py grpo recipes/grpo-demo.yaml --seeds 8 --threads 1 2 \
        --setting "as before: train.learning_rate=3e-3 train.lr_scheduler=constant" \
        --setting "now: "

A run *learned* when its mean reward over the last 10 updates beats the first 5 updates' by `--margin`; it
*collapsed* when that last-10 mean fell below half of its best 10-update mean (after the best passed
`--margin`): the policy found the reward and lost it. One line per run (JSON), then one table row per setting.
Each run is a fresh process with OMP_NUM_THREADS set: torch's kernels split work differently per thread count,
so a run can learn at one count and not at another; a default must hold at both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def outcome(rewards: list[float], margin: float) -> dict:
    """What a run's reward curve says: first, last and best window means, learned, collapsed."""
    first, last = statistics.fmean(rewards[:5]), statistics.fmean(rewards[-10:])
    windows = [statistics.fmean(rewards[i : i + 10]) for i in range(max(1, len(rewards) - 9))]
    best = max(windows)
    collapsed = best - first >= margin and last < 0.5 * best
    return {"first5": round(first, 3), "last10": round(last, 3), "best10": round(best, 3),
            "learned": last - first >= margin and not collapsed, "collapsed": collapsed}  # fmt: skip


def run_one(command: str, recipe: str, overrides: list[str], seed: int, threads: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    argv = [sys.executable, "-m", "lora_rl", command, recipe, *overrides, f"seed={seed}", f"output_dir={out}"]
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1:], "seconds": time.perf_counter() - started}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    undone = sum(1 for r in records if r.get("update_undone"))
    return {"rewards": [r["reward"] for r in records], "seconds": round(time.perf_counter() - started, 1),
            "max_approx_kl": round(max(r.get("approx_kl", 0.0) for r in records), 3), "undone": undone}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["ppo", "grpo"])
    parser.add_argument("recipe")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--setting", action="append", default=[],
                        help='"name: key=value key=value" (repeatable; an empty list runs the recipe as written)')
    parser.add_argument("--margin", type=float, default=0.15, help="reward gain that counts as learning")
    args = parser.parse_args()
    settings = [(s.split(":", 1)[0].strip(), s.split(":", 1)[1].split()) for s in args.setting or ["recipe: "]]
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in settings:
            results = []
            for threads in args.threads:
                for seed in range(args.seeds):
                    out = Path(tmp) / f"{len(table)}-{threads}-{seed}"
                    run = run_one(args.command, args.recipe, overrides, seed, threads, out)
                    if "rewards" in run:
                        run.update(outcome(run.pop("rewards"), args.margin))
                    print(json.dumps({"setting": name, "threads": threads, "seed": seed, **run}), flush=True)
                    results.append(run)
            ok = [r for r in results if "error" not in r]
            table.append((name, len(results), sum(r["learned"] for r in ok), sum(r["collapsed"] for r in ok),
                          min((r["last10"] for r in ok), default=float("nan")),
                          statistics.fmean(r["last10"] for r in ok) if ok else float("nan"),
                          len(results) - len(ok)))  # fmt: skip
    print("\n| setting | runs | learned | collapsed | worst last-10 reward | mean last-10 reward | failed |")
    print("|---|---|---|---|---|---|---|")
    for name, runs, learned, collapsed, worst, mean, failed in table:
        print(f"| {name} | {runs} | {learned} | {collapsed} | {worst:.3f} | {mean:.3f} | {failed} |")


if __name__ == "__main__":
    main()
