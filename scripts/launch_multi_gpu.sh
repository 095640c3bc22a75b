#!/usr/bin/env bash
# Run a lora-rl command on the GPUs of this machine, one process per GPU (DDP through accelerate).
#
#   scripts/launch_multi_gpu.sh [--cpu] NUM_PROCESSES COMMAND RECIPE [KEY=VALUE ...]
#   scripts/launch_multi_gpu.sh 4 ppo recipes/ppo-demo.yaml train.learning_rate=1e-5
#   scripts/launch_multi_gpu.sh --cpu 2 train-reward recipes/reward-demo.yaml   # 2 CPU processes (gloo)
#
# It runs, from any directory:
#   accelerate launch --config_file recipes/accelerate/multi_gpu.yaml --num_processes N -m lora_rl COMMAND RECIPE ...
# ACCELERATE_CONFIG=recipes/accelerate/fsdp.yaml (or another file) selects another accelerate config.
#
# --cpu runs N processes on the CPU with the gloo backend, to try multi-process runs without GPUs. It does
# not use `accelerate launch --cpu`, which in accelerate 1.x starts a single process whatever
# --num_processes says; it starts the same torchrun launcher as the GPU case with ACCELERATE_USE_CPU=1,
# which makes every process choose the CPU and gloo.
set -euo pipefail

usage="usage: $0 [--cpu] NUM_PROCESSES COMMAND RECIPE [KEY=VALUE ...]"
cpu=false
if [[ ${1:-} == --cpu ]]; then
    cpu=true
    shift
fi
if (($# < 3)); then
    echo "$usage" >&2
    exit 2
fi
num_processes=$1
shift
if [[ ! $num_processes =~ ^[1-9][0-9]*$ ]]; then
    echo "error: NUM_PROCESSES must be a positive integer, got '$num_processes'" >&2
    echo "$usage" >&2
    exit 2
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
config=${ACCELERATE_CONFIG:-$root/recipes/accelerate/multi_gpu.yaml}
if [[ ! -f $config ]]; then
    echo "error: accelerate config '$config' not found" >&2
    exit 2
fi

if $cpu; then
    export ACCELERATE_USE_CPU=1
fi
exec accelerate launch --config_file "$config" --num_processes "$num_processes" -m lora_rl "$@"
