"""lora-rl: LoRA fine-tuning for RLHF (reward models, PPO) driven by YAML recipes."""

import os

# transformers >= 5 turns on hub kernels by default and, at model.train() on a GPU, downloads replacement layers
# (kernels-community/rotary, ...) from the Hugging Face Hub: on an offline cluster every command then failed
# ("could not verify publisher trust status"). lora-rl never downloads at run time; USE_HUB_KERNELS=YES opts in.
os.environ.setdefault("USE_HUB_KERNELS", "NO")

__version__ = "0.1.0"
