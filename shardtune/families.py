"""What differs between the model families shardtune trains, in one place: which class a checkpoint loads
as, where its language model's config is, which parameters are its vision tower and projector (frozen for
text training), and its linear-attention (recurrent) layers, run one sequence at a time on packed rows.

Multimodal checkpoints (Qwen3.5, Gemma 3, Qwen2.5-VL, Qwen3-VL, ...) are loaded as the class their
config.json names (`architectures`), so training and export keep every tensor and the released
architecture; text-only checkpoints load as `AutoModelForCausalLM`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from shardtune.attention import sequence_bounds


def is_multimodal(hf_config: Any) -> bool:
    return getattr(hf_config, "vision_config", None) is not None


def model_class(hf_config: Any) -> Any:
    """The class to build: a multimodal checkpoint's own class (from `architectures`, else the
    image-text-to-text auto class), else the auto causal-LM class (which picks the family's class)."""
    if not is_multimodal(hf_config):
        return AutoModelForCausalLM
    for name in getattr(hf_config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return AutoModelForImageTextToText


def from_config(hf_config: Any, **kwargs) -> torch.nn.Module:
    """An initialised model of `model_class(hf_config)` built from the config (no weights read)."""
    cls = model_class(hf_config)
    if hasattr(cls, "from_config"):  # an auto class
        return cls.from_config(hf_config, **kwargs)
    kwargs.pop("trust_remote_code", None)  # a transformers class: its code is already here
    return cls._from_config(hf_config, **kwargs)


def concrete_class(hf_config: Any) -> type:
    """The transformers class `model_class` resolves to (for its declared kernel support)."""
    cls = model_class(hf_config)
    mapping = getattr(cls, "_model_mapping", None)
    return mapping[type(hf_config)] if mapping is not None else cls


def text_config(hf_config: Any) -> Any:
    """The language model's config (the config itself for text-only models)."""
    return hf_config.get_text_config()


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def vision_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The vision tower and projector of a multimodal model, with their qualified names: every child of the
    inner model except the language model (Qwen-VL's `visual` holds its merger; Gemma 3 has `vision_tower`
    and `multi_modal_projector`). Empty for text-only models."""
    model = base_model(model)
    if not is_multimodal(model.config):
        return []
    inner_name, inner = next((n, m) for n, m in model.named_children() if hasattr(m, "language_model"))
    return [(f"{inner_name}.{n}", m) for n, m in inner.named_children() if n != "language_model"]


def vision_parameter_names(model: torch.nn.Module) -> list[str]:
    """State-dict names of the vision tower and projector parameters (relative to the transformers model)."""
    return [f"{prefix}.{n}" for prefix, m in vision_modules(model) for n, _ in m.named_parameters()]


def freeze_vision(model: torch.nn.Module) -> int:
    """Text training of a multimodal checkpoint: the vision tower and projector keep their weights (no
    gradient, so the optimizer never sees them). Returns how many parameters were frozen."""
    frozen = 0
    for _, module in vision_modules(model):
        for p in module.parameters():
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


# ----------------------------------------------------------------------------------------------------------
# Linear-attention / recurrent layers (Gated DeltaNet in Qwen3.5 and Qwen3-Next, Mamba-style mixers) carry a
# state along the row: on a packed row it must restart at every sequence. transformers' PyTorch path does not
# (it refuses `cu_seqlens` without flash-linear-attention, and its causal conv would run across boundaries),
# so each such layer runs once per sequence of the row.

LINEAR_ATTENTION_LAYER_TYPES = ("linear_attention", "mamba", "mamba2")


def has_linear_attention(hf_config: Any) -> bool:
    layer_types = getattr(text_config(hf_config), "layer_types", None) or []
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
