"""Models: building one frozen base with LoRA targets and its report (build), the LM head's logits and
sampling settings (lm_head), the reward model and hidden-state helpers (reward_model), a model's context
window against a recipe's sequences (context), and the built-in models' builders (tiny, smollm2).

May import: training (adapter and checkpoint files) and the foundation. Never adapters, rl, commands or cli.
"""
