"""A weighted mixture of streamed sources (`data.streaming=true` with several sources in data.train_files).

Each source is streamed as a single source is (data/stream.py: rows read in file order, tokenized as they come,
shuffled in its own seeded buffer of `data.shuffle_buffer` samples), but endlessly: when a pass over a
source's files ends, its next pass starts with a fresh buffer order, whatever the other sources are doing.
Each global batch takes from every source the count that `DrawCounts` gives the step (the same weights
rule as the map-style mixture: within one sample of each source's share, running totals within one sample
of the target), so every batch is full and keeps the weights. Weights divide samples: a stream's mean
length is unknown ahead, so `data.mixture_unit=tokens` is refused for streams (config/rules.py).

The mixture has no pass of its own: its epoch counts the passes that every source has completed (the
smallest number of passes over any source), so `after_each_epoch` cadences fire once every source has
been read through again. Source i's buffer is seeded from (trainer.seed, i), so two sources of the same
files still shuffle differently.

State: the number of trained steps and each source's stream state (its pass, the samples drawn in that
pass, its read position and buffer as row references); a resume re-reads only the buffered rows of each
source. The weights and names are checked on resume: other weights would draw other batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from shardtune.batch import supervised_count
from shardtune.config import DataConfig, Source
from shardtune.data.batching import GlobalBatch
from shardtune.data.mixture import DrawCounts
from shardtune.data.stream import CONTINUE_WEIGHTS, Sample, SampleStream, StreamState, next_sample
from shardtune.errors import ConfigError


def source_seed(seed: int, index: int) -> int:
    """The seed of source `index`'s shuffle buffer: distinct per source, a pure function of the run's seed."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class _Cursor:
    """One source of the mixture read sample by sample, pass after pass, from a saved state on."""

    def __init__(self, stream: SampleStream, state: StreamState):
        self.stream = stream
        self._open(state)

    def _open(self, state: StreamState) -> None:
        self.epoch, self.drawn = state.epoch, state.step_in_epoch  # drawn: samples taken in this pass
        self.buffer, self.rows = self.stream.reopen(state)

    def take(self, count: int) -> list[Sample]:
        out: list[Sample] = []
        while len(out) < count:
            item = next_sample(self.buffer, self.rows)
            if item is None:  # this pass is over: the next one starts in a fresh order
                if self.drawn == 0:
                    self.stream.nothing_to_train(self.rows)
                self._open(StreamState(epoch=self.epoch + 1, formats=dict(self.rows.formats.known)))
                continue
            self.drawn += 1
            out.append(item[1])
        return out

    def snapshot(self) -> StreamState:
        return self.stream.snapshot(self.epoch, self.drawn, self.buffer, self.rows)


def passes_done(state: StreamState) -> int:
    """Passes over a source completed in a state: its pass number, plus one when that pass has been drained."""
    return state.epoch + int(state.draining and not state.buffer)


class MixedStream:
    """Streamed sources drawn by weight, with the loader interface of `SampleStream`."""

    steps_per_epoch = None  # a mixture of streams has no known pass length

    def __init__(self, sources: list[Source], tokenizer: Any, cfg: DataConfig, seed: int):
        self.sources, self.seed = list(sources), seed
        self.streams = [SampleStream(s, tokenizer, cfg, source_seed(seed, i)) for i, s in enumerate(sources)]
        self.draws = DrawCounts([s.weight for s in sources], cfg.train_batch_size)
        self.step = 0  # global batches trained
        self.ended_epoch = False
        self.stats: dict[str, Any] = {"streaming": True}

    @property
    def rows_read(self) -> int:
        return sum(s.rows_read for s in self.streams)

    @property
    def rows_reread(self) -> int:
        return sum(s.rows_reread for s in self.streams)

    def __iter__(self) -> Iterator[GlobalBatch]:
        """Global batches from the state on, forever; iterating does not move the state."""
        cursors = [_Cursor(s, s.state) for s in self.streams]
        step, epoch = self.step, self._epoch([s.state for s in self.streams])
        while True:
            counts = self.draws.per_step(step)
            samples = [x for cursor, k in zip(cursors, counts) for x in cursor.take(int(k))]
            states = tuple(c.snapshot() for c in cursors)
            after = self._epoch(states)
            step += 1
            lengths = np.array([len(s[0]) for s in samples], dtype=np.int64)
            targets = np.array([supervised_count(s[1]) for s in samples], dtype=np.int64)
            sources = np.repeat(np.arange(len(cursors), dtype=np.int64), counts)
            dropped = sum(sum(s.dropped.values()) for s in states)
            yield GlobalBatch(epoch, step - 1, lengths, targets, sources, samples.__getitem__, after > epoch,
                              dropped, position=(step, states))
            epoch = after

    @staticmethod
    def _epoch(states: list[StreamState] | tuple[StreamState, ...]) -> int:
        return min(passes_done(s) for s in states)

    def consumed(self, batch: GlobalBatch) -> None:
        self.step, states = batch.position
        for stream, state in zip(self.streams, states):
            stream.state = state
        self.ended_epoch = batch.ends_epoch

    def epoch_progress(self, batch: GlobalBatch) -> float:
        """Passes every source has completed once `batch` has trained."""
        return batch.epoch + int(batch.ends_epoch)

    def at_epoch_end(self) -> bool:
        return self.ended_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"streaming": True, "step": self.step, "seed": self.seed,
                "weights": {s.name: s.weight for s in self.sources},
                "streams": {s.name: stream.state_dict() for s, stream in zip(self.sources, self.streams)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue each source at its saved position; refused for other sources, weights or seed."""
        if "streams" not in state:
            was = "streamed one source" if state.get("streaming") else "did not stream its training data"
            raise ConfigError(f"The checkpoint was written by a run that {was}; data.train_files now streams a "
                              f"mixture of {len(self.sources)} sources. Fix: resume with the data it was written "
                              f"with; or {CONTINUE_WEIGHTS}.")
        now = {s.name: s.weight for s in self.sources}
        if state["weights"] != now or state["seed"] != self.seed:
            raise ConfigError(f"The checkpoint's mixture was {state['weights']} with seed {state['seed']}, and this "
                              f"run has {now} with seed {self.seed}: resuming would draw other batches than the run "
                              f"it continues. Fix: resume with the same sources, weights and trainer.seed; or "
                              f"{CONTINUE_WEIGHTS}.")
        for source, stream in zip(self.sources, self.streams):
            stream.load_state_dict(state["streams"][source.name])
        self.step = state["step"]
        self.ended_epoch = False

    def describe(self) -> dict[str, Any]:
        """Where each source's stream stands, for the resume event."""
        return {"step": self.step, **{s.name: stream.describe() for s, stream in zip(self.sources, self.streams)}}
