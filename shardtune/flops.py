"""Model FLOPs per training step, peak FLOP/s of the device, and MFU.

Training FLOPs = 6 x (matmul parameters touched per token) x tokens, plus causal attention:
QK^T and AV cost 2 x s^2 x head_dim x heads per layer forward for a full s x s score matrix; a causal
mask halves that, and backward doubles forward, so 6 x s^2 x head_dim x heads per layer and sequence.
The attention term uses each sequence's own length (sum of s^2), not a padded or packed length.
Embedding lookups are not matmuls and are not counted; the output head is.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

import torch

# Dense bf16/fp16 tensor-core peaks (no sparsity), FLOP/s; fp32 peaks are far lower and listed separately.
GPU_PEAK_BF16 = {"B200": 2.25e15, "H200": 989e12, "H100": 989e12, "H800": 989e12, "H20": 148e12,
                 "A100": 312e12, "A800": 312e12, "L40S": 362e12, "MI300X": 1307e12, "A10G": 70e12}
GPU_PEAK_FP32 = {"B200": 80e12, "H200": 67e12, "H100": 67e12, "A100": 19.5e12, "L40S": 91.6e12, "MI300X": 163e12}


def config_value(config: Any, *names: str, default: Any = None) -> Any:
    """The first of `names` the config sets. A per-layer value (a list, as Gemma 3n's intermediate_size, or set
    per layer, as Gemma 4's head_dim) gives its mean over the layers, rounded."""
    for n in names:
        try:
            v = getattr(config, n, None)
        except RuntimeError:  # transformers refuses one global value of an attribute that varies per layer
            layers = config.per_layer_config
            v = [getattr(layers[i], n) for i in range(len(layers))]
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) for x in v):
            v = round(sum(v) / len(v))
        if v is not None:
            return v
    return default



def matmul_params_per_token(config: Any) -> int:
    """Weights a token is multiplied with (per forward), for dense and mixture-of-experts decoders."""
    h = config.hidden_size
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = config_value(config, "head_dim", default=h // heads)
    kv = config_value(config, "num_key_value_heads", default=heads)
    attn = h * head_dim * (2 * heads + 2 * kv)  # q, o + k, v projections
    experts = config_value(config, "num_experts", "num_local_experts", "n_routed_experts")
    if experts:
        active = config_value(config, "num_experts_per_tok", "num_experts_per_token", default=1)
        moe_inter = config_value(config, "moe_intermediate_size", "intermediate_size")
        mlp = active * 3 * h * moe_inter + h * experts  # routed experts + router
        shared = config_value(config, "shared_expert_intermediate_size", default=0)
        mlp += 3 * h * shared
    else:
        mlp = 3 * h * config_value(config, "intermediate_size")  # gate, up, down (SwiGLU / GeGLU)
    return layers * (attn + mlp) + config.vocab_size * h


def training_flops(config: Any, seq_lengths: list[int] | Any) -> float:
    """FLOPs of forward + backward over sequences of the given lengths."""
    tokens = int(sum(seq_lengths))
    config = config.get_text_config()  # a vision-language model: its language model (the tower is not counted)
    heads = config.num_attention_heads
    head_dim = config_value(config, "head_dim", default=config.hidden_size // heads)
    squares = float(sum(int(s) ** 2 for s in seq_lengths))
    return 6.0 * matmul_params_per_token(config) * tokens + 6.0 * config.num_hidden_layers * heads * head_dim * squares


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak FLOP/s of one device: the table for known GPUs, a short matmul measurement on CPUs."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = GPU_PEAK_BF16 if dtype in (torch.bfloat16, torch.float16) else GPU_PEAK_FP32
        return next((v for k, v in table.items() if k in name), float("nan"))
    return measured_cpu_peak(dtype)


@lru_cache(maxsize=4)
def measured_cpu_peak(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.3) -> float:
    """Best observed matmul FLOP/s of this CPU with the current thread count (what MFU is relative to)."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm up
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best
