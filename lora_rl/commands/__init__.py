"""One module per CLI command, each `run` reading top to bottom: check the input, set up, loop, save.

rl (ppo and grpo), train_reward, load, validate, plot; merge's command lives with its mechanics in
lora_rl.adapters.merge. May import: every layer below (rl, adapters, models, training, and the foundation:
recipe, data, display, builtin). Never lora_rl.cli.
"""
