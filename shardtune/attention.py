"""Attention for padding-free (packed) rows, registered through transformers' attention interface.

A packed row holds several sequences back to back. transformers' plain sdpa path keeps them apart with a
dense (T x T) block-diagonal mask built from `position_ids`, so its cost grows with the square of the whole
row. `varlen_sdpa` instead runs causal sdpa on each sequence's slice (boundaries from `cu_seq_lens_q`,
which the engine passes with every packed micro-batch): the cost is the sum of the squares of the
sequence lengths, as with flash-attn's varlen kernel, and no mask is materialised.

Because the name is not a transformers mask type, transformers builds no mask at all for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

VARLEN_SDPA = "shardtune_varlen_sdpa"


def varlen_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        cu_seq_lens_q: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, H, T, D], key/value [B, Hkv, T, D] -> [B, T, H, D]. Packed rows have B == 1; their sequence
    boundaries come from `cu_seq_lens_q`, else from `position_ids` restarting at 0."""
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


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_forward)
    return VARLEN_SDPA


def choose(requested: str, packed: bool, device: torch.device) -> str:
    """`auto`: flash-attn varlen on GPU when installed, else shardtune's per-sequence sdpa for packed rows,
    plain sdpa for padded ones. Any other value is passed to transformers unchanged."""
    if requested != "auto":
        return register() if requested == VARLEN_SDPA else requested
    if not packed:
        return "sdpa"
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return register()
