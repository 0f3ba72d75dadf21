"""The contract between the data path and the engine: a micro-batch of tensors and the label convention.

`labels` are aligned with `input_ids` and hold IGNORE_INDEX where nothing is trained; the data path shifts
them to next-token `targets` once per sequence before packing. A sample's supervised tokens are therefore its
labels after the first position (nothing predicts position 0): `supervised_count` is that rule, used by the
dataset (loss divisors from the data plan), collation and validation alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100


def supervised_count(labels: Any) -> int:
    """Next-token targets a sample trains: its labels after the first position that are not IGNORE_INDEX
    (a numpy array or a tensor)."""
    return int((labels[1:] != IGNORE_INDEX).sum())


def supervised_counts(labels: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """`supervised_count` of every sample of flat `labels` (sample i spans offsets[i]:offsets[i + 1]), at once."""
    trained = np.concatenate([[0], np.cumsum(np.asarray(labels) != IGNORE_INDEX)])
    first = np.minimum(offsets[:-1] + 1, offsets[1:])  # position 0 of a sample is never a target
    return (trained[offsets[1:]] - trained[first]).astype(np.int64)


@dataclass
class VisionInputs:
    """The pictures of a micro-batch: the image processor's tensors for all of them in sequence order (e.g.
    pixel_values, image_grid_thw), passed to the model as keyword arguments, and how many belong to each
    sequence (per-sequence positions such as Qwen's 3-D rope need them); videos likewise."""

    tensors: dict[str, torch.Tensor]
    images_per_sequence: list[int]
    videos_per_sequence: list[int] | None = None  # the same for videos (pixel_values_videos, video_grid_thw)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [rows, T]
    targets: torch.Tensor  # [rows, T], next-token targets, IGNORE_INDEX where nothing is trained
    position_ids: torch.Tensor  # [rows, T], restarting at 0 per sequence
    attention_mask: torch.Tensor | None  # [rows, T] for padded batches; None when packed
    cu_seqlens: torch.Tensor | None  # int32 [n_seq + 1] for packed batches
    max_seqlen: int
    num_tokens: int  # real (non-pad) tokens
    num_targets: int  # supervised tokens in this micro-batch (in this rank's slice under sequence parallelism)
    num_padded: int  # pad tokens processed
    seq_lengths: list[int]
    vision: VisionInputs | None = None  # the micro-batch's pictures (vision-language data)
    # under sequence parallelism with pictures: the whole row's input_ids (the pictures' features are placed
    # into the whole row's embeddings before the row is split; see shardtune/vision.py)
    full_input_ids: torch.Tensor | None = None
    # [rows, T] float32 beside `targets` (data.message_weight_key): each target's loss weight, 0 where nothing is
    # trained; None: every target weighs 1. The loss divisor stays the supervised-token count (num_targets)
    weights: torch.Tensor | None = None

    def pin_memory(self) -> MicroBatch:
        """Page-locked copies of the tensors, so the host-to-GPU copies can run asynchronously."""
        vision = self.vision and VisionInputs({k: v.pin_memory() for k, v in self.vision.tensors.items()},
                                              self.vision.images_per_sequence, self.vision.videos_per_sequence)
        return replace(self, input_ids=self.input_ids.pin_memory(), targets=self.targets.pin_memory(),
                       position_ids=self.position_ids.pin_memory(), cu_seqlens=_pinned(self.cu_seqlens),
                       attention_mask=_pinned(self.attention_mask), vision=vision,
                       full_input_ids=_pinned(self.full_input_ids), weights=_pinned(self.weights))


def _pinned(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.pin_memory()
