"""Several processes through accelerate (gloo on CPU), launched with the shipped scripts/launch_multi_gpu.sh."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def command(processes: int, *args: str, home: Path | None = None) -> dict:
    env = {**os.environ, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}"}
    if home is not None:  # an empty cache: the processes would race to build the tiny model
        env["LORA_RL_HOME"] = str(home)
    args = ["bash", str(ROOT / "scripts/launch_multi_gpu.sh"), "--cpu", str(processes), *args]
    return {"args": args, "cwd": ROOT, "text": True, "env": env}


def launch(processes: int, *args: str, home: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(**command(processes, *args, home=home), capture_output=True, timeout=timeout)


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
              f"data.eval_path={tmp_path / 'eval.jsonl'}", "data.eval_fraction=0", "train.eval_every=3"]  # fmt: skip
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
                    "ppo.rollout_batch_size=16", "train.save_every=2", "train.samples_every=2",
                    "train.num_samples=3")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["update"] for m in metrics(out)] == [1, 2, 3, 4]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["update"] for s in samples] == [1, 1, 1, 2, 2, 2, 4, 4, 4]  # the main process alone writes them
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (out / ".lora-rl.lock").exists()  # taken by the main process, released before its os._exit
    rng = load_file(out / "checkpoint-2" / "rng.safetensors")
    assert not torch.equal(rng["torch.0"], rng["torch.1"])  # each process samples its own stream


def test_two_process_resume_equals_uninterrupted(tmp_path):
    """Every rank's RNG (dropout) and the shared data position are restored: exact, as with one process."""
    rows = (ROOT / "recipes/data/reward-demo.jsonl").read_text().splitlines()[:100]
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    settings = [f"data.train_path={tmp_path / 'pairs.jsonl'}", "data.eval_fraction=0.2", "data.max_length=32",
                "train.batch_size=4", "train.gradient_accumulation_steps=2", "train.num_epochs=2",
                "train.save_every=3", "actor.model.lora_dropout=0.1", "actor.model.lora_rank=4"]  # fmt: skip
    full = launch(
        2, "train-reward", str(ROOT / "recipes/reward-demo.yaml"), f"output_dir={tmp_path / 'full'}", *settings
    )
    assert full.returncode == 0, full.stderr[-2000:]
    crashed = tmp_path / "crashed"  # as a crash after step 6 leaves the run
    subprocess.run(["cp", "-r", str(tmp_path / "full"), str(crashed)], check=True)
    subprocess.run(["rm", "-rf", str(crashed / "final"), str(crashed / "checkpoint-9")], check=True)
    resumed = launch(2, "train-reward", str(crashed / "recipe.yaml"), f"output_dir={crashed}", "--resume", "auto",
                     home=tmp_path / "home")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(tmp_path / "full/final/adapter_model.safetensors")
    b = load_file(crashed / "final/adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    timing = lambda m: {k: v for k, v in m.items() if k != "pairs_per_s"}  # noqa: E731
    assert [timing(m) for m in metrics(tmp_path / "full")] == [timing(m) for m in metrics(crashed)]


def worker_pids(output_dir: Path) -> dict[int, int]:
    """{rank: pid} of the workers running into output_dir (accelerate's agent starts them, with RANK set)."""
    pids = {}
    for proc in Path("/proc").iterdir():
        try:
            cmdline, environ = (proc / "cmdline").read_bytes(), (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = [int(v[5:]) for v in environ if v.startswith(b"RANK=")]
        if f"output_dir={output_dir}".encode() in cmdline and rank:
            pids[rank[0]] = int(proc.name)
    return pids


SIGNALLED = ["train-reward", str(ROOT / "recipes/reward-demo.yaml"), "train.save_every=0", "train.eval_every=0",
             "train.max_steps=150", "train.log_every=1"]  # fmt: skip


def signalled_run(out: Path, targets, signum: int) -> tuple[subprocess.Popen, str]:
    """SIGNALLED on 2 processes into `out`; after 5 logged steps, `signum` to each pid `targets(process)` names.
    The launcher and its workers (sessions of their own) are killed if they do not end in 120 s: processes that
    disagree wait in a collective forever."""
    process = subprocess.Popen(**command(2, *SIGNALLED, f"output_dir={out}"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 5):
            assert process.poll() is None, process.communicate()
            time.sleep(0.1)
        for pid in targets(process):
            os.kill(pid, signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            for pid in [*worker_pids(out).values(), process.pid]:
                os.kill(pid, signal.SIGKILL)
    return process, stderr


def test_ctrl_c_reaching_one_process_stops_all_at_the_same_step(tmp_path):
    """accelerate's agent forwards Ctrl-C to each worker on its own, so they may see it a step apart; here only
    process 1 gets it. All processes must save the same checkpoint (its writing takes collectives) and stop."""
    out = tmp_path / "run"
    _, stderr = signalled_run(out, lambda process: [worker_pids(out)[1]], signal.SIGINT)
    saved = [p.name for p in out.glob("checkpoint-*")]
    assert len(saved) == 1 and stderr.count(f"interrupted at step {saved[0].split('-')[1]}; saved") == 2, stderr
    resumed = launch(2, *SIGNALLED, f"output_dir={out}", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [m["step"] for m in metrics(out) if m["split"] == "train"] == list(range(1, 151))


@pytest.mark.parametrize("workers_too", [False, True], ids=["to the launcher", "to every process"])
def test_sigterm_to_the_launcher_saves_on_every_process(tmp_path, workers_too):
    """A scheduler sends SIGTERM to `accelerate launch` (scancel, preemption, the time limit as the shipped sbatch
    passes it on), and with cgroup process tracking to every worker too: the agent forwards it, each worker sees it
    once or twice, and all save one checkpoint, then stop; the launcher ends with 143 (128 + SIGTERM)."""
    out = tmp_path / "run"
    targets = lambda process: [process.pid, *(worker_pids(out).values() if workers_too else [])]  # noqa: E731
    process, stderr = signalled_run(out, targets, signal.SIGTERM)
    assert process.returncode == 143, stderr[-3000:]
    saved = [p.name for p in out.glob("checkpoint-*")]
    assert len(saved) == 1 and stderr.count(f"SIGTERM: stopped at step {saved[0].split('-')[1]}; saved") == 2


def test_a_missing_ppo_score_on_one_process_stops_all(tmp_path):
    """ppo's check that every completion got a score runs inside the same agreement: process 0 must not wait for
    process 1 in a collective after process 1 stopped."""
    out = tmp_path / "ppo"
    result = launch(2, "ppo", str(ROOT / "recipes/ppo-demo.yaml"), f"output_dir={out}", "ppo.rollout_batch_size=16",
                    "reward.function=tests.process_rewards:none_on_process_1", timeout=300)  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert "the reward function returned None for 16 of 16 completions; ppo needs a score for every one (process 1)" \
        in result.stderr  # fmt: skip
    assert not (out / "final").exists()


def test_a_reward_function_failing_on_one_process_stops_all(tmp_path):
    """nan from the reward function on process 1 only: a named error there, and every process stops with it (one
    process alone would leave the other waiting in a collective)."""
    out = tmp_path / "ppo"
    result = launch(2, "ppo", str(ROOT / "recipes/ppo-demo.yaml"), f"output_dir={out}", "ppo.rollout_batch_size=16",
                    "reward.function=tests.process_rewards:nan_on_process_1", timeout=300)  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert "reward function tests.process_rewards:nan_on_process_1: completion 1 of 16" in result.stderr
    assert "(process 1)" in result.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "final").exists()

def test_two_process_ppo_resume_with_reward_normalisation_equals_uninterrupted(tmp_path):
    """Running reward statistics are merged over every process's scores, so every process holds the same ones
    and the checkpoint's (rank 0's) are every process's: a resumed run continues exactly."""
    settings = [str(ROOT / "recipes/ppo-demo.yaml"), "ppo.num_updates=4", "ppo.rollout_batch_size=8",
                "train.batch_size=4", "train.save_every=2", "ppo.normalize_rewards=true"]  # fmt: skip
    full = launch(2, "ppo", *settings, f"output_dir={tmp_path / 'full'}", timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    crashed = tmp_path / "crashed"  # as a crash after update 3 leaves the run
    subprocess.run(["cp", "-r", str(tmp_path / "full"), str(crashed)], check=True)
    subprocess.run(["rm", "-rf", str(crashed / "final")], check=True)
    resumed = launch(2, "ppo", str(crashed / "recipe.yaml"), f"output_dir={crashed}", "--resume", "auto", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(tmp_path / "full/final/adapter_model.safetensors")
    b = load_file(crashed / "final/adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    timing = lambda m: {k: v for k, v in m.items() if not k.startswith("time_")}  # noqa: E731
    assert [timing(m) for m in metrics(tmp_path / "full")] == [timing(m) for m in metrics(crashed)]
    state = json.loads((crashed / "checkpoint-2/trainer_state.json").read_text())
    assert state["reward_moments"]["count"] == 2 * 8 * 2  # 2 updates x 8 prompts x 2 processes


def test_reward_std_is_over_every_process_s_scores(tmp_path):
    out = tmp_path / "ppo"
    result = launch(2, "ppo", str(ROOT / "recipes/ppo-demo.yaml"), f"output_dir={out}", "ppo.num_updates=1",
                    "ppo.rollout_batch_size=8", "train.batch_size=8", "reward.function=tests.process_rewards:rank",
                    timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    line = metrics(out)[0]
    assert abs(line["reward"] - 0.5) < 1e-6
    assert abs(line["reward_std"] - torch.tensor([0.0] * 8 + [1.0] * 8).std().item()) < 1e-6  # not 0


def test_two_process_grpo_runs_and_resumes_exactly(tmp_path):
    """grpo on 2 processes: groups stay whole on each process, dapo's token count and the group statistics are
    reduced over both; a resumed run equals the uninterrupted one."""
    settings = [str(ROOT / "recipes/grpo-demo.yaml"), "grpo.num_steps=4", "grpo.prompts_per_step=2",
                "grpo.num_generations=4", "train.batch_size=4", "train.save_every=2", "grpo.beta=0.05"]  # fmt: skip
    full = launch(2, "grpo", *settings, f"output_dir={tmp_path / 'full'}", timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    lines = metrics(tmp_path / "full")
    assert [m["update"] for m in lines] == [1, 2, 3, 4] and all("frac_reward_zero_std" in m for m in lines)
    crashed = tmp_path / "crashed"
    subprocess.run(["cp", "-r", str(tmp_path / "full"), str(crashed)], check=True)
    subprocess.run(["rm", "-rf", str(crashed / "final")], check=True)
    resumed = launch(2, "grpo", *settings, f"output_dir={crashed}", "--resume", "auto", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(tmp_path / "full/final/adapter_model.safetensors")
    b = load_file(crashed / "final/adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    timing = lambda m: {k: v for k, v in m.items() if not k.startswith("time_")}  # noqa: E731
    assert [timing(m) for m in lines] == [timing(m) for m in metrics(crashed)]


def test_batch_statistics_are_over_every_process_s_rows(tmp_path):
    """grpo.scale_rewards: batch (TRL gathers the rewards) and REINFORCE++'s whitening (verl whitens the global
    batch): 2 processes holding half a batch each get the advantages 1 process gets holding all of it."""
    from tests import distributed_advantages as worker
    from tests.test_kl_reward import OneProcess, rollout

    env = {**os.environ, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}", "ACCELERATE_USE_CPU": "1"}
    args = ["accelerate", "launch", "--config_file", str(ROOT / "recipes/accelerate/multi_gpu.yaml"),
            "--num_processes", "2", "-m", "tests.distributed_advantages", str(tmp_path)]  # fmt: skip
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    got = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for name in worker.SETTINGS:
        whole = worker.objective(name).advantages(OneProcess(), rollout(*worker.whole_batch())).advantages
        for rank, rows in enumerate((slice(0, 4), slice(4, 8))):
            mine, width = got[rank][name], got[rank][name].shape[-1]
            torch.testing.assert_close(mine, whole[rows, :width] if mine.dim() == 2 else whole[rows], rtol=1e-5,
                                       atol=1e-6, msg=f"{name}, process {rank}")  # fmt: skip
            assert mine.dim() == 1 or not whole[rows, width:].any()  # past a process's own width: nothing
            # this process's rows alone would give other advantages: the test can tell
            alone = worker.objective(name).advantages(OneProcess(), rollout(*worker.part(rank, 2))).advantages
            assert not torch.allclose(alone, mine, atol=1e-2), name


def test_evaluation_on_two_processes_equals_one_under_ddp_and_fsdp(tmp_path):
    """Each process completes its share of the held-out prompts (3 batches of 2 prompts x 2 samples: 2 on process 0,
    1 on process 1, which under FSDP runs one more whose results it drops); gathered, they equal one process's, to
    the byte. Every run must evaluate the same policy: a learning rate of 1e-30 moves a fresh adapter (B = 0) by
    far less than float32 rounding of any layer's output, so the policy stays the base (every evaluation of a run
    the same shows it), while the training around it runs as usual. `lora-rl eval` of the run on two processes gives
    the run's figures for the base and final/ alike."""
    from tests.test_fsdp import launch as launch_fsdp

    rows = [json.loads(line) for line in (ROOT / "recipes/data/grpo-demo.jsonl").read_text().splitlines()[:5]]
    (tmp_path / "held-out.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = ["grpo", str(ROOT / "recipes/grpo-demo.yaml"), "grpo.num_steps=2", "grpo.num_generations=4",
              "train.batch_size=4", f"data.eval_path={tmp_path / 'held-out.jsonl'}", "train.eval_every=1",
              "eval.num_samples=2", "eval.batch_size=4", "train.learning_rate=1e-30"]  # fmt: skip
    one = launch(1, *common, "grpo.prompts_per_step=2", f"output_dir={tmp_path / 'one'}", timeout=300)
    two = launch(2, *common, "grpo.prompts_per_step=1", f"output_dir={tmp_path / 'two'}", timeout=300)
    fsdp = launch_fsdp("recipes/accelerate/fsdp.yaml", *common, "grpo.prompts_per_step=1",
                       f"output_dir={tmp_path / 'fsdp'}")  # fmt: skip
    assert one.returncode == 0 and two.returncode == 0 and fsdp.returncode == 0, \
        one.stderr[-2000:] + two.stderr[-2000:] + fsdp.stderr[-3000:]  # fmt: skip
    assert "fsdp_on_cpu: FSDP2" in fsdp.stderr
    evaluated = lambda out: [{k: v for k, v in m.items() if k.startswith("eval/")} for m in metrics(out)]  # noqa: E731
    written = (tmp_path / "one/eval_samples.jsonl").read_text()
    lines = [json.loads(line) for line in written.splitlines()]
    assert [(w["update"], w["prompt"]) for w in lines] == [(u, r["prompt"]) for u in (1, 2) for r in rows for _ in "ab"]
    assert [{k: v for k, v in w.items() if k != "update"} for w in lines[:10]] == \
        [{k: v for k, v in w.items() if k != "update"} for w in lines[10:]]  # fmt: skip
    assert len({w["completion"] for w in lines}) > 1
    for other in ("two", "fsdp"):
        assert (tmp_path / other / "eval_samples.jsonl").read_text() == written, other
        assert evaluated(tmp_path / other) == evaluated(tmp_path / "one"), other
    assert two.stdout.count("update 2: eval reward") == 1  # the main process alone says it
    # `lora-rl eval` of the run on two processes: the run's own figures for final/, the same for the base
    evaluated_apart = launch(2, "eval", str(tmp_path / "one"), "--json", timeout=300)
    assert evaluated_apart.returncode == 0, evaluated_apart.stderr[-2000:]
    found = [json.loads(line) for line in evaluated_apart.stdout.splitlines() if line.startswith("{")]
    assert [f["model"] for f in found] == ["base", "final"]
    for model in found:
        assert {k: v for k, v in model.items() if k.startswith("eval/")} == evaluated(tmp_path / "one")[-1]
