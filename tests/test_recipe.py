from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lora_rl.recipe import Recipe, RecipeError, describe_keys, load_recipe, recipe_warnings


def problems_of(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(RecipeError) as err:
        load_recipe(path, overrides)
    return err.value.problems


def test_defaults_resolve(write_recipe):
    recipe = load_recipe(write_recipe({}))
    assert recipe.actor.model.path == "tiny-llama"
    assert recipe.actor.model.lora_rank == 32
    assert recipe.actor.model.lora_alpha == 64  # 2 x lora_rank
    assert recipe.actor.model.init_lora_weights == "gaussian"


def test_output_dir_defaults_to_runs_recipe_stem(tmp_path):
    path = tmp_path / "my-run.yaml"
    path.write_text("seed: 3\n")
    assert load_recipe(path).output_dir == str(Path("runs") / "my-run")


def test_unknown_key_names_full_path_and_suggests(write_recipe):
    path = write_recipe({"actor": {"model": {"lora_rnak": 8}}})
    assert problems_of(path) == ["actor.model.lora_rnak: unknown key; did you mean lora_rank?"]


def test_unknown_key_without_close_match_lists_valid_keys(write_recipe):
    (problem,) = problems_of(write_recipe({"train": {"zzz": 1}}))
    assert problem.startswith("train.zzz: unknown key; valid keys: learning_rate, batch_size,")


def test_unknown_section(write_recipe):
    assert problems_of(write_recipe({"trian": {}})) == ["trian: unknown key; did you mean train?"]


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ({"lora_rank": 0}, 0, "actor.model.lora_rank: got 0; expected an integer > 0"),
        ({"lora_rank": -4}, -4, "actor.model.lora_rank: got -4; expected an integer > 0"),
        ({"lora_rank": "eight"}, "eight", "actor.model.lora_rank: got 'eight'; expected an integer"),
        ({"lora_rank": 8.5}, 8.5, "actor.model.lora_rank: got 8.5; expected an integer"),
        ({"lora_dropout": 1.0}, 1.0, "actor.model.lora_dropout: got 1.0; expected a number in [0, 1)"),
        ({"lora_dropout": -0.1}, -0.1, "actor.model.lora_dropout: got -0.1; expected a number in [0, 1)"),
        ({"is_lora": "yes please"}, None, "actor.model.is_lora: got 'yes please'; expected true or false"),
        ({"is_lora": 1}, None, "actor.model.is_lora: got 1; expected true or false"),
        ({"dtype": "fp8"}, None, "actor.model.dtype: got 'fp8'; expected one of float32, bfloat16, float16"),
        (
            {"init_lora_weights": "xavier"},
            None,
            "actor.model.init_lora_weights: got 'xavier'; expected true or false or one of gaussian, olora, pissa",
        ),
        (
            {"target_modules": "q_proj"},
            None,
            "actor.model.target_modules: got 'q_proj'; expected a list of strings or one of all-linear or null",
        ),
        (
            {"num_layers_unfrozen": -2},
            None,
            "actor.model.num_layers_unfrozen: got -2; expected -1 (all layers) or an integer >= 0",
        ),
    ],
)
def test_bad_model_values(write_recipe, section, value, message):
    assert problems_of(write_recipe({"actor": {"model": section}})) == [message]


def test_missing_files_are_named(write_recipe, tmp_path):
    path = write_recipe(
        {
            "actor": {"model": {"path": str(tmp_path / "nope"), "lora_path": str(tmp_path)}},
            "data": {"train_path": "missing.jsonl"},
        }
    )
    assert problems_of(path) == [
        f"actor.model.path: '{tmp_path / 'nope'}' is not a directory; expected a local model directory "
        "or one of the built-in models: tiny-llama, tiny-gpt2, smollm2-135m-instruct",
        f"actor.model.lora_path: '{tmp_path}' has no adapter_config.json; expected an adapter directory",
        "data.train_path: 'missing.jsonl' does not exist; expected a data file or directory",
    ]


def test_every_problem_reported_at_once(write_recipe):
    path = write_recipe(
        {
            "seed": "x",
            "actor": {"model": {"lora_rnak": 8, "lora_rank": 0, "lora_dropout": 2}},
            "train": {"learning_rate": -1, "batch_szie": 4},
            "data": {"train_path": "missing.jsonl"},
        }
    )
    found = problems_of(path)
    assert len(found) == 7
    assert "seed: got 'x'; expected an integer" in found
    assert "train.learning_rate: got -1.0; expected a number > 0" in found
    assert "train.batch_szie: unknown key; did you mean batch_size?" in found


def test_section_must_be_a_mapping(write_recipe):
    assert problems_of(write_recipe({"actor": 3})) == ["actor: got 3; expected a mapping of keys"]


def test_yaml_scientific_notation_without_dot_is_a_number(write_recipe):
    path = write_recipe({})
    path.write_text(path.read_text() + "train:\n  learning_rate: 1e-5\n")
    assert load_recipe(path).train.learning_rate == 1e-5


def test_all_linear_as_string_or_one_item_list(write_recipe):
    as_string = load_recipe(write_recipe({"actor": {"model": {"target_modules": "all-linear"}}}))
    as_list = load_recipe(write_recipe({"actor": {"model": {"target_modules": ["all-linear"]}}}))
    assert as_string.actor.model.target_modules == as_list.actor.model.target_modules == "all-linear"


def test_duplicate_key_is_an_error(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("seed: 1\nseed: 2\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: invalid YAML at line 2: key 'seed' appears twice")


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\nactor: [\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: invalid YAML at line 3")


def test_missing_recipe_file(tmp_path):
    assert problems_of(tmp_path / "none.yaml") == [f"{tmp_path / 'none.yaml'}: recipe file not found"]


def test_top_level_must_be_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n")
    assert problems_of(path) == [f"{path}: expected a mapping of recipe keys at the top level"]


def test_overrides_are_applied_and_typed(write_recipe):
    recipe = load_recipe(
        write_recipe({"actor": {"model": {"lora_rank": 8}}}),
        [
            "actor.model.lora_rank=16",
            "train.learning_rate=1e-5",
            "actor.model.target_modules=[q_proj,v_proj]",
            "actor.model.lora_path=null",
            "seed=7",
        ],
    )
    assert recipe.actor.model.lora_rank == 16
    assert recipe.actor.model.lora_alpha == 32  # follows the overridden rank
    assert recipe.train.learning_rate == 1e-5
    assert recipe.actor.model.target_modules == ["q_proj", "v_proj"]
    assert recipe.seed == 7


def test_overrides_validated_like_the_file(write_recipe):
    path = write_recipe({"seed": 1})
    assert problems_of(path, ["actor.model.lora_rnak=16", "actor.model.lora_rank=0", "lr", "seed.x=1"]) == [
        "override 'lr': expected KEY=VALUE, e.g. actor.model.lora_rank=16",
        "override 'seed.x=1': seed is not a section",
        "actor.model.lora_rnak: unknown key; did you mean lora_rank?",
        "actor.model.lora_rank: got 0; expected an integer > 0",
    ]


def test_saved_recipe_round_trips(write_recipe, tmp_path):
    recipe = load_recipe(
        write_recipe({"actor": {"model": {"lora_rank": 4, "target_modules": ["q_proj"]}}}), ["train.max_steps=3"]
    )
    recipe.save(tmp_path / "resolved.yaml")
    again = load_recipe(tmp_path / "resolved.yaml")
    assert again == recipe
    assert again.to_dict()["actor"]["model"]["lora_alpha"] == 8


def test_warnings_for_ignored_keys(write_recipe):
    full = load_recipe(write_recipe({"actor": {"model": {"is_lora": False, "lora_rank": 8, "use_rslora": True}}}))
    assert recipe_warnings(full) == [
        "actor.model.lora_rank, use_rslora: ignored because is_lora is false (full fine-tuning)"
    ]
    lora = load_recipe(write_recipe({"actor": {"model": {"num_layers_unfrozen": 2}}}))
    assert recipe_warnings(lora) == [
        "actor.model.num_layers_unfrozen is ignored when is_lora is true (LoRA trains adapters only)"
    ]
    assert recipe_warnings(load_recipe(write_recipe({}))) == []


def test_every_key_has_a_doc():
    rows = describe_keys()
    assert {"actor.model.lora_rank", "train.learning_rate", "data.train_path", "seed"} <= {k for k, _, _ in rows}
    assert all(doc for _, _, doc in rows)
    assert len(rows) == len({k for k, _, _ in rows})


def test_recipe_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Recipe().seed = 3  # type: ignore[misc]
