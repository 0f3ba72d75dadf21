"""The vision tower's share of the memory estimate: its activations on one micro-batch's pictures.

A picture reaches the tower as patches: Qwen-VL cuts it into patch_size x patch_size (x temporal_patch_size)
patches and merges spatial_merge_size^2 of them into one image token; Gemma 3's SigLIP tower sees a fixed
image_size crop, (image_size / patch_size)^2 patches pooled to mm_tokens_per_image tokens; Gemma 4's pools
pooling_kernel_size^2 patches into a token (it pads each picture's patches to the image processor's
max_soft_tokens budget, which its resize nearly fills, so the padding is left out). So the patches the
tower runs on are the micro-batch's image tokens times `patches_per_token`, read from the vision config.

Per patch, a vision block (pre-norm attention and MLP, as every family's tower is built) keeps about what a
decoder layer keeps per token: the two norms' inputs and outputs, q, k (before and after the rotary
embedding), v, the attention output with its logsumexp, o_proj's input, and the MLP's intermediate tensors
(fc1 and its activation: 3 x intermediate counting GELU's temporary; gated MLPs 4). How much of it lives at once
depends on whether the tower trains (model.freeze_vision_model=false):
- frozen: nothing is saved for backward (no parameter of the tower needs a gradient and the pixels need none),
  so only one block's tensors are live at a time;
- trained: every block's tensors are saved for backward, or under gradient checkpointing each block's input
  and one block recomputed at a time, as for the decoder.
Always live: the pixel values (fp32, from the image processor, and their cast), the patch embeddings, the
tower's output and the projector's output (one vector of the language model's width per image token, which
the input embeddings take in).

The tower's peak is set by the micro-batch with the most image tokens, not by the data's average: a token
budget filled with pictures costs many times one of mostly text. `worst_micro_batch_image_tokens` finds it by
planning one epoch's micro-batches exactly as the trainer's loader plans them (the same sampler, the same
balancing over ranks, the same token budget); a stream, whose epoch is not known ahead, gets the bound from
the densest sample of its head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from shardtune.data.dataset import CombinedDataset, TokenizedDataset


@dataclass(frozen=True)
class VisionShape:
    hidden: int
    intermediate: int
    depth: int
    heads: int
    gated: bool  # a SwiGLU MLP (Qwen2.5-VL) rather than fc1 / activation / fc2
    patches_per_token: int  # tower patches per image token of the language model
    pixels_per_patch: int  # input values per patch (channels x temporal x patch x patch)
    out_hidden: int  # the projector's output width (the language model's)
    trained: bool  # some tower parameter has requires_grad


def vision_shape(model: torch.nn.Module) -> VisionShape | None:
    """The tower's sizes from the model's vision config (None for a text model)."""
    from shardtune.vision import part_of

    config = model.config
    v = getattr(config, "vision_config", None)
    if v is None:
        return None
    hidden = _first(v, "embed_dim", "hidden_size")  # Qwen2-VL's hidden_size is its output width
    intermediate = _first(v, "intermediate_size", default=0) or int(hidden * _first(v, "mlp_ratio", default=4))
    patch = _first(v, "patch_size")
    if getattr(v, "spatial_merge_size", None):  # Qwen-VL: merged patches, each with a temporal depth
        per_token = v.spatial_merge_size ** 2
        channels = _first(v, "in_channels", "in_chans", default=3)
        pixels = channels * _first(v, "temporal_patch_size", default=1) * patch**2
    elif getattr(v, "pooling_kernel_size", None):  # Gemma 4: k x k patches pooled into one token
        per_token = v.pooling_kernel_size ** 2
        pixels = 3 * patch**2
    else:  # SigLIP (Gemma 3): a fixed crop pooled to mm_tokens_per_image tokens
        per_token = max(1, (v.image_size // patch) ** 2 // _first(config, "mm_tokens_per_image", default=1))
        pixels = _first(v, "num_channels", default=3) * patch**2
    text = config.get_text_config()
    return VisionShape(
        hidden=hidden, intermediate=intermediate, depth=_first(v, "depth", "num_hidden_layers"),
        heads=_first(v, "num_heads", "num_attention_heads"), gated=_gated(v),
        patches_per_token=per_token, pixels_per_patch=pixels,
        out_hidden=_first(v, "out_hidden_size", default=0) or text.hidden_size,
        trained=any(p.requires_grad for n, p in model.named_parameters() if part_of(n) == "tower"))


def _gated(v: Any) -> bool:
    """Whether the tower's MLP is gated (Qwen2.5-VL's SiLU MLP, Gemma 4's GELU gate and up projections)."""
    return getattr(v, "hidden_act", "") == "silu" or v.model_type == "gemma4_vision"


def _first(c: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        if getattr(c, n, None):
            return getattr(c, n)
    if default is None:
        raise ValueError(f"the vision config has none of {names}")
    return default


def block_bytes_per_patch(v: VisionShape, act: int) -> float:
    h, i = v.hidden, v.intermediate
    norms = 4 * act * h + 2 * 2 * 4  # each norm's input and output, its fp32 mean / rstd
    attention = 7 * act * h + 4 * v.heads  # q, k before and after rope, v, the output and o_proj's input; lse
    mlp = (4 if v.gated else 3) * act * i + act * h  # the intermediate tensors and the residual sum
    return norms + attention + mlp


def vision_bytes(v: VisionShape, image_tokens: int, act: int, checkpointing: bool) -> float:
    """Bytes of the tower's activations for `image_tokens` image tokens in one micro-batch."""
    if not image_tokens:
        return 0.0
    patches = image_tokens * v.patches_per_token
    block = block_bytes_per_patch(v, act) * patches
    # pixels (fp32 and cast), patch embeddings, the tower's output; the projector's output per image token
    outside = patches * (4 * v.pixels_per_patch + act * v.pixels_per_patch + 2 * act * v.hidden)
    outside += image_tokens * act * v.out_hidden
    if not v.trained:
        return block + outside
    if checkpointing:
        return v.depth * patches * act * v.hidden + block + outside
    return v.depth * block + outside


def image_token_counts(data: TokenizedDataset, token_ids: list[int]) -> np.ndarray:
    """The tower-fed tokens (image pads) of each sample, read only from the samples that hold pictures."""
    counts = []
    for shard in data.shards:
        n = len(shard.offsets) - 1
        mine = np.zeros(n, dtype=np.int64)
        if shard.sample_images is not None:
            for j in np.flatnonzero(np.diff(shard.sample_images)):
                a, b = shard.offsets[j], shard.offsets[j + 1]
                mine[j] = np.isin(np.asarray(shard.input_ids[a:b]), token_ids).sum()
        counts.append(mine)
    return np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)


def worst_micro_batch_image_tokens(data: CombinedDataset, per_sample: np.ndarray, cfg: Any, dp_size: int,
                                   packed: bool) -> int:
    """The most image tokens any rank's micro-batch holds over one epoch, planned as the loader plans it."""
    from shardtune.data.batching import plan_micro_batches
    from shardtune.data.loader import batch_sampler

    if not per_sample.any():
        return 0
    sampler = batch_sampler(data, cfg.data, cfg.trainer.seed)
    worst = 0
    for step in range(sampler.steps_per_epoch):
        indices = sampler.batch(0, step)
        lengths, images = data.lengths[indices], per_sample[indices]
        plans = plan_micro_batches(np.arange(len(indices)), lengths, dp_size, cfg.data, padded=not packed)
        worst = max([worst] + [int(images[m].sum()) for plan in plans for m in plan if m])
    return worst


def densest_micro_batch_bound(data: TokenizedDataset, per_sample: np.ndarray, cfg: Any) -> int:
    """For a stream: the image tokens of a micro-batch filled with the head's densest samples (by share of
    the token budget, or the fixed micro-batch's count of the samples richest in pictures)."""
    if not per_sample.any():
        return 0
    d = cfg.data
    if d.use_dynamic_bsz:
        return int(d.max_token_len_per_gpu * float((per_sample / np.maximum(data.lengths, 1)).max()))
    return int(np.sort(per_sample)[::-1][:d.micro_batch_size_per_gpu].sum())
