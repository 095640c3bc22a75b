"""lora-rl merge: streaming and in-memory merges against peft's merge_and_unload, the check, and every error."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig
from typer.testing import CliRunner

from lora_rl import builtin
from lora_rl.adapters import merge, streaming_merge
from lora_rl.cli import app
from lora_rl.models import tiny
from lora_rl.models.build import ModelError, build
from lora_rl.models.reward_model import RewardModel
from lora_rl.recipe import load_recipe
from lora_rl.training import checkpoint

runner = CliRunner()
IDS = torch.tensor([[2, 20, 21, 22, 23, 24, 25, 26], [2, 30, 31, 32, 33, 34, 35, 36]])


# ---------------------------------------------------------------- helpers


def quiet_load(cls, path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(path, **kwargs)


def randomize(model, seed: int = 0) -> None:
    """Give LoRA B (zero at init) and saved whole modules random values, so every part of the adapter matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def attach(model, adapter: Path) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on tied and Conv1D layers
        return PeftModel.from_pretrained(model, adapter)


def make_adapter(path: Path, base: Path, reward: bool = False, seed: int = 0, **lora) -> Path:
    """A peft adapter for `base`, saved by plain peft (no manifest), with random non-zero weights."""
    cls = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    model = quiet_load(cls, base, **({"num_labels": 1, "pad_token_id": 0} if reward else {}))
    config = LoraConfig(task_type="SEQ_CLS" if reward else "CAUSAL_LM", r=4, lora_alpha=8, **lora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config)
        randomize(peft_model, seed)
        peft_model.save_pretrained(path)
    return path


def peft_merged(adapter: Path, base: Path, reward: bool = False, dtype=torch.float32, untie: bool = False):
    """The reference: peft's own merge_and_unload on the base (untied first, the way peft's docs say, if asked)."""
    cls = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    kwargs = {"num_labels": 1, "pad_token_id": 0} if reward else {}
    if untie:
        model = quiet_load(cls, base, dtype=dtype, tie_word_embeddings=False, **kwargs)
        model.lm_head.weight.data = model.get_input_embeddings().weight.data.clone()
    else:
        model = quiet_load(cls, base, dtype=dtype, **kwargs)
    return attach(model, adapter).merge_and_unload()


def saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors |= load_file(path)
    return tensors


def assert_same_tensors(directory: Path, model) -> None:
    """The merged directory holds exactly the model's tensors, each bitwise equal."""
    saved, expected = saved_tensors(directory), model.state_dict()
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # transformers saves a tied weight once
    assert saved.keys() == expected.keys()
    for name, tensor in saved.items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name


def stream(adapter: Path, out: Path, **kwargs) -> Path:
    return merge.run(adapter, out, check=False, streaming=True, **kwargs)


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory) -> Path:
    """tiny-llama saved in several small shards (with an index), as large bases are."""
    path = tmp_path_factory.mktemp("sharded") / "llama"
    quiet_load(AutoModelForCausalLM, builtin.materialize("tiny-llama")).save_pretrained(path, max_shard_size="100KB")
    tiny.build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bf16") / "llama"
    quiet_load(AutoModelForCausalLM, builtin.materialize("tiny-llama"), dtype=torch.bfloat16).save_pretrained(path)
    tiny.build_tokenizer().save_pretrained(path)
    return path


# ---------------------------------------------------------------- streaming == peft


ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "llama": ("tiny-llama", {"target_modules": ALL_LLAMA}),
    "gpt2-conv1d": ("tiny-gpt2", {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
    # peft flips fan_in_fan_out per layer: the saved flag says False, yet the Conv1D layers are (in, out).
    "gpt2-conv1d-flag-off": ("tiny-gpt2", {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": False}),
    "rslora-patterns": ("tiny-llama", {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_rslora": True,
                                       "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}}),
    "embedding": ("tiny-llama", {"target_modules": ["embed_tokens", "up_proj"]}),
    "modules-to-save": ("tiny-llama", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_streaming_equals_peft_merge_bitwise(case, tmp_path):
    base, lora = CASES[case]
    base_dir = builtin.materialize(base)
    adapter = make_adapter(tmp_path / "adapter", base_dir, **lora)
    out = stream(adapter, tmp_path / "out")
    assert_same_tensors(out, peft_merged(adapter, base_dir))
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_rslora_scaling_is_alpha_over_sqrt_r(tmp_path):
    """An independent computation of one merged weight: W + alpha/sqrt(r) * B @ A."""
    base_dir = builtin.materialize("tiny-llama")
    adapter = make_adapter(tmp_path / "adapter", base_dir, target_modules=["q_proj"], use_rslora=True)
    lora, name = load_file(adapter / "adapter_model.safetensors"), "model.layers.0.self_attn.q_proj"
    a, b = lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"]
    base = load_file(base_dir / "model.safetensors")[f"{name}.weight"]
    merged = load_file(stream(adapter, tmp_path / "out") / "model.safetensors")[f"{name}.weight"]
    torch.testing.assert_close(merged, base + 8 / 4**0.5 * b @ a, rtol=0, atol=1e-6)


def test_reward_adapter_streams_to_a_sequence_classifier(tmp_path):
    base_dir = builtin.materialize("tiny-llama")
    adapter = make_adapter(tmp_path / "adapter", base_dir, reward=True, target_modules=["q_proj", "down_proj"])
    out = stream(adapter, tmp_path / "out")
    reference = peft_merged(adapter, base_dir, reward=True)
    assert_same_tensors(out, reference)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == 0
    assert "lm_head.weight" not in saved_tensors(out)  # a classifier has no LM head


def test_tied_lm_head_is_untied(tmp_path):
    base_dir = builtin.materialize("tiny-gpt2")
    adapter = make_adapter(tmp_path / "adapter", base_dir, target_modules=["c_attn", "lm_head"])
    out = stream(adapter, tmp_path / "out")
    assert_same_tensors(out, peft_merged(adapter, base_dir, untie=True))
    saved, base = saved_tensors(out), load_file(base_dir / "model.safetensors")
    assert torch.equal(saved["transformer.wte.weight"], base["transformer.wte.weight"])  # only lm_head moved
    assert not torch.equal(saved["lm_head.weight"], base["transformer.wte.weight"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    with torch.no_grad():
        adapter_model = attach(quiet_load(AutoModelForCausalLM, base_dir), adapter)
        merged = quiet_load(AutoModelForCausalLM, out)
        assert merged.lm_head.weight is not merged.transformer.wte.weight
        torch.testing.assert_close(merged(IDS).logits, adapter_model(IDS).logits, rtol=0, atol=1e-5)


def test_multi_shard_base_gives_the_same_shards(tmp_path, sharded_llama):
    adapter = make_adapter(tmp_path / "adapter", sharded_llama, target_modules=ALL_LLAMA + ["lm_head"])
    out = stream(adapter, tmp_path / "out")
    shards = sorted(p.name for p in sharded_llama.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["weight_map"] == json.loads((sharded_llama / "model.safetensors.index.json").read_text())["weight_map"]
    assert_same_tensors(out, peft_merged(adapter, sharded_llama))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tensors_copied_in_pieces_are_unchanged(tmp_path, monkeypatch, dtype):
    adapter = make_adapter(tmp_path / "adapter", builtin.materialize("tiny-gpt2"), target_modules=["c_attn"])
    whole = saved_tensors(stream(adapter, tmp_path / "whole", dtype=dtype))
    monkeypatch.setattr(streaming_merge, "CHUNK", 1000)  # bytes: the embeddings go in many pieces
    pieces = saved_tensors(stream(adapter, tmp_path / "pieces", dtype=dtype))
    assert whole.keys() == pieces.keys()
    for name, tensor in whole.items():
        assert torch.equal(tensor, pieces[name]), name


def test_bf16_within_one_ulp_of_peft_and_equal_to_in_memory(tmp_path, bf16_llama):
    adapter = make_adapter(tmp_path / "adapter", bf16_llama, target_modules=ALL_LLAMA)
    streamed = saved_tensors(stream(adapter, tmp_path / "stream"))
    in_memory = saved_tensors(merge.run(adapter, tmp_path / "memory", streaming=False))  # checked, in bf16
    native = peft_merged(adapter, bf16_llama, dtype=torch.bfloat16).state_dict()  # peft rounds twice in bf16
    for name, tensor in streamed.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, in_memory[name]), name
        larger = torch.maximum(tensor.abs(), native[name].abs())
        ulp = torch.nextafter(larger, torch.tensor(float("inf"), dtype=torch.bfloat16)) - larger
        assert ((tensor.float() - native[name].float()).abs() <= ulp.float()).all(), name


def test_dtype_option_casts_once(tmp_path):
    adapter = make_adapter(tmp_path / "adapter", builtin.materialize("tiny-llama"), target_modules=["q_proj"])
    out = stream(adapter, tmp_path / "out", dtype="float16")
    float32 = saved_tensors(stream(adapter, tmp_path / "f32"))
    for name, tensor in saved_tensors(out).items():
        assert torch.equal(tensor, float32[name].half()), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


# ---------------------------------------------------------------- round trips through the CLI


def project_reward_adapter(write_recipe, path: Path) -> Path:
    """A reward adapter as train-reward saves it: manifest, tokenizer, recipe, base fingerprint."""
    recipe = load_recipe(write_recipe({"actor": {"model": {"lora_rank": 4, "target_modules": ["q_proj", "v_proj"]}},
                                       "train": {"gradient_checkpointing": False}}))  # fmt: skip
    built = build(recipe, "reward")
    randomize(built.model)
    fingerprint = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": len(tiny.VOCAB)}
    checkpoint.save_adapter(built.model, path, step=7, tokenizer=built.tokenizer, recipe=recipe,
                            extra={"base_fingerprint": fingerprint})  # fmt: skip
    return path


GPT2_TIED = ["c_attn", "c_fc", "lm_head"]


@pytest.fixture
def round_trips(tmp_path, write_recipe) -> dict[str, tuple[Path, str]]:
    """Adapter directories for both built-in architectures and a reward model, with their heads."""
    return {
        "llama": (make_adapter(tmp_path / "llama", builtin.materialize("tiny-llama"), target_modules=ALL_LLAMA), "lm"),
        "gpt2": (make_adapter(tmp_path / "gpt2", builtin.materialize("tiny-gpt2"), target_modules=GPT2_TIED), "lm"),
        "reward": (project_reward_adapter(write_recipe, tmp_path / "reward"), "reward"),
    }


def adapter_outputs(adapter: Path, head: str) -> torch.Tensor:
    spec = merge.read_adapter(adapter)
    cls = AutoModelForSequenceClassification if head == "reward" else AutoModelForCausalLM
    kwargs = {"num_labels": 1, "pad_token_id": 0} if head == "reward" else {}
    with torch.no_grad():
        return attach(quiet_load(cls, spec.base, **kwargs), adapter)(IDS).logits


LOAD_WITHOUT_PEFT = """
import sys, torch
sys.modules["peft"] = None  # any import of peft now fails
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
ids, out = torch.tensor({ids}), {{}}
for name, path, head in {dirs}:
    cls = AutoModelForSequenceClassification if head == "reward" else AutoModelForCausalLM
    out[name] = cls.from_pretrained(path)(ids).logits.detach()
torch.save(out, {target!r})
"""


def test_merge_round_trips_and_loads_without_peft(tmp_path, round_trips):
    dirs = []
    for name, (adapter, head) in round_trips.items():
        result = runner.invoke(app, ["merge", str(adapter), str(tmp_path / f"out-{name}")], env={"COLUMNS": "300"})
        assert result.exit_code == 0, result.output
        assert "check: max |logit diff| merged vs adapter" in result.stdout and "): ok" in result.stdout
        assert ("unties them" in result.stderr) == (name == "gpt2")  # its lm_head is tied and targeted
        dirs.append((name, str(tmp_path / f"out-{name}"), head))
    script = LOAD_WITHOUT_PEFT.format(ids=IDS.tolist(), dirs=dirs, target=str(tmp_path / "logits.pt"))
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    merged = torch.load(tmp_path / "logits.pt")
    for name, (adapter, head) in round_trips.items():
        torch.testing.assert_close(merged[name], adapter_outputs(adapter, head), rtol=0, atol=1e-5)


def test_merged_reward_model_gives_the_adapters_rewards(tmp_path, write_recipe):
    adapter = project_reward_adapter(write_recipe, tmp_path / "reward")
    out = merge.run(adapter, tmp_path / "out")  # in memory, checked
    assert {"tokenizer.json", "recipe.yaml", "manifest.json"} <= {p.name for p in out.iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["the cat is good", "bad"], return_tensors="pt", padding=True)
    merged = quiet_load(AutoModelForSequenceClassification, out)
    llama = builtin.materialize("tiny-llama")
    base = quiet_load(AutoModelForSequenceClassification, llama, num_labels=1, pad_token_id=0)
    adapter_model = attach(base, adapter)
    with torch.no_grad():
        expected = RewardModel(adapter_model, "score")(batch.input_ids, batch.attention_mask)
        got = RewardModel(merged, "score")(batch.input_ids, batch.attention_mask)
        plain = merged(**batch).logits.squeeze(-1)  # transformers' own pooling, by pad_token_id
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(plain, expected, rtol=0, atol=1e-5)
    assert checkpoint.verify(out)["step"] == 7


# ---------------------------------------------------------------- modes, check


def test_dora_merges_in_memory_but_not_streaming(tmp_path):
    llama = builtin.materialize("tiny-llama")
    adapter = make_adapter(tmp_path / "adapter", llama, target_modules=["q_proj"], use_dora=True)
    result = runner.invoke(app, ["merge", str(adapter), str(tmp_path / "out"), "--streaming"], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    assert "the streaming merge does not support DoRA (use_dora); merge in memory with --in-memory" in result.stderr
    result = runner.invoke(app, ["merge", str(adapter), str(tmp_path / "out")], env={"COLUMNS": "300"})
    assert result.exit_code == 0 and "): ok" in result.stdout


def test_base_files_naming_tensors_otherwise_are_not_streamed(tmp_path):
    base = tmp_path / "renamed"
    shutil.copytree(builtin.materialize("tiny-llama"), base)
    tensors = load_file(base / "model.safetensors")
    tensors["model.final_norm.weight"] = tensors.pop("model.norm.weight")  # as a legacy checkpoint might
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    adapter = make_adapter(tmp_path / "adapter", builtin.materialize("tiny-llama"), target_modules=["q_proj"])
    with pytest.raises(ModelError, match="does not support tensor model.norm.weight, which the base's files lack"):
        stream(adapter, tmp_path / "out", base=base)


def test_unsupported_features_are_named():
    assert streaming_merge.unsupported_features({"init_lora_weights": "pissa", "lora_bias": True}) == [
        "LoRA biases (lora_bias)",
        "init_lora_weights 'pissa' (peft rewrites the base when loading it)",
    ]
    assert streaming_merge.unsupported_features({"init_lora_weights": "gaussian", "use_rslora": True}) == []


def test_mode_streams_when_the_base_does_not_fit_unless_told():
    assert merge.choose_mode(None, 10, 5) == (True, False)
    assert merge.choose_mode(None, 5, 10) == (False, True)
    assert merge.choose_mode(False, 10, 5) == (False, False)  # --in-memory: the user knows best
    assert merge.choose_mode(True, 5, None) == (True, True)  # budget unknown: everything "fits"


def test_large_base_streams_automatically_and_skips_the_check(tmp_path, monkeypatch):
    adapter = make_adapter(tmp_path / "adapter", builtin.materialize("tiny-llama"), target_modules=["q_proj"])
    monkeypatch.setattr(merge, "memory_budget", lambda: 1000)
    result = runner.invoke(app, ["merge", str(adapter), str(tmp_path / "out")], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "(streaming, tensor by tensor; chosen as the base needs" in result.stdout
    assert "warning: skipped the merged-vs-adapter check" in result.stderr


def test_a_wrong_merge_fails_the_check_and_writes_nothing(tmp_path, monkeypatch):
    adapter = make_adapter(tmp_path / "adapter", builtin.materialize("tiny-gpt2"), target_modules=["c_attn"])
    delta = streaming_merge.lora_delta
    monkeypatch.setattr(streaming_merge, "lora_delta", lambda lora, f: 2 * delta(lora, f))
    result = runner.invoke(app, ["merge", str(adapter), str(tmp_path / "out"), "--streaming"], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert result.stderr.startswith("error: check failed: merged and adapter logits differ by up to")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no OUT_DIR, no temporary directory


def test_tolerance_fits_the_dtype():
    reference = torch.full((2, 3), 10.0)
    assert merge.compare_logits(reference + 5e-4, reference, torch.float32)[1] == pytest.approx(1e-3)
    with pytest.raises(ModelError, match="over the float32 tolerance"):
        merge.compare_logits(reference + 2e-3, reference, torch.float32)
    merge.compare_logits(reference + 0.5, reference, torch.bfloat16)
    with pytest.raises(ModelError, match="tolerance 1; nothing was saved .--dtype float32 tells rounding"):
        merge.compare_logits(reference + 1.5, reference, torch.bfloat16)
    with pytest.raises(ModelError):
        merge.compare_logits(reference * float("nan"), reference, torch.bfloat16)


# ---------------------------------------------------------------- errors


@pytest.fixture
def llama_adapter(tmp_path) -> Path:
    return make_adapter(tmp_path / "adapter", builtin.materialize("tiny-llama"), target_modules=["q_proj", "v_proj"])


def other_llama(path: Path) -> Path:
    """A llama base of another width: an adapter for tiny-llama cannot fit it."""
    config = LlamaConfig(vocab_size=len(tiny.VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def without(adapter: Path, name: str) -> Path:
    (adapter / name).unlink()
    return adapter


def truncated(adapter: Path) -> Path:
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    return adapter


def sealed(adapter: Path, tmp: Path) -> Path:
    """A copy of the adapter sealed with lora-rl's manifest, as save_adapter leaves it."""
    return checkpoint.write_atomically(tmp / "sealed", lambda d: shutil.copytree(adapter, d, dirs_exist_ok=True), 0)


# case -> (ADAPTER_DIR and options, given the adapter and tmp_path; the error line without "error: ")
ERRORS = {
    "dir missing": (lambda a, t: [t / "nope"], "adapter directory {t}/nope not found"),
    "no adapter_config": (lambda a, t: [without(a, "adapter_config.json")],
                          "{a}: no adapter_config.json; not a peft adapter directory"),
    "weights missing": (lambda a, t: [without(a, "adapter_model.safetensors")],
                        "{a}/adapter_model.safetensors: weights file missing"),
    "weights truncated": (lambda a, t: [truncated(a)],
                          "{a}/adapter_model.safetensors: corrupt or truncated safetensors file"),
    "weights altered": (lambda a, t: [truncated(sealed(a, t))],
                        "{t}/sealed/adapter_model.safetensors: sha256 differs from manifest.json"),
    "base not found": (lambda a, t: [a, "--base", t / "no-base"],
                       "base model {t}/no-base (from --base) not found: no config.json there; pass --base DIR"),
    "shapes do not fit": (lambda a, t: [a, "--base", other_llama(t / "narrow")],
                          "the adapter does not fit the base {t}/narrow: model.layers.0.self_attn.q_proj: "
                          "LoRA A (4, 64) and B (64, 4) (r=4) do not fit its weight (32, 32)"),
    "layers missing": (lambda a, t: [a, "--base", "tiny-gpt2"], "the adapter does not fit the base "),
}  # fmt: skip


@pytest.mark.parametrize("case", ERRORS)
def test_merge_errors_one_line_each_and_nothing_written(case, tmp_path, llama_adapter):
    make_args, expected = ERRORS[case]
    adapter_dir, *options = make_args(llama_adapter, tmp_path)
    args = ["merge", str(adapter_dir), str(tmp_path / "out"), *map(str, options)]
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.output
    assert result.stderr.startswith("error: " + expected.format(a=llama_adapter, t=tmp_path))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_out_dir_holding_an_input_is_refused(tmp_path, llama_adapter):
    result = runner.invoke(app, ["merge", str(llama_adapter), str(tmp_path), "--force"], env={"COLUMNS": "400"})
    assert result.exit_code == 2
    assert result.stderr == f"error: OUT_DIR {tmp_path} holds the input {llama_adapter}; choose another directory\n"
    assert (llama_adapter / "adapter_model.safetensors").is_file()


def run_with_final(adapter: Path, tmp: Path) -> Path:
    """A run directory as a training command leaves it: its run record, and final/ sealed with lora-rl's manifest."""
    run = tmp / "run"
    run.mkdir()
    (run / checkpoint.RUN_RECORD).write_text(json.dumps({"files": list(checkpoint.RUN_FILES)}) + "\n")
    checkpoint.write_atomically(run / "final", lambda d: shutil.copytree(adapter, d, dirs_exist_ok=True), 0)
    return run


# case -> (ADAPTER_DIR, OUT_DIR), given the run directory and a plain adapter; the error line without "error: "
INSIDE = {
    "in the merged final/": (lambda r, a: (r / "final", r / "final/merged"),
                             "OUT_DIR {r}/final/merged is inside {r}/final, a lora-rl checkpoint or output (its "
                             "manifest.json), which a run's --overwrite or a merge --force replaces whole; choose a "
                             "directory outside it"),
    "in another checkpoint": (lambda r, a: (a, r / "final/merged"), "OUT_DIR {r}/final/merged is inside {r}/final"),
    "a checkpoint name of the run": (lambda r, a: (r / "final", r / "checkpoint-9"),
                                     "OUT_DIR {r}/checkpoint-9 is a checkpoint name (checkpoint-N, final) of the run "
                                     "in {r} (its .lora-rl-run.json), which the run's --overwrite deletes; choose "
                                     "another directory"),
    "under a checkpoint name of the run": (lambda r, a: (r / "final", r / "checkpoint-9/merged"),
                                           "OUT_DIR {r}/checkpoint-9/merged is inside {r}/checkpoint-9, a checkpoint "
                                           "name (checkpoint-N, final) of the run in {r}"),
    "in the plain adapter": (lambda r, a: (a, a / "merged"),
                             "OUT_DIR {a}/merged is inside the adapter directory {a}; choose a directory outside it"),
}  # fmt: skip


@pytest.mark.parametrize("case", INSIDE)
def test_out_dir_that_a_run_or_merge_would_delete_is_refused(case, tmp_path, llama_adapter):
    """A merged model saved inside a checkpoint (or named like one in a run directory) would vanish with the
    run's next --overwrite: refused before anything is written."""
    run = run_with_final(llama_adapter, tmp_path)
    adapter, out = INSIDE[case][0](run, llama_adapter)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = runner.invoke(app, ["merge", str(adapter), str(out), "--no-check"], env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.output
    assert result.stderr.startswith("error: " + INSIDE[case][1].format(r=run, a=llama_adapter)), result.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_out_dir_beside_the_checkpoints_of_a_run_is_fine(tmp_path, llama_adapter):
    run = run_with_final(llama_adapter, tmp_path)
    result = runner.invoke(app, ["merge", str(run / "final"), str(run / "merged"), "--no-check"])
    assert result.exit_code == 0, result.output
    assert checkpoint.verify(run / "merged")["merged_from"]["adapter"] == str(run / "final")


def test_temporaries_of_a_killed_merge_are_cleaned_by_the_next_merge(tmp_path, llama_adapter, monkeypatch):
    """A kill mid-merge leaves OUT_DIR's temporary directory (lora-rl's mark in it): the next merge to OUT_DIR
    removes it once its process is gone, and leaves those of a merge still running (here or on another host)."""
    out = tmp_path / "out"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # with the cleanup below disabled: what SIGKILL leaves

    with monkeypatch.context() as patched:
        patched.setattr(checkpoint.shutil, "rmtree", lambda *a, **k: None)
        patched.setattr(merge, "save_extras", killed)
        with pytest.raises(KeyboardInterrupt):
            merge.run(llama_adapter, out, check=False)
    (left,) = tmp_path.glob(".out.tmp-*")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        owner = f"{os.getpid()}@{socket.gethostname()}"
        running = [left.with_name(left.name.replace(owner, f"{live.pid}@{socket.gethostname()}")),
                   left.with_name(left.name.replace(owner, f"{os.getpid()}@another-host"))]  # fmt: skip
        assert all(path != left for path in running)
        for path in running:
            shutil.copytree(left, path)
        (tmp_path / ".out.tmp-notes").mkdir()  # no mark of lora-rl's: not lora-rl's
        older = shutil.copytree(left, tmp_path / ".out.tmp-k3j4h5g6")  # an older lora-rl's name: no writer in it
        result = runner.invoke(app, ["merge", str(llama_adapter), str(out), "--no-check"], env={"COLUMNS": "400"})
        assert result.exit_code == 0, result.output
        kept = [".out.tmp-notes", older.name] + [p.name for p in running]
        assert sorted(p.name for p in tmp_path.glob(".out*")) == sorted(kept)
        assert f"warning: {older}: left by a merge to {out} that was killed" in result.stderr
    finally:
        live.kill()
        live.wait()


def test_base_named_in_adapter_config_not_found(tmp_path, llama_adapter):
    config = json.loads((llama_adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/model-on-a-hub"
    (llama_adapter / "adapter_config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["merge", str(llama_adapter), str(tmp_path / "out")], env={"COLUMNS": "400"})
    assert result.exit_code == 2
    assert result.stderr.startswith(
        "error: base model org/model-on-a-hub (from base_model_name_or_path in adapter_config.json) not found"
    )


def test_adapter_for_another_architecture_is_refused_by_its_fingerprint(tmp_path, write_recipe):
    adapter = project_reward_adapter(write_recipe, tmp_path / "reward")
    with pytest.raises(ModelError, match="was made for another base .*'model_type': 'llama'.*'model_type': 'gpt2'"):
        merge.run(adapter, tmp_path / "out", base="tiny-gpt2")


def test_non_empty_out_dir_needs_force(tmp_path, llama_adapter):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    result = runner.invoke(app, ["merge", str(llama_adapter), str(out)], env={"COLUMNS": "400"})
    assert result.exit_code == 2
    assert result.stderr == f"error: OUT_DIR {out} is not empty; pass --force to replace it\n"
    assert (out / "old.txt").read_text() == "keep me"
    args = ["merge", str(llama_adapter), str(out), "--force", "--no-check"]
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 2  # --force replaces only lora-rl's outputs and empty directories
    assert result.stderr == (f"error: OUT_DIR {out} is not a lora-rl output (no manifest.json of its own): --force "
                             "replaces only those and empty directories; it would delete old.txt\n")  # fmt: skip
    assert (out / "old.txt").read_text() == "keep me"
    (out / "old.txt").unlink()
    for _ in range(2):  # into the empty directory, then over lora-rl's own output
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert checkpoint.verify(out)["merged_from"]["adapter"] == str(llama_adapter)
        assert "check:" not in result.stdout


def test_symlinked_out_dir_is_refused(tmp_path, llama_adapter):
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    args = ["merge", str(llama_adapter), str(tmp_path / "link"), "--force"]
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: OUT_DIR {tmp_path / 'link'} is a symbolic link")
    assert list((tmp_path / "target").iterdir()) == [] and (tmp_path / "link").is_symlink()


def test_missing_shard_is_reported(tmp_path, sharded_llama):
    base = tmp_path / "base"
    shutil.copytree(sharded_llama, base)
    next(iter(sorted(base.glob("model-*.safetensors")))).unlink()
    adapter = make_adapter(tmp_path / "adapter", sharded_llama, target_modules=["q_proj"])
    with pytest.raises(checkpoint.CheckpointError, match="model-00001-of-.*: weights file missing"):
        stream(adapter, tmp_path / "out", base=base)


@pytest.mark.parametrize("reward", [False, True], ids=["causal-lm", "reward"])
def test_base_without_tokenizer_merges_and_says_so(tmp_path, reward):
    base = Path(shutil.copytree(builtin.materialize("tiny-llama"), tmp_path / "base"))
    for path in base.glob("tokenizer*"):
        path.unlink()
    adapter = make_adapter(tmp_path / "adapter", base, reward=reward, target_modules=["q_proj"])
    result = runner.invoke(app, ["merge", str(adapter), str(tmp_path / "out")], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "tokenizer: none (neither the adapter nor the base has one); the merged model has none" in result.stdout
    assert "check: max |logit diff|" in result.stdout
    assert (tmp_path / "out/model.safetensors").is_file() and not list((tmp_path / "out").glob("tokenizer*"))


def test_merge_says_whose_tokenizer_it_copied(tmp_path, llama_adapter):
    result = runner.invoke(app, ["merge", str(llama_adapter), str(tmp_path / "out"), "--no-check"])
    assert result.exit_code == 0, result.output
    assert f"tokenizer: the base's ({builtin.materialize('tiny-llama')})" in result.stdout
    assert (tmp_path / "out/tokenizer.json").is_file()


NO_TOKENIZER_TARGETS = {
    "tiny-llama": {"target_modules": ["q_proj", "o_proj"]},
    "tiny-gpt2": {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True},  # Conv1D layers
}


@pytest.mark.parametrize("mode", ["--in-memory", "--streaming"])
@pytest.mark.parametrize("name", tiny.TINY_MODELS)
def test_every_tiny_family_saved_without_tokenizer_files_merges_and_checks(tmp_path, name, mode):
    """A base of config + safetensors only. transformers 5's AutoTokenizer builds GPT-2's tokenizer class from the
    model type even with no vocabulary file: an empty tokenizer, whose probe ids could not be drawn (random_
    expects 'from' to be less than 'to') and which would have been saved with the merged model."""
    base = tmp_path / "base"
    tiny.build_model(name).save_pretrained(base)  # no tokenizer files at all
    assert not [p.name for p in base.iterdir() if "token" in p.name or p.suffix in (".txt", ".model")]
    adapter = make_adapter(tmp_path / "adapter", base, **NO_TOKENIZER_TARGETS[name])
    result = runner.invoke(app, ["merge", str(adapter), str(tmp_path / "out"), mode], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "tokenizer: none (neither the adapter nor the base has one); the merged model has none" in result.stdout
    assert "check: max |logit diff|" in result.stdout
    out = tmp_path / "out"
    assert not [p.name for p in out.iterdir() if "token" in p.name or p.name in ("vocab.json", "merges.txt")]
    assert_same_tensors(out, peft_merged(adapter, base))


def test_a_directory_without_tokenizer_files_has_no_tokenizer(tmp_path):
    """Not an empty tokenizer built from the model type (GPT-2's class needs no file to be made)."""
    from lora_rl.models.build import load_tokenizer
    from lora_rl.recipe import ModelConfig

    for name in tiny.TINY_MODELS:
        tiny.build_model(name).save_pretrained(tmp_path / name)
        with pytest.raises(ModelError, match=f"base: {tmp_path / name} has no tokenizer"):
            load_tokenizer(tmp_path / name, ModelConfig(), "base")
