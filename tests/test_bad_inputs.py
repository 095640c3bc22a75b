"""Bad inputs, one case per kind: each ends in exit 2 with one line naming the key or file, never a traceback, and
leaves no output behind. Add a case here whenever a new kind turns up."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lora_rl import builtin
from lora_rl.cli import app
from tests.test_merge import make_adapter

runner = CliRunner()
LORA = {"lora_rank": 4, "target_modules": ["q_proj", "v_proj"]}  # what make_adapter's adapters were made with


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def ppo_recipe(tmp: Path, **sections) -> Path:
    """A complete tiny PPO recipe (one update) writing to tmp/out; `sections` replace whole sections."""
    prompts = write_rows(tmp / "prompts.jsonl", [{"prompt": "tell about the cat"}] * 8)
    data = {"output_dir": str(tmp / "out"), "actor": {"model": dict(LORA)},
            "data": {"train_path": str(prompts), "max_length": 16}, "generation": {"max_new_tokens": 4},
            "reward": {"function": "lora_rl.demo_rewards:praise"}, "ppo": {"num_updates": 1, "rollout_batch_size": 4},
            "train": {"batch_size": 4, "gradient_checkpointing": False}, **sections}  # fmt: skip
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(data))
    return tmp / "recipe.yaml"


def reward_recipe(tmp: Path) -> Path:
    """A complete tiny train-reward recipe (one step) writing to tmp/out."""
    pairs = write_rows(tmp / "pairs.jsonl", [{"chosen": "a good cat", "rejected": "a bad cat"}] * 8)
    data = {"output_dir": str(tmp / "out"), "actor": {"model": dict(LORA)}, "data": {"train_path": str(pairs)},
            "train": {"batch_size": 4, "max_steps": 1}}  # fmt: skip
    (tmp / "reward.yaml").write_text(yaml.safe_dump(data))
    return tmp / "reward.yaml"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Plain peft adapters (no manifest) on tiny-llama: a causal-LM one and a reward (SEQ_CLS) one."""
    root = tmp_path_factory.mktemp("adapters")
    base, targets = builtin.materialize("tiny-llama"), LORA["target_modules"]
    return {"policy": make_adapter(root / "policy", base, target_modules=targets),
            "reward": make_adapter(root / "reward", base, reward=True, target_modules=targets)}  # fmt: skip


def copy_of(adapter: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(adapter, tmp / adapter.name))


def pickled(adapter: Path, tmp: Path) -> Path:
    """The adapter with its weights as adapter_model.bin (pickle), next to a checkpoint's optimizer.safetensors."""
    copy = copy_of(adapter, tmp)
    torch.save(load_file(copy / "adapter_model.safetensors"), copy / "adapter_model.bin")
    (copy / "adapter_model.safetensors").unlink()
    save_file({"0.exp_avg": torch.zeros(2)}, copy / "optimizer.safetensors")
    return copy


def truncated(adapter: Path, tmp: Path) -> Path:
    copy = copy_of(adapter, tmp)
    weights = copy / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    return copy


def malformed_config(adapter: Path, tmp: Path) -> Path:
    copy = copy_of(adapter, tmp)
    (copy / "adapter_config.json").write_text('{"peft_type": "LORA",')
    return copy


def model_without(tmp: Path, pattern: str) -> Path:
    """tiny-llama copied without the files matching `pattern`."""
    copy = Path(shutil.copytree(builtin.materialize("tiny-llama"), tmp / "model"))
    for path in copy.glob(pattern):
        path.unlink()
    return copy


def recipe_file(tmp: Path, content: bytes) -> Path:
    (tmp / "bad.yaml").write_bytes(content)
    return tmp / "bad.yaml"


def data_file(tmp: Path, name: str, content: bytes) -> Path:
    (tmp / name).write_bytes(content)
    return tmp / name


def beside_recipe(tmp: Path, module: str, source: str) -> str:
    (tmp / f"{module}.py").write_text(source)
    return f"reward.function={module}:score"


def working_dir(tmp: Path, monkeypatch) -> Path:
    (tmp / "work").mkdir()
    monkeypatch.chdir(tmp / "work")
    return tmp / "work"


GPT2 = {"path": "tiny-gpt2", "lora_rank": 4, "target_modules": ["c_attn"]}  # learned positions: 512 of them
GRPO = {"num_steps": 1, "prompts_per_step": 2, "num_generations": 2}


def long_prompts(tmp: Path) -> str:
    """Prompts, row 1 of 601 tokens (the tiny tokenizer: <bos>, then a token a word) with data.max_length 700."""
    rows = [{"prompt": "the cat " * 300}] + [{"prompt": "tell about the cat"}] * 7
    return f"data.train_path={write_rows(tmp / 'long.jsonl', rows)}"


def long_pairs(tmp: Path) -> str:
    """Pairs whose row 2 takes 605 tokens (<bos>, 600 of prompt, 3 of answer, <eos>)."""
    rows = [{"chosen": "a good cat", "rejected": "a bad cat"}] * 8
    rows[1] = {"prompt": "the cat " * 300, "chosen": "a good cat", "rejected": "bad"}
    return f"data.train_path={write_rows(tmp / 'long.jsonl', rows)}"


def same_pairs(tmp: Path) -> str:
    return f"data.train_path={write_rows(tmp / 'same.jsonl', [{'chosen': 'a', 'rejected': 'a'}] * 2)}"


def strict_template(tmp: Path) -> str:
    """tiny-llama with a chat template that refuses a system message (as Gemma's and Mistral's do)."""
    copy = Path(shutil.copytree(builtin.materialize("tiny-llama"), tmp / "strict"))
    refuse = "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    template = (copy / "chat_template.jinja").read_text()
    (copy / "chat_template.jinja").write_text(template.replace("{% for message in messages %}",
                                                               "{% for message in messages %}" + refuse))  # fmt: skip
    return f"actor.model.path={copy}"


def strict_reward_model(tmp: Path) -> str:
    """strict_template's model as a reward.model trained with data.chat_template: true (its recipe.yaml says so):
    it reads each prompt through its own chat template."""
    copy = Path(strict_template(tmp).split("=", 1)[1])
    (copy / "recipe.yaml").write_text("data:\n  chat_template: true\n")
    return f"reward.model={copy}"


def system_prompts(tmp: Path) -> str:
    """Chat prompts, rows 3 and 5 opening with a system message."""
    user = [{"role": "user", "content": "tell about the cat"}]
    rows = [{"prompt": user}] * 8
    rows[2] = rows[4] = {"prompt": [{"role": "system", "content": "be nice"}, *user]}
    return f"data.train_path={write_rows(tmp / 'chat.jsonl', rows)}"


BLANK, NOT_AN_OBJECT, CUT_SHORT = b" \n\n", b'{"prompt": "a"}\n[1, 2]\n', b'{"prompt": "a"}\n{"prompt"\n'

# case -> build(tmp_path, adapters, monkeypatch) -> (CLI arguments, text the one error line must hold)
Case = Callable[[Path, dict, object], tuple[list, str]]
CASES: dict[str, Case] = {
    "a YAML key that is a list": lambda t, a, m: (
        ["validate", recipe_file(t, b"? [1, 2]\n: 3\n")],
        "{t}/bad.yaml: invalid YAML at line 1: a recipe key must be a name"),
    "a section that is a list": lambda t, a, m: (
        ["validate", recipe_file(t, b"actor: [1, 2]\n")], "actor: got [1, 2]; expected a mapping of keys"),
    "a recipe that is not UTF-8": lambda t, a, m: (
        ["validate", recipe_file(t, b"seed: \xff\xfe\n")], "{t}/bad.yaml: not UTF-8 text"),
    "a negative seed": lambda t, a, m: (
        ["ppo", ppo_recipe(t), "seed=-1"], "seed: got -1; expected an integer in [0, 4294967295]"),
    "a seed over 2**32 - 1": lambda t, a, m: (
        ["train-reward", reward_recipe(t), "seed=4294967296"], "seed: got 4294967296; expected an integer in"),
    "an infinite learning rate": lambda t, a, m: (
        ["train-reward", reward_recipe(t), "train.learning_rate=.inf"],
        "train.learning_rate: got inf; expected a finite number"),
    "output_dir that is a file": lambda t, a, m: (
        ["ppo", ppo_recipe(t), f"output_dir={data_file(t, 'a-file', b'x')}"],
        "output_dir: '{t}/a-file' is a file; expected a directory"),
    "an empty jsonl": lambda t, a, m: (
        ["train-reward", reward_recipe(t), f"data.train_path={data_file(t, 'empty.jsonl', b'')}"],
        "{t}/empty.jsonl: no rows"),
    "a blank jsonl": lambda t, a, m: (
        ["ppo", ppo_recipe(t), f"data.train_path={data_file(t, 'blank.jsonl', BLANK)}"],
        "{t}/blank.jsonl: no rows"),
    "a jsonl row that is not an object": lambda t, a, m: (
        ["ppo", ppo_recipe(t), f"data.train_path={data_file(t, 'rows.jsonl', NOT_AN_OBJECT)}"],
        "{t}/rows.jsonl: row 2: expected a JSON object"),
    "a jsonl row cut short": lambda t, a, m: (
        ["ppo", ppo_recipe(t), f"data.train_path={data_file(t, 'rows.jsonl', CUT_SHORT)}"],
        "{t}/rows.jsonl: row 2: invalid JSON"),
    "a corrupt parquet file": lambda t, a, m: (
        ["ppo", ppo_recipe(t), f"data.train_path={data_file(t, 'c.parquet', b'PAR1 not parquet')}"],
        "{t}/c.parquet: not valid parquet data"),
    "a model directory without a tokenizer": lambda t, a, m: (
        ["ppo", ppo_recipe(t), f"actor.model.path={model_without(t, 'tokenizer*')}"],
        "actor.model.path: {t}/model has no tokenizer that transformers can load"),
    "a model directory without weights": lambda t, a, m: (
        ["train-reward", reward_recipe(t), f"actor.model.path={model_without(t, '*.safetensors')}"],
        "actor.model.path: {t}/model has no weights: expected model.safetensors"),
    "a truncated adapter": lambda t, a, m: (
        ["ppo", ppo_recipe(t), f"actor.model.lora_path={truncated(a['policy'], t)}"],
        "{t}/policy/adapter_model.safetensors: corrupt or truncated safetensors file"),
    "a malformed adapter_config.json": lambda t, a, m: (
        ["train-reward", reward_recipe(t), f"actor.model.lora_path={malformed_config(a['reward'], t)}"],
        "{t}/reward/adapter_config.json: corrupt JSON"),
    "a pickle lora_path for ppo": lambda t, a, m: (
        ["ppo", ppo_recipe(t), f"actor.model.lora_path={pickled(a['policy'], t)}"],
        "{t}/policy: the weights are pickle (adapter_model.bin)"),
    "a pickle lora_path for train-reward": lambda t, a, m: (
        ["train-reward", reward_recipe(t), f"actor.model.lora_path={pickled(a['reward'], t)}"],
        "{t}/reward: the weights are pickle (adapter_model.bin)"),
    "a pickle reward.adapter": lambda t, a, m: (
        ["ppo", ppo_recipe(t, reward={"adapter": str(pickled(a["reward"], t))})],
        "{t}/reward: the weights are pickle (adapter_model.bin)"),
    "a reward function whose module fails to import": lambda t, a, m: (
        ["ppo", ppo_recipe(t), beside_recipe(t, "failing_reward", "raise RuntimeError('no GPU here')\n")],
        "reward.function: cannot import 'failing_reward:score' (RuntimeError: no GPU here)"),
    "merge into the working directory": lambda t, a, m: (
        ["merge", a["policy"], ".", "--force"] if working_dir(t, m) else [],
        "OUT_DIR .: the working directory cannot be replaced"),
    "a prompt longer than the model's context (grpo)": lambda t, a, m: (
        ["grpo", ppo_recipe(t, actor={"model": GPT2}, grpo=GRPO, ppo={}), long_prompts(t), "data.max_length=700"],
        "data.max_length + generation.max_new_tokens: a sequence takes up to 605 positions (601 prompt tokens: the "
        "longest prompt, {t}/long.jsonl row 1; 4 new), over the 512 that actor.model.path tiny-gpt2 takes "
        "(n_positions in its config.json); set data.max_length to at most 508"),
    "a prompt longer than the model's context (validate)": lambda t, a, m: (
        ["validate", ppo_recipe(t, actor={"model": GPT2}), long_prompts(t), "data.max_length=700", "--for", "ppo"],
        "data.max_length + generation.max_new_tokens: a sequence takes up to 605 positions"),
    "prompts cut to a data.max_length over the model's context": lambda t, a, m: (
        ["ppo", ppo_recipe(t, actor={"model": GPT2}), long_prompts(t), "data.max_length=510"],
        "a sequence takes up to 514 positions (510 prompt tokens: data.max_length; 4 new), over the 512"),
    "a pair longer than the model's context (train-reward)": lambda t, a, m: (
        ["train-reward", reward_recipe(t), long_pairs(t), "data.max_length=700", "actor.model.path=tiny-gpt2",
         "actor.model.target_modules=[c_attn]"],
        "data.max_length: a pair takes up to 605 positions (the longest pair, {t}/long.jsonl row 2), over the 512 "
        "that actor.model.path tiny-gpt2 takes (n_positions in its config.json); set data.max_length to at most 512"),
    "a chat template refusing a prompt (grpo)": lambda t, a, m: (
        ["grpo", ppo_recipe(t, grpo=GRPO, ppo={}), strict_template(t), system_prompts(t), "data.max_length=64"],
        "{t}/chat.jsonl: rows 3, 5: the chat template of actor.model.path fails on the prompt (TemplateError: "
        "System role not supported)"),
    "a chat template refusing a prompt (validate)": lambda t, a, m: (
        ["validate", ppo_recipe(t, grpo=GRPO, ppo={}), strict_template(t), system_prompts(t), "--for", "grpo"],
        "{t}/chat.jsonl: rows 3, 5: the chat template of actor.model.path fails on the prompt"),
    "a reward.model's chat template refusing a prompt (ppo)": lambda t, a, m: (
        ["ppo", ppo_recipe(t), strict_reward_model(t), "reward.function=null", system_prompts(t)],
        "{t}/chat.jsonl: rows 3, 5: the chat template of reward.model fails on the prompt (TemplateError: System "
        "role not supported)"),
    "every pair the same once truncated": lambda t, a, m: (
        ["train-reward", reward_recipe(t), "data.max_length=3"],
        "{t}/pairs.jsonl: chosen and rejected tokenize to the same ids in all 8 pairs (rows 1, 2, 3, 4, 5 and 3 "
        "more): nothing to learn (loss log 2, accuracy 0); they differ only past data.max_length 3: raise it"),
    "every pair's chosen equal to its rejected (validate)": lambda t, a, m: (
        ["validate", reward_recipe(t), same_pairs(t), "--for", "train-reward"],
        "{t}/same.jsonl: chosen and rejected tokenize to the same ids in all 2 pairs (rows 1, 2): nothing to learn "
        "(loss log 2, accuracy 0); 2 are the same in full (equal texts, or text the tokenizer cannot tell apart)"),
    "train-reward evaluating every N steps with no held-out pairs": lambda t, a, m: (
        ["train-reward", reward_recipe(t), "train.eval_every=2"],
        "train.eval_every: set, but there are no held-out pairs to evaluate on: set data.eval_path or "
        "data.eval_fraction"),
    "train-reward with held-out pairs from two sources": lambda t, a, m: (
        ["train-reward", reward_recipe(t), f"data.eval_path={t}/pairs.jsonl", "data.eval_fraction=0.25"],
        "data.eval_path and data.eval_fraction: both set"),
    "eval with a recipe without held-out prompts": lambda t, a, m: (
        ["eval", ppo_recipe(t)], "eval needs held-out prompts: set data.eval_path"),
    "load with --max-new-tokens 0": lambda t, a, m: (
        ["load", a["policy"], "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens: got 0; expected"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, adapters, monkeypatch):
    args, expected = CASES[case](tmp_path, adapters, monkeypatch)
    before = sorted(p.name for p in Path.cwd().iterdir())
    result = runner.invoke(app, [str(arg) for arg in args], env={"COLUMNS": "400"})
    assert "Traceback" not in result.output
    assert result.exit_code == 2, result.output
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ") and expected.format(t=tmp_path) in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() and sorted(p.name for p in Path.cwd().iterdir()) == before


# Failures during training (the user's reward function misbehaving): exit 1, one line naming the function and
# what it returned, nothing saved. case -> (reward module source, text the one error line must hold)
REWARD_FAILURES = {
    "raises": ("def score(prompts, completions):\n    raise KeyError('label')\n",
               "reward function failing:score raised KeyError: 'label'"),
    "returns the wrong length": ("def score(prompts, completions):\n    return [1.0]\n",
                                 "reward function failing:score: returned 1 rewards for 4 completions"),
    "returns strings": ("def score(prompts, completions):\n    return ['good'] * len(completions)\n",
                        "reward function failing:score: completion 1 of 4: expected a finite number or None, got "
                        "'good'"),
    "returns None (ppo needs every score)": ("def score(prompts, completions):\n    return [None] * len(completions)\n",
                                             "the reward function returned None for 4 of 4 completions; ppo needs"),
}  # fmt: skip


@pytest.mark.parametrize("case", REWARD_FAILURES)
def test_reward_function_failing_mid_run_is_one_line_exit_1(case, tmp_path):
    source, expected = REWARD_FAILURES[case]
    module = f"failing_{list(REWARD_FAILURES).index(case)}"  # a module name per case: imports are cached
    expected = expected.replace("failing:", f"{module}:")
    args = ["ppo", ppo_recipe(tmp_path), beside_recipe(tmp_path, module, source)]
    result = runner.invoke(app, [str(arg) for arg in args], env={"COLUMNS": "400"})
    assert "Traceback" not in result.output
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert not (tmp_path / "out" / "final").exists() and not (tmp_path / "out" / "metrics.jsonl").exists()
