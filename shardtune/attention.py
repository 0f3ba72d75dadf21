"""Attention for padding-free (packed) rows, registered through transformers' attention interface.

A packed row holds several sequences back to back. transformers' plain sdpa path keeps them apart with a
dense (T x T) block-diagonal mask built from `position_ids`, so its cost grows with the square of the whole
row. `varlen_sdpa` instead runs causal sdpa on each sequence's slice (boundaries from `cu_seq_lens_q`,
which the engine passes with every packed micro-batch): the cost is the sum of the squares of the
sequence lengths, as with flash-attn's varlen kernel, and no mask is materialised.

Because the name is not a transformers mask type, transformers builds no mask at all for it.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

VARLEN_SDPA = "shardtune_varlen_sdpa"


def _check_supported(module: torch.nn.Module, kwargs: dict) -> None:
    if kwargs.get("sliding_window") or kwargs.get("softcap") or getattr(module, "sinks", None) is not None:
        raise ValueError("shardtune's varlen kernels do not implement sliding windows, soft-capping or sinks. "
                         "Fix: model.attn_implementation=sdpa (or flash_attention_2 on GPU).")


def varlen_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        cu_seq_lens_q: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, H, T, D], key/value [B, Hkv, T, D] -> [B, T, H, D]. Packed rows have B == 1; their sequence
    boundaries come from `cu_seq_lens_q`, else from `position_ids` restarting at 0."""
    _check_supported(module, kwargs)
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        raise ValueError(f"{VARLEN_SDPA} is a training kernel for packed or unpadded rows without a KV cache. "
                         "Fix: model.set_attn_implementation('sdpa') before generating.")
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    if cu_seq_lens_q is not None:
        bounds = cu_seq_lens_q.tolist()
    elif position_ids is not None and position_ids.shape[0] == 1:  # packed row: sequences restart at 0
        starts = (position_ids[0] == 0).nonzero().flatten().tolist()
        bounds = [*starts, position_ids.shape[1]]
    else:  # ordinary rows: one causal sdpa over the batch
        bounds = [0, query.shape[2]]
    outs = [
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=p,
                                       is_causal=True, scale=scaling, enable_gqa=gqa)
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


TORCH_VARLEN = "shardtune_torch_varlen"


def torch_varlen_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                         **kwargs) -> tuple[torch.Tensor, None]:
    """PyTorch's flash-attention varlen kernel (CUDA only) on a packed row; same contract as above."""
    from torch.nn.attention.varlen import varlen_attn

    _check_supported(module, kwargs)
    if cu_seq_lens_q is None or query.shape[0] != 1:
        return varlen_sdpa_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                   cu_seq_lens_q=cu_seq_lens_q, **kwargs)
    cu = cu_seq_lens_q.to(torch.int32)
    max_len = int(max_length_q or int((cu[1:] - cu[:-1]).max()))
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
    if torch.is_autocast_enabled("cuda"):  # a custom op autocast does not cover: cast as sdpa would be cast
        dtype = torch.get_autocast_dtype("cuda")
        q, k, v = (x.to(dtype) for x in (q, k, v))
    causal, gqa = _varlen_flags(varlen_attn)
    if q.shape[1] != k.shape[1] and not gqa:  # releases without enable_gqa: give each query head its KV head
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    elif q.shape[1] != k.shape[1]:
        causal = {**causal, "enable_gqa": True}
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, **causal)
    return out[None], None


def _varlen_flags(fn) -> tuple[dict, bool]:
    """How this torch release asks `varlen_attn` for causal attention (`window_size=(-1, 0)` since 2.11,
    `is_causal=True` in 2.10), and whether it takes `enable_gqa`."""
    import inspect

    params = inspect.signature(fn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return causal, "enable_gqa" in params


KERNELS = {VARLEN_SDPA: varlen_sdpa_forward, TORCH_VARLEN: torch_varlen_forward}


def register(name: str = VARLEN_SDPA) -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(name, KERNELS[name])
    return name


def _torch_varlen_available() -> bool:
    try:
        import torch.nn.attention.varlen  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def needs_masked_attention(hf_config) -> bool:
    """Sliding windows, logit soft-capping and attention sinks are not implemented by the per-sequence
    kernels here; transformers' sdpa path applies them through its mask."""
    window = getattr(hf_config, "sliding_window", None) and getattr(hf_config, "use_sliding_window", True)
    layer_types = getattr(hf_config, "layer_types", None) or []
    return bool(window or "sliding_attention" in layer_types or getattr(hf_config, "attn_logit_softcapping", None))


def choose(requested: str, packed: bool, device: torch.device, compute_dtype: torch.dtype = torch.float32,
           hf_config=None) -> str:
    """`auto` for packed rows: flash-attn's varlen kernel on GPU when installed, else PyTorch's own varlen kernel
    (`torch.nn.attention.varlen`, CUDA), else shardtune's per-sequence sdpa; plain sdpa for padded rows. Any
    other value is passed to transformers unchanged."""
    if requested != "auto":
        return register(requested) if requested in KERNELS else requested
    if not packed or (hf_config is not None and needs_masked_attention(hf_config)):
        return "sdpa"
    if device.type == "cuda" and compute_dtype in (torch.bfloat16, torch.float16):  # flash kernels: 16-bit only
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            if _torch_varlen_available():
                return register(TORCH_VARLEN)
    return register()


# ----------------------------------------------------------------------------------------------------------
# Ulysses sequence parallelism: each rank of a sequence-parallel group holds a slice of the packed row. Around
# attention, an all-to-all trades the sequence slices for head slices (every rank then sees the whole row for
# H/sp heads), the per-sequence kernel runs, and a second all-to-all trades back.

ULYSSES = "shardtune_ulysses"
_SP_GROUP = None


def set_sequence_parallel_group(group) -> None:
    global _SP_GROUP
    _SP_GROUP = group


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Autograd-aware all-to-all of equal chunks along dim 0."""
    from torch.distributed.nn.functional import all_to_all_single

    x = x.contiguous()  # (empty_like of a permuted view would keep its strides and scramble the result)
    with warnings.catch_warnings():  # the autograd-aware version is the one that is documented to work on gloo
        warnings.filterwarnings("ignore", message=".*all_to_all_single is deprecated")
        return all_to_all_single(torch.empty_like(x), x, group=group)


def seq_to_heads(x: torch.Tensor, sp: int, group) -> torch.Tensor:
    """[1, H, S/sp, D] (my sequence slice, all heads) -> [1, H/sp, S, D] (all positions, my heads)."""
    _, h, s_local, d = x.shape
    out = _all_to_all(x[0].reshape(sp, h // sp, s_local, d), group)  # out[i]: rank i's slice of my heads
    return out.permute(1, 0, 2, 3).reshape(1, h // sp, sp * s_local, d)


def heads_to_seq(x: torch.Tensor, sp: int, group) -> torch.Tensor:
    """[1, H/sp, S, D] -> [1, H, S/sp, D], the inverse of `seq_to_heads`."""
    _, h_local, s, d = x.shape
    chunks = x[0].reshape(h_local, sp, s // sp, d).permute(1, 0, 2, 3)  # chunk i: rank i's positions
    return _all_to_all(chunks, group).reshape(1, sp * h_local, s // sp, d)


def repeat_kv_for(kv: torch.Tensor, sp: int) -> torch.Tensor:
    """Repeat key/value heads so their count divides by sp (grouped-query attention with fewer KV heads
    than sequence-parallel ranks); each query head keeps its original KV head."""
    import math

    n = kv.shape[1]
    factor = sp // math.gcd(n, sp)
    return kv if factor == 1 else kv.repeat_interleave(factor, dim=1)


def ulysses_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    import torch.distributed as dist

    group = _SP_GROUP
    sp = dist.get_world_size(group)
    q = seq_to_heads(query, sp, group)
    k = seq_to_heads(repeat_kv_for(key, sp), sp, group)
    v = seq_to_heads(repeat_kv_for(value, sp), sp, group)
    kwargs.pop("position_ids", None)  # local slice; the full row's boundaries come in cu_seq_lens_q
    inner = torch_varlen_forward if query.is_cuda and _torch_varlen_available() else varlen_sdpa_forward
    out, _ = inner(module, q, k, v, attention_mask, **kwargs)  # [1, S, H/sp, D]
    out = heads_to_seq(out.transpose(1, 2), sp, group)  # [1, H, S/sp, D]
    return out.transpose(1, 2).contiguous(), None


def register_ulysses(group) -> str:
    from transformers import AttentionInterface

    set_sequence_parallel_group(group)
    AttentionInterface.register(ULYSSES, ulysses_forward)
    return ULYSSES
