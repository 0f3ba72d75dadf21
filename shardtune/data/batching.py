"""Global batches -> per-rank shares -> micro-batches -> tensors.

Everything here is a pure function of (seed, epoch, data), so every rank computes the same plan for
every rank without talking to the others. The set of samples in a global step does not depend on the
number of processes, which is what makes 1-process and N-process runs comparable step by step.

Labels are shifted to next-token targets here, once, per sequence, before sequences are packed: a
packed row never asks a token to predict the first token of the next document.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shardtune.batch import IGNORE_INDEX, MicroBatch, VisionInputs, supervised_count
from shardtune.config import DataConfig
from shardtune.data.video import is_video
from shardtune.errors import ConfigError, DataError

# rank -> micro-batch -> positions in the global batch: every data-parallel rank's micro-batches for one step
MicroBatchPlan = list[list[list[int]]]


@dataclass
class GlobalBatch:
    """The samples of one optimizer step as drawn, before they are planned: their lengths and supervised-token
    counts (what the planner and the loss divisor need), and `sample(p)` to read the one at position p
    (only this rank's are read). Drawn from a dataset by a sampler, or from a stream (`position`: the
    stream's state once this step has trained)."""

    epoch: int
    step_in_epoch: int
    lengths: np.ndarray
    target_counts: np.ndarray
    sources: np.ndarray  # the source (position in data.sources) of each sample
    sample: Callable[[int], tuple[Any, Any]]
    ends_epoch: bool
    dropped_rows: int = 0  # rows dropped from the data so far (streaming: in this pass)
    position: Any = None


class StepSampler:
    """A position (epoch, step in epoch) over global batches of sample indices; subclasses say what each
    batch holds (`batch`) and how many steps an epoch has. Stateful: `state_dict()` holds the position, so a
    resumed run continues with the same batches."""

    epoch: int = 0
    step_in_epoch: int = 0
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def batch(self, epoch: int, step: int) -> np.ndarray:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield (epoch, step_in_epoch, indices) from the current position on, forever (epochs roll over).
        Iterating does not move the position, so a prefetcher may run ahead; `consumed` moves it."""
        epoch, step = self.epoch, self.step_in_epoch
        while True:
            while step < self.steps_per_epoch:
                yield epoch, step, self.batch(epoch, step)
                step += 1
            epoch, step = epoch + 1, 0

    def consumed(self, epoch: int, step_in_epoch: int) -> None:
        """Mark the step as trained: the position (and a checkpoint's state) moves past it."""
        self.epoch, self.step_in_epoch = epoch, step_in_epoch + 1

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])


class GlobalBatchSampler(StepSampler):
    """Which samples make up each global step: a seeded permutation per epoch, cut into global batches."""

    def __init__(self, num_samples: int, global_batch: int, seed: int, shuffle: bool = True, drop_last: bool = False):
        if num_samples < global_batch and drop_last:
            raise ConfigError(f"Only {num_samples} samples, fewer than one global batch ({global_batch}), and "
                              "data.drop_last=true leaves nothing to train. Fix: lower data.train_batch_size or "
                              "set data.drop_last=false.")
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.step_in_epoch = 0, 0
        self._order: tuple[int, np.ndarray] = (-1, np.arange(0))

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.global_batch)
        return full + (1 if rest and not self.drop_last else 0)

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        if self._order[0] != epoch:  # one permutation per epoch, not one per step
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._order = (epoch, torch.randperm(self.num_samples, generator=g).numpy())
        return self._order[1]

    def batch(self, epoch: int, step: int) -> np.ndarray:
        return self.order(epoch)[step * self.global_batch : (step + 1) * self.global_batch]


def split_across_ranks(indices: np.ndarray, lengths: np.ndarray, dp_size: int) -> list[list[int]]:
    """Balance a global batch over data-parallel ranks by tokens (longest first onto the lightest rank),
    with at most ceil(n / dp_size) samples per rank. Each rank's share keeps the global order."""
    cap = -(-len(indices) // dp_size)
    heap = [(0, r) for r in range(dp_size)]
    shares: list[list[int]] = [[] for _ in range(dp_size)]
    for pos in sorted(range(len(indices)), key=lambda p: (-int(lengths[indices[p]]), p)):
        full = []
        while True:
            load, r = heapq.heappop(heap)
            if len(shares[r]) < cap:
                break
            full.append((load, r))
        shares[r].append(pos)
        heapq.heappush(heap, (load + int(lengths[indices[pos]]), r))
        for item in full:
            heapq.heappush(heap, item)
    return [[int(indices[p]) for p in sorted(share)] for share in shares]


def fixed_micro_batches(share: list[int], micro_batch_size: int) -> list[list[int]]:
    return [share[i : i + micro_batch_size] for i in range(0, len(share), micro_batch_size)]


def token_budget_micro_batches(share: list[int], lengths: np.ndarray, budget: int,
                               padded: bool = False) -> list[list[int]]:
    """Pack a rank's samples into as few micro-batches of at most `budget` tokens as best-fit-decreasing
    finds (longest first, each into the fullest micro-batch it still fits). Samples keep their order.
    `padded`: the micro-batches become right-padded rows, so a micro-batch costs rows x its longest row
    (the first sample placed in it), and that is what the budget bounds."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(share, key=lambda i: -int(lengths[i])):
        n = int(lengths[i])
        if n > budget:  # never for valid configs: datasets are checked when built, streams by the config rules
            raise ValueError(f"sample {i} has {n} tokens, more than the budget data.max_token_len_per_gpu={budget}")
        cost = [int(lengths[b[0]]) if padded else n for b in bins]
        fits = [b for b in range(len(bins)) if loads[b] + cost[b] <= budget]
        if fits:
            b = max(fits, key=lambda b: loads[b])
            bins[b].append(i)
            loads[b] += cost[b]
        else:
            bins.append([i])
            loads.append(n)
    order = {i: k for k, i in enumerate(share)}
    return sorted((sorted(b, key=order.__getitem__) for b in bins), key=lambda b: order[b[0]])


def split_heaviest(micro: list[list[int]], n: int, lengths: np.ndarray) -> list[list[int]]:
    """Split the heaviest micro-batches in two until there are `n` (every rank must run the same number);
    splitting never breaks the token budget."""
    micro = [list(m) for m in micro]
    while len(micro) < n:
        splittable = [m for m in micro if len(m) > 1]
        if not splittable:
            break
        heaviest = max(splittable, key=lambda m: int(lengths[m].sum()))
        micro.remove(heaviest)
        halves: list[list[int]] = [[], []]
        for i in sorted(heaviest, key=lambda i: -int(lengths[i])):
            min(halves, key=lambda h: int(lengths[h].sum()) if h else 0).append(i)
        order = {i: k for k, i in enumerate(heaviest)}
        micro += [sorted(h, key=order.__getitem__) for h in halves]
    return micro


def equalize_micro_batch_counts(plans: MicroBatchPlan) -> MicroBatchPlan:
    """Give every rank the same number of micro-batches (FSDP needs every rank in every collective):
    ranks with fewer get empty micro-batches, which contribute nothing to the loss."""
    n = max(1, max(len(p) for p in plans))
    return [p + [[] for _ in range(n - len(p))] for p in plans]


def plan_micro_batches(indices: np.ndarray, lengths: np.ndarray, dp_size: int, cfg: DataConfig,
                       padded: bool = False) -> MicroBatchPlan:
    """Every data-parallel rank's micro-batches for one global batch: samples balanced over ranks by tokens,
    then cut by count (data.micro_batch_size_per_gpu) or packed by token budget (data.max_token_len_per_gpu;
    for `padded` rows the budget bounds rows x longest row), with the same number of micro-batches on every
    rank."""
    shares = split_across_ranks(indices, lengths, dp_size)
    if not cfg.use_dynamic_bsz:
        return equalize_micro_batch_counts([fixed_micro_batches(s, cfg.micro_batch_size_per_gpu) for s in shares])
    plans = [token_budget_micro_batches(s, lengths, cfg.max_token_len_per_gpu, padded) for s in shares]
    n = max(len(p) for p in plans)
    return equalize_micro_batch_counts([split_heaviest(p, n, lengths) for p in plans])


def collate(samples: list[tuple[Any, ...]], packed: bool, pad_id: int,
            pixels: Callable[[list[bytes]], dict[str, torch.Tensor]] | None = None) -> MicroBatch:
    """Sequences (input_ids, labels[, pictures[, weights]]) -> one packed row (padding-free) or a right-padded
    batch; the pictures of all sequences become the micro-batch's vision tensors (`pixels`: the image
    processor)."""
    mb = _collate_tokens(samples, packed, pad_id)
    pictures = [list(s[2]) if len(s) > 2 else [] for s in samples]
    if any(pictures):
        if pixels is None:
            raise DataError("The data holds pictures, and the model folder has no image processor. Fix: train a "
                            "vision-language model folder (with preprocessor_config.json).")
        videos = [sum(map(is_video, ps)) for ps in pictures]
        mb.vision = VisionInputs(pixels([p for ps in pictures for p in ps]),
                                 [len(ps) - v for ps, v in zip(pictures, videos)], videos if any(videos) else None)
    return mb


def _collate_tokens(samples: list[tuple[Any, ...]], packed: bool, pad_id: int) -> MicroBatch:
    if not samples:  # an empty micro-batch: one pad token with no target
        samples = [(np.array([pad_id]), np.array([IGNORE_INDEX]))]
        real = 0
    else:
        real = sum(len(s[0]) for s in samples)
    ids = [torch.from_numpy(np.array(s[0], dtype=np.int64)) for s in samples]  # copies out of the mmap
    targets = [_shift(torch.from_numpy(np.array(s[1], dtype=np.int64))) for s in samples]
    weights = _target_weights(samples)
    lengths = [len(x) for x in ids]
    num_targets = sum(supervised_count(s[1]) for s in samples)
    positions = [torch.arange(n) for n in lengths]
    if packed:
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
        return MicroBatch(torch.cat(ids)[None], torch.cat(targets)[None], torch.cat(positions)[None], None, cu,
                          max(lengths), real, num_targets, 0, lengths if real else [],
                          weights=None if weights is None else torch.cat(weights)[None])
    width = max(lengths)
    batch = torch.full((len(ids), width), pad_id, dtype=torch.long)
    tgt = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(ids), width), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, (x, t, p) in enumerate(zip(ids, targets, positions)):
        batch[r, : len(x)], tgt[r, : len(x)], pos[r, : len(x)], mask[r, : len(x)] = x, t, p, 1
    wts = None
    if weights is not None:
        wts = torch.zeros((len(ids), width), dtype=torch.float32)
        for r, w in enumerate(weights):
            wts[r, : len(w)] = w
    return MicroBatch(batch, tgt, pos, mask, None, width, real, num_targets, len(ids) * width - real,
                      lengths if real else [], weights=wts)


def _target_weights(samples: list[tuple[Any, ...]]) -> list[torch.Tensor] | None:
    """Each sequence's loss weights shifted as its targets are (float32, 0 where nothing is trained), when any
    sequence has weights; a sequence without (a source without data.message_weight_key) weighs its targets 1."""
    if not any(len(s) > 3 for s in samples):
        return None
    out = []
    for s in samples:
        w = (torch.from_numpy(np.array(s[3], dtype=np.float32)) if len(s) > 3
             else torch.from_numpy((np.asarray(s[1]) != IGNORE_INDEX).astype(np.float32)))
        shifted = torch.zeros_like(w)
        shifted[:-1] = w[1:]
        out.append(shifted)
    return out


def _shift(labels: torch.Tensor) -> torch.Tensor:
    """labels aligned with input_ids -> targets: position t predicts labels[t + 1]; the last predicts nothing."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:-1] = labels[1:]
    return out


def pad_to_bucket(mb: MicroBatch, bucket: int, sp: int, pad_id: int) -> MicroBatch:
    """A packed row padded up to a multiple of `bucket` tokens (rounded up to a multiple of `sp`, so the
    sequence-parallel split adds nothing), so compiled kernels see few distinct shapes. The padding is a
    separate dummy sequence of pad tokens with no targets: it attends to nothing real and is not counted in
    the loss normalisation (num_targets is unchanged)."""
    assert mb.cu_seqlens is not None, "bucket padding needs packed rows"
    step = -(-bucket // sp) * sp
    return _append_dummy(mb, -mb.input_ids.shape[1] % step, pad_id)


def _append_dummy(mb: MicroBatch, pad: int, pad_id: int) -> MicroBatch:
    """`mb` with `pad` pad tokens appended to its packed row as a sequence of their own, with no targets."""
    if not pad:
        return mb
    total = mb.input_ids.shape[1]
    ids = torch.cat([mb.input_ids, torch.full((1, pad), pad_id, dtype=mb.input_ids.dtype)], dim=1)
    targets = torch.cat([mb.targets, torch.full((1, pad), IGNORE_INDEX, dtype=mb.targets.dtype)], dim=1)
    positions = torch.cat([mb.position_ids, torch.arange(pad)[None]], dim=1)
    cu = torch.cat([mb.cu_seqlens, torch.tensor([total + pad], dtype=mb.cu_seqlens.dtype)])
    weights = None if mb.weights is None else torch.cat([mb.weights, mb.weights.new_zeros((1, pad))], dim=1)
    return MicroBatch(ids, targets, positions, None, cu, max(mb.max_seqlen, pad), mb.num_tokens, mb.num_targets,
                      mb.num_padded + pad, mb.seq_lengths, mb.vision, weights=weights)


def slice_for_sequence_parallel(mb: MicroBatch, sp: int, sp_rank: int, pad_id: int) -> MicroBatch:
    """This rank's 1/sp slice of a packed row for Ulysses sequence parallelism.

    The row is first padded to a multiple of sp with a separate dummy sequence (pad tokens, no targets), so
    padding never attends to or is attended by real tokens. `cu_seqlens` and `max_seqlen` stay those of the
    whole padded row: attention runs over all positions after the all-to-all.
    """
    assert mb.cu_seqlens is not None, "sequence parallelism needs packed rows"
    mb = _append_dummy(mb, -mb.input_ids.shape[1] % sp, pad_id)
    width = mb.input_ids.shape[1] // sp
    part = slice(sp_rank * width, (sp_rank + 1) * width)
    local_targets = mb.targets[:, part]
    # pictures: the whole row's tokens travel too (their features are placed into the whole row's embeddings,
    # which are split before the language model: shardtune/vision.py)
    return MicroBatch(mb.input_ids[:, part], local_targets, mb.position_ids[:, part], None, mb.cu_seqlens,
                      mb.max_seqlen, mb.num_tokens, int((local_targets != IGNORE_INDEX).sum()), mb.num_padded,
                      mb.seq_lengths, mb.vision, mb.input_ids if mb.vision is not None else None,
                      weights=None if mb.weights is None else mb.weights[:, part])
