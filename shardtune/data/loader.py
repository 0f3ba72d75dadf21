"""The training data path in one object: which samples each step trains, on which rank, in which micro-batch.

`StepLoader` owns the sampler position (its `state_dict` is what a checkpoint saves), plans every rank's
micro-batches for a global batch (balanced by tokens, by count or by token budget), collates this rank's
into tensors, slices them for Ulysses sequence parallelism, pins them for asynchronous GPU copies, and with
`data.prefetch_steps > 0` does all of it in a background thread ahead of the loop. The engine receives
ready micro-batches and the step's loss divisor; it never sees samples, plans or the tokenizer.

Iterating does not move the position; `consumed(batch)` does, once the step has trained, so a checkpoint
taken while prepared batches wait in the queue still resumes at the right sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from torchdata.nodes import IterableWrapper, Loader, Prefetcher

from shardtune.batch import MicroBatch
from shardtune.config import DataConfig
from shardtune.data.batching import (
    GlobalBatchSampler,
    MicroBatchPlan,
    StepSampler,
    collate,
    plan_micro_batches,
    slice_for_sequence_parallel,
)
from shardtune.data.dataset import CombinedDataset
from shardtune.data.mixture import MixtureSampler
from shardtune.errors import ConfigError


@dataclass(frozen=True)
class RankLayout:
    """Where this process sits: its data-parallel rank among dp_size, its sequence-parallel rank among sp_size."""

    dp_rank: int = 0
    dp_size: int = 1
    sp_rank: int = 0
    sp_size: int = 1


@dataclass
class StepBatch:
    """One optimizer step's data: the sampler position it came from, the global batch, every rank's plan,
    this rank's ready micro-batches and the numbers the loss and the metrics need."""

    epoch: int
    step_in_epoch: int
    indices: np.ndarray  # the samples of the global batch
    plans: MicroBatchPlan
    micro_batches: list[MicroBatch]  # this rank's, sliced for sequence parallelism and pinned where useful
    num_targets: int  # supervised tokens of the global batch: the loss divisor
    lengths: np.ndarray  # tokens of each sample of the global batch
    padded_tokens: int  # pad tokens all ranks process (0 when padding-free)
    sources: np.ndarray  # the source (position in data.sources) of each sample of the global batch


class StepLoader:
    def __init__(self, data: CombinedDataset, cfg: DataConfig, layout: RankLayout, *, seed: int, packed: bool,
                 pad_id: int, pin_memory: bool = False):
        self.data, self.cfg, self.layout = data, cfg, layout
        self.packed, self.pad_id, self.pin = packed, pad_id, pin_memory
        self.sampler = batch_sampler(data, cfg, seed)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def epoch_progress(self, batch: StepBatch) -> float:
        """Epochs completed once `batch` has trained (verl's train/epoch)."""
        return batch.epoch + (batch.step_in_epoch + 1) / self.steps_per_epoch

    # ------------------------------------------------------------------------------------------------------
    def micro_batches(self, indices: np.ndarray, data: CombinedDataset) -> tuple[MicroBatchPlan, list[MicroBatch]]:
        """Every rank's plan for these samples of `data`, and this rank's micro-batches, ready for the engine."""
        plans = plan_micro_batches(indices, data.lengths, self.layout.dp_size, self.cfg, padded=not self.packed)
        ready = []
        for micro in plans[self.layout.dp_rank]:
            mb = collate([data[i] for i in micro], self.packed, self.pad_id)
            if self.layout.sp_size > 1:
                mb = slice_for_sequence_parallel(mb, self.layout.sp_size, self.layout.sp_rank, self.pad_id)
            ready.append(mb.pin_memory() if self.pin else mb)
        return plans, ready

    def prepare(self, epoch: int, step_in_epoch: int, indices: np.ndarray) -> StepBatch:
        plans, ready = self.micro_batches(indices, self.data)
        lengths = self.data.lengths[indices]
        padded = 0 if self.packed else sum(len(m) * int(self.data.lengths[m].max()) - int(self.data.lengths[m].sum())
                                           for plan in plans for m in plan if m)
        return StepBatch(epoch, step_in_epoch, indices, plans, ready, self.data.num_targets(indices), lengths, padded,
                         self.data.source_of(indices))

    def __iter__(self) -> Iterator[StepBatch]:
        """The coming steps from the sampler's position on, forever. With data.prefetch_steps > 0 a background
        thread prepares them that many steps ahead, so the engine does not wait for its next batch."""
        ahead = self.cfg.prefetch_steps
        if ahead == 0:
            return (self.prepare(*b) for b in self.sampler)
        loader = Loader(Prefetcher(IterableWrapper(self._prepared_or_error()), prefetch_factor=ahead))
        return (_raise_if_error(item) for item in loader)

    def _prepared_or_error(self) -> Iterator[StepBatch | Exception]:
        """Prepared steps; an error is handed over as an item, so the loop raises it as itself (torchdata would
        re-wrap it with the thread's traceback, losing shardtune's message format)."""
        for b in self.sampler:
            try:
                yield self.prepare(*b)
            except Exception as e:
                yield e
                return

    def consumed(self, batch: StepBatch) -> None:
        """Mark `batch` as trained: the position (and what a checkpoint saves) moves past it."""
        self.sampler.consumed(batch.epoch, batch.step_in_epoch)

    def at_epoch_end(self) -> bool:
        return self.sampler.step_in_epoch == self.steps_per_epoch

    # ------------------------------------------------------------------------------------------------------
    def validation_batches(self, data: CombinedDataset, source: int) -> Iterator[list[MicroBatch]]:
        """This rank's micro-batches of every sample of one validation source (none dropped, none repeated
        across ranks), one global batch's worth at a time."""
        indices, chunk = data.source_indices(source), self.cfg.train_batch_size
        for start in range(0, len(indices), chunk):
            yield self.micro_batches(indices[start : start + chunk], data)[1]

    def state_dict(self) -> dict[str, Any]:
        """The position, and what it is a position in (the seed, each source's samples)."""
        return {**self.sampler.state_dict(), "sources": {s.name: len(d) for s, d in zip(self.data.sources,
                                                                                       self.data.datasets)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved position; refused when the data or the seed changed, since the position would
        then point at other samples (a checkpoint written before the sources were recorded is trusted)."""
        now = self.state_dict()
        for key in ("seed", "sources"):
            if key in state and state[key] != now[key]:
                raise ConfigError(
                    f"The checkpoint's data position was saved for {key} {state[key]}, and this run has {now[key]}: "
                    "resuming there would train other samples than the run it continues. Fix: resume with the same "
                    "data and trainer.seed; or, to continue the weights on other data, start a new "
                    "trainer.default_local_dir with trainer.resume_from_path=<that checkpoint> and "
                    "checkpoint.load_contents=[model,optimizer] (data, schedule and step count start over).")
        self.sampler.load_state_dict(state)


def _raise_if_error(item: Any) -> Any:
    if isinstance(item, Exception):
        raise item
    return item


def batch_sampler(data: CombinedDataset, cfg: DataConfig, seed: int) -> StepSampler:
    """One source: a seeded permutation per epoch. Several: the weighted mixture (data/mixture.py), its weights
    dividing samples or, with data.mixture_unit=tokens, tokens."""
    if len(data.sources) == 1:
        return GlobalBatchSampler(len(data), cfg.train_batch_size, seed, cfg.shuffle, cfg.drop_last)
    means = [float(d.lengths.mean()) for d in data.datasets] if cfg.mixture_unit == "tokens" else None
    return MixtureSampler([len(d) for d in data.datasets], [s.weight for s in data.sources], cfg.train_batch_size,
                          seed, mean_lengths=means, drop_last=cfg.drop_last, shuffle=cfg.shuffle)


def planned_steps(total_training_steps: int | None, total_epochs: int, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: trainer.total_training_steps when set, else epochs x steps per epoch."""
    return total_training_steps or total_epochs * steps_per_epoch
