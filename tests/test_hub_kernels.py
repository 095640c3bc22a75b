"""No download at run time: transformers' hub kernels stay off on a GPU unless the user opts in.

Without a GPU the path is reached as transformers reaches it: kernelize reads `model._kernels_device` before the
model's device, and the kernels package asks the GPU's capability. On the old code model.train() then fetched
kernels-community/rotary from the hub and failed ("could not verify publisher trust status")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRAIN_ON_A_FAKE_GPU = """
import sys, torch
from lora_rl.models.build import build
from lora_rl.recipe import load_recipe
recipe = load_recipe(sys.argv[1], [f"actor.model.path={sys.argv[2]}", "output_dir=unused"])
model = build(recipe, "causal-lm").model
torch.cuda.get_device_capability = lambda device=None: (9, 0)  # an H100/H200 to the kernels package
base = model.get_base_model()
base._kernels_device = "cuda"  # what kernelize asks before the model's own device
model.train()
print("use_kernels", base.use_kernels)
"""


def run(llama_dir: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    return subprocess.run([sys.executable, "-c", TRAIN_ON_A_FAKE_GPU, str(ROOT / "recipes/ppo-demo.yaml"),
                           str(llama_dir)], capture_output=True, text=True, cwd=ROOT, env={**clean, **env})  # fmt: skip


def test_training_mode_on_a_gpu_fetches_no_hub_kernel(llama_dir):
    result = run(llama_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "use_kernels False" in result.stdout


def test_a_user_can_still_opt_in(llama_dir):
    result = run(llama_dir, USE_HUB_KERNELS="YES", HF_HUB_OFFLINE="1")  # opting in offline: the hub is asked
    assert result.returncode != 0 and "kernels-community/rotary" in result.stderr
