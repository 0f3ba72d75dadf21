"""Linear-attention and hybrid layers (Qwen3.5 / Qwen3-Next Gated DeltaNet, Mamba-style mixers, short
convolutions) on packed rows: each runs one sequence at a time, so its recurrent state restarts at every
sequence start.

(Attention variants live in attention.py, vision-language parts in vision.py, MoE routing in moe.py.)
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F

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


def run_per_sequence(forward, row: dict[str, Any], mixer: torch.nn.Module | None = None, use_fla: bool = False):
    """Wrap a recurrent mixer's forward: on a packed row (batch 1 with sequence boundaries, given to the mixer
    or recorded in `row` by its decoder layer) call it once per sequence, so its conv and recurrent states
    start from zero at each sequence start; or, with `use_fla` on CUDA, run a Gated DeltaNet of Qwen3.5's
    shape over the whole row with flash-linear-attention's varlen kernels (`fla_gated_deltanet`)."""

    @functools.wraps(forward)
    def per_sequence(hidden_states: torch.Tensor, *args, **kwargs):
        cu = kwargs.get("cu_seq_lens_q", row.get("cu_seq_lens_q"))
        pos = kwargs.get("position_ids", row.get("position_ids"))
        plain = {k: v for k, v in kwargs.items() if k not in _PACKED_KWARGS}
        if hidden_states.shape[0] != 1 or (cu is None and pos is None):
            return forward(hidden_states, *args, **plain)
        bounds = sequence_bounds(hidden_states.shape[1], cu, pos, 1)
        if use_fla and hidden_states.is_cuda and plain.get("cache") is None:
            return fla_gated_deltanet(mixer, hidden_states, torch.tensor(bounds, device=hidden_states.device))
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


def isolate_recurrent_layers(model: torch.nn.Module, use_fla: bool | None = None) -> int:
    """Make every recurrent mixer of `model`'s decoder layers keep the sequences of a packed row apart; returns
    how many. `use_fla` (default: when flash-linear-attention is installed) takes its varlen kernels on CUDA
    for the Gated DeltaNets it serves; the rest, and every mixer on the CPU, run per sequence."""
    from shardtune.parallel import decoder_layers

    fla = fla_installed() if use_fla is None else use_fla
    count = 0
    for layer in decoder_layers(model):
        for mixer in layer.children():
            if _is_recurrent_mixer(mixer) and not getattr(mixer.forward, "shardtune_per_sequence", False):
                row: dict[str, Any] = {}
                layer.register_forward_pre_hook(_record_row(row), with_kwargs=True)
                mixer.forward = run_per_sequence(mixer.forward, row, mixer, fla and fla_serves(mixer))
                count += 1
    return count


# ----------------------------------------------------------------------------------------------------------
# flash-linear-attention (`pip install 'shardtune[fla]'`, Triton kernels, CUDA): Gated DeltaNet over a whole
# packed row, its causal convolution and its delta rule both restarting at every `cu_seqlens` boundary, in
# one launch each instead of one call per sequence. transformers' own layer cannot be handed the boundaries
# for this: it would take fla's delta rule with them, but its convolution runs across them.

_GDN_PARTS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "conv1d", "A_log", "dt_bias", "norm",
              "out_proj")


def fla_installed() -> bool:
    return importlib.util.find_spec("fla") is not None


def fla_serves(mixer: torch.nn.Module) -> bool:
    """Qwen3.5's Gated DeltaNet (separate q/k/v, z, b, a projections); Qwen3-Next fuses its projections and
    Mamba-style mixers are other layers: they stay on the per-sequence path."""
    return type(mixer).__name__.endswith("GatedDeltaNet") and all(hasattr(mixer, n) for n in _GDN_PARTS)


def fla_gated_deltanet(m: torch.nn.Module, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """transformers' Qwen3.5 Gated DeltaNet forward (training: no cache, no padding mask) on a packed row
    [1, T, hidden], through fla's varlen causal convolution and chunked gated delta rule."""
    from fla.modules.causal_conv1d import causal_conv1d
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    _, t, _ = hidden_states.shape
    cu = cu_seqlens.to(torch.long)
    # fla's convolution takes [B, T, D] and a [D, W] weight (transformers' runs on [B, D, T])
    qkv, _ = causal_conv1d(x=m.in_proj_qkv(hidden_states), weight=m.conv1d.weight.squeeze(1), bias=m.conv1d.bias,
                           activation=m.activation, cu_seqlens=cu)
    q, k, v = torch.split(qkv, [m.key_dim, m.key_dim, m.value_dim], dim=-1)
    q, k = (x.reshape(1, t, -1, m.head_k_dim) for x in (q, k))
    v = v.reshape(1, t, -1, m.head_v_dim)
    beta = m.in_proj_b(hidden_states).sigmoid()
    g = -m.A_log.float().exp() * F.softplus(m.in_proj_a(hidden_states).float() + m.dt_bias)  # log-space decay
    out, _ = chunk_gated_delta_rule(q, k, v, g=g, beta=beta, output_final_state=False, use_qk_l2norm_in_kernel=True,
                                    cu_seqlens=cu)
    z = m.in_proj_z(hidden_states).reshape(-1, m.head_v_dim)
    out = m.norm(out.reshape(-1, m.head_v_dim), z).reshape(1, t, -1)
    return m.out_proj(out)
