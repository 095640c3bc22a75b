#!/usr/bin/env bash
# The whole pipeline on a built-in tiny model, about a minute on a CPU:
# reward model -> PPO against it -> merge the policy -> compare base and policy side by side.
#   bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
lora-rl train-reward recipes/reward-demo.yaml --overwrite
lora-rl ppo recipes/ppo-demo.yaml reward.function=null reward.adapter=runs/reward-demo/final \
    output_dir=runs/pipeline-ppo --overwrite
lora-rl merge runs/pipeline-ppo/final runs/pipeline-merged --force
lora-rl load runs/pipeline-ppo/final --prompt "what about the cat ?" --prompt "tell about the sea ?" --max-new-tokens 10
