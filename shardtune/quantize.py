"""QLoRA's frozen 4-bit base (`model.load_in_4bit`): the Linear weights of the decoder layers as torchao's
NF4 tensor, which FSDP2 shards and all-gathers in its 4-bit form (docs/qlora.md says why torchao and not
bitsandbytes).

A weight is cut into blocks of 64 values; each value is stored as the 4-bit index of the nearest entry of a
16-value code (NF4, or FP4 with `bnb_4bit_quant_type=fp4`) scaled by its block's absolute maximum; those
block scales are themselves stored in 8 bits ("double quantization", one fp32 factor per group of blocks).
The forward de-quantizes a layer's weight to the compute dtype just before its matmul.

The quantization is a function of the full weight only (never of a shard), so 1 and N processes train the
same numbers: the weight is quantized whole where it was loaded (rank 0) and each rank receives its rows.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist

from shardtune.errors import ConfigError
from shardtune.parallel import decoder_layers

BLOCK = 64  # values per scale (QLoRA's block size)
MAX_SCALER_BLOCK = 256  # block scales per fp32 factor of the double quantization (torchao's default)
MIN_SCALER_GROUPS = 8  # at least this many factors per weight, so shards of up to 8 ranks hold whole groups
# bitsandbytes' FP4 code (1 sign, 2 exponent, 1 mantissa bit), scaled to [-1, 1]; 0 appears twice (+0, -0)
FP4_CODE = (-1.0, -2 / 3, -1 / 2, -1 / 3, -1 / 4, -1 / 6, -1 / 192, 0.0, 0.0, 1 / 192, 1 / 6, 1 / 4, 1 / 3, 1 / 2,
            2 / 3, 1.0)
SHARDED_PARTS = ("quantized_data", "quantized_scalers", "quantization_factor")  # split by rows under FSDP2
REPLICATED_PARTS = ("scaler_mean", "nf4")  # the same on every rank (`nf4` is the code table, NF4 or FP4)


def nf4_class() -> type:
    from torchao.quantization import NF4Tensor

    return NF4Tensor


def is_4bit(t: Any) -> bool:
    """A 4-bit weight, plain or as the local shard of an FSDP2 DTensor."""
    if "torchao" not in sys.modules:  # no 4-bit tensor exists before torchao is imported
        return False
    return isinstance(getattr(t, "_local_tensor", t), nf4_class())


def scaler_block_size(n_blocks: int) -> int | None:
    """Blocks per double-quantization group: torchao's 256, smaller for small weights so that each weight has
    at least MIN_SCALER_GROUPS groups; None when the blocks cannot be grouped so."""
    size = MAX_SCALER_BLOCK
    while size >= 1:
        groups = n_blocks // size
        if n_blocks % size == 0 and groups >= MIN_SCALER_GROUPS and groups % MIN_SCALER_GROUPS == 0:
            return size
        size //= 2
    return None


def quantizable(weight: torch.Tensor) -> bool:
    """Weights whose blocks split evenly over up to 8 ranks stay whole per shard; others stay dense."""
    return (weight.dim() == 2 and weight.numel() % BLOCK == 0 and weight.shape[0] % MIN_SCALER_GROUPS == 0
            and scaler_block_size(weight.numel() // BLOCK) is not None)


@torch.no_grad()
def to_4bit(weight: torch.Tensor, quant_type: str, dtype: torch.dtype) -> torch.Tensor:
    """`weight` quantized whole; it de-quantizes to `dtype` (the compute dtype)."""
    cls = nf4_class()
    w = weight.detach().to(dtype).contiguous()
    n_blocks = w.numel() // BLOCK
    groups = scaler_block_size(n_blocks)
    if quant_type == "nf4":
        return cls.from_tensor(w, BLOCK, groups)
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import SubclassTensorArgs

    # FP4: torchao's container with bitsandbytes' FP4 code as its lookup table (the table travels with the
    # tensor through FSDP2's all-gather, so sharding and de-quantization are the same code as NF4's)
    code = torch.tensor(FP4_CODE, device=w.device, dtype=w.dtype)
    scalers, factor, mean = cls.double_quantize_scalers(w.flatten(), BLOCK, groups)
    data = cls.convert_to_norm_float_weight(w, n_blocks, BLOCK, code)
    meta = SubclassTensorArgs(w.size(), w.stride(), w.storage_offset(), w.dtype, w.device, False)
    return cls(meta, BLOCK, n_blocks, groups, scalers, factor, mean, data, code)


def quantize_base(model: torch.nn.Module, quant_type: str, dtype: torch.dtype,
                  device: torch.device | None = None) -> int:
    """Replace the Linear weights of the decoder layers by frozen 4-bit ones (before LoRA wraps them; the
    embeddings, norms and the output layer stay as loaded), quantized one at a time on `device` (a GPU:
    torchao's quantization takes about 6 s per 16.8M weights on one CPU thread; default: where the weight
    is) and left there. Returns how many weights were quantized."""
    count = 0
    for layer in decoder_layers(model):
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear) and quantizable(module.weight):
                weight = module.weight if device is None or module.weight.is_meta else module.weight.to(device)
                module.weight = torch.nn.Parameter(to_4bit(weight, quant_type, dtype), requires_grad=False)
                count += 1
    return count


def dense(t: torch.Tensor) -> torch.Tensor:
    """A 4-bit weight de-quantized (in its compute dtype); any other tensor as it is."""
    return t.get_original_weight() if is_4bit(t) else t


def split_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(4-bit entries, the others) of a state dict."""
    four = {k: v for k, v in state.items() if is_4bit(v)}
    return four, {k: v for k, v in state.items() if k not in four}


# ----------------------------------------------------------------------------------------------------------
# FSDP2: rank 0 quantized the full weights; every rank takes its rows


def broadcast_from_rank0(model: torch.nn.Module, full: dict[str, Any], device: torch.device) -> None:
    """Fill each rank's 4-bit shards from rank 0's full 4-bit weights (`full`: empty on the other ranks),
    one weight at a time, in the device the process group serves."""
    for name, param in model.named_parameters():  # the live tensors (a state dict holds detached copies)
        if not is_4bit(param):
            continue
        local = param._local_tensor
        mesh = param.device_mesh
        shards, index = mesh.size(-1), mesh.get_coordinate()[-1]
        for part in SHARDED_PARTS + REPLICATED_PARTS:
            mine = getattr(local, part)
            shape = (mine.numel() * shards,) if part in SHARDED_PARTS else mine.shape
            staged = (getattr(full[name], part).to(device) if name in full
                      else torch.empty(shape, dtype=mine.dtype, device=device))
            if staged.shape != shape:
                raise ConfigError(f"{name}: its 4-bit blocks do not split evenly over {shards} ranks. Fix: a "
                                  f"power-of-two number of processes up to {MIN_SCALER_GROUPS}.")
            dist.broadcast(staged, src=0)
            if part in SHARDED_PARTS:
                mine.copy_(staged.chunk(shards)[index])
            else:  # to_empty leaves these as they were built (meta on ranks > 0): replaced, not filled
                setattr(local, part, staged.to(mine.dtype).to(local.quantized_data.device))


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: a 4-bit weight is saved as its parts (DCP knows plain tensors and DTensors, not NF4)

PART_SEP = ".4bit."


def checkpoint_entries(state: dict[str, Any]) -> dict[str, Any]:
    """`state` with each 4-bit weight replaced by its parts: views of the live tensors (so DCP loads into
    them in place), as DTensors sharded like the weight under FSDP2."""
    out = {}
    for name, value in state.items():
        if not is_4bit(value):
            out[name] = value
            continue
        local = getattr(value, "_local_tensor", value)
        for part in SHARDED_PARTS + REPLICATED_PARTS:
            tensor = getattr(local, part)
            if part in SHARDED_PARTS and local is not value:
                from torch.distributed.tensor import DTensor

                tensor = DTensor.from_local(tensor, value.device_mesh, value.placements, run_check=False)
            out[name + PART_SEP + part] = tensor
    return out


def without_parts(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if PART_SEP not in k}


def dense_from_parts(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The de-quantized weight from its saved parts (export: one process, whole tensors)."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import SubclassTensorArgs

    n_blocks = parts["quantized_scalers"].numel()
    numel, dtype = 2 * parts["quantized_data"].numel(), parts["nf4"].dtype
    meta = SubclassTensorArgs(torch.Size([numel]), (1,), 0, dtype, parts["nf4"].device, False)
    t = nf4_class()(meta, numel // n_blocks, n_blocks, n_blocks // parts["quantization_factor"].numel(),
                    parts["quantized_scalers"], parts["quantization_factor"], parts["scaler_mean"],
                    parts["quantized_data"], parts["nf4"])
    return t.get_original_weight()


def part_buffers(state: dict[str, Any], saved: dict[str, Any], prefix: str = "model.") -> dict[str, Any]:
    """For export: `state` with each weight that a checkpoint saved in 4 bits (`saved`: its DCP metadata)
    replaced by empty buffers of its parts, to be read and then de-quantized with `fill_dense`."""
    out = dict(state)
    for name in state:
        if prefix + name + PART_SEP + SHARDED_PARTS[0] in saved:
            del out[name]
            for part in SHARDED_PARTS + REPLICATED_PARTS:
                meta = saved[prefix + name + PART_SEP + part]
                out[name + PART_SEP + part] = torch.empty(meta.size, dtype=meta.properties.dtype)
    return out


@torch.no_grad()
def fill_dense(state: dict[str, Any], loaded: dict[str, Any]) -> None:
    """Write the de-quantized 4-bit weights of `loaded` (read by `part_buffers`) into the model's `state`."""
    for name, weight in state.items():
        if name + PART_SEP + SHARDED_PARTS[0] in loaded:
            parts = {p: loaded[name + PART_SEP + p] for p in SHARDED_PARTS + REPLICATED_PARTS}
            weight.copy_(dense_from_parts(parts).view_as(weight))
