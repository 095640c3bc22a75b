"""The user's files: lora-rl removes or replaces only what it wrote, locks the output directory it writes to,
honours the umask, and resumes where a cluster needs it (killed early, killed mid-write, finished, damaged)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lora_rl import builtin
from lora_rl.cli import app
from lora_rl.commands import train_reward
from lora_rl.models import tiny
from lora_rl.recipe import load_recipe
from lora_rl.training import checkpoint
from lora_rl.training import lock as run_lock
from lora_rl.training.checkpoint import CheckpointError, write_atomically
from lora_rl.training.lock import LOCK, release_lock
from lora_rl.training.resume import checkpoints, trim_metrics
from lora_rl.training.run_dir import start_run_dir
from tests.test_resume import ROOT, reward_recipe

runner = CliRunner()


def tree(directory: Path) -> dict[str, tuple[int, int]]:
    """Every entry under `directory` (links not followed) with its size and mtime: what "untouched" means."""
    return {str(p.relative_to(directory)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in directory.rglob("*")}


def foreign(directory: Path, *names: str) -> None:
    """Directories of the user's (no lora-rl manifest), each with a file in it."""
    for name in names:
        (directory / name).mkdir(parents=True)
        (directory / name / "notes.txt").write_text("the user's")


def own_checkpoint(directory: Path) -> Path:
    return write_atomically(directory, lambda tmp: (tmp / "w.safetensors").write_bytes(b"w"), step=0)


@pytest.fixture
def recipe(write_recipe, tmp_path):
    return load_recipe(write_recipe({}))


# ---------------------------------------------------------------- never touch what lora-rl did not write


def test_plain_run_leaves_entries_it_did_not_write_alone(recipe, tmp_path):
    out = tmp_path / "out"
    foreign(out, ".something.tmp-1", ".final.old-2", "final")
    (out / ".something.old-3").write_text("the user's")
    before = tree(out)
    with pytest.raises(CheckpointError, match=f"{out / 'final'}: not written by lora-rl"):
        start_run_dir(out, recipe, overwrite=False)
    with pytest.raises(CheckpointError, match=f"{out / 'final'}: not written by lora-rl"):
        start_run_dir(out, recipe, overwrite=True)
    assert tree(out) == before
    shutil.rmtree(out / "final")
    start_run_dir(out, recipe, overwrite=False)  # nothing of the user's is in the way now
    assert (out / ".something.tmp-1" / "notes.txt").is_file() and (out / ".something.old-3").is_file()
    assert (out / ".final.old-2" / "notes.txt").is_file() and not (out / "final").exists()


def test_overwrite_replaces_only_lora_rl_checkpoints(recipe, tmp_path):
    out = start_run_dir(tmp_path / "out", recipe, overwrite=False)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "samples.jsonl").write_text('{"update": 1}\n')
    own_checkpoint(out / "checkpoint-2")
    foreign(out, "checkpoint-3")
    with pytest.raises(CheckpointError, match=f"{out / 'checkpoint-3'}: not written by lora-rl"):
        start_run_dir(out, recipe, overwrite=True)
    assert (out / "checkpoint-2").is_dir() and (out / "metrics.jsonl").is_file()  # nothing deleted before refusing
    assert (out / "samples.jsonl").is_file()
    shutil.rmtree(out / "checkpoint-3")
    start_run_dir(out, recipe, overwrite=True)
    assert not (out / "checkpoint-2").exists() and not (out / "metrics.jsonl").exists()
    assert not (out / "samples.jsonl").exists()


def test_run_files_lora_rl_did_not_write_are_not_replaced(recipe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "recipe.yaml").write_text("the user's own recipe")
    with pytest.raises(CheckpointError, match=f"{out / 'recipe.yaml'}: not written by lora-rl"):
        start_run_dir(out, recipe, overwrite=True)
    assert (out / "recipe.yaml").read_text() == "the user's own recipe"
    (out / "recipe.yaml").unlink()
    for name in ("metrics.jsonl", "samples.jsonl"):
        (out / name).write_text("the user's\n")
        with pytest.raises(CheckpointError, match=f"{out / name}: not written by lora-rl"):
            start_run_dir(out, recipe, overwrite=True)
        assert (out / name).read_text() == "the user's\n"
        (out / name).rename(out / f"{name}.kept")


def test_symlinked_output_dir_touches_nothing_of_the_user_in_the_target(recipe, tmp_path):
    target = tmp_path / "target"
    foreign(target, "checkpoint-1", ".checkpoint-1.tmp-x")
    elsewhere = own_checkpoint(tmp_path / "elsewhere")
    (target / "checkpoint-5").symlink_to(elsewhere)  # lora-rl's files, but the link is not lora-rl's
    (tmp_path / "link").symlink_to(target)
    before, kept = tree(target), tree(elsewhere)
    for overwrite in (False, True):
        with pytest.raises(CheckpointError, match="checkpoint-1: not written by lora-rl"):
            start_run_dir(tmp_path / "link", recipe, overwrite=overwrite)
    shutil.rmtree(target / "checkpoint-1")
    with pytest.raises(CheckpointError, match="checkpoint-5: not written by lora-rl"):
        start_run_dir(tmp_path / "link", recipe, overwrite=True)
    del before["checkpoint-1"], before["checkpoint-1/notes.txt"]
    assert tree(target) == before and tree(elsewhere) == kept


def test_interrupted_saves_of_lora_rl_are_recovered(recipe, tmp_path, monkeypatch):
    out = start_run_dir(tmp_path / "out", recipe, overwrite=False)
    own_checkpoint(out / "final")
    os.replace(out / "final", out / ".final.old-7")  # killed between moving final aside and renaming the new one
    own_checkpoint(out / "checkpoint-2")
    os.replace(own_checkpoint(out / "spare"), out / ".checkpoint-2.old-8")  # killed before deleting the old one

    def killed(tmp: Path) -> None:
        (tmp / "w.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # with the cleanup below disabled: what SIGKILL leaves

    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(out / "checkpoint-4", killed, step=4)
    monkeypatch.undo()
    assert len(list(out.glob(".checkpoint-4.tmp-*"))) == 1
    start_run_dir(out, recipe, overwrite=False, resuming=True)
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK) == [
        ".lora-rl-run.json", "checkpoint-2", "final", "recipe.yaml"
    ]  # fmt: skip


def full_disk(monkeypatch, name: str) -> None:
    """Writing a file named `name` fills the disk half-way through, as Python reports it: no path in the error."""
    write_text = Path.write_text

    def write(path: Path, text: str, *args, **kwargs):
        if path.name != name:
            return write_text(path, text, *args, **kwargs)
        write_text(path, text[: len(text) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", write)


def test_a_full_disk_at_the_start_names_the_path_and_leaves_nothing_behind(write_recipe, tmp_path, monkeypatch):
    path = reward_recipe(write_recipe, tmp_path, max_steps=1)
    out = Path(load_recipe(path).output_dir)
    with monkeypatch.context() as patched:
        full_disk(patched, ".recipe.yaml.tmp")
        result = runner.invoke(app, ["train-reward", str(path)], env={"COLUMNS": "400"})
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr == f"error: No space left on device: {out / 'recipe.yaml'}\n"
    assert sorted(p.name for p in out.iterdir()) == [".lora-rl-run.json"]  # no temporary, no lock
    result = runner.invoke(app, ["train-reward", str(path)])  # space again: the run starts where it stopped
    assert result.exit_code == 0, result.output


def test_the_next_start_removes_the_temporary_run_files_of_a_killed_one(recipe, tmp_path):
    out = start_run_dir(tmp_path / "out", recipe, overwrite=False)
    (out / ".recipe.yaml.tmp").write_text("seed: 4")  # killed while saving the recipe
    (out / ".metrics.jsonl.tmp-k3j4h5g6").write_text('{"step"')  # killed while trimming metrics on resume
    (out / ".notes.tmp").write_text("the user's")
    (out / ".recipe.yaml.tmp-link").symlink_to(out / ".notes.tmp")
    start_run_dir(out, recipe, overwrite=False, resuming=True)
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK) == [
        ".lora-rl-run.json", ".notes.tmp", ".recipe.yaml.tmp-link", "recipe.yaml"]  # fmt: skip


def test_a_kill_while_building_a_built_in_model_is_cleaned_by_the_next_build(tmp_path, monkeypatch, gpt2_dir):
    monkeypatch.setenv("LORA_RL_HOME", str(tmp_path))
    models = tmp_path / "models"

    def killed(name: str, directory: Path) -> None:
        (directory / "config.json").write_text("{")
        raise KeyboardInterrupt  # with the cleanup below disabled: what SIGKILL leaves

    with monkeypatch.context() as patched:
        patched.setattr(tiny, "save", killed)
        patched.setattr(builtin.shutil, "rmtree", lambda *a, **k: None)
        with pytest.raises(KeyboardInterrupt):
            builtin.materialize("tiny-gpt2")
    assert len(list(models.glob(".tiny-gpt2-*"))) == 1 and not (models / "tiny-gpt2").exists()
    (models / ".tiny-llama-notes").mkdir()  # no mark of lora-rl's: not lora-rl's
    assert builtin.materialize("tiny-gpt2") == models / "tiny-gpt2"
    assert sorted(p.name for p in models.iterdir()) == [".lock", ".tiny-llama-notes", "tiny-gpt2"]
    assert sorted(p.name for p in (models / "tiny-gpt2").iterdir()) == sorted(p.name for p in gpt2_dir.iterdir())


# ---------------------------------------------------------------- the lock


HOLD = """
import sys
from lora_rl.training.run_dir import start_run_dir
from lora_rl.recipe import load_recipe
start_run_dir(sys.argv[2], load_recipe(sys.argv[1]), overwrite=False)
print("locked", flush=True)
sys.stdin.read()
"""


def hold(recipe_path: Path, out: Path) -> subprocess.Popen:
    """Another process holding `out`, as a running run does, until its stdin closes."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(recipe_path), str(out)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    assert process.stdout.readline() == "locked\n"
    return process


def test_second_run_on_a_locked_output_dir_is_refused_then_stale_lock_taken_over(write_recipe, tmp_path, capsys):
    path = write_recipe({})
    recipe = load_recipe(path)
    out = Path(recipe.output_dir)
    first = hold(path, out)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = tree(out)
    host = socket.gethostname()
    for overwrite, resuming in ((False, False), (True, False), (False, True)):
        with pytest.raises(CheckpointError, match=rf"output_dir {out} is in use by another run: pid {first.pid} "
                                                  rf"on {host} since \S+ \({out / LOCK}\)"):  # fmt: skip
            start_run_dir(out, recipe, overwrite=overwrite, resuming=resuming)
    assert tree(out) == before
    first.kill()
    first.wait()
    start_run_dir(out, recipe, overwrite=True)
    warning = f"took over the lock of a run that is no longer running (pid {first.pid} on {host}"
    assert warning in capsys.readouterr().err
    assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()


def test_lock_is_released_at_the_end_of_a_run_and_after_an_error(write_recipe, tmp_path, monkeypatch):
    recipe = load_recipe(reward_recipe(write_recipe, tmp_path, num_epochs=1, save_every=2))
    out = Path(recipe.output_dir)
    train_reward.run(recipe)
    assert not (out / LOCK).exists()
    assert all(LOCK not in checkpoint.verify(p)["files"] for p in [*checkpoints(out), out / "final"])

    def fail(*args, **kwargs):
        assert (out / LOCK).is_file()  # held while the run writes
        raise RuntimeError("failed during training")

    monkeypatch.setattr(train_reward, "save_checkpoint", fail)
    with pytest.raises(RuntimeError, match="failed during training"):
        train_reward.run(recipe, overwrite=True)
    assert not (out / LOCK).exists()


SIGTERM_HOLD = """
import sys, time
from lora_rl.training import run_dir
from lora_rl.training import lock as run_lock
from lora_rl.recipe import load_recipe
@run_lock.releases_lock
def run():
    run_dir.start_run_dir(sys.argv[2], load_recipe(sys.argv[1]), overwrite=False)
    print("locked", flush=True)
    time.sleep(120)
run()
"""


def test_lock_is_released_on_sigterm(write_recipe):
    path = write_recipe({})
    out = Path(load_recipe(path).output_dir)
    process = subprocess.Popen([sys.executable, "-c", SIGTERM_HOLD, str(path), str(out)], stdout=subprocess.PIPE,
                               text=True, cwd=ROOT)  # fmt: skip
    assert process.stdout.readline() == "locked\n" and (out / LOCK).is_file()
    process.terminate()  # what slurm sends a preempted or cancelled job
    assert process.wait(timeout=60) == -signal.SIGTERM
    assert not (out / LOCK).exists()


def disk_full(monkeypatch, only: str | None = None) -> None:
    """Every file the lock module opens to write (or only the one named `only`) fails as on a full disk (ENOSPC) at
    its first write."""
    real = os.fdopen

    def fdopen(fd, *args, **kwargs):
        opened = real(fd, *args, **kwargs)

        def write(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        if only is None or os.readlink(f"/proc/self/fd/{fd}").endswith(f"/{only}"):
            opened.write = write
        return opened

    monkeypatch.setattr(run_lock.os, "fdopen", fdopen)


def test_a_disk_full_at_start_leaves_no_lock_behind(write_recipe, tmp_path, monkeypatch):
    path = reward_recipe(write_recipe, tmp_path, num_epochs=1, save_every=0)
    out = Path(load_recipe(path).output_dir)
    disk_full(monkeypatch)
    result = runner.invoke(app, ["train-reward", str(path)], env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    assert f"output_dir {out}: cannot write {LOCK}: No space left on device" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (out / LOCK).exists() and not list(out.glob(f"{LOCK}*"))  # nor half of one
    monkeypatch.undo()  # space freed
    result = runner.invoke(app, ["train-reward", str(path), "--resume", "auto"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("content", [b"", b"{\"pid\": 12", b"\xff\xfe not a lock"], ids=["empty", "cut", "garbage"])
def test_an_empty_or_unreadable_lock_is_stale(recipe, tmp_path, capsys, content):
    """No run writes its lock in place any more (it appears whole, by link): an empty or unreadable one was left
    by a run that failed or was killed writing it, and nothing clears it but lora-rl."""
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_bytes(content)
    run_lock.refuse_locked(out)  # not a live run's
    start_run_dir(out, recipe, overwrite=False)
    assert f"output_dir {out}: took over the lock of a run that is no longer running" in capsys.readouterr().err
    assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()


def test_the_lock_appears_whole(tmp_path, monkeypatch):
    """Between its creation and its content a lock never exists: whoever sees it, sees its holder."""
    seen = []
    real = os.fdopen

    def fdopen(fd, *args, **kwargs):
        seen.append((tmp_path / LOCK).exists())  # the content is about to be written
        return real(fd, *args, **kwargs)

    monkeypatch.setattr(run_lock.os, "fdopen", fdopen)
    run_lock.take_lock(tmp_path)
    run_lock.release_lock(tmp_path)
    assert seen == [False]


def test_without_hard_links_the_lock_is_created_in_place(tmp_path, monkeypatch):
    """Some mounts (FUSE, SMB) refuse link(2): the lock is then created with O_EXCL and written at once; a failed
    write removes it."""

    def no_links(source, target):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(run_lock.os, "link", no_links)
    run_lock.take_lock(tmp_path)
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert [p.name for p in tmp_path.iterdir()] == [LOCK]  # its temporary twin is gone
    run_lock.release_lock(tmp_path)
    assert not (tmp_path / LOCK).exists()
    disk_full(monkeypatch, only=LOCK)  # the temporary file was written, the lock itself is not
    with pytest.raises(CheckpointError, match="cannot write .lora-rl.lock: No space left on device"):
        run_lock.take_lock(tmp_path)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- umask


@pytest.mark.parametrize(("mask", "directories", "files"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_checkpoints_honour_the_umask(tmp_path, mask, directories, files):
    def write(tmp: Path) -> None:
        save_file({"w": torch.zeros(2)}, tmp / "adapter_model.safetensors")  # safetensors makes files 0600
        (tmp / "critic").mkdir()
        (tmp / "critic" / "adapter_config.json").write_text("{}")

    previous = os.umask(mask)
    try:
        final = write_atomically(tmp_path / "final", write, step=1)
    finally:
        os.umask(previous)
    assert final.stat().st_mode & 0o777 == directories and (final / "critic").stat().st_mode & 0o777 == directories
    modes = {p.name: p.stat().st_mode & 0o777 for p in final.rglob("*") if p.is_file()}
    assert modes == dict.fromkeys(["adapter_model.safetensors", "adapter_config.json", "manifest.json"], files)


# ---------------------------------------------------------------- resume where a cluster needs it


def test_resume_auto_after_a_kill_before_the_first_checkpoint_starts_fresh(write_recipe, tmp_path, capsys):
    recipe = load_recipe(reward_recipe(write_recipe, tmp_path, num_epochs=1, save_every=0))
    out = start_run_dir(recipe.output_dir, recipe, overwrite=False)  # the killed run's start
    (out / "metrics.jsonl").write_text('{"step": 2, "split": "train", "loss": 9.0}\n{"step": 4, "spl')
    final = train_reward.run(recipe, resume="auto")
    assert checkpoint.verify(final)["step"] == 5
    assert f"resume auto: {out} holds no checkpoint; starting fresh" in " ".join(capsys.readouterr().err.split())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 2 and lines[0]["loss"] != 9.0 and lines[-1]["step"] == 5  # the killed run's are gone


def test_partial_last_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    trim_metrics(path, "step", 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert f"{path}: dropped its last line, cut short" in " ".join(capsys.readouterr().err.split())
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(CheckpointError, match=f"{path}: line 2 is not JSON"):
        trim_metrics(path, "step", 2)


TRIM_KILLED = """
import resource, signal, sys
from pathlib import Path
from lora_rl.training.resume import trim_metrics
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; by default the process dies
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # killed once a write passes 4 KiB
trim_metrics(Path(sys.argv[1]), "step", 900)
"""


def test_a_kill_while_metrics_are_rewritten_loses_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps({"step": i, "loss": 1 / i}) + "\n" for i in range(1, 1001))
    path.write_text(text)
    result = subprocess.run([sys.executable, "-c", TRIM_KILLED, str(path)], cwd=ROOT, capture_output=True)
    assert result.returncode == -signal.SIGXFSZ, result.stderr
    assert path.read_text() == text


def test_resume_auto_on_a_finished_run_touches_nothing(write_recipe, tmp_path):
    path = reward_recipe(write_recipe, tmp_path, num_epochs=1, save_every=2)
    out = Path(load_recipe(path).output_dir)
    assert runner.invoke(app, ["train-reward", str(path)]).exit_code == 0
    before = tree(out)
    result = runner.invoke(app, ["train-reward", str(path), "--resume", "auto"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert f"{out} holds a finished run ({out / 'final'}, step 5); nothing to do" in result.stdout
    assert tree(out) == before


def test_resume_auto_on_a_finished_ppo_run_touches_nothing(tmp_path):
    args = ["ppo", str(ROOT / "recipes/ppo-demo.yaml"), f"output_dir={tmp_path / 'out'}", "ppo.num_updates=2",
            "train.save_every=1", "ppo.rollout_batch_size=8", "train.batch_size=8"]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    before = tree(tmp_path / "out")
    result = runner.invoke(app, [*args, "--resume", "auto"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "holds a finished run" in result.stdout and tree(tmp_path / "out") == before


def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(write_recipe, tmp_path, capsys):
    recipe = load_recipe(reward_recipe(write_recipe, tmp_path, num_epochs=1, save_every=2))
    out = Path(recipe.output_dir)
    train_reward.run(recipe)
    shutil.rmtree(out / "final")  # as a crash after step 4 leaves the run
    (out / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"torn")
    with pytest.raises(CheckpointError, match="checkpoint-4/adapter_model.safetensors: sha256 differs"):
        train_reward.run(recipe, resume=str(out / "checkpoint-4"))  # named explicitly: an error
    for resume in ("auto", str(out)):
        final = train_reward.run(recipe, resume=resume)
        warning = " ".join(capsys.readouterr().err.split())
        assert f"{out / 'checkpoint-4'} is damaged" in warning and f"resuming from {out / 'checkpoint-2'}" in warning
        assert checkpoint.verify(final)["step"] == 5
        shutil.rmtree(final)
        (out / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"torn")


def test_resume_auto_keeps_checkpoints_that_lost_their_state(write_recipe, tmp_path, capsys):
    """A checkpoint-N/ without trainer_state.json is damaged, never absent: `--resume auto` must not take the run
    for one that never saved, and so delete it."""
    path = reward_recipe(write_recipe, tmp_path, num_epochs=1, save_every=2)
    out = Path(load_recipe(path).output_dir)
    assert runner.invoke(app, ["train-reward", str(path)]).exit_code == 0
    shutil.rmtree(out / "final")
    for state in out.glob("checkpoint-*/trainer_state.json"):
        state.unlink()
    before = tree(out)
    result = runner.invoke(app, ["train-reward", str(path), "--resume", "auto"], env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    error = " ".join(result.stderr.split())
    assert "no intact checkpoint to resume from" in error and "starting fresh" not in error
    assert f"{out / 'checkpoint-2'} is damaged" in error and f"{out / 'checkpoint-4'} is damaged" in error
    assert tree(out) == before  # refused, everything kept


def test_resume_auto_warns_when_the_newest_checkpoint_lost_its_state(write_recipe, tmp_path, capsys):
    recipe = load_recipe(reward_recipe(write_recipe, tmp_path, num_epochs=1, save_every=2))
    out = Path(recipe.output_dir)
    train_reward.run(recipe)
    shutil.rmtree(out / "final")
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    final = train_reward.run(recipe, resume="auto")
    warning = " ".join(capsys.readouterr().err.split())
    assert f"{out / 'checkpoint-4'} is damaged" in warning and f"resuming from {out / 'checkpoint-2'}" in warning
    assert checkpoint.verify(final)["step"] == 5


def test_fresh_start_of_resume_auto_deletes_only_what_holds_nothing(recipe, tmp_path, capsys):
    """Without a checkpoint to continue from, `--resume auto` starts afresh deleting only the killed run's metric
    and sample lines; a final/ it cannot resume (damaged, other settings) is refused and kept."""
    out = start_run_dir(tmp_path / "out", recipe, overwrite=False)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "notes.txt").write_text("the user's")
    start_run_dir(out, recipe, overwrite=False, restart=True)
    warning = " ".join(capsys.readouterr().err.split())
    assert "starting fresh (deleting metrics.jsonl" in warning and "keeping notes.txt" in warning
    assert not (out / "metrics.jsonl").exists() and (out / "notes.txt").is_file()
    own_checkpoint(out / "final")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    release_lock(out)
    before = tree(out)
    refused = rf"{out} holds final but no checkpoint to continue from; nothing deleted"
    with pytest.raises(CheckpointError, match=refused):
        start_run_dir(out, recipe, overwrite=False, restart=True)
    assert tree(out) == before
