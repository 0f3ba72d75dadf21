"""NEFTune: uniform noise on the input embeddings while training (Jain et al., 2023).

Each token's embedding gets noise drawn from U(-1, 1) scaled by alpha / sqrt(L * d), where d is the hidden
size and L the length of the token's own sequence: the row's real tokens in a padded batch, each packed
sequence in a padding-free row (found from `position_ids` restarting at 0), so packing does not change the
noise level. Only in training mode: validation, evaluation and generation (eval mode) see none. The noise
comes from torch's global generator, whose state checkpoints keep per rank (restored on a resume with the
same number of processes). Each rank draws for its own micro-batches, so runs on different numbers of
processes draw different noise.
"""

from __future__ import annotations

from typing import Any

import torch


class NEFTune:
    def __init__(self, alpha: float):
        self.alpha = alpha
        self.lengths: torch.Tensor | None = None  # [rows, T]: each token's sequence length, from the last forward

    def capture(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of the whole model: where its sequences start and end."""
        self.lengths = sequence_lengths(kwargs.get("position_ids"), kwargs.get("attention_mask"))

    def add_noise(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook of the input embeddings."""
        if not module.training:
            return output
        rows, width, hidden = output.shape
        lengths = self.lengths if self.lengths is not None and self.lengths.shape == (rows, width) else None
        length = lengths.to(output.device, torch.float32) if lengths is not None else torch.full(
            (rows, width), float(width), device=output.device)
        scale = (self.alpha / torch.sqrt(length * hidden)).to(output.dtype)[..., None]
        noise = torch.rand(output.shape, device=output.device, dtype=output.dtype).mul_(2).sub_(1)
        return output + noise * scale


def sequence_lengths(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[rows, T]: the length of the sequence each token belongs to (a padded row: its real tokens; a packed
    row: the run of positions that starts at its last 0)."""
    if attention_mask is not None:
        real = attention_mask.sum(dim=1, keepdim=True)
        return real.expand_as(attention_mask)
    if position_ids is None:
        return None
    out = torch.empty_like(position_ids)
    for r in range(position_ids.shape[0]):
        starts = position_ids[r] == 0
        starts[0] = True
        seq = torch.cumsum(starts.long(), 0) - 1
        out[r] = torch.bincount(seq)[seq]
    return out


def install_neftune(model: torch.nn.Module, alpha: float) -> NEFTune:
    neft = NEFTune(alpha)
    model.register_forward_pre_hook(neft.capture, with_kwargs=True)
    model.get_input_embeddings().register_forward_hook(neft.add_noise)
    return neft
