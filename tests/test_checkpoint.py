from __future__ import annotations

import json
import os

import pytest

from lora_rl.training import checkpoint
from lora_rl.training.checkpoint import CheckpointError, verify, write_atomically


def write_files(files: dict[str, bytes]):
    def write(tmp):
        for name, data in files.items():
            (tmp / name).write_bytes(data)

    return write


def test_manifest_lists_every_file_with_sha256(tmp_path):
    final = write_atomically(tmp_path / "ckpt", write_files({"a.safetensors": b"abc", "b.json": b"{}"}), step=7)
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["step"] == 7
    assert manifest["files"] == {
        "a.safetensors": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",  # sha256("abc")
        "b.json": "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",  # sha256("{}")
    }
    assert set(manifest["versions"]) == {"lora_rl", "torch", "transformers", "peft"}
    assert verify(final)["step"] == 7


def test_failure_during_save_leaves_nothing_under_final_name(tmp_path):
    def crash(tmp):
        (tmp / "half.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "ckpt", crash, step=1)
    assert list(tmp_path.iterdir()) == []


def test_failure_during_save_keeps_previous_checkpoint(tmp_path):
    write_atomically(tmp_path / "ckpt", write_files({"w.safetensors": b"old"}), step=1)

    def crash(tmp):
        (tmp / "w.safetensors").write_bytes(b"new-but-half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(tmp_path / "ckpt", crash, step=2)
    assert (tmp_path / "ckpt" / "w.safetensors").read_bytes() == b"old"
    assert verify(tmp_path / "ckpt")["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_save_replaces_previous_checkpoint(tmp_path):
    write_atomically(tmp_path / "ckpt", write_files({"w.safetensors": b"old", "extra.json": b"1"}), step=1)
    write_atomically(tmp_path / "ckpt", write_files({"w.safetensors": b"new"}), step=2)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["manifest.json", "w.safetensors"]
    assert verify(tmp_path / "ckpt")["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_truncated_or_missing_file_is_named(tmp_path):
    final = write_atomically(tmp_path / "ckpt", write_files({"w.safetensors": b"x" * 100, "c.json": b"{}"}), 0)
    (final / "w.safetensors").write_bytes(b"x" * 50)
    with pytest.raises(CheckpointError, match=r"w.safetensors: sha256 differs from manifest.json"):
        verify(final)
    (final / "c.json").unlink()
    with pytest.raises(CheckpointError, match=r"c.json: listed in manifest.json but missing"):
        verify(final)


def test_directory_without_manifest_is_accepted_as_foreign(tmp_path):
    assert verify(tmp_path) is None


def test_corrupt_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt manifest"):
        verify(tmp_path)


def test_pickle_weights_refused_unless_opted_in(tmp_path):
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match=r"adapter_model.bin\), which can run arbitrary code"):
        checkpoint.refuse_pickle(tmp_path, allow_pickle=False)
    checkpoint.refuse_pickle(tmp_path, allow_pickle=True)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    checkpoint.refuse_pickle(tmp_path, allow_pickle=False)  # safetensors present: those are read


def test_restart_recovers_from_a_killed_save(tmp_path):
    from lora_rl.training.checkpoint import recover_interrupted_saves

    write_atomically(tmp_path / "final", write_files({"w.safetensors": b"previous"}), step=1)
    os.replace(tmp_path / "final", tmp_path / ".final.old-123")  # killed between moving final aside and the rename
    write_atomically(tmp_path / "checkpoint-2", write_files({"w.safetensors": b"new"}), step=2)
    write_atomically(tmp_path / "spare", write_files({"w.safetensors": b"old"}), step=1)
    os.replace(tmp_path / "spare", tmp_path / ".checkpoint-2.old-9")  # replaced, only the deletion was missed
    (tmp_path / ".checkpoint-4.tmp-abc").mkdir()  # a save killed before its rename: its mark is written first
    (tmp_path / ".checkpoint-4.tmp-abc" / checkpoint.PARTIAL).touch()
    recover_interrupted_saves(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "final"]
    assert (tmp_path / "final" / "w.safetensors").read_bytes() == b"previous"


def test_other_safetensors_files_do_not_make_pickle_weights_safe(tmp_path):
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    (tmp_path / "optimizer.safetensors").write_bytes(b"")  # every lora-rl checkpoint holds one
    with pytest.raises(CheckpointError, match=r"the weights are pickle \(adapter_model.bin\)"):
        checkpoint.refuse_pickle(tmp_path, allow_pickle=False)


def test_recovery_leaves_what_lora_rl_did_not_write(tmp_path):
    from lora_rl.training.checkpoint import recover_interrupted_saves

    for name in (".checkpoint-4.tmp-abc", ".final.old-123", ".x.old-1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("the user's")
    recover_interrupted_saves(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint-4.tmp-abc", ".final.old-123", ".x.old-1"]
    assert all((tmp_path / p / "notes.txt").is_file() for p in (".checkpoint-4.tmp-abc", ".final.old-123"))
