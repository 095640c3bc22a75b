"""Several processes through accelerate (gloo on CPU), launched with the shipped scripts/launch_multi_gpu.sh."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def launch(processes: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}"}
    command = ["bash", str(ROOT / "scripts/launch_multi_gpu.sh"), "--cpu", str(processes), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """1 process x 16 pairs vs 2 processes x 8 pairs: the same examples per step (the sampler's order is dealt
    out batch by batch) and DDP averages the two halves' gradients, so only float rounding differs: gloo's
    reduction order and per-process padding widths. Measured on the full demo: train losses agree to 1e-5
    over 112 steps; we allow 1e-4 on losses and margins, and 1e-4 on the adapter weights after 6 steps."""
    rows = (ROOT / "recipes/data/reward-demo.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:96]) + "\n")  # 6 global batches of 16: no partial batch
    (tmp_path / "eval.jsonl").write_text("\n".join(rows[1000:1032]) + "\n")
    common = ["train-reward", str(ROOT / "recipes/reward-demo.yaml"), f"data.train_path={tmp_path / 'train.jsonl'}",
              f"data.eval_path={tmp_path / 'eval.jsonl'}", "train.eval_every=3"]  # fmt: skip
    one = launch(1, *common, f"output_dir={tmp_path / 'one'}", "train.batch_size=16")
    two = launch(2, *common, f"output_dir={tmp_path / 'two'}", "train.batch_size=8")
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [(m["step"], m["split"]) for m in a] == [(m["step"], m["split"]) for m in b]  # rank 0 alone logs
    assert [m["pairs"] for m in b if m["split"] == "eval"] == [32, 32]  # eval gathered from both processes
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-4 and abs(x["margin"] - y["margin"]) < 1e-4, (x, y)
    wa = load_file(tmp_path / "one/final/adapter_model.safetensors")
    wb = load_file(tmp_path / "two/final/adapter_model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)
    assert two.stdout.count("saved ") == 1  # one process prints


def test_ppo_demo_runs_on_two_processes(tmp_path):
    out = tmp_path / "ppo"
    result = launch(2, "ppo", str(ROOT / "recipes/ppo-demo.yaml"), f"output_dir={out}", "ppo.num_updates=4",
                    "ppo.rollout_batch_size=16", "train.save_every=2")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["update"] for m in metrics(out)] == [1, 2, 3, 4]
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    rng = load_file(out / "checkpoint-2" / "rng.safetensors")
    assert not torch.equal(rng["torch.0"], rng["torch.1"])  # each process samples its own stream
