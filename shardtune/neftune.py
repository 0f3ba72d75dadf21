"""NEFTune: uniform noise on the input embeddings while training (Jain et al., 2023).

Each token's embedding gets noise drawn from U(-1, 1) scaled by alpha / sqrt(L * d), where d is the hidden
size and L the length of the token's own sequence: a padded row's real tokens, or each sequence of a
padding-free row (found from `position_ids` restarting at 0), so packing does not change the noise level.
Only in training mode: validation, evaluation and generation (eval mode) see none.

Which noise a sequence gets depends only on the run's seed, the optimizer step and the sequence itself: its
[L, d] draw comes from a generator seeded with a hash of (trainer.seed, the optimizer steps taken before this
one, the sequence's token ids), and row k of that draw goes to its k-th token. So the noise does not depend
on the rank a sample lands on, the micro-batch it shares, padding or packing: 1 process and 2 train the same
numbers, and a resume (the step is the schedule's position, which checkpoints keep) draws what the
uninterrupted run drew. The hash sees token ids, not the sample's index, so two identical samples in one step
get the same noise (the data path does not carry sample indices down to the model); in another step or epoch
a sample gets a fresh draw. Pad tokens get none (attention never reads them).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from shardtune.attention import sequence_bounds


def sequence_seed(seed: int, step: int, ids: list[int]) -> int:
    """The generator seed of one sequence's noise: 63 bits of blake2b over (seed, step, token ids) as int64."""
    key = np.asarray([seed, step, *ids], dtype=np.int64).tobytes()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


class NEFTune:
    def __init__(self, alpha: float, seed: int):
        self.alpha, self.seed = alpha, seed
        self.step = 0  # optimizer steps taken before the current one; the engine sets it before each step
        self.layout: dict[str, torch.Tensor | None] = {}  # the last forward's position_ids and attention_mask

    def capture(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of the whole model: what tells its sequences apart."""
        self.layout = {"position_ids": kwargs.get("position_ids"), "attention_mask": kwargs.get("attention_mask")}

    def add_noise(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook of the input embeddings (args[0]: the token ids)."""
        if not module.training:
            return output
        ids = args[0].cpu()  # one copy to the host for every sequence's hash
        hidden = output.shape[-1]
        noise = torch.zeros(output.shape, dtype=torch.float32, device=output.device)
        for row, index in sequences(ids, self.layout.get("position_ids"), self.layout.get("attention_mask")):
            tokens = ids[row, index].tolist()
            gen = torch.Generator(device=output.device).manual_seed(sequence_seed(self.seed, self.step, tokens))
            draw = torch.rand((len(tokens), hidden), generator=gen, device=output.device).mul_(2).sub_(1)
            noise[row, index.to(output.device)] = draw * (self.alpha / (len(tokens) * hidden) ** 0.5)
        return output + noise.to(output.dtype)


def sequences(ids: torch.Tensor, position_ids: torch.Tensor | None,
              attention_mask: torch.Tensor | None) -> list[tuple[int, torch.Tensor]]:
    """(row, the positions of its tokens in order) of every sequence: a padded row's real tokens, each run of
    a packed row that starts where `position_ids` is 0 (a row without either: one sequence)."""
    rows, width = ids.shape
    if attention_mask is not None:
        return [(r, attention_mask[r].cpu().nonzero().squeeze(1)) for r in range(rows)]
    out = []
    for r in range(rows):  # the packed-row boundaries the attention kernels use (mrope positions included)
        bounds = sequence_bounds(width, None, None if position_ids is None else position_ids[..., r:r + 1, :].cpu(), 1)
        out.extend((r, torch.arange(s, e)) for s, e in zip(bounds[:-1], bounds[1:]))
    return out


def install_neftune(model: torch.nn.Module, alpha: float, seed: int) -> NEFTune:
    neft = NEFTune(alpha, seed)
    model.register_forward_pre_hook(neft.capture, with_kwargs=True)
    model.get_input_embeddings().register_forward_hook(neft.add_noise)
    return neft
