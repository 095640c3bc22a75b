"""scripts/gpu_check.py, run with --cpu: every command and the benchmarks' our side, one JSON line each."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.test_roles import ROOT


def test_gpu_check_runs_every_check_on_the_cpu():
    result = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--cpu", "--precision", "bf16"],
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    checks = {line["check"]: line for line in lines if "check" in line}
    assert result.returncode == 0, [line for line in checks.values() if not line["ok"]] or result.stderr[-2000:]
    assert lines[0]["device"] == "cpu" and lines[-1] == {"checks": 16, "failed": []}
    for name in ("train-reward", "ppo shared critic, reward function", "ppo adapter critic, checkpointing",
                 "ppo reward adapter", "ppo reward model", "ppo full fine-tuning", "merge in memory",
                 "merge streaming reward", "load", "load --score", "grpo reward functions, evaluation", "eval",
                 "grpo beta, checkpointing, rloo"):  # fmt: skip
        assert checks[name]["ok"] and checks[name]["seconds"] > 0 and checks[name]["peak_rss_gb"] > 0, name
    assert "reward" in checks["ppo reward adapter"] and "accuracy" in checks["train-reward"]
    assert "eval/pass@2" in checks["grpo reward functions, evaluation"]
    assert checks["bench ppo tiny (4, 16, 3) bf16"]["time_train"] > 0
    assert checks["bench reward tiny (4, 128, 4) bf16"]["pairs_per_s"] > 0
