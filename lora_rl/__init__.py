"""lora-rl: LoRA fine-tuning for RLHF (reward models, PPO) driven by YAML recipes."""

__version__ = "0.1.0"
