from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_rl import builtin
from lora_rl.models import tiny


def test_build_is_deterministic():
    for name in tiny.TINY_MODELS:
        a, b = tiny.build_model(name).state_dict(), tiny.build_model(name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_materialized_model_loads_by_path(llama_dir):
    assert builtin.materialize("tiny-llama") == llama_dir
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    reference = tiny.build_model("tiny-llama").state_dict()
    assert all(torch.equal(t, reference[k]) for k, t in model.state_dict().items())


def test_architectures_have_their_module_names(llama_dir, gpt2_dir):
    llama = {n.rsplit(".", 1)[-1] for n, _ in AutoModelForCausalLM.from_pretrained(llama_dir).named_modules()}
    gpt2 = {n.rsplit(".", 1)[-1] for n, _ in AutoModelForCausalLM.from_pretrained(gpt2_dir).named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= llama
    assert {"c_attn", "c_proj", "c_fc"} <= gpt2


def test_tokenizer_round_trip(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    ids = tokenizer("The cat is good.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the cat is good ."
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 3
