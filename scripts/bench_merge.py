"""Peak memory and time of `lora-rl merge --streaming` against peft's merge_and_unload + save_pretrained.

    python scripts/bench_merge.py                 # Qwen2-0.5B shape, bf16, shards of 500MB
    python scripts/bench_merge.py --shape tiny    # a few seconds

Builds (once, cached under --workdir) a random base from a transformers config, saved sharded as hub
checkpoints are, and a random LoRA adapter on all its projections; then runs each variant in a fresh
subprocess, which reports its own peak RSS (ru_maxrss) and the wall time of the merge (imports excluded,
they are alike). Goal (issue 6): streaming peak at most one shard + 10%, time at most 0.7x peft's.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # Qwen2Config keyword arguments
    "qwen2-0.5b": {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                   "num_attention_heads": 14, "num_key_value_heads": 2},
    "tiny": {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
}  # fmt: skip
MAX_SHARD = {"qwen2-0.5b": "500MB", "tiny": "100KB"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(path: Path, shape: str) -> None:
    """A random bf16 Qwen2-style base with tied embeddings, saved in shards, with the tiny tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from lora_rl.models import tiny

    config = Qwen2Config(**SHAPES[shape], tie_word_embeddings=True, dtype="bfloat16")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size=MAX_SHARD[shape])
    tiny.build_tokenizer().save_pretrained(path)


def build_adapter(path: Path, base: Path, shape: str, rank: int) -> None:
    """A LoRA adapter on every projection of every layer, with random A and B, written as peft writes one."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    dims = SHAPES[shape]
    hidden, inter, layers = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]
    kv = hidden // dims["num_attention_heads"] * dims["num_key_value_heads"]
    sizes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, kv), "self_attn.v_proj": (hidden, kv),
             "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
             "mlp.down_proj": (inter, hidden)}  # (in, out)  # fmt: skip
    generator, tensors = torch.Generator().manual_seed(0), {}
    for layer in range(layers):
        for name, (fan_in, fan_out) in sizes.items():
            prefix = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.02
    path.mkdir(parents=True)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
               base_model_name_or_path=str(base)).save_pretrained(path)  # fmt: skip


# ---------------------------------------------------------------- one variant, in its own process


def child(variant: str, workdir: Path, out: Path) -> None:
    """Run one variant and print {"seconds", "cpu_seconds", "peak_rss", "rss_after_imports"} as JSON."""
    shape = json.loads((workdir / "shape").read_text())
    # The same imports before the clock in both variants, so neither is timed importing what the other has.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_rl.adapters import merge

    after_imports = peak_rss()
    started, cpu_started = time.perf_counter(), cpu_seconds()
    if variant == "streaming":
        merge.run(workdir / "adapter", out, streaming=True, check=False)
    else:  # what users do today: the whole model in memory, merged, saved
        model = AutoModelForCausalLM.from_pretrained(workdir / "base")
        merged = PeftModel.from_pretrained(model, workdir / "adapter").merge_and_unload()
        merged.save_pretrained(out, max_shard_size=MAX_SHARD[shape])
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    result = {"seconds": seconds, "cpu_seconds": cpu, "peak_rss": peak_rss(), "rss_after_imports": after_imports}
    print(json.dumps(result))


def cpu_seconds() -> float:
    """User + system CPU time: unlike wall time, barely moved by other processes on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_child(variant: str, workdir: Path, out: Path, shape: str = "", rank: int = 0) -> dict:
    """Run `variant` in a fresh process. The parent never imports torch before its children are done:
    Linux carries ru_maxrss over fork and exec, so a big parent would inflate every child's peak."""
    args = [sys.executable, __file__, "--child", variant, "--workdir", str(workdir), "--out", str(out),
            "--shape", shape or "tiny", "--rank", str(rank or 1)]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1]) if variant != "build" else {}


def max_difference(a: Path, b: Path) -> float:
    """Largest |difference| between same-named tensors of two merged directories (read one tensor at a time)."""
    from safetensors import safe_open

    def tensors(directory: Path) -> dict[str, Path]:
        names = {}
        for path in directory.glob("*.safetensors"):
            with safe_open(path, "pt") as f:
                names |= {name: path for name in f.keys()}  # noqa: SIM118 (safe_open has keys(), no iteration)
        return names

    left, right, worst = tensors(a), tensors(b), 0.0
    assert left.keys() == right.keys(), set(left) ^ set(right)
    for name in left:
        with safe_open(left[name], "pt") as f, safe_open(right[name], "pt") as g:
            worst = max(worst, (f.get_tensor(name).float() - g.get_tensor(name).float()).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="qwen2-0.5b")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each variant, alternating; best time kept")
    parser.add_argument("--workdir", type=Path, help="where the base and adapter are built (kept for reruns)")
    parser.add_argument("--child", choices=["build", "streaming", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.gettempdir()) / f"lora-rl-bench-merge-{args.shape}-r{args.rank}"
    if args.child == "build":
        build_base(workdir / "base", args.shape)
        build_adapter(workdir / "adapter", workdir / "base", args.shape, args.rank)
        (workdir / "shape").write_text(json.dumps(args.shape))
        return
    if args.child:
        return child(args.child, workdir, args.out)

    if not (workdir / "shape").is_file():
        print(f"building the {args.shape} base and a rank-{args.rank} adapter in {workdir} ...", flush=True)
        run_child("build", workdir, workdir, args.shape, args.rank)
    shards = sorted((workdir / "base").glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    print(f"base: {sum(p.stat().st_size for p in shards) / 2**20:.0f} MiB in {len(shards)} shards, "
          f"largest {largest / 2**20:.0f} MiB; adapter rank {args.rank} on {', '.join(TARGETS)}")  # fmt: skip
    runs: dict[str, list[dict]] = {"streaming": [], "peft": []}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for i in range(args.repeat):
            for variant in ("streaming", "peft") if i % 2 == 0 else ("peft", "streaming"):
                shutil.rmtree(Path(tmp) / variant, ignore_errors=True)
                runs[variant].append(run_child(variant, workdir, Path(tmp) / variant))
        difference = max_difference(Path(tmp) / "streaming", Path(tmp) / "peft")
    report(runs, largest, difference)


def report(runs: dict[str, list[dict]], largest: int, difference: float) -> None:
    """Best times and highest peak of each variant, and the ratios the issue sets goals for."""
    best = {}
    for variant, rs in runs.items():
        peak, imports = max(r["peak_rss"] for r in rs), max(r["rss_after_imports"] for r in rs)
        best[variant] = {"seconds": min(r["seconds"] for r in rs), "cpu": min(r["cpu_seconds"] for r in rs),
                         "peak": peak, "adds": peak - imports}  # fmt: skip
    print(f"{'variant':<10} {'wall s (best)':>13} {'wall s (all)':>17} {'CPU s (best)':>13} {'peak RSS MiB':>13} "
          f"{'merge adds MiB':>15}")  # fmt: skip
    for variant, r in best.items():
        times = ", ".join(f"{x['seconds']:.1f}" for x in runs[variant])
        print(f"{variant:<10} {r['seconds']:>13.1f} {times:>17} {r['cpu']:>13.1f} {r['peak'] / 2**20:>13.0f} "
              f"{r['adds'] / 2**20:>15.0f}")  # fmt: skip
    s, p = best["streaming"], best["peft"]
    print(f"streaming / peft: wall time {s['seconds'] / p['seconds']:.2f}x, CPU time {s['cpu'] / p['cpu']:.2f}x "
          f"(goal: at most 0.7x), peak RSS {s['peak'] / p['peak']:.2f}x, memory the merge adds "
          f"{s['adds'] / max(p['adds'], 1):.2f}x")  # fmt: skip
    print(f"streaming / largest shard: peak RSS {s['peak'] / largest:.2f}x, memory the merge adds "
          f"{s['adds'] / largest:.2f}x (goal: at most 1.10x)")  # fmt: skip
    print(f"max |difference| between the two merged models' tensors: {difference:.3g}")


if __name__ == "__main__":
    main()
