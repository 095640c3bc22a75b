"""Preemption: what cluster schedulers send before they kill a job (SIGTERM; slurm's --signal pre-warning, here
SIGUSR1) saves a checkpoint at the next step boundary, as Ctrl-C does, and ends the run with 128 + the signal's
number; Ctrl-C while the program still loads is one line, not a traceback. Real signals, sent to subprocesses."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_rl.commands import train_reward
from lora_rl.recipe import load_recipe
from lora_rl.training.checkpoint import verify
from lora_rl.training.lock import LOCK
from lora_rl.training.resume import checkpoints
from tests.test_files_safety import SIGTERM_HOLD  # a run holding its lock, then sleeping
from tests.test_resume import ROOT, reward_recipe


def start(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lora_rl", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "400"})  # fmt: skip


def when_logged(process: subprocess.Popen, metrics: Path, lines: int) -> None:
    """Wait until the run has logged `lines` metric lines: it is in its training loop."""
    while not (metrics.exists() and metrics.read_text().count("\n") >= lines):
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)


def stopped(process: subprocess.Popen, out: Path, code: int) -> tuple[Path, str]:
    """The run's one checkpoint and its stderr, once it ended with `code` having saved it and released the lock."""
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == code, stderr
    (saved,) = checkpoints(out)
    assert verify(saved) and not (out / "final").exists() and not (out / LOCK).exists()
    return saved, " ".join(stderr.split())


@pytest.mark.parametrize(("sent", "code"), [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)], ids=["TERM", "USR1"])
def test_train_reward_saves_on_sigterm_and_sigusr1_and_resumes(write_recipe, tmp_path, sent, code):
    path = reward_recipe(write_recipe, tmp_path, num_epochs=40, save_every=0, eval_every=0)
    recipe = load_recipe(path)
    out = Path(recipe.output_dir)
    process = start("train-reward", str(path))
    when_logged(process, out / "metrics.jsonl", 3)
    process.send_signal(sent)
    process.send_signal(sent)  # a launcher forwards what the scheduler also sent: still one save, no early end
    saved, stderr = stopped(process, out, code)
    step = verify(saved)["step"]
    assert f"{sent.name}: stopped at step {step}; saved {saved}; continue with --resume {saved}" in stderr
    one_more = load_recipe(path, [f"train.max_steps={step + 1}"])  # the resumed run: one step, not the 200 left
    assert verify(train_reward.run(one_more, resume="auto", allow_changes=True))["step"] == step + 1


def test_grpo_saves_on_sigterm(tmp_path):
    out = tmp_path / "out"
    process = start("grpo", str(ROOT / "recipes/grpo-demo.yaml"), f"output_dir={out}", "grpo.num_steps=500",
                    "grpo.prompts_per_step=4", "grpo.num_generations=4", "train.batch_size=8")  # fmt: skip
    when_logged(process, out / "metrics.jsonl", 2)
    process.terminate()
    saved, stderr = stopped(process, out, 143)
    assert f"SIGTERM: stopped at step {verify(saved)['step']}; saved {saved}" in stderr




@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGUSR1], ids=["TERM", "USR1"])
def test_a_signal_before_the_training_loop_releases_the_lock_and_ends_at_once(write_recipe, sent):
    """Before the loop (loading the model) there is nothing new to save: the lock goes, then the process ends as
    the signal ends it."""
    path = write_recipe({})
    out = Path(load_recipe(path).output_dir)
    process = subprocess.Popen([sys.executable, "-c", SIGTERM_HOLD, str(path), str(out)], stdout=subprocess.PIPE,
                               text=True, cwd=ROOT)  # fmt: skip
    assert process.stdout.readline() == "locked\n" and (out / LOCK).is_file()
    process.send_signal(sent)
    assert process.wait(timeout=60) == -sent
    assert not (out / LOCK).exists()


CTRL_C_WHILE_LOADING = """
import builtins, os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores SIGINT)
real, target = builtins.__import__, sys.argv[1]
def importing(name, globals=None, locals=None, fromlist=(), level=0):
    if target in [name, *(f"{name}.{inner}" for inner in fromlist or ())]:  # Ctrl-C while it loads
        os.kill(os.getpid(), signal.SIGINT)
    return real(name, globals, locals, fromlist, level)
builtins.__import__ = importing
sys.argv = ["lora-rl", *sys.argv[2:]]
exec(sys.stdin.read())
"""
ENTRY_POINT = re.search(r'^lora-rl = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)[1]
RUN_ENTRY_POINT = f"import importlib; getattr(importlib.import_module({ENTRY_POINT.split(':')[0]!r}), " \
                  f"{ENTRY_POINT.split(':')[1]!r})()"  # fmt: skip
RUN_MODULE = "import runpy; runpy.run_module('lora_rl', run_name='__main__', alter_sys=True)"  # python -m lora_rl


@pytest.mark.parametrize("launcher", [RUN_ENTRY_POINT, RUN_MODULE], ids=["lora-rl", "python -m lora_rl"])
@pytest.mark.parametrize("module", ["typer", "lora_rl.commands.train_reward"])
def test_ctrl_c_while_the_program_loads_is_one_line(write_recipe, launcher, module):
    argv = [sys.executable, "-c", CTRL_C_WHILE_LOADING, module, "train-reward", str(write_recipe({}))]
    result = subprocess.run(argv, input=launcher, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip() == "warning: interrupted (Ctrl-C)"
