"""lora-rl load: one base, adapters switched in turn, checked against plain transformers and single-adapter peft."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from lora_rl import builtin
from lora_rl.cli import app
from lora_rl.commands import load

runner = CliRunner()
PROMPTS = ["the cat is", "hello how are you", "one two three"]


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' load report, peft's layer notes
        return fn(*args, **kwargs)


def make_adapter(path: Path, base: str, seed: int, reward: bool = False, **lora) -> Path:
    """A plain peft adapter with random non-zero B weights (and a random reward head), saved to `path`."""
    cls = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    model = quiet(
        cls.from_pretrained, builtin.materialize(base), **({"num_labels": 1, "pad_token_id": 0} if reward else {})
    )
    config = LoraConfig(task_type="SEQ_CLS" if reward else "CAUSAL_LM", r=4, lora_alpha=8, **lora)
    peft_model = quiet(get_peft_model, model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    quiet(peft_model.save_pretrained, path)
    return path


def generated(model, prompts: list[list[int]], max_new_tokens: int, seed: int | None = None, **sampling) -> list[str]:
    """Completions of token-id prompts by a model used alone: greedy, or sampled after seeding with `seed`."""
    tokenizer = AutoTokenizer.from_pretrained(builtin.materialize("tiny-llama"))
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=seed is not None, pad_token_id=0, **sampling)  # fmt: skip
        outputs.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return outputs


def alone(adapter: Path | None, reward: bool = False):
    """The tiny Llama by itself, or with one adapter by plain peft."""
    kwargs = {"num_labels": 1, "pad_token_id": 0} if reward else {}
    cls = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    base = quiet(cls.from_pretrained, builtin.materialize("tiny-llama"), **kwargs)
    return quiet(PeftModel.from_pretrained, base, adapter) if adapter else base


def saved_with(directory: Path, adapter: Path, recipe: dict) -> Path:
    """A copy of `adapter` with the recipe.yaml lora-rl saves next to every adapter it trains."""
    shutil.copytree(adapter, directory)
    (directory / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return directory


def templated(texts: list[str]) -> list[list[int]]:
    """Each text as a user message of the tiny chat template, the assistant's header after it."""
    tokenizer = AutoTokenizer.from_pretrained(builtin.materialize("tiny-llama"))
    return [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for text in texts]  # fmt: skip


def plain(texts: list[str]) -> list[list[int]]:
    return AutoTokenizer.from_pretrained(builtin.materialize("tiny-llama"))(texts)["input_ids"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(root / "a", "tiny-llama", seed=1, target_modules=["q_proj", "v_proj", "down_proj"]),
        "b": make_adapter(root / "b", "tiny-llama", seed=2, target_modules=["o_proj", "up_proj"]),
        "r1": make_adapter(root / "r1", "tiny-llama", seed=3, reward=True, target_modules=["q_proj"]),
        "r2": make_adapter(root / "r2", "tiny-llama", seed=4, reward=True, target_modules=["v_proj"]),
        "gpt2": make_adapter(root / "gpt2", "tiny-gpt2", seed=5, target_modules=["c_attn"]),
    }


def test_switching_adapters_changes_outputs_and_the_base_row_is_the_base(adapters):
    columns = load.run("tiny-llama", [f"a={adapters['a']}", f"b={adapters['b']}"], PROMPTS, None, 8)
    assert list(columns) == ["base", "a", "b"]
    assert columns["base"] == generated(alone(None), plain(PROMPTS), 8)
    for name in ("a", "b"):
        assert columns[name] == generated(alone(adapters[name]), plain(PROMPTS), 8), name
    assert columns["a"] != columns["base"] and columns["b"] != columns["base"] and columns["a"] != columns["b"]


def test_rewards_of_each_reward_adapter(adapters):
    columns = load.run("tiny-llama", [f"r1={adapters['r1']}", f"r2={adapters['r2']}"], PROMPTS, None, score=True)
    assert list(columns) == ["r1", "r2"]
    tokenizer = AutoTokenizer.from_pretrained(builtin.materialize("tiny-llama"))
    for name in ("r1", "r2"):
        base = quiet(AutoModelForSequenceClassification.from_pretrained, builtin.materialize("tiny-llama"),
                     num_labels=1, pad_token_id=0)  # fmt: skip
        alone = quiet(PeftModel.from_pretrained, base, adapters[name])
        with torch.no_grad():  # one text + EOS at a time (the reward is read at the EOS): no padding involved
            expected = [alone(**tokenizer(text + tokenizer.eos_token, return_tensors="pt")).logits.item()
                        for text in PROMPTS]  # fmt: skip
        assert columns[name] == pytest.approx(expected, abs=1e-5), name
    assert columns["r1"] != pytest.approx(columns["r2"], abs=1e-3)


def test_cli_adapter_as_first_argument_and_prompts_file(adapters, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat is\n\n  one two [bold]three  \n")
    result = runner.invoke(app, ["load", str(adapters["gpt2"]), "--prompts-file", str(prompts),
                                 "--max-new-tokens", "4"], env={"COLUMNS": "200"})  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    caption = f"{builtin.materialize('tiny-gpt2')}: greedy completions, up to 4 new tokens; prompts as plain text"
    assert lines[0].strip() == caption
    assert [cell.strip() for cell in lines[2].split("┃")[1:-1]] == ["prompt", "base", "gpt2"]  # the header row
    assert "one two [bold]three" in result.stdout  # user text is shown as written, not read as markup


def test_sampling_draws_every_cell_from_the_seed(adapters):
    sampling = load.Sampling(temperature=1.5, top_k=40, seed=7)
    columns = load.run("tiny-llama", [f"a={adapters['a']}"], PROMPTS, None, 8, sampling=sampling)
    for name, adapter in (("base", None), ("a", adapters["a"])):
        expected = generated(alone(adapter), plain(PROMPTS), 8, seed=7, temperature=1.5, top_k=40, top_p=1.0)
        assert columns[name] == expected, name
    assert load.run("tiny-llama", [f"a={adapters['a']}"], PROMPTS, None, 8, sampling=sampling) == columns
    other_seed = load.run("tiny-llama", [], PROMPTS, None, 8, sampling=sampling._replace(seed=8))
    assert other_seed["base"] != columns["base"]
    assert columns["base"] != load.run("tiny-llama", [], PROMPTS, None, 8)["base"]  # greedy by default


def test_each_column_formats_prompts_as_its_adapter_trained(adapters, tmp_path):
    chat = saved_with(tmp_path / "chat", adapters["a"], {"generation": {"chat_template": True}})
    result = runner.invoke(app, ["load", "tiny-llama", "--adapter", f"chat={chat}", "--adapter", f"b={adapters['b']}",
                                 *(arg for p in PROMPTS for arg in ("--prompt", p)), "--max-new-tokens", "8"],
                           env={"COLUMNS": "400"})  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].endswith(
        "greedy completions, up to 8 new tokens; prompts in the chat template for base, chat, as plain text for b"
    )
    columns = load.run("tiny-llama", [f"chat={chat}", f"b={adapters['b']}"], PROMPTS, None, 8)
    assert columns["chat"] == generated(alone(adapters["a"]), templated(PROMPTS), 8)
    assert columns["base"] == generated(alone(None), templated(PROMPTS), 8)  # the base follows the first adapter
    assert columns["b"] == generated(alone(adapters["b"]), plain(PROMPTS), 8)  # no recipe.yaml: plain text
    # the base (seeded, unlike the fixture's adapters) shows that the template changes what is generated
    assert columns["base"] != generated(alone(None), plain(PROMPTS), 8)
    overridden = load.run("tiny-llama", [f"chat={chat}", f"b={adapters['b']}"], PROMPTS, None, 8, chat_template=False)
    assert overridden["chat"] == generated(alone(adapters["a"]), plain(PROMPTS), 8)
    forced = load.run("tiny-llama", [f"b={adapters['b']}"], PROMPTS, None, 8, chat_template=True)
    assert forced["b"] == generated(alone(adapters["b"]), templated(PROMPTS), 8)


ANSWERS = ["good", "fine thanks", "four"]


def test_each_reward_adapter_scores_as_it_trained(adapters, tmp_path):
    chat = saved_with(tmp_path / "chat", adapters["r1"], {"data": {"chat_template": True}})
    columns = load.run("tiny-llama", [f"chat={chat}", f"r2={adapters['r2']}"], PROMPTS, None, score=True,
                       completions=ANSWERS)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(builtin.materialize("tiny-llama"))
    answers = tokenizer(ANSWERS, add_special_tokens=False)["input_ids"]
    read = {"chat": [p + a + [tokenizer.eos_token_id] for p, a in zip(templated(PROMPTS), answers, strict=True)],
            "r2": plain([p + a + tokenizer.eos_token for p, a in zip(PROMPTS, ANSWERS, strict=True)])}  # fmt: skip
    for name, adapter in (("chat", adapters["r1"]), ("r2", adapters["r2"])):
        model = alone(adapter, reward=True)
        with torch.no_grad():  # one text at a time: no padding involved
            expected = [model(input_ids=torch.tensor([ids])).logits.item() for ids in read[name]]
        assert columns[name] == pytest.approx(expected, abs=1e-5), name


def test_a_template_the_tokenizer_lacks_or_an_unanswered_templated_reward_is_one_line(adapters, tmp_path):
    no_template = tmp_path / "base"
    shutil.copytree(builtin.materialize("tiny-llama"), no_template)
    (no_template / "chat_template.jinja").unlink()
    chat = saved_with(tmp_path / "chat", adapters["a"], {"generation": {"chat_template": True}})
    reward = saved_with(tmp_path / "reward", adapters["r1"], {"data": {"chat_template": True}})
    cases = {
        "--chat-template, but the tokenizer has no chat template": [str(no_template), "--chat-template"],
        "adapter chat was trained with generation.chat_template: true (its recipe.yaml), but the tokenizer has no "
        "chat template": [str(no_template), "--adapter", f"chat={chat}"],
        "adapter r was trained with data.chat_template: true (its recipe.yaml): a templated reward reads a prompt and "
        "its answer; give each --prompt its --completion": ["tiny-llama", "--adapter", f"r={reward}", "--score"],
    }
    for expected, args in cases.items():
        result = runner.invoke(app, ["load", *args, "--prompt", "x"], env={"COLUMNS": "400"})
        assert result.exit_code == 2, result.output
        assert result.stderr.splitlines() == [f"error: {expected}"]


ERRORS = {
    "malformed adapter": (lambda a, t: ["tiny-llama", "--adapter", "x.y=dir", "--prompt", "x"],
                          "--adapter x.y=dir: expected DIR or NAME=DIR, NAME made of letters, digits, _ and -"),
    "duplicate name": (lambda a, t: ["tiny-llama", "--adapter", f"x={a['a']}", "--adapter", f"x={a['b']}",
                                     "--prompt", "x"], "--adapter x: the name is taken"),
    "reserved name": (lambda a, t: ["tiny-llama", "--adapter", f"base={a['a']}", "--prompt", "x"],
                      "--adapter base: the name is taken"),
    "two prompt sources": (lambda a, t: ["tiny-llama", "--prompt", "x", "--prompts-file", str(t / "p.txt")],
                           "give prompts with --prompt or --prompts-file, not both"),
    "no prompt": (lambda a, t: ["tiny-llama"], "no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE"),
    "prompts file missing": (lambda a, t: ["tiny-llama", "--prompts-file", str(t / "p.txt")],
                             "--prompts-file: {t}/p.txt not found"),
    "adapter missing": (lambda a, t: ["tiny-llama", "--adapter", f"x={t / 'nope'}", "--prompt", "x"],
                        "adapter directory {t}/nope not found"),
    "base missing": (lambda a, t: [str(t / "nobase"), "--prompt", "x"],
                     "base model {t}/nobase (from BASE_OR_ADAPTER) not found"),
    "another base": (lambda a, t: ["tiny-llama", "--adapter", f"g={a['gpt2']}", "--prompt", "x"],
                     "{gpt2} does not fit the base: transformer.h.0.attn.c_attn has LoRA weights but the base has "
                     "no such layer"),
    "reward without --score": (lambda a, t: ["tiny-llama", "--adapter", f"r={a['r1']}", "--prompt", "x"],
                               "adapter r ({r1}) is a reward (SEQ_CLS) adapter: pass --score"),
    "causal with --score": (lambda a, t: ["tiny-llama", "--adapter", f"a={a['a']}", "--prompt", "x", "--score"],
                            "adapter a ({a}) is a causal-LM adapter; --score takes reward adapters"),
    "--score alone": (lambda a, t: ["tiny-llama", "--prompt", "x", "--score"],
                      "--score needs at least one reward adapter (--adapter NAME=DIR)"),
    "--completion without --score": (lambda a, t: ["tiny-llama", "--prompt", "x", "--completion", "y"],
                                      "--completion goes with --score (the answer scored after each prompt)"),
    "a --completion short": (lambda a, t: ["tiny-llama", "--adapter", f"r={a['r1']}", "--score", "--prompt", "x",
                                           "--prompt", "y", "--completion", "z"],
                             "--completion: got 1 for 2 prompts; expected one per prompt"),
    "--top-p when greedy": (lambda a, t: ["tiny-llama", "--prompt", "x", "--top-p", "0.9"],
                            "--top-p and --top-k shape sampling; generation is greedy unless --temperature > 0"),
    "negative temperature": (lambda a, t: ["tiny-llama", "--prompt", "x", "--temperature", "-1"],
                             "--temperature: got -1.0; expected 0 (greedy) or a number > 0 (sampling)"),
}  # fmt: skip


@pytest.mark.parametrize("case", ERRORS)
def test_load_errors_one_line_each_before_generating(case, adapters, tmp_path, monkeypatch):
    monkeypatch.setattr(load, "complete", lambda *args: pytest.fail("generated despite the error"))
    make_args, expected = ERRORS[case]
    result = runner.invoke(app, ["load", *make_args(adapters, tmp_path)], env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.output
    assert result.stderr.startswith("error: " + expected.format(t=tmp_path, **adapters))
