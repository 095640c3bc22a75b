"""Every template under recipes/templates/ is a valid recipe, and names only layers its model family has.

A template points at a model directory the user downloads, so here each is loaded with its paths overridden:
the base becomes a tiny random model built from the family's transformers config class, and `build` (the real
loading and target matching) must find every target module in every layer of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_rl.models import tiny
from lora_rl.models.build import build
from lora_rl.recipe import load_recipe, read_yaml

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_DIR = ROOT / "recipes" / "templates"
TEMPLATES = sorted(TEMPLATE_DIR.rglob("*.yaml"))

# template folder -> (transformers config class, what that family needs beyond the shared tiny sizes)
FAMILIES = {
    "qwen2.5": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "llama3": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "gemma2": ("Gemma2Config", {"head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16}),
    "phi3": ("Phi3Config", {}),
    "smollm2": ("LlamaConfig", {"tie_word_embeddings": True}),
}
HEADS = {"reward": "reward", "ppo": "causal-lm", "grpo": "causal-lm", "grpo-math": "causal-lm"}  # what it trains
COMMANDS = {"reward": "train-reward", "ppo": "ppo", "grpo": "grpo", "grpo-math": "grpo"}
LAYERS = 2


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """family -> directory of a tiny random model of that family with the tiny tokenizer, built once each."""
    import transformers
    from transformers import AutoModelForCausalLM

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            config_class, extra = FAMILIES[family]
            sizes = {"vocab_size": len(tiny.VOCAB), "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}  # fmt: skip
            config = getattr(transformers, config_class)(**sizes, **extra)
            path = tmp_path_factory.mktemp(family)
            AutoModelForCausalLM.from_config(config).save_pretrained(path)
            tiny.build_tokenizer().save_pretrained(path)
            built[family] = path
        return built[family]

    return get


def existing_paths(template: Path, tmp_path: Path) -> list[str]:
    """Overrides that point every file the template names at one that exists (validation checks them)."""
    data = read_yaml(template)
    data_file = tmp_path / "data.jsonl"
    data_file.write_text("")
    adapter = tmp_path / "reward-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({}))
    overrides = [f"output_dir={tmp_path / 'out'}"]
    overrides += [f"data.{k}={data_file}" for k in ("train_path", "eval_path") if data.get("data", {}).get(k)]
    if data.get("reward", {}).get("adapter"):
        overrides.append(f"reward.adapter={adapter}")
    return overrides


def test_every_template_has_a_family_and_a_command():
    assert TEMPLATES
    for template in TEMPLATES:
        assert template.parent.parent == TEMPLATE_DIR, f"{template}: expected recipes/templates/FAMILY/NAME.yaml"
        assert template.parent.name in FAMILIES, f"{template}: family {template.parent.name} has no tiny config"
        assert template.stem in HEADS, f"{template}: expected one of {', '.join(HEADS)}.yaml"
    assert {t.parent.name for t in TEMPLATES} == set(FAMILIES)  # no family in the table without templates


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: str(p.relative_to(TEMPLATE_DIR)))
def test_template_fits_its_family(template, family_dir, tmp_path):
    family, name = template.parent.name, template.stem
    recipe = load_recipe(template, [f"actor.model.path={family_dir(family)}", *existing_paths(template, tmp_path)])
    built = build(recipe, HEADS[name])
    targets = recipe.actor.model.target_modules
    assert isinstance(targets, list) and targets, "a template names its family's target modules"
    # one module per layer for each entry: a name the family lacks (or has only in some layers) fails here
    assert {m.entry: len(m.modules) for m in built.report.matches} == dict.fromkeys(targets, LAYERS)
    assert "lm_head" not in targets  # tied on Gemma and SmolLM2; never needed with the layers adapted
    assert (recipe.train.mixed_precision, recipe.train.gradient_checkpointing) == ("bf16", True)
    assert recipe.actor.model.dtype == "bfloat16"
    if HEADS[name] == "causal-lm":
        assert recipe.generation.chat_template  # instruct models: prompts as chat
    else:
        assert recipe.data.chat_template  # pairs formatted as the family's ppo and grpo present completions


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: str(p.relative_to(TEMPLATE_DIR)))
def test_template_header_says_what_to_download_and_how_to_launch(template):
    header = "\n".join(line for line in template.read_text().splitlines() if line.startswith("#"))
    model_path = read_yaml(template)["actor"]["model"]["path"]
    assert model_path.startswith("/models/") and model_path in header
    command, relative = COMMANDS[template.stem], template.relative_to(ROOT)
    assert f"lora-rl validate --for {command} {relative}" in header  # validate checks for ppo unless told
    assert f"lora-rl {command} {relative}" in header
    assert "24 GB" in header and "80 GB" in header
