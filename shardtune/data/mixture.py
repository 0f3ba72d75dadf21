"""Weighted mixtures of data sources, drawn per global batch.

Each source s has a weight w_s (normalised to sum to 1) and N_s samples. With `data.mixture_unit=samples`
every global batch of B samples takes about B * w_s samples from source s; with `tokens` the weights divide
tokens instead, so a source of long samples contributes fewer of them (sample shares w_s / mean length,
normalised). Per step the counts are B * share rounded so that every source stays within one sample of its
share, and the running totals within one sample of the running target (largest deficit first).

Within a source, samples come from a seeded permutation of that source, read in order and reshuffled when
it runs out: a source larger than its share of an epoch is sampled without repetition, a smaller one is
repeated (each pass in a fresh order). An epoch of a mixture is ceil(sum of N_s / B) global batches
(floor with data.drop_last), every one of them full: since sources are drawn as endless streams, the last
batch of an epoch is completed from the sources' next passes instead of being cut short, so every step
keeps the weights. With weights equal to the sources' natural proportions and B dividing the total, an
epoch visits every sample once, like an unweighted epoch.

Everything is a pure function of (seed, step), so the sampler's state is only its position, every rank
computes the same batches, and a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

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
        self.draws = DrawCounts(weights, global_batch, mean_lengths)
        self.sizes, self.global_batch, self.seed, self.drop_last = list(sizes), global_batch, seed, drop_last
        self.shuffle = shuffle
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.epoch, self.step_in_epoch = 0, 0
        self._laps: dict[int, dict[int, np.ndarray]] = {}
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
        return self.draws.per_step(global_step)

    def batch(self, epoch: int, step: int) -> np.ndarray:
        global_step = epoch * self.steps_per_epoch + step
        start, counts = self.draws.cumulative(global_step), self.draws.per_step(global_step)
        parts = [self.offsets[s] + self._source_positions(s, int(start[s]), int(counts[s]))
                 for s in range(len(self.sizes))]
        return np.concatenate(parts).astype(np.int64)

    def _source_positions(self, source: int, start: int, count: int) -> np.ndarray:
        """Positions `start .. start+count-1` of the endless stream of permutations of one source."""
        n = self.sizes[source]
        if not self.shuffle:  # data.shuffle=false: each source in its own order, pass after pass
            return np.arange(start, start + count, dtype=np.int64) % n
        out = [self._permutation(source, k // n)[k % n] for k in range(start, start + count)]
        return np.asarray(out, dtype=np.int64)

    def _permutation(self, source: int, lap: int) -> np.ndarray:
        """The order of one pass over a source, seeded by (seed, source, pass). The two newest passes of each
        source are kept (a batch reaches at most into the next pass): memory stays bounded however long the
        run; int32 where it fits."""
        laps = self._laps.setdefault(source, {})
        if lap not in laps:
            seed = int(np.random.SeedSequence([self.seed, source, lap]).generate_state(1)[0])
            order = torch.randperm(self.sizes[source], generator=torch.Generator().manual_seed(seed)).numpy()
            laps[lap] = order.astype(np.int32) if len(order) < 2**31 else order
            for old in sorted(laps)[:-2]:
                del laps[old]
        return laps[lap]


class DrawCounts:
    """How many samples each source gives each global batch of `global_batch` samples: the shares of the
    weights (divided by the sources' mean lengths when they divide tokens), rounded so that every source
    stays within one sample of its share per step and its running total within one sample of the running
    target. A pure function of the step: a resumed run draws what an uninterrupted one would."""

    def __init__(self, weights: list[float], global_batch: int, mean_lengths: list[float] | None = None):
        w = np.asarray(weights, dtype=np.float64)
        if mean_lengths is not None:  # weights divide tokens: fewer samples from sources of long samples
            w = w / np.asarray(mean_lengths, dtype=np.float64)
        self.shares, self.global_batch = w / w.sum(), global_batch
        # cumulative draws of each source before each global step (row g), grown as steps are asked for
        self._counts = np.zeros((1, len(w)), dtype=np.int64)

    def per_step(self, global_step: int) -> np.ndarray:
        """Samples each source gives the batch of this step (counted from the start of training)."""
        return self.cumulative(global_step + 1) - self.cumulative(global_step)

    def cumulative(self, global_step: int) -> np.ndarray:
        """Samples each source gave the steps before `global_step`."""
        while len(self._counts) <= global_step:
            grown = np.zeros((2 * len(self._counts), len(self.shares)), dtype=np.int64)
            grown[: len(self._counts)] = self._counts
            known, self._counts = len(self._counts), grown
            for g in range(known, len(grown)):
                self._counts[g] = self._next(self._counts[g - 1])
        return self._counts[global_step]

    def _next(self, drawn: np.ndarray) -> np.ndarray:
        """Cumulative draws after one more step: the floors of the shares, and the samples they leave over to
        the sources furthest behind their running target."""
        size = self.global_batch
        take = np.floor(self.shares * size).astype(np.int64)
        deficit = self.shares * (drawn.sum() + size) - (drawn + take)
        for s in np.argsort(-deficit, kind="stable")[: size - int(take.sum())]:
            take[s] += 1
        return drawn + take
