"""Built-in tiny random models, for demos and tests: nothing may be downloaded.

Each is built from a transformers config with a fixed seed, plus a word-level tokenizer made in memory, and
saved by lora_rl.builtin.materialize to its cache directory. The seed is fixed (not the
recipe's) so an adapter trained by one recipe fits the same base in another recipe.
"""

from __future__ import annotations

from pathlib import Path

TINY_SEED = 0

# Lower-case words the tokenizer knows; everything else becomes <unk>. The demos' texts use them.
WORDS = """
user assistant system answer question about
the a an and or but not no yes is are was were be been to of in on at for with by from as it this that
these those i you he she we they me him her us them my your his our their what which who how why when where
there here all any some many much more most few less very so too also only just than then now good great
excellent wonderful nice happy glad love like fine best better bad awful terrible poor sad hate worse worst
wrong ugly thanks thank please sorry hello hi bye help question answer say tell ask know think want need make
take give get go come see look find use try work day time year way thing man woman child world life hand part
place case point fact cat dog bird fish tree sun moon star sky sea rain snow wind fire water food book word
story song game home house room door city road car red blue green yellow black white big small long short
old new high low hot cold fast slow one two three four five six seven eight nine ten zero first last next
do does did done have has had will would can could should may might must
""".split()
SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>"]
PUNCTUATION = list(".,!?;:'\"-()")
VOCAB = SPECIAL + PUNCTUATION + [str(d) for d in range(10)] + list(dict.fromkeys(WORDS))

# hidden 64, 2 layers: a few hundred thousand parameters, a forward pass in milliseconds on CPU.
TINY_MODELS = ("tiny-llama", "tiny-gpt2")


def save(name: str, directory: Path) -> None:
    """Write tiny model `name` and the word-level tokenizer to `directory` (lora_rl.builtin.materialize)."""
    build_model(name).save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)


def build_tokenizer():
    """A word-level fast tokenizer over VOCAB: lower-cases, splits words and punctuation, prepends <bos>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {token: i for i, token in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", ids["<bos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# "question : <user text> answer :" -- enough structure to exercise chat-template handling.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}answer :{% endif %}"
)


def build_config(name: str):
    """The transformers config of built-in model `name`."""
    from transformers import GPT2Config, LlamaConfig

    special = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    if name == "tiny-llama":  # q/k/v/o_proj, gate/up/down_proj (nn.Linear), untied lm_head
        return LlamaConfig(
            vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=False, **special,
        )  # fmt: skip
    # GPT-2: c_attn/c_proj/c_fc are transformers Conv1D layers; lm_head is tied to the embedding.
    return GPT2Config(vocab_size=len(VOCAB), n_embd=64, n_layer=2, n_head=4, n_positions=512, **special)


def build_model(name: str):
    """Random-init causal LM `name`, identical on every call (seeded with TINY_SEED)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = build_config(name)
    devices = [] if not torch.cuda.is_available() else list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(TINY_SEED)
        return AutoModelForCausalLM.from_config(config)
