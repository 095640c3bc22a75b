"""Run every command on a GPU (or the CPU with --cpu) and print one JSON line per check.

    python scripts/gpu_check.py                       # on a GPU machine: about 5 minutes on one H100
    python scripts/gpu_check.py --cpu --bench-shape tiny
    python scripts/gpu_check.py --trl-python /path/to/venv-with-trl/bin/python   # TRL's side of the benchmarks too

Checks, each in a fresh process on a built-in tiny model: train-reward; ppo with the shared and the adapter
critic, with gradient checkpointing, full fine-tuning, and each reward source (function, reward adapter,
separate reward model); grpo with beta 0, and with beta > 0, checkpointing, rloo and two iterations; merge
(in memory and streaming); load (generations and --score). Then our side of the PPO and reward benchmarks
(scripts/bench_ppo.py, bench_reward.py) at --bench-shape in bf16, and TRL's side where --trl-python names an
environment with TRL. Each line: {"check", "ok", "seconds", "peak_gpu_gb",
"peak_rss_gb", ...}; the last line counts the failures, and the exit code is 1 if any check failed.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import BASELINES, ROOT  # noqa: E402

sys.path.insert(1, str(ROOT))  # the output checks import lora_rl, also where it is not installed (a bare GPU box)

# Runs argv as a script in this process and prints its peak memory last (GPU: torch's allocator high mark).
PEAK_WRAPPER = """
import json, resource, runpy, sys
sys.argv = sys.argv[1:]
code = 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as stop:
    code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
finally:
    import torch
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"peak_gpu_gb": gpu, "peak_rss_gb": rss}), flush=True)
sys.exit(code)
"""


STDERR_TAIL = 25  # lines of a failed check's stderr shown (LORA_RL_DEBUG=1 makes them a traceback)


def measure(name: str, argv: list[str], env: dict, check=None) -> dict:
    """Run argv (a Python script and its arguments) in a fresh process; one result line."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *argv], capture_output=True, text=True, env=env,
                            cwd=ROOT)  # fmt: skip
    lines = result.stdout.strip().splitlines()
    peak = json.loads(lines[-1]) if lines and lines[-1].startswith('{"peak_gpu_gb"') else {}
    line = {"check": name, "ok": result.returncode == 0, "seconds": round(time.perf_counter() - started, 1), **peak}
    if result.returncode != 0:
        line["error"] = (result.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        print(f"--- {name}: last lines of stderr\n" + "\n".join(result.stderr.splitlines()[-STDERR_TAIL:]),
              file=sys.stderr, flush=True)  # fmt: skip
    elif check is not None:
        try:
            line.update(check())
        except Exception as err:  # a check of the outputs failed: report it as this check's failure
            line.update(ok=False, error=f"{type(err).__name__}: {err}")
    print(json.dumps(line), flush=True)
    return line


def slug(name: str) -> str:
    return name.replace(", ", "-").replace(" ", "-")


def lora_rl(*args: str) -> list[str]:
    return [str(ROOT / "lora_rl" / "__main__.py"), *args]


def last_metrics(run: Path) -> dict:
    """The run's last metrics line; its numbers must be finite and the final adapter complete."""
    from lora_rl.training.checkpoint import verify

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    bad = [k for k, v in last.items() if isinstance(v, float) and v != v]
    if bad:
        raise ValueError(f"non-finite metrics {bad}")
    verify(run / "final")
    keep = ("reward", "kl", "loss", "accuracy", "approx_kl", "clip_fraction", "clip_ratio", "eval/reward",
            "eval/pass@2")
    return {k: round(v, 4) for k, v in last.items() if k in keep and isinstance(v, float)}


def command_checks(work: Path, precision: str) -> list[tuple[str, list[str], object]]:
    reward, ppo = str(ROOT / "recipes/reward-demo.yaml"), str(ROOT / "recipes/ppo-demo.yaml")
    grpo = str(ROOT / "recipes/grpo-demo.yaml")
    common = [f"train.mixed_precision={precision}"]
    short_ppo = [*common, "ppo.num_updates=3", "ppo.rollout_batch_size=16", "train.batch_size=8"]
    adapter = work / "reward" / "final"

    def ppo_run(name: str, *overrides: str):
        out = work / slug(name)
        return name, lora_rl("ppo", ppo, f"output_dir={out}", *short_ppo, *overrides), lambda: last_metrics(out)

    def grpo_run(name: str, *overrides: str):
        out = work / slug(name)
        argv = lora_rl("grpo", grpo, f"output_dir={out}", *common, "grpo.num_steps=3", *overrides)
        return name, argv, lambda: last_metrics(out)

    return [
        (
            "train-reward",
            lora_rl(
                "train-reward",
                reward,
                f"output_dir={work / 'reward'}",
                *common,
                "train.max_steps=20",
                "train.eval_every=10",
            ),  # fmt: skip
            lambda: last_metrics(work / "reward"),
        ),
        ppo_run("ppo shared critic, reward function"),
        ppo_run("ppo adapter critic, checkpointing", "critic.mode=adapter", "train.gradient_checkpointing=true"),
        ppo_run("ppo reward adapter", "reward.function=null", f"reward.adapter={adapter}"),
        ppo_run("ppo reward model", "reward.function=null", "reward.model=tiny-gpt2"),
        ppo_run("ppo full fine-tuning", "actor.model.is_lora=false", "actor.model.target_modules=null"),
        ppo_run(
            "ppo adapter critic, reward adapter, normalised",
            "critic.mode=adapter",
            "reward.function=null",
            f"reward.adapter={adapter}",
            "ppo.normalize_rewards=true",
        ),  # fmt: skip
        grpo_run("grpo reward functions, evaluation", "data.eval_fraction=0.1", "train.eval_every=2",
                 "eval.num_samples=2", "train.save_best=eval/pass@2"),  # fmt: skip
        grpo_run("grpo beta, checkpointing, rloo", "grpo.beta=0.04", "train.gradient_checkpointing=true",
                 "grpo.advantage=rloo", "grpo.num_iterations=2"),  # fmt: skip
        (
            "merge in memory",
            lora_rl(
                "merge",
                str(work / slug("ppo shared critic, reward function") / "final"),
                str(work / "merged"),
                "--in-memory",
            ),
            None,
        ),  # fmt: skip
        ("eval", lora_rl("eval", str(work / slug("grpo reward functions, evaluation")), "--json"), None),
        ("merge streaming reward", lora_rl("merge", str(adapter), str(work / "merged-reward"), "--streaming"), None),
        (
            "load",
            lora_rl(
                "load",
                str(work / slug("ppo reward adapter") / "final"),
                "--prompt",
                "what about the cat ?",
                "--max-new-tokens",
                "8",
            ),
            None,
        ),  # fmt: skip
        (
            "load --score",
            lora_rl(
                "load", "tiny-llama", "--adapter", f"demo={adapter}", "--score", "--prompt", "this is great , i love it"
            ),
            None,
        ),  # fmt: skip
    ]


def bench_checks(work: Path, shape: str, precision: str, env: dict, trl_python: str | None) -> list[dict]:
    """Our side of the PPO and reward benchmarks (their recipes, in `precision`), and TRL's when available."""
    import bench_ppo
    import bench_reward

    ppo_args, reward_args = (4, 16, 3), (4, 128, 4)
    ppo_recipe = bench_ppo.prepare(shape, *ppo_args, work / "bench-ppo")
    reward_recipe = bench_reward.prepare(shape, *reward_args, work / "bench-reward")

    def figures(recipe: Path, keys: tuple[str, ...]) -> dict:
        lines = [json.loads(line) for line in (recipe.parent / "run" / "metrics.jsonl").read_text().splitlines()]
        lines = [m for m in lines if m.get("split", "train") == "train"]
        return {k: round(statistics.median(m[k] for m in lines[1:] or lines), 4) for k in keys}

    ppo_argv = lora_rl("ppo", str(ppo_recipe), *_precision(precision))
    ppo_check = measure(
        f"bench ppo {shape} {ppo_args} {precision}",
        ppo_argv,
        env,
        lambda: figures(ppo_recipe, ("time_generate", "time_score", "time_train")),
    )
    reward_check = measure(
        f"bench reward {shape} {reward_args} {precision}",
        lora_rl("train-reward", str(reward_recipe), *_precision(precision)),
        env,
        lambda: figures(reward_recipe, ("pairs_per_s",)),
    )
    results = [ppo_check, reward_check]
    if trl_python:
        for script, args in (("trl_ppo_baseline.py", (*ppo_args, "lora")), ("trl_reward_baseline.py", reward_args)):
            argv = [str(BASELINES / script), shape, *map(str, args)]
            started = time.perf_counter()
            result = subprocess.run([trl_python, *argv], capture_output=True, text=True, env=env)
            peer = [json.loads(x) for x in result.stdout.splitlines() if x.startswith('{"peer"')]
            print(json.dumps({"check": f"TRL {script}", "ok": result.returncode == 0 and bool(peer),
                              "seconds": round(time.perf_counter() - started, 1), **(peer[0] if peer else {})}),
                  flush=True)  # fmt: skip
    return results


def _precision(precision: str) -> list[str]:
    return [f"train.mixed_precision={precision}"]


def environment(cpu: bool) -> dict:
    # ROOT first, and whatever PYTHONPATH already holds after it (e.g. packages installed with --target)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU, e.g. to test this script")
    parser.add_argument(
        "--precision",
        choices=["no", "bf16", "fp16"],
        default=None,
        help="train.mixed_precision of every check (default: bf16 on a GPU, no on the CPU)",
    )
    parser.add_argument("--bench-shape", choices=["qwen0.5b", "tiny", "none"], default=None,
                        help="benchmark shape (default: qwen0.5b on a GPU, tiny with --cpu; none skips)")  # fmt: skip
    parser.add_argument("--only", nargs="*", default=None, help="run only the checks whose names contain a word")
    parser.add_argument("--trl-python", default=None, help="a Python with trl==1.12 installed: TRL's side too")
    args = parser.parse_args()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU visible; pass --cpu to run the checks on the CPU")
    precision = args.precision or ("no" if args.cpu else "bf16")
    shape = args.bench_shape or ("tiny" if args.cpu else "qwen0.5b")
    device = "cpu" if args.cpu else torch.cuda.get_device_name()
    print(json.dumps({"device": device, "torch": torch.__version__, "precision": precision}), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work, env = Path(tmp), environment(args.cpu)
        env["LORA_RL_HOME"] = str(work / "home")  # built-in models built fresh, as on a new machine
        for name, argv, check in command_checks(work, precision):
            if not args.only or any(word in name for word in args.only):
                results.append(measure(name, argv, env, check))
        if shape != "none":
            results += bench_checks(work, shape, precision, env, args.trl_python)
    failed = [r["check"] for r in results if not r["ok"]]
    print(json.dumps({"checks": len(results), "failed": failed}), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
