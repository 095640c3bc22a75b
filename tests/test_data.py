from __future__ import annotations

import json

import pytest
import torch

from lora_rl.data import DataError, PairCollator, load_pairs, pad, split_rows, tokenize_pairs


def jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def problems(path) -> list[str]:
    with pytest.raises(DataError) as err:
        load_pairs(path)
    return err.value.problems


GOOD = {"prompt": "hi ", "chosen": "good", "rejected": "bad"}


def test_reads_jsonl_json_parquet_and_saved_dataset(tmp_path):
    import datasets

    rows = [GOOD, {"chosen": "a", "rejected": "b"}]
    jsonl(tmp_path / "p.jsonl", rows)
    (tmp_path / "p.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name in ("p.jsonl", "p.json", "p.parquet", "saved"):
        loaded = load_pairs(tmp_path / name)
        assert [(r["chosen"], r["rejected"]) for r in loaded] == [("good", "bad"), ("a", "b")], name


def test_missing_field_names_file_and_row(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", [GOOD, {"chosen": "x"}, {"rejected": "y"}])
    assert problems(path) == [f"{path}: row 2: missing 'rejected'", f"{path}: row 3: missing 'chosen'"]


def test_empty_or_non_string_values(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", [{"chosen": "", "rejected": 3}, {"chosen": " ", "rejected": "b", "prompt": 1}])
    assert problems(path) == [
        f"{path}: row 1: 'chosen' must be a non-empty string, got ''",
        f"{path}: row 1: 'rejected' must be a non-empty string, got 3",
        f"{path}: row 2: 'chosen' must be a non-empty string, got ' '",
        f"{path}: row 2: 'prompt' must be a string, got 1",
    ]


def test_margin_all_or_none(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", [{**GOOD, "margin": 1.5}, GOOD, {**GOOD, "margin": "big"}])
    assert problems(path) == [
        f"{path}: row 2: missing 'margin' (other rows have one: all or none)",
        f"{path}: row 3: 'margin' must be a number, got 'big'",
    ]


def test_invalid_json_line_is_named(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"chosen": "a",\n')
    assert problems(path) == [f"{path}: row 2: invalid JSON (Expecting property name enclosed in double quotes)"]


def test_many_problems_are_capped(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", [{"chosen": "a"}] * 15)
    found = problems(path)
    assert len(found) == 11 and found[-1] == f"{path}: ... and 5 more problems"


def test_unsupported_suffix_and_empty_file(tmp_path):
    (tmp_path / "p.csv").write_text("chosen,rejected\n")
    assert problems(tmp_path / "p.csv") == [
        f"{tmp_path / 'p.csv'}: unsupported file type '.csv'; expected .jsonl, .json, .parquet"
    ]


def test_split_is_seeded_and_disjoint():
    rows = list(range(100))
    train, held = split_rows(rows, 0.1, seed=3)
    assert len(held) == 10 and sorted(train + held) == rows
    assert split_rows(rows, 0.1, seed=3) == (train, held)
    assert split_rows(rows, 0.1, seed=4)[1] != held
    assert split_rows(rows, 0.0, seed=3) == (rows, [])


def test_tokenize_counts_truncates_or_drops_long_pairs(llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    rows = [
        {"prompt": "the cat ", "chosen": "is good", "rejected": "is very very bad"},
        {"chosen": "a", "rejected": "b"},
    ]
    kept = tokenize_pairs(rows, tokenizer, max_length=6, drop_long=False)
    # <bos> the cat is very very bad <eos> = 8 tokens > 6; <bos> the cat is good <eos> = 6
    assert kept.truncated == 1 and kept.dropped == 0 and len(kept.pairs) == 2
    eos = tokenizer.eos_token_id
    assert kept.pairs[0].chosen == tokenizer("the cat is good")["input_ids"] + [eos]
    assert kept.pairs[0].rejected == tokenizer("the cat is very")["input_ids"] + [eos]  # truncated, EOS kept
    dropped = tokenize_pairs(rows, tokenizer, max_length=6, drop_long=True)
    assert dropped.truncated == dropped.dropped == 1 and len(dropped.pairs) == 1


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad(side):
    ids, mask = pad([[5, 6, 7], [8]], pad_id=0, side=side)
    if side == "right":
        assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    else:
        assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_collator_puts_chosen_then_rejected():
    from lora_rl.data import Pair

    batch = PairCollator(pad_id=0)([Pair([1, 2], [3], 0.5), Pair([4], [5, 6, 7], 0.0)])
    assert batch.input_ids.tolist() == [[1, 2, 0], [4, 0, 0], [3, 0, 0], [5, 6, 7]]
    assert torch.equal(batch.margin, torch.tensor([0.5, 0.0]))


def test_packed_pairs_share_their_prefix_once_and_rejected_cannot_see_chosen():
    from lora_rl.data import Pair, pack_pairs

    batch = pack_pairs([Pair([1, 2, 3, 4], [1, 2, 5], 0.5), Pair([6], [7, 8], 0.0)], pad_id=0)
    # pair 0 shares [1, 2] -> one row 1 2 | 3 4 | 5; pair 1 shares nothing -> 6 | 7 8, then padding
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 0, 1, 0, 0]]  # rejected continues the prefix
    assert batch.read_at.tolist() == [[0, 3], [1, 0], [0, 4], [1, 2]]  # chosen ends, then rejected ends
    visible = batch.attention_mask[:, 0].int().tolist()
    assert visible[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 1]]
    assert visible[1] == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]
    assert torch.equal(batch.margin, torch.tensor([0.5, 0.0]))


def test_shared_prefix_leaves_each_text_its_last_token():
    from lora_rl.data import shared_prefix

    assert shared_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert shared_prefix([1, 2, 3], [1, 2, 3]) == 2  # identical: each keeps its last token to be read at
    assert shared_prefix([1, 2], [1, 2, 3, 4]) == 1  # chosen a prefix of rejected
    assert shared_prefix([5], [5, 6]) == 0 and shared_prefix([1, 2], [3, 2]) == 0


def test_text_that_tokenizes_to_nothing_is_an_error():
    class EmptyTokenizer:
        eos_token_id = 2

        def __call__(self, texts):
            return {"input_ids": [[] if "zzz" in t else [1] for t in texts]}

    rows = [{"chosen": "a", "rejected": "b"}, {"chosen": "zzz", "rejected": "b"}]
    with pytest.raises(DataError) as err:
        tokenize_pairs(rows, EmptyTokenizer(), max_length=8, drop_long=False)
    assert err.value.problems == ["rows 2: text tokenizes to zero tokens; check the tokenizer and the data"]


def test_prompt_rows_are_checked(tmp_path):
    from lora_rl.rl.rewards import load_prompt_rows

    path = jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": ""}, {"text": "x"}, {"prompt": 3}])
    with pytest.raises(DataError) as err:
        load_prompt_rows(path)
    expected = "must be a non-empty string (or, in every row, a list of {role, content} messages)"
    assert err.value.problems == [
        f"{path}: row 2: 'prompt' {expected}, got ''",
        f"{path}: row 3: 'prompt' {expected}, got None",
        f"{path}: row 4: 'prompt' {expected}, got 3",
    ]


def test_prompts_keep_their_last_tokens_and_chat_template_needs_one(llama_dir):
    from transformers import AutoTokenizer

    from lora_rl.data import tokenize_prompts

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    result = tokenize_prompts(["the cat is good", "hi"], tokenizer, max_length=3, chat_template=False)
    assert result.truncated == 1 and result.pairs[0] == tokenizer("the cat is good")["input_ids"][-3:]
    templated = tokenize_prompts(["the cat"], tokenizer, max_length=32, chat_template=True).pairs[0]
    assert tokenizer.decode(templated) == "user : the cat answer :"
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="the tokenizer has no chat template"):
        tokenize_prompts(["hi"], tokenizer, max_length=8, chat_template=True)
