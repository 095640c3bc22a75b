"""Seconds per PPO update on the real model (recipes/smollm2/ppo-sentiment.yaml), split into generation,
scoring (reference forward + reward) and training, and where the time goes (cProfile).

    python scripts/bench_smollm2.py                 # 6 updates; the split's medians over updates 2..N
    python scripts/bench_smollm2.py 6 --profile     # and the 20 functions with the most time of their own

Needs the demo extra (README: quick start). Prints one JSON line with the figures, then the profile table.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPLIT = ("time_generate", "time_score", "time_train")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("updates", type=int, nargs="?", default=6)
    parser.add_argument("--profile", action="store_true", help="run under cProfile and print its top functions")
    args = parser.parse_args()
    from typer.testing import CliRunner

    from lora_rl.cli import app

    with tempfile.TemporaryDirectory() as tmp:
        data = ROOT / "recipes/data/movie-openings.jsonl"
        argv = ["ppo", str(ROOT / "recipes/smollm2/ppo-sentiment.yaml"), f"output_dir={tmp}/run",
                f"data.train_path={data}", f"ppo.num_updates={args.updates}"]  # fmt: skip
        profile = cProfile.Profile() if args.profile else None
        if profile:
            profile.enable()
        result = CliRunner().invoke(app, argv)
        if profile:
            profile.disable()
        if result.exit_code != 0:
            sys.exit(result.output)
        lines = [json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
    steady = lines[1:] or lines  # update 1 pays one-time costs (first allocations, lazy imports)
    split = {key: round(statistics.median(m[key] for m in steady), 2) for key in SPLIT}
    total = sum(split.values())
    shares = {key.removeprefix("time_"): f"{split[key] / total:.0%}" for key in SPLIT}
    print(json.dumps({"model": "smollm2-135m-instruct", "updates": args.updates, "s_per_update": round(total, 2),
                      **split, "shares": shares}))  # fmt: skip
    if profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
