"""The training data path in one object: which samples each step trains, on which rank, in which micro-batch.

`StepLoader` draws each step's global batch from its batch source, plans every rank's micro-batches for it
(balanced by tokens, by count or by token budget), collates this rank's into tensors, slices them for Ulysses
sequence parallelism, pins them for asynchronous GPU copies, and with `data.prefetch_steps > 0` does all of it
in a background thread ahead of the loop. The engine receives ready micro-batches and the step's loss
divisor; it never sees samples, plans or the tokenizer.

Two batch sources: `SampledBatches` draws from tokenized datasets by a sampler (a seeded permutation per
epoch, or the weighted mixture); a `SampleStream` (data/stream.py, `data.streaming=true`) reads, tokenizes and
shuffles rows as it goes, inside the prefetch thread (`MixedStream`, data/stream_mixture.py: several streamed
sources drawn by weight). Planning works on the positions of a global batch's
samples and their lengths, so both share it. The source's state (sampler position or stream position) is
what a checkpoint saves.

Iterating does not move the position; `consumed(batch)` does, once the step has trained, so a checkpoint
taken while prepared batches wait in the queue still resumes at the right sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from torchdata.nodes import IterableWrapper, Loader, Prefetcher

from shardtune.batch import MicroBatch
from shardtune.config import DataConfig
from shardtune.data.batching import (
    GlobalBatch,
    GlobalBatchSampler,
    MicroBatchPlan,
    StepSampler,
    collate,
    pad_to_bucket,
    plan_micro_batches,
    slice_for_sequence_parallel,
)
from shardtune.data.dataset import CombinedDataset
from shardtune.data.mixture import MixtureSampler
from shardtune.data.stream import CONTINUE_WEIGHTS, SampleStream
from shardtune.data.stream_mixture import MixedStream
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
    """One optimizer step's data: the global batch as drawn, every rank's plan (positions in the global
    batch), this rank's ready micro-batches and the numbers the loss and the metrics need."""

    drawn: GlobalBatch
    plans: MicroBatchPlan
    micro_batches: list[MicroBatch]  # this rank's, sliced for sequence parallelism and pinned where useful
    num_targets: int  # supervised tokens of the global batch: the loss divisor
    padded_tokens: int  # pad tokens all ranks process (0 when padding-free)

    @property
    def epoch(self) -> int:
        return self.drawn.epoch

    @property
    def step_in_epoch(self) -> int:
        return self.drawn.step_in_epoch

    @property
    def lengths(self) -> np.ndarray:  # tokens of each sample of the global batch
        return self.drawn.lengths

    @property
    def sources(self) -> np.ndarray:  # the source (position in data.sources) of each sample of the global batch
        return self.drawn.sources


class SampledBatches:
    """Global batches of tokenized datasets: one source by a seeded permutation per epoch, several by the
    weighted mixture (data/mixture.py)."""

    def __init__(self, data: CombinedDataset, cfg: DataConfig, seed: int):
        self.data, self.sampler = data, batch_sampler(data, cfg, seed)
        self.dropped_rows = sum(data.stats.get("dropped", {}).values())

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def __iter__(self) -> Iterator[GlobalBatch]:
        for epoch, step, indices in self.sampler:
            yield self.draw(epoch, step, indices)

    def draw(self, epoch: int, step: int, indices: np.ndarray) -> GlobalBatch:
        data = self.data
        return GlobalBatch(epoch, step, data.lengths[indices], data.target_counts[indices], data.source_of(indices),
                           lambda p: data[int(indices[p])], step + 1 == self.steps_per_epoch, self.dropped_rows)

    def consumed(self, batch: GlobalBatch) -> None:
        self.sampler.consumed(batch.epoch, batch.step_in_epoch)

    def epoch_progress(self, batch: GlobalBatch) -> float:
        return batch.epoch + (batch.step_in_epoch + 1) / self.steps_per_epoch

    def at_epoch_end(self) -> bool:
        return self.sampler.step_in_epoch == self.steps_per_epoch

    def state_dict(self) -> dict[str, Any]:
        """The position, and what it is a position in (the seed, each source's samples)."""
        return {**self.sampler.state_dict(), "sources": {s.name: len(d) for s, d in zip(self.data.sources,
                                                                                       self.data.datasets)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved position; refused when the data or the seed changed, since the position would
        then point at other samples (a checkpoint written before the sources were recorded is trusted)."""
        if state.get("streaming"):
            raise ConfigError("The checkpoint was written by a run that streamed its training data "
                              "(data.streaming=true): its position is a place in the stream, not in this dataset. "
                              f"Fix: resume it with data.streaming=true; or {CONTINUE_WEIGHTS}.")
        now = self.state_dict()
        for key in ("seed", "sources"):
            if key in state and state[key] != now[key]:
                raise ConfigError(
                    f"The checkpoint's data position was saved for {key} {state[key]}, and this run has {now[key]}: "
                    "resuming there would train other samples than the run it continues. Fix: resume with the same "
                    f"data and trainer.seed; or {CONTINUE_WEIGHTS}.")
        self.sampler.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        return {"epoch": self.sampler.epoch, "step_in_epoch": self.sampler.step_in_epoch}


class StepLoader:
    def __init__(self, data: CombinedDataset | SampleStream | MixedStream, cfg: DataConfig, layout: RankLayout, *,
                 seed: int, packed: bool, pad_id: int, pin_memory: bool = False,
                 pixels: Callable[[list[bytes]], dict[str, Any]] | None = None):
        self.cfg, self.layout = cfg, layout
        self.packed, self.pad_id, self.pin = packed, pad_id, pin_memory
        self.pixels = pixels  # pictures -> the image processor's tensors (vision-language models)
        self.batches = SampledBatches(data, cfg, seed) if isinstance(data, CombinedDataset) else data

    @property
    def steps_per_epoch(self) -> int | None:
        """Steps of an epoch; None for a stream (known once a pass has been read)."""
        return self.batches.steps_per_epoch

    def epoch_progress(self, batch: StepBatch) -> float:
        """Epochs completed once `batch` has trained (verl's train/epoch); for a stream, whole passes."""
        return self.batches.epoch_progress(batch.drawn)

    # ------------------------------------------------------------------------------------------------------
    def micro_batches(self, lengths: np.ndarray, sample: Callable[[int], tuple[Any, Any]]
                      ) -> tuple[MicroBatchPlan, list[MicroBatch]]:
        """Every rank's plan for a global batch of samples with these `lengths` (plans hold positions in it),
        and this rank's micro-batches, ready for the engine (`sample(p)` reads the one at position p)."""
        plans = plan_micro_batches(np.arange(len(lengths)), lengths, self.layout.dp_size, self.cfg,
                                   padded=not self.packed)
        ready = []
        for micro in plans[self.layout.dp_rank]:
            mb = collate([sample(p) for p in micro], self.packed, self.pad_id, self.pixels)
            if self.packed and self.cfg.pad_to_length_bucket:
                mb = pad_to_bucket(mb, self.cfg.pad_to_length_bucket, self.layout.sp_size, self.pad_id)
            if self.layout.sp_size > 1:
                mb = slice_for_sequence_parallel(mb, self.layout.sp_size, self.layout.sp_rank, self.pad_id)
            ready.append(mb.pin_memory() if self.pin else mb)
        return plans, ready

    def _bucket_padding(self, lengths: np.ndarray, plans: MicroBatchPlan) -> int:
        """Pad tokens data.pad_to_length_bucket adds to every rank's packed micro-batches (see pad_to_bucket)."""
        if not self.cfg.pad_to_length_bucket:
            return 0
        step = -(-self.cfg.pad_to_length_bucket // self.layout.sp_size) * self.layout.sp_size
        return sum(-int(lengths[m].sum()) % step for plan in plans for m in plan if m)

    def prepare(self, drawn: GlobalBatch) -> StepBatch:
        lengths = drawn.lengths
        plans, ready = self.micro_batches(lengths, drawn.sample)
        padded = self._bucket_padding(lengths, plans) if self.packed else sum(
            len(m) * int(lengths[m].max()) - int(lengths[m].sum()) for plan in plans for m in plan if m)
        return StepBatch(drawn, plans, ready, int(drawn.target_counts.sum()), padded)

    def __iter__(self) -> Iterator[StepBatch]:
        """The coming steps from the source's position on, forever. With data.prefetch_steps > 0 a background
        thread prepares them that many steps ahead (for a stream: reads and tokenizes its rows too), so the
        engine does not wait for its next batch."""
        ahead = self.cfg.prefetch_steps
        if ahead == 0:
            return (self.prepare(b) for b in self.batches)
        loader = Loader(Prefetcher(IterableWrapper(self._prepared_or_error()), prefetch_factor=ahead))
        return (_raise_if_error(item) for item in loader)

    def _prepared_or_error(self) -> Iterator[StepBatch | Exception]:
        """Prepared steps; an error is handed over as an item, so the loop raises it as itself (torchdata would
        re-wrap it with the thread's traceback, losing shardtune's message format)."""
        try:
            for b in self.batches:
                yield self.prepare(b)
        except Exception as e:
            yield e

    def consumed(self, batch: StepBatch) -> None:
        """Mark `batch` as trained: the position (and what a checkpoint saves) moves past it."""
        self.batches.consumed(batch.drawn)

    def at_epoch_end(self) -> bool:
        return self.batches.at_epoch_end()

    def describe(self) -> dict[str, Any]:
        """Where the data stands (for the resume event)."""
        return self.batches.describe()

    # ------------------------------------------------------------------------------------------------------
    def validation_batches(self, data: CombinedDataset, source: int) -> Iterator[list[MicroBatch]]:
        """This rank's micro-batches of every sample of one validation source (none dropped, none repeated
        across ranks), one global batch's worth at a time."""
        indices, chunk = data.source_indices(source), self.cfg.train_batch_size
        for start in range(0, len(indices), chunk):
            part = indices[start : start + chunk]
            yield self.micro_batches(data.lengths[part], lambda p, part=part: data[int(part[p])])[1]

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)


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


def planned_steps(total_training_steps: int | None, total_epochs: int, steps_per_epoch: int | None) -> int:
    """Optimizer steps of the run: trainer.total_training_steps when set, else epochs x steps per epoch (a
    stream, whose epochs have no known length, always sets total_training_steps: config/rules.py)."""
    return total_training_steps or total_epochs * steps_per_epoch
