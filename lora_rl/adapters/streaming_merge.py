"""Streaming merge: fold a LoRA adapter into its base tensor by tensor, over the base's safetensors files.

The model is never built. A plan is made first from the files' headers and a model instantiated on the
meta device (no memory): which tensor of the merged model comes from which file, which gets a LoRA delta,
which tied weights must be untied. Then each output shard is written tensor by tensor: read (plain file
reads, not mmap, so the page cache never counts as our memory), merge in float32, cast once, write. Peak
memory is about the largest tensor, a few times over while merging, instead of the whole model.

The plan also serves the in-memory merge and `lora-rl load`: it is where an adapter is checked to fit a base.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from lora_rl.models.build import ModelError, quiet_transformers
from lora_rl.training.checkpoint import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
NAMES = {dtype: name for name, dtype in DTYPES.items()}
SINGLE_FILE, INDEX = "model.safetensors", "model.safetensors.index.json"
CHUNK = 64 * 2**20  # bytes: tensors without a LoRA delta are copied in pieces this big
ADAPTER_PREFIX = "base_model.model."  # peft's prefix on every saved adapter tensor
# peft's saved LoRA tensor suffixes -> which factor (Embedding layers name theirs apart).
LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B"}
VARIANT_SUFFIXES = (".lora_magnitude_vector", ".lora_B.bias")  # DoRA, lora_bias: peft merges them, we do not
STREAMABLE = ("linear", "conv1d", "embedding")
# Each adapter_config key below changes what merging means; streaming supports none of them.
UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)", "lora_bias": "LoRA biases (lora_bias)", "use_qalora": "QALoRA (use_qalora)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)", "arrow_config": "Arrow (arrow_config)",
    "use_bdlora": "BD-LoRA (use_bdlora)", "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)", "kasa_config": "KaSA (kasa_config)",
    "layer_replication": "layer_replication", "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "ensure_weight_tying": "tied LoRA weights (ensure_weight_tying)",
}  # fmt: skip
# Other inits (pissa, olora, corda, loftq, ...) rewrite the base weights when peft loads the adapter.
PLAIN_INITS = (True, False, "gaussian", "orthogonal")


# ---------------------------------------------------------------- safetensors files


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> where it lies in safetensors file `path`; a corrupt or truncated file is an error."""
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file missing")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= size - 8:
                raise ValueError("header length exceeds the file")
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        infos = {name: TensorInfo(h["dtype"], tuple(h["shape"]), 8 + length + h["data_offsets"][0],
                                  8 + length + h["data_offsets"][1]) for name, h in header.items()}  # fmt: skip
        for info in infos.values():
            if info.end - info.start != info.numel * DTYPES[info.dtype].itemsize or info.end > size:
                raise ValueError("tensor data lies beyond the end of the file")
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({err})") from None
    return infos


def read_tensor(f: BinaryIO, info: TensorInfo) -> torch.Tensor:
    """One tensor, read into fresh memory with plain reads (unlike mmap, the file's pages are not ours)."""
    data = torch.empty(info.end - info.start, dtype=torch.uint8)
    f.seek(info.start)
    f.readinto(data.numpy())
    return data.view(DTYPES[info.dtype]).reshape(info.shape)


def write_safetensors(path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      tensors: Iterable[Iterable[torch.Tensor]]) -> int:  # fmt: skip
    """Write a safetensors file whose tensors come one at a time, in `layout` order; returns its data bytes.

    Each tensor is given as pieces (flat or not) whose data, concatenated, is the tensor's. The header is
    written first, from the layout, so no tensor waits in memory for the others.
    """
    header, offset = {}, 0
    for name, dtype, shape in layout:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the format asks
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for (name, dtype, shape), pieces in zip(layout, tensors, strict=True):
            written = 0
            for piece in pieces:
                if piece.dtype != dtype:
                    raise RuntimeError(f"{name}: planned {dtype}, got {piece.dtype}")
                written += f.write(piece.contiguous().reshape(-1).view(torch.uint8).numpy())
            if written != math.prod(shape) * dtype.itemsize:
                raise RuntimeError(f"{name}: planned {shape}, got {written} bytes")
    return offset


def base_files(base: Path) -> list[tuple[Path, dict[str, TensorInfo]]]:
    """The base's safetensors files, in order, with their headers."""
    if (base / INDEX).is_file():
        weight_map = json.loads((base / INDEX).read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    elif (base / SINGLE_FILE).is_file():
        names = [SINGLE_FILE]
    else:
        raise CheckpointError(f"{base}: no safetensors weights ({SINGLE_FILE} or {INDEX})")
    return [(base / name, read_header(base / name)) for name in names]


# ---------------------------------------------------------------- what the model expects


@dataclass(frozen=True)
class Layout:
    """What a transformers model holds: its tensors, the kind of each layer LoRA can wrap, its tied weights."""

    shapes: dict[str, tuple[int, ...]]  # parameters and persistent buffers (tied names each listed)
    buffers: frozenset[str]
    kinds: dict[str, str]  # module name -> "linear", "conv1d", "embedding" or its class name
    tied: list[list[str]]  # groups of parameter names sharing one tensor


def model_layout(model: nn.Module) -> Layout:
    """The layout of `model` (a real one, or one on the meta device)."""
    kinds = {name: layer_kind(module) for name, module in model.named_modules()
             if isinstance(getattr(module, "weight", None), torch.Tensor)}  # fmt: skip
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    params = {name for group in groups.values() for name in group}
    return Layout(shapes, frozenset(set(shapes) - params), kinds, [g for g in groups.values() if len(g) > 1])


def layer_kind(module: nn.Module) -> str:
    from transformers.pytorch_utils import Conv1D

    for cls, kind in ((Conv1D, "conv1d"), (nn.Linear, "linear"), (nn.Embedding, "embedding")):
        if isinstance(module, cls):
            return kind
    return type(module).__name__


def meta_model(config, task: str) -> nn.Module:
    """The merged model's class, instantiated on the meta device: structure without memory."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if task == "reward" else AutoModelForCausalLM
    with torch.device("meta"), quiet_transformers():
        return cls.from_config(config)


# ---------------------------------------------------------------- the adapter against the layout


@dataclass(frozen=True)
class Lora:
    """One LoRA layer: W' = W + scaling * B @ A, transposed where the base stores W as (in, out)."""

    a: TensorInfo  # (r, in) in the adapter file
    b: TensorInfo  # (out, r)
    scaling: float  # alpha / r, or alpha / sqrt(r) with rslora
    transposed: bool  # Conv1D (GPT-2) and Embedding: peft's fan_in_fan_out, decided per layer


@dataclass
class AdapterParts:
    loras: dict[str, Lora] = field(default_factory=dict)  # by base weight name, e.g. "...q_proj.weight"
    replacements: dict[str, TensorInfo] = field(default_factory=dict)  # base tensor name -> saved whole tensor
    problems: list[str] = field(default_factory=list)  # the adapter does not fit the base
    unstreamable: list[str] = field(default_factory=list)  # what only peft (in memory) merges


def adapter_parts(header: dict[str, TensorInfo], config: dict, layout: Layout) -> AdapterParts:
    """Sort the adapter's tensors into LoRA pairs and whole replacements, checking each fits `layout`."""
    parts, pairs = AdapterParts(), {}
    for key, info in header.items():
        name = key.removeprefix(ADAPTER_PREFIX)
        suffix = next((s for s in LORA_SUFFIXES if name.endswith(s)), None)
        if suffix:
            pairs.setdefault(name.removesuffix(suffix), {})[LORA_SUFFIXES[suffix]] = info
        elif name.endswith(VARIANT_SUFFIXES):
            parts.unstreamable.append(f"tensor {name}")
        else:  # modules_to_save (e.g. score) or a saved embedding: `x.base_layer.weight` is `x.weight`
            parts.replacements[name.replace(".base_layer.", ".")] = info
    for module, factors in pairs.items():
        if layout.kinds.get(module, "linear") not in STREAMABLE:  # peft may merge it; its check will tell
            parts.unstreamable.append(f"{module}, a {layout.kinds[module]} layer")
            continue
        lora = pair_lora(module, factors, config, layout, parts.problems)
        if lora is not None:
            parts.loras[f"{module}.weight"] = lora
    for name, info in parts.replacements.items():
        if layout.shapes.get(name) != info.shape:
            expected = layout.shapes.get(name)
            parts.problems.append(f"{name} is {info.shape} in the adapter, " + (
                f"{expected} in the base" if expected else "and the base has no such tensor"))  # fmt: skip
    return parts


def pair_lora(module: str, factors: dict, config: dict, layout: Layout, problems: list[str]) -> Lora | None:
    """The Lora of one adapted module, or None with the reason appended to `problems`."""
    from peft.utils.other import get_pattern_key

    kind = layout.kinds.get(module)
    if kind is None:
        problems.append(f"{module} has LoRA weights but the base has no such layer")
        return None
    if set(factors) != {"A", "B"}:
        problems.append(f"{module}: only lora_{next(iter(factors))} is in the adapter file")
        return None
    a, b = factors["A"], factors["B"]
    r = config.get("rank_pattern", {}).get(get_pattern_key(config.get("rank_pattern", {}), module), config["r"])
    alphas = config.get("alpha_pattern", {})
    alpha = alphas.get(get_pattern_key(alphas, module), config["lora_alpha"])
    transposed = kind in ("conv1d", "embedding")
    delta = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
    base_shape = layout.shapes.get(f"{module}.weight")
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != r or b.shape[1] != r or delta != base_shape:
        problems.append(f"{module}: LoRA A {a.shape} and B {b.shape} (r={r}) do not fit its weight {base_shape}")
        return None
    # Same Python float as peft's LoraLayer.update_layer, so the product is bitwise the same.
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return Lora(a, b, scaling, transposed)


def untied_groups(layout: Layout, parts: AdapterParts) -> list[list[str]]:
    """Tied groups a member of which the adapter changes: merging must give each its own tensor."""
    changed = set(parts.loras) | set(parts.replacements)
    return [group for group in layout.tied if changed & set(group)]


def unsupported_features(config: dict) -> list[str]:
    """What in adapter_config.json the streaming merge cannot reproduce."""
    found = [what for key, what in UNSUPPORTED.items() if config.get(key)]
    if config.get("init_lora_weights", True) not in PLAIN_INITS:
        found.append(f"init_lora_weights {config['init_lora_weights']!r} (peft rewrites the base when loading it)")
    return found


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Entry:
    """One tensor of the merged model and where it comes from."""

    name: str
    source: TensorInfo  # in the base file of its shard, or in the adapter file
    from_adapter: bool
    lora: Lora | None


@dataclass(frozen=True)
class Shard:
    name: str  # output file name
    base_file: Path
    entries: list[Entry]


@dataclass
class Plan:
    config: object  # the base's transformers config, set up for the merged model's head
    model_class: str  # e.g. LlamaForSequenceClassification
    layout: Layout
    parts: AdapterParts
    shards: list[Shard]
    sharded: bool  # the base came in several files (with an index)
    untied: list[list[str]]
    dropped: list[str]  # base tensors the merged model has no place for (a reward model's lm_head)
    unstreamable: list[str]  # why only an in-memory merge can do it (empty for plain LoRA on standard files)
    base_dtype: torch.dtype
    float32_bytes: int  # the base's size in float32: what an in-memory merge holds
    largest_shard_bytes: int


def plan_merge(base: Path, config, task: str, adapter_header: dict[str, TensorInfo], adapter_config: dict) -> Plan:
    """Where each tensor of the merged model comes from; raises ModelError when the adapter does not fit.

    `config` is the base's transformers config; the plan keeps a copy set up for the merged model's head.
    """
    config = copy.deepcopy(config)
    if task == "reward":
        config.num_labels = reward_labels(adapter_header, adapter_config)
    model = meta_model(config, task)
    layout = model_layout(model)
    parts = adapter_parts(adapter_header, adapter_config, layout)
    files = base_files(base)
    shards, dropped, missing = assign(files, layout, parts, untied := untied_groups(layout, parts))
    if parts.problems:
        raise ModelError(f"the adapter does not fit the base {base}: {first_few(parts.problems)}")
    # A checkpoint naming tensors otherwise than this transformers version (it renames them on load).
    unstreamable = parts.unstreamable + [f"tensor {name}, which the base's files lack" for name in missing]
    floats = [i for _, header in files for i in header.values() if DTYPES[i.dtype].is_floating_point]
    return Plan(config, type(model).__name__, layout, parts, shards, len(files) > 1, untied, dropped, unstreamable,
                base_dtype=config_dtype(config) or DTYPES[max(floats, key=lambda i: i.numel).dtype],
                float32_bytes=sum(4 * i.numel for i in floats),
                largest_shard_bytes=max(path.stat().st_size for path, _ in files))  # fmt: skip


def first_few(items: list[str], shown: int = 3) -> str:
    more = f" (and {len(items) - shown} more)" if len(items) > shown else ""
    return "; ".join(items[:shown]) + more


def config_dtype(config) -> torch.dtype | None:
    """The precision the base was saved in, as its config says (a dtype or its name), if it says."""
    dtype = getattr(config, "dtype", None)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def reward_labels(header: dict[str, TensorInfo], config: dict) -> int:
    """The reward head's output count, read from its saved weight (modules_to_save)."""
    for head in config.get("modules_to_save") or []:
        info = header.get(f"{ADAPTER_PREFIX}{head}.weight")
        if info is not None:
            return info.shape[0]
    raise ModelError("the reward (SEQ_CLS) adapter has no saved head weights (e.g. score in modules_to_save)")


def assign(files: list[tuple[Path, dict[str, TensorInfo]]], layout: Layout, parts: AdapterParts,
           untied: list[list[str]]) -> tuple[list[Shard], list[str], list[str]]:  # fmt: skip
    """(shards mirroring the base's files, dropped base tensors, parameters found nowhere)."""
    where = {name: i for i, (_, header) in enumerate(files) for name in header}
    entries: list[list[Entry]] = [[] for _ in files]
    stored_alias = {}  # every name of a still-tied group -> the one name the base file stores it under
    for group in layout.tied:
        stored = next((n for n in group if n in where), group[0])
        stored_alias |= {name: stored for name in group}
    untied_names = {name for group in untied for name in group}
    missing = []
    for name in layout.shapes:
        source = name if name in where else stored_alias.get(name)
        if name in stored_alias and name != stored_alias[name] and name not in untied_names:
            continue  # a tied alias: transformers ties it again on load
        if name in parts.replacements:
            shard = where.get(source, len(files) - 1)
            entries[shard].append(Entry(name, parts.replacements[name], True, parts.loras.get(name)))
        elif source in where:
            header = files[where[source]][1]
            entries[where[source]].append(Entry(name, header[source], False, parts.loras.get(name)))
        elif name not in layout.buffers:  # a missing buffer is rebuilt by transformers; a parameter is not
            missing.append(name)
    dropped = [name for name in where if name not in layout.shapes]
    shards = [Shard(path.name, path, sorted(shard, key=lambda e: (-DTYPES[e.source.dtype].itemsize, e.name)))
              for (path, _), shard in zip(files, entries, strict=True)]  # fmt: skip
    return shards, dropped, missing


# ---------------------------------------------------------------- writing


def write_merged(plan: Plan, adapter_weights: Path, out: Path, dtype: torch.dtype) -> list[str]:
    """Write the merged tensors of every shard to `out` (plus the index when sharded); returns file names."""
    weight_map, total = {}, 0
    with open(adapter_weights, "rb") as adapter:
        for shard in plan.shards:
            name = shard.name if plan.sharded else SINGLE_FILE
            layout = [(e.name, out_dtype(e, dtype), e.source.shape) for e in shard.entries]
            with open(shard.base_file, "rb") as base:
                tensors = (tensor_pieces(e, base, adapter, dtype) for e in shard.entries)
                total += write_safetensors(out / name, layout, tensors)
            weight_map |= {e.name: name for e in shard.entries}
    if not plan.sharded:
        return [SINGLE_FILE]
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [shard.name for shard in plan.shards] + [INDEX]


def out_dtype(entry: Entry, dtype: torch.dtype) -> torch.dtype:
    source = DTYPES[entry.source.dtype]
    return dtype if source.is_floating_point else source


def tensor_pieces(entry: Entry, base: BinaryIO, adapter: BinaryIO, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The merged model's tensor `entry`: whole when it gets a LoRA delta, else copied in pieces of CHUNK
    bytes, so an embedding that LoRA leaves alone (2 GiB in a 70B model) never sits whole in memory."""
    if entry.lora is not None:
        yield merged_tensor(entry, base, adapter, dtype)
        return
    source, target, info = adapter if entry.from_adapter else base, out_dtype(entry, dtype), entry.source
    itemsize = DTYPES[info.dtype].itemsize
    step = max(CHUNK // itemsize, 1) * itemsize
    for start in range(info.start, info.end, step):
        end = min(start + step, info.end)
        yield read_tensor(source, TensorInfo(info.dtype, ((end - start) // itemsize,), start, end)).to(target)


def merged_tensor(entry: Entry, base: BinaryIO, adapter: BinaryIO, dtype: torch.dtype) -> torch.Tensor:
    """One tensor of the merged model: read, merged in float32 when it has a LoRA delta, cast once."""
    tensor = read_tensor(adapter if entry.from_adapter else base, entry.source)
    if entry.lora is not None:
        tensor = tensor.float()  # a fresh buffer either way, so adding in place is safe
        tensor += lora_delta(entry.lora, adapter)  # peft: weight.data += get_delta_weight(adapter)
    return tensor.to(out_dtype(entry, dtype))


def lora_delta(lora: Lora, adapter: BinaryIO) -> torch.Tensor:
    """scaling * B @ A in float32, computed with peft's get_delta_weight's own operations and order."""
    a, b = read_tensor(adapter, lora.a).float(), read_tensor(adapter, lora.b).float()
    delta = (b @ a).mul_(lora.scaling)  # in place: the same values as peft's `* scaling`, one buffer fewer
    return delta.T if lora.transposed else delta
