"""Weighted mixtures of data sources, drawn per global batch.

Each source s has a weight w_s (normalised to sum to 1) and N_s samples. With `data.mixture_unit=samples`
every global batch of B samples takes about B * w_s samples from source s; with `tokens` the weights divide
tokens instead, so a source of long samples contributes fewer of them (sample shares w_s / mean length,
normalised). Per step the counts are B * share rounded so that every source stays within one sample of its
share, and the running totals within one sample of the running target (largest deficit first).

Within a source, samples come from a seeded permutation of that source, read in order and reshuffled when
it runs out: a source larger than its share of an epoch is sampled without repetition, a smaller one is
repeated (each pass in a fresh order). An epoch of a mixture is as many samples as all sources hold
together (sum of N_s), cut into global batches; with weights equal to the sources' natural proportions it
visits every sample once, like an unweighted epoch.

Everything is a pure function of (seed, step), so the sampler's state is only its position, every rank
computes the same batches, and a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from shardtune.data.batching import StepSampler
from shardtune.errors import ConfigError


class MixtureSampler(StepSampler):
    """Global batches of indices into the concatenation of the sources (source s holds indices
    offsets[s] .. offsets[s+1]-1), with the same interface as GlobalBatchSampler."""

    def __init__(self, sizes: list[int], weights: list[float], global_batch: int, seed: int,
                 mean_lengths: list[float] | None = None, drop_last: bool = False, shuffle: bool = True):
        if any(n <= 0 for n in sizes):
            raise ConfigError(f"Every data source needs at least one usable sample (sizes {sizes}).")
        w = np.asarray(weights, dtype=np.float64)
        if mean_lengths is not None:  # weights divide tokens: fewer samples from sources of long samples
            w = w / np.asarray(mean_lengths, dtype=np.float64)
        self.shares = w / w.sum()
        self.sizes, self.global_batch, self.seed, self.drop_last = list(sizes), global_batch, seed, drop_last
        self.shuffle = shuffle
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.epoch, self.step_in_epoch = 0, 0
        self._counts = [np.zeros(len(sizes), dtype=np.int64)]  # cumulative draws before each global step
        if self.steps_per_epoch == 0:
            raise ConfigError(f"The sources hold {sum(sizes)} samples, fewer than one global batch ({global_batch}), "
                              "and data.drop_last=true leaves nothing to train. Fix: lower data.train_batch_size "
                              "or set data.drop_last=false.")

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(sum(self.sizes), self.global_batch)
        return full + (1 if rest and not self.drop_last else 0)

    def per_step_counts(self, global_step: int) -> np.ndarray:
        """Samples each source gives the batch of this step (counted from the start of training)."""
        return self._cumulative(global_step + 1) - self._cumulative(global_step)

    def _cumulative(self, global_step: int) -> np.ndarray:
        while len(self._counts) <= global_step:
            drawn = self._counts[-1]
            target = self.shares * self.global_batch * len(self._counts)  # running target after this step
            take = np.floor(self.shares * self.global_batch).astype(np.int64)
            # hand the samples the floors leave over to the sources furthest behind their running target
            deficit = target - (drawn + take)
            for s in np.argsort(-deficit, kind="stable")[: self.global_batch - int(take.sum())]:
                take[s] += 1
            self._counts.append(drawn + take)
        return self._counts[global_step]

    def batch(self, epoch: int, step: int) -> np.ndarray:
        global_step = epoch * self.steps_per_epoch + step
        start, counts = self._cumulative(global_step), self.per_step_counts(global_step)
        parts = [self.offsets[s] + self._source_positions(s, int(start[s]), int(counts[s]))
                 for s in range(len(self.sizes))]
        return np.concatenate(parts).astype(np.int64)

    def _source_positions(self, source: int, start: int, count: int) -> np.ndarray:
        """Positions `start .. start+count-1` of the endless stream of permutations of one source."""
        n = self.sizes[source]
        if not self.shuffle:  # data.shuffle=false: each source in its own order, pass after pass
            return np.arange(start, start + count, dtype=np.int64) % n
        out = [_permutation(n, self.seed, source, k // n)[k % n] for k in range(start, start + count)]
        return np.asarray(out, dtype=np.int64)


@lru_cache(maxsize=64)
def _permutation(n: int, seed: int, source: int, lap: int) -> np.ndarray:
    """The order of one pass over a source: seeded by (seed, source, pass)."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, source, lap]).generate_state(1)[0]))
    return torch.randperm(n, generator=g).numpy()
