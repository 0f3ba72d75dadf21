"""Linear-attention and hybrid layers (Qwen3.5 / Qwen3-Next Gated DeltaNet, Mamba-style mixers) on packed
rows: each runs one sequence at a time, so its recurrent state restarts at every sequence start.

(Attention variants live in attention.py, vision-language parts in vision.py, MoE routing in moe.py.)
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from shardtune.attention import sequence_bounds

# ----------------------------------------------------------------------------------------------------------
# Linear-attention / recurrent layers (Gated DeltaNet in Qwen3.5 and Qwen3-Next, Mamba-style mixers) carry a
# state along the row: on a packed row it must restart at every sequence. transformers' PyTorch path does not
# (it refuses `cu_seqlens` without flash-linear-attention, and its causal conv would run across boundaries),
# so each such layer runs once per sequence of the row.

LINEAR_ATTENTION_LAYER_TYPES = ("linear_attention", "mamba", "mamba2")


def has_linear_attention(hf_config: Any) -> bool:
    layer_types = getattr(hf_config.get_text_config(), "layer_types", None) or []
    return any(t in LINEAR_ATTENTION_LAYER_TYPES for t in layer_types)


def _is_recurrent_mixer(module: torch.nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith("GatedDeltaNet") or name.endswith("MambaMixer") or name.endswith("Mamba2Mixer")


_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids")


def run_per_sequence(forward):
    """Wrap a recurrent mixer's forward: on a packed row (batch 1 with sequence boundaries) call it once
    per sequence, so its conv and recurrent states start from zero at each sequence start."""

    @functools.wraps(forward)
    def per_sequence(hidden_states: torch.Tensor, *args, **kwargs):
        cu, pos = kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids")
        plain = {k: v for k, v in kwargs.items() if k not in _PACKED_KWARGS}
        if hidden_states.shape[0] != 1 or (cu is None and pos is None):
            return forward(hidden_states, *args, **plain)
        bounds = sequence_bounds(hidden_states.shape[1], cu, pos, 1)
        if len(bounds) == 2:
            return forward(hidden_states, *args, **plain)
        outs = [forward(hidden_states[:, s:e], *args, **plain) for s, e in zip(bounds[:-1], bounds[1:])]
        return torch.cat(outs, dim=1)

    per_sequence.shardtune_per_sequence = True
    return per_sequence


def isolate_recurrent_layers(model: torch.nn.Module) -> int:
    """Make every recurrent mixer of `model` run per sequence on packed rows; returns how many."""
    count = 0
    for module in model.modules():
        if _is_recurrent_mixer(module) and not getattr(module.forward, "shardtune_per_sequence", False):
            module.forward = run_per_sequence(module.forward)
            count += 1
    return count
