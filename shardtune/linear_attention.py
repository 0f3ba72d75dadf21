"""Linear-attention and hybrid layers (Qwen3.5 / Qwen3-Next Gated DeltaNet, Mamba-style mixers, short
convolutions) on packed rows: each runs one sequence at a time, so its recurrent state restarts at every
sequence start.

(Attention variants live in attention.py, vision-language parts in vision.py, MoE routing in moe.py.)
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from shardtune.attention import sequence_bounds

# ----------------------------------------------------------------------------------------------------------
# Linear-attention / recurrent layers (Gated DeltaNet in Qwen3.5 and Qwen3-Next, Mamba-style mixers in Jamba,
# Falcon-H1 and Granite 4, LFM2's short convolutions) carry a state along the row: on a packed row it must
# restart at every sequence. transformers' PyTorch paths do not (Gated DeltaNet refuses `cu_seqlens` without
# flash-linear-attention; the convolutions and scans run across boundaries), so each such mixer runs once per
# sequence of the row. The boundaries come from the decoder layer's own call (`cu_seq_lens_q`, `position_ids`):
# not every model hands them on to its mixer (Jamba's does not).

LINEAR_ATTENTION_LAYER_TYPES = ("linear_attention", "mamba", "mamba2", "conv")
# class-name endings of the recurrent mixers that decoder layers hold
MIXER_CLASSES = ("GatedDeltaNet", "MambaMixer", "Mamba2Mixer", "MambaLayer", "H1Mixer", "ShortConv")


def has_linear_attention(hf_config: Any) -> bool:
    """Whether the model has recurrent layers: by `layer_types`, or Mamba fields in a config without them
    (Falcon-H1 runs a Mamba mixer beside attention in every layer)."""
    c = hf_config.get_text_config()
    layer_types = getattr(c, "layer_types", None) or []
    return any(t in LINEAR_ATTENTION_LAYER_TYPES for t in layer_types) or getattr(c, "mamba_d_state", None) is not None


def _is_recurrent_mixer(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith(MIXER_CLASSES)


_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids")


def run_per_sequence(forward, row: dict[str, Any]):
    """Wrap a recurrent mixer's forward: on a packed row (batch 1 with sequence boundaries, given to the mixer
    or recorded in `row` by its decoder layer) call it once per sequence, so its conv and recurrent states
    start from zero at each sequence start."""

    @functools.wraps(forward)
    def per_sequence(hidden_states: torch.Tensor, *args, **kwargs):
        cu = kwargs.get("cu_seq_lens_q", row.get("cu_seq_lens_q"))
        pos = kwargs.get("position_ids", row.get("position_ids"))
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


def _record_row(row: dict[str, Any]):
    def hook(module, args, kwargs):
        row.clear()
        row.update({k: kwargs.get(k) for k in ("cu_seq_lens_q", "position_ids")})

    return hook


def isolate_recurrent_layers(model: torch.nn.Module) -> int:
    """Make every recurrent mixer of `model`'s decoder layers run per sequence on packed rows; returns how many."""
    from shardtune.parallel import decoder_layers

    count = 0
    for layer in decoder_layers(model):
        for mixer in layer.children():
            if _is_recurrent_mixer(mixer) and not getattr(mixer.forward, "shardtune_per_sequence", False):
                row: dict[str, Any] = {}
                layer.register_forward_pre_hook(_record_row(row), with_kwargs=True)
                mixer.forward = run_per_sequence(mixer.forward, row)
                count += 1
    return count
