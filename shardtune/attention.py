"""Attention for padding-free (packed) rows, registered through transformers' attention interface.

A packed row holds several sequences back to back. transformers' plain sdpa path keeps them apart with a
dense (T x T) block-diagonal mask built from `position_ids`, so its cost grows with the square of the whole
row. `varlen_forward` instead runs causal attention on each sequence's slice (boundaries from
`cu_seq_lens_q`, which the engine passes with every packed micro-batch): the cost is the sum of the squares
of the sequence lengths, as with flash-attn's varlen kernel, and no row-wide mask is materialised. It has
the variants the model families use (sliding windows, soft-capping, sinks, MLA's narrower values).

Because the name is not a transformers mask type, transformers builds no mask at all for it.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import warnings
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_to_all_single
from transformers import AttentionInterface

# The registered name holds no "sdpa": transformers checks a model's own sdpa support for any name containing
# it, and refuses models without one (Gemma 2, gpt-oss) although this kernel serves them. The old name stays
# accepted as `model.attn_implementation`.
VARLEN = "shardtune_varlen"
VARLEN_ALIASES = ("shardtune_varlen_sdpa",)


def sequence_bounds(length: int, cu_seq_lens_q: torch.Tensor | None, position_ids: torch.Tensor | None,
                    batch: int) -> list[int]:
    """Where the sequences of a row start and end: from `cu_seq_lens_q`, else from `position_ids` restarting
    at 0 on a packed row (batch 1), else the whole row (ordinary rows: one causal pass over the batch)."""
    if cu_seq_lens_q is not None:
        return cu_seq_lens_q.tolist()
    if position_ids is not None and batch == 1:
        pos = position_ids.reshape(-1, position_ids.shape[-1])[-1]  # mrope: [3 or 4, 1, T]; the text row last
        starts = (pos == 0).nonzero().flatten().tolist()
        return [0, length] if not starts else ([0] if starts[0] else []) + starts + [length]
    return [0, length]


def _masked_attention(module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      window: int | None, softcap: float | None, sinks: torch.Tensor | None,
                      dropout: float, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of one sequence with the variants sdpa lacks, computed as the models' eager code
    does: scores (soft-capped), the causal mask widened to the whole picture for image tokens (`blocks` [B, T]:
    each token's picture, -1 for text; Gemma 3), the sliding-window mask over that, a softmax in fp32 over the
    scores and a learnt sink logit per head (dropped after the softmax). [B, H, T, D] -> [B, H, T, Dv]."""
    if k.shape[1] != q.shape[1]:
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    t = q.shape[2]
    i = torch.arange(t, device=q.device)
    allowed = i[None, :] <= i[:, None]
    if blocks is not None:  # transformers' blockwise overlay: OR(causal, same picture), then AND(window)
        allowed = (allowed | ((blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)))[:, None]
    if window:
        allowed &= i[None, :] > i[:, None] - window  # transformers' sliding_window_overlay
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, sink], dim=-1)
        scores = scores - scores.amax(dim=-1, keepdim=True)  # as gpt-oss's eager code
    # at least fp32 (as the models' eager code), and fp64 kept: fp64 parity checks need every op in fp64
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
    if sinks is not None:
        probs = probs[..., :-1]
    probs = F.dropout(probs, p=dropout)
    return probs @ v


def varlen_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   cu_seq_lens_q: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                   sliding_window: int | None = None, softcap: float | None = None, s_aux: torch.Tensor | None = None,
                   image_blocks: torch.Tensor | None = None, image_blocks_on: str = "all",
                   **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, H, T, D], key [B, Hkv, T, D], value [B, Hkv, T, Dv] -> [B, T, H, Dv]: causal attention
    of each sequence on its own slice. Packed rows have B == 1 and their boundaries in `cu_seq_lens_q` (or
    `position_ids` restarting at 0); right-padded rows need no mask (causal: no real token sees a pad).
    Plain sequences run sdpa; sliding windows, soft-capping (Gemma 2) and sinks (gpt-oss, `s_aux`) run
    `_masked_attention`, as do sequences holding pictures whose tokens attend both ways (`image_blocks`
    [B, T], shardtune/vision.py; on every layer, or only on sliding-window layers when `image_blocks_on` is
    'sliding'). The cost is the sum of the squares of the sequence lengths."""
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        raise ValueError(f"{VARLEN} is a training kernel for packed or unpadded rows without a KV cache. "
                         "Fix: model.set_attn_implementation('sdpa') (or 'eager') before generating.")
    sinks = s_aux if s_aux is not None else getattr(module, "sinks", None)
    if sinks is not None and sinks.shape[0] != query.shape[1]:
        raise ValueError(f"{sinks.shape[0]} attention sinks for {query.shape[1]} query heads")
    p = dropout if module.training else 0.0
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    bounds = sequence_bounds(query.shape[2], cu_seq_lens_q, position_ids, query.shape[0])
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        q, k, v = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]
        blocks = None
        if image_blocks is not None and (image_blocks_on == "all" or sliding_window):
            blocks = image_blocks[:, s:e] if bool((image_blocks[:, s:e] >= 0).any()) else None
        if sliding_window or softcap or sinks is not None or blocks is not None:
            outs.append(_masked_attention(module, q, k, v, scale, sliding_window, softcap, sinks, p, blocks))
        else:
            outs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scale,
                                                       enable_gqa=q.shape[1] != k.shape[1]))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


TORCH_VARLEN = "shardtune_torch_varlen"


def torch_varlen_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                         sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """PyTorch's flash-attention varlen kernel (CUDA only) on a packed row; same contract as above. It has
    sliding windows (torch >= 2.11); soft-capping, sinks and MLA's narrower values take `varlen_forward`."""
    from torch.nn.attention.varlen import varlen_attn

    causal, gqa = _varlen_flags(varlen_attn)
    unsupported = (kwargs.get("softcap") or kwargs.get("s_aux") is not None or kwargs.get("image_blocks") is not None
                   or getattr(module, "sinks", None) is not None
                   or value.shape[-1] != query.shape[-1] or (sliding_window and "window_size" not in causal))
    if cu_seq_lens_q is None or query.shape[0] != 1 or unsupported:
        return varlen_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                              cu_seq_lens_q=cu_seq_lens_q, sliding_window=sliding_window, **kwargs)
    cu = cu_seq_lens_q.to(torch.int32)
    max_len = int(max_length_q or int((cu[1:] - cu[:-1]).max()))
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
    if torch.is_autocast_enabled("cuda"):  # a custom op autocast does not cover: cast as sdpa would be cast
        dtype = torch.get_autocast_dtype("cuda")
        q, k, v = (x.to(dtype) for x in (q, k, v))
    if sliding_window:  # transformers' window: a query sees the `sliding_window - 1` keys before it and itself
        causal = {"window_size": (sliding_window - 1, 0)}
    if q.shape[1] != k.shape[1] and not gqa:  # releases without enable_gqa: give each query head its KV head
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    elif q.shape[1] != k.shape[1]:
        causal = {**causal, "enable_gqa": True}
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, **causal)
    return out[None], None


def _varlen_flags(fn) -> tuple[dict, bool]:
    """How this torch release asks `varlen_attn` for causal attention (`window_size=(-1, 0)` since 2.11,
    `is_causal=True` in 2.10), and whether it takes `enable_gqa`."""
    params = inspect.signature(fn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return causal, "enable_gqa" in params


KERNELS = {VARLEN: varlen_forward, TORCH_VARLEN: torch_varlen_forward}


def register(name: str = VARLEN) -> str:
    name = VARLEN if name in VARLEN_ALIASES else name
    AttentionInterface.register(name, KERNELS[name])
    return name


def _torch_varlen_available() -> bool:
    try:
        import torch.nn.attention.varlen  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def variants(hf_config) -> set[str]:
    """The attention variants of a model, from its (text) config: `window` (sliding-window layers), `softcap`
    (attention logit soft-capping, Gemma 2), `sinks` (a learnt sink logit per head, gpt-oss), `mla` (values
    narrower than queries and keys, DeepSeek's multi-head latent attention)."""
    c = hf_config.get_text_config()
    layer_types = getattr(c, "layer_types", None) or []
    window = getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", True) and (
        "sliding_attention" in layer_types or not layer_types)
    found = {"window"} if window else set()
    if getattr(c, "attn_logit_softcapping", None):
        found.add("softcap")
    if c.model_type in SINK_MODELS:
        found.add("sinks")
    if getattr(c, "v_head_dim", None) and getattr(c, "kv_lora_rank", None):
        found.add("mla")
    return found


SINK_MODELS = ("gpt_oss",)  # model types whose attention adds learnt sinks (`s_aux`)


def choose(requested: str, packed: bool, device: torch.device, compute_dtype: torch.dtype = torch.float32,
           hf_config=None, model_class=None) -> str:
    """`auto`: a kernel that serves the model's attention variants and keeps the sequences of a packed row
    apart. On GPU in 16-bit: flash-attn's varlen kernel when installed (windows, soft-capping), else
    PyTorch's `torch.nn.attention.varlen` (windows); else, and on CPU, shardtune's per-sequence kernel,
    which has every variant. Padded rows take transformers' sdpa where the model has it and its variants
    fit sdpa (no soft-capping, no sinks), else the per-sequence kernel (right padding needs no mask). Any
    other value is passed to transformers unchanged (our own names are registered first)."""
    if requested != "auto":
        return register(requested) if requested in KERNELS or requested in VARLEN_ALIASES else requested
    found = variants(hf_config) if hf_config is not None else set()
    sdpa_ok = model_class is None or getattr(model_class, "_supports_sdpa", True)
    if not packed:
        return "sdpa" if sdpa_ok and not found & {"softcap", "sinks"} else register(VARLEN)
    if device.type == "cuda" and compute_dtype in (torch.bfloat16, torch.float16):  # flash kernels: 16-bit only
        flash_ok = model_class is None or getattr(model_class, "_supports_flash_attn", True)
        if flash_ok and "sinks" not in found and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        if _torch_varlen_available() and not found & {"softcap", "sinks", "mla"}:
            return register(TORCH_VARLEN)
    return register(VARLEN)


# ----------------------------------------------------------------------------------------------------------
# Ulysses sequence parallelism: each rank of a sequence-parallel group holds a slice of the packed row. Around
# attention, an all-to-all trades the sequence slices for head slices (every rank then sees the whole row for
# H/sp heads), the per-sequence kernel runs, and a second all-to-all trades back.

ULYSSES = "shardtune_ulysses"


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Autograd-aware all-to-all of equal chunks along dim 0."""
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
    n = kv.shape[1]
    factor = sp // math.gcd(n, sp)
    return kv if factor == 1 else kv.repeat_interleave(factor, dim=1)


def ulysses_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, *, sp_group, **kwargs) -> tuple[torch.Tensor, None]:
    group = sp_group
    sp = dist.get_world_size(group)
    q = seq_to_heads(query, sp, group)
    k = seq_to_heads(repeat_kv_for(key, sp), sp, group)
    v = seq_to_heads(repeat_kv_for(value, sp), sp, group)
    kwargs.pop("position_ids", None)  # local slice; the full row's boundaries come in cu_seq_lens_q
    sinks = kwargs.pop("s_aux", None)
    sinks = sinks if sinks is not None else getattr(module, "sinks", None)
    if sinks is not None:  # one sink per query head: this rank's heads only
        kwargs["s_aux"] = sinks.reshape(sp, -1)[dist.get_rank(group)]
    inner = torch_varlen_forward if query.is_cuda and _torch_varlen_available() else varlen_forward
    out, _ = inner(module, q, k, v, attention_mask, **kwargs)  # [1, S, H/sp, D]
    out = heads_to_seq(out.transpose(1, 2), sp, group)  # [1, H, S/sp, D]
    return out.transpose(1, 2).contiguous(), None


def register_ulysses(group) -> str:
    """Register the Ulysses attention of this process's sequence-parallel group (bound to the function, so
    no module-level state)."""
    AttentionInterface.register(ULYSSES, partial(ulysses_forward, sp_group=group))
    return ULYSSES
