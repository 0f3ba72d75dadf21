"""Streamed training data (`data.streaming=true`): rows read in file order, tokenized as they come, shuffled in
a seeded buffer of samples, cut into global batches; nothing is tokenized ahead or cached.

Per epoch (a pass over the files): rows are read in order from the data files (local, globs, or fsspec URLs
read in blocks), each row tokenized by the same rule as the cached path (`tokenize.tokenize_row`: the same
samples, truncation and drops by reason), and its samples pushed into a `ShuffleBuffer` of
`data.shuffle_buffer` samples. Once the buffer is full, every new sample replaces one picked by the epoch's
generator, which is emitted; when the files are exhausted the buffer is drained in the order of a seeded
permutation. The generator is seeded with seed + epoch, as the map-style sampler's permutation is, so when the
buffer holds the whole set nothing is emitted before the end and the drain is the map-style order: the same
samples in the same global batches. Global batches are `data.train_batch_size` consecutive emitted samples;
the last, smaller one of an epoch is kept unless data.drop_last. `data.shuffle=false`: file order.

State (what a checkpoint saves, as JSON): epoch and step, the next row to read (file, row, sample of the row,
and where to start reading: the jsonl byte offset / line), the buffer as references to the rows its samples
came from (file, row, offset, sample of the row), the generator's state, the files' detected formats and the
drop counts. A resumed run re-reads only the buffered rows (`readers.reread`: parquet row groups, jsonl lines
by offset; json lists and Arrow streams from their start), re-tokenizes them and reads on from the saved
position, never replaying the stream from its start. Every rank reads and tokenizes the whole stream
(deterministic, no communication) and keeps only its own micro-batches.
"""

from __future__ import annotations

import base64
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from shardtune import remote
from shardtune.batch import supervised_count
from shardtune.config import DataConfig, Source
from shardtune.data.batching import GlobalBatch
from shardtune.data.chat import resolve_chat_template, weights_of
from shardtune.data.readers import Start, data_files, read_file, reread
from shardtune.data.tokenize import FileFormats, tokenize_row
from shardtune.data.vision import images_of
from shardtune.errors import ConfigError, DataError

# how a refused resume can still continue the weights
CONTINUE_WEIGHTS = ("to continue the weights on other data, start a new trainer.default_local_dir with "
                    "trainer.resume_from_path=<that checkpoint> and checkpoint.load_contents=[model,optimizer] "
                    "(data, schedule and step count start over)")
Sample = tuple  # (input_ids, labels) int32 arrays[, the sample's encoded pictures[, float32 loss weights]]
Ref = tuple[int, int, int, int, int]  # (file, row, byte offset, line, sample of the row): where a sample came from


class ShuffleBuffer:
    """A seeded shuffle buffer over one epoch's items. `push` stores an item and, once the buffer is full,
    returns one it replaces (picked by the generator); `finish` (the stream is exhausted) orders what is left
    by a permutation from the same generator; `pop` then returns it in that order. Without `shuffle` it holds
    one item, so items come out in the order they went in."""

    def __init__(self, capacity: int, seed: int, shuffle: bool = True):
        self.capacity = capacity if shuffle else 1
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)
        self.items: list[Any] = []
        self.draining = False  # after finish(): items are kept in reverse emission order, popped from the end

    def __len__(self) -> int:
        return len(self.items)

    def push(self, item: Any) -> Any:
        if len(self.items) < self.capacity:
            self.items.append(item)
            return None
        slot = int(torch.randint(self.capacity, (1,), generator=self.generator)) if self.shuffle else 0
        out, self.items[slot] = self.items[slot], item
        return out

    def finish(self) -> None:
        order = (torch.randperm(len(self.items), generator=self.generator).tolist() if self.shuffle
                 else range(len(self.items)))
        self.items = [self.items[i] for i in reversed(order)]
        self.draining = True

    def pop(self) -> Any:
        return self.items.pop() if self.items else None

    def generator_state(self) -> str:
        return base64.b64encode(self.generator.get_state().numpy().tobytes()).decode()

    def set_generator_state(self, state: str) -> None:
        self.generator.set_state(torch.from_numpy(np.frombuffer(base64.b64decode(state), dtype=np.uint8).copy()))


@dataclass(frozen=True)
class Position:
    """The next sample to read: sample `sample` of row `row` of file `file`, read from `start` (a place at or
    before that row); `rows_before` rows of the source come before it (for the source's max_samples)."""

    file: int = 0
    row: int = 0
    sample: int = 0
    rows_before: int = 0
    start: Start = Start()


@dataclass(frozen=True)
class StreamState:
    """The stream as of a trained step (see the module doc); `to_json` is what trainer_state.json holds."""

    epoch: int = 0
    step_in_epoch: int = 0
    next: Position = Position()
    buffer: tuple[Ref, ...] = ()  # in the buffer's own order
    draining: bool = False
    generator: str | None = None  # None: fresh from seed + epoch
    formats: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # rows dropped in this epoch so far, by reason

    def to_json(self, seed: int, capacity: int, files: list[str], sizes: list[int]) -> dict[str, Any]:
        p = self.next
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": seed, "streaming": True,
                "shuffle_buffer": capacity, "files": files, "sizes": sizes,
                "next": {"file": p.file, "row": p.row, "sample": p.sample, "rows_before": p.rows_before,
                         "start": [p.start.row, p.start.offset, p.start.line]},
                "buffer": [list(r) for r in self.buffer], "draining": self.draining, "generator": self.generator,
                "formats": self.formats, "dropped": self.dropped}

    @classmethod
    def from_json(cls, s: dict[str, Any]) -> StreamState:
        n = s["next"]
        position = Position(n["file"], n["row"], n["sample"], n["rows_before"], Start(*n["start"]))
        return cls(s["epoch"], s["step_in_epoch"], position, tuple(tuple(r) for r in s["buffer"]), s["draining"],
                   s["generator"], dict(s["formats"]), dict(s["dropped"]))


class SampleStream:
    """One training source, streamed: global batches from the current state on (`__iter__`), the state a
    trained step leaves (`consumed`), and its JSON for checkpoints (`state_dict` / `load_state_dict`)."""

    steps_per_epoch = samples = None  # unknown until a pass has been read

    def __init__(self, source: Source, tokenizer: Any, cfg: DataConfig, seed: int):
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("The tokenizer has no fast (Rust) version; shardtune needs its character offsets to "
                            "place the loss mask. Fix: use a tokenizer folder with tokenizer.json.")
        self.source, self.sources, self.tokenizer, self.seed = source, [source], tokenizer, seed
        self.cfg, self.global_batch = source.data, cfg.train_batch_size
        self.skip_bad = source.data.on_bad_row == "skip"
        self.shuffle, self.capacity, self.drop_last = cfg.shuffle, cfg.shuffle_buffer, cfg.drop_last
        self.template = resolve_chat_template(self.cfg.chat_template, tokenizer)
        self.files = data_files(list(source.paths))
        self.sizes = [remote.size(f) if remote.is_url(f) else os.path.getsize(f) for f in self.files]
        self.state = StreamState()
        self.ended_epoch = False
        self.rows_read = self.rows_reread = 0  # rows this process read from the files: new ones, buffered ones
        self.stats: dict[str, Any] = {"streaming": True}  # for the trainer's start events (nothing counted yet)

    # -- the loader's interface ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[GlobalBatch]:
        """Global batches from the state on, forever (epochs roll over); iterating does not move the state."""
        state = self.state
        while True:
            batches = self._epoch(state)
            ahead = next(batches, None)
            while ahead is not None:  # one batch ahead: a batch knows whether it is its epoch's last
                (samples, snapshot), ahead = ahead, next(batches, None)
                yield self._global_batch(samples, snapshot, last=ahead is None)
            state = self._epoch_start(state.epoch + 1, state.formats)

    def consumed(self, batch: GlobalBatch) -> None:
        self.state, self.ended_epoch = batch.position, batch.ends_epoch

    def epoch_progress(self, batch: GlobalBatch) -> float:
        """Passes over the data completed once `batch` has trained (the length of a pass is not known ahead)."""
        return batch.epoch + int(batch.ends_epoch)

    def at_epoch_end(self) -> bool:
        return self.ended_epoch

    def state_dict(self) -> dict[str, Any]:
        return self.state.to_json(self.seed, self.capacity, self.files, self.sizes)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved position; refused when it would name other rows or another order."""
        if "streams" in state:
            raise ConfigError("The checkpoint was written by a run that streamed a weighted mixture of "
                              f"{len(state['streams'])} sources; data.train_files now names one. Fix: resume with "
                              f"the same data.train_files; or {CONTINUE_WEIGHTS}.")
        if not state.get("streaming"):
            raise ConfigError("The checkpoint was written by a run that did not stream its training data "
                              "(data.streaming=false), so it holds no stream position. Fix: resume it with "
                              f"data.streaming=false; or {CONTINUE_WEIGHTS}.")
        if state["files"] != self.files or state["sizes"] != self.sizes:
            raise ConfigError(f"The training files changed since the checkpoint was written (it read "
                              f"{len(state['files'])} files, now {len(self.files)}; names or sizes differ), so its "
                              f"stream position names other rows. Fix: restore the files; or {CONTINUE_WEIGHTS}.")
        for key, now in (("seed", self.seed), ("shuffle_buffer", self.capacity)):
            if state.get(key, now) != now:
                raise ConfigError(f"The checkpoint's stream position was saved for {key} {state[key]}, and this run "
                                  f"has {now}: resuming there would train another order than the run it continues. "
                                  f"Fix: resume with the same trainer.seed and data.shuffle_buffer; or "
                                  f"{CONTINUE_WEIGHTS}.")
        self.state = StreamState.from_json(state)
        self.ended_epoch = self.state.step_in_epoch == 0 and self.state.epoch > 0

    def describe(self) -> dict[str, Any]:
        """Where the stream stands, for the resume event."""
        s = self.state
        return {"epoch": s.epoch, "step_in_epoch": s.step_in_epoch, "file": s.next.file, "row": s.next.row,
                "rows_before": s.next.rows_before, "buffered": len(s.buffer)}

    # -- one epoch ----------------------------------------------------------------------------------------------
    def _epoch_start(self, epoch: int, formats: dict[str, str]) -> StreamState:
        return StreamState(epoch=epoch, formats=formats)

    def _epoch(self, state: StreamState) -> Iterator[tuple[list[Sample], StreamState]]:
        """The rest of one epoch from `state`: each global batch's samples and the state once it has trained."""
        buffer, rows = self.reopen(state)
        step = state.step_in_epoch
        while True:
            batch: list[tuple[Ref, Sample]] = []
            while len(batch) < self.global_batch and (item := next_sample(buffer, rows)) is not None:
                batch.append(item)
            if not batch or (len(batch) < self.global_batch and self.drop_last):
                if step == 0:
                    self.nothing_to_train(rows)
                return
            step += 1
            yield [sample for _, sample in batch], self.snapshot(state.epoch, step, buffer, rows)
            if len(batch) < self.global_batch:
                return

    def reopen(self, state: StreamState) -> tuple[ShuffleBuffer, _Rows]:
        """The buffer and the row reader of a saved state (its buffered rows read again)."""
        formats = FileFormats(self.cfg, state.formats)
        buffer = ShuffleBuffer(self.capacity, self.seed + state.epoch, self.shuffle)
        buffer.items, buffer.draining = self._reread(state.buffer, formats), state.draining
        if state.generator is not None:
            buffer.set_generator_state(state.generator)
        return buffer, _Rows(self, state.next, formats, Counter(state.dropped))

    def snapshot(self, epoch: int, step: int, buffer: ShuffleBuffer, rows: _Rows) -> StreamState:
        return StreamState(epoch, step, rows.position, tuple(ref for ref, _ in buffer.items), buffer.draining,
                           buffer.generator_state() if self.shuffle else None, dict(rows.formats.known),
                           dict(rows.dropped))

    def _global_batch(self, samples: list[Sample], state: StreamState, last: bool) -> GlobalBatch:
        lengths = np.array([len(s[0]) for s in samples], dtype=np.int64)
        targets = np.array([supervised_count(s[1]) for s in samples], dtype=np.int64)
        after = self._epoch_start(state.epoch + 1, state.formats) if last else state
        return GlobalBatch(state.epoch, state.step_in_epoch - 1, lengths, targets, np.zeros(len(samples), np.int64),
                           samples.__getitem__, last, sum(state.dropped.values()), position=after)

    def _reread(self, refs: tuple[Ref, ...], formats: FileFormats) -> list[tuple[Ref, Sample]]:
        """The buffered samples of a saved state, from their rows read again and re-tokenized."""
        by_file: dict[int, list[Ref]] = defaultdict(list)
        for ref in refs:
            by_file[ref[0]].append(ref)
        samples: dict[Ref, Sample] = {}
        for f, file_refs in by_file.items():
            rows = reread(self.files[f], [Start(r[1], r[2], r[3]) for r in file_refs], self.skip_bad)
            self.rows_reread += len(rows)
            tokenized = {i: tokenize_row(row, formats.of(row), self.tokenizer, self.cfg, self.template).samples
                         for i, row in rows.items()}
            for ref in file_refs:
                kept = tokenized.get(ref[1], [])
                if ref[4] >= len(kept):
                    raise DataError(f"{self.files[f]}, row {ref[1]}: the checkpoint's shuffle buffer holds sample "
                                    f"{ref[4]} of this row, which it no longer gives: the file changed since. Fix: "
                                    f"restore the file; or {CONTINUE_WEIGHTS}.")
                samples[ref] = _arrays(kept[ref[4]])
        return [(ref, samples[ref]) for ref in refs]

    def nothing_to_train(self, rows: _Rows) -> None:
        if not rows.kept_rows:
            raise DataError(f"No usable rows in {list(self.source.paths)} (dropped: {dict(rows.dropped)}). "
                            "Fix: check the data format keys and data.max_length.")
        raise DataError(f"A pass over {list(self.source.paths)} gives fewer samples than one global batch "
                        f"({self.global_batch}), and data.drop_last=true leaves nothing to train. Fix: lower "
                        "data.train_batch_size or set data.drop_last=false.")


def next_sample(buffer: ShuffleBuffer, rows: _Rows) -> tuple[Ref, Sample] | None:
    """The next emitted sample of the epoch, or None when it is over."""
    while not buffer.draining:
        new = next(rows, None)
        if new is None:
            buffer.finish()
            break
        out = buffer.push(new)
        if out is not None:
            return out
    return buffer.pop()


class _Rows:
    """Samples of the stream's rows from a position on, each with its reference; `position` is always the
    next sample not yet handed out, `dropped` the drops counted up to it (so a snapshot taken between two
    samples is consistent)."""

    def __init__(self, stream: SampleStream, position: Position, formats: FileFormats, dropped: Counter):
        self.stream, self.position, self.formats, self.dropped = stream, position, formats, dropped
        self.kept_rows = 0
        self._samples = self._iterate()

    def __iter__(self) -> Iterator[tuple[Ref, Sample]]:
        return self

    def __next__(self) -> tuple[Ref, Sample]:
        return next(self._samples)

    def _iterate(self) -> Iterator[tuple[Ref, Sample]]:
        s, p = self.stream, self.position
        limit = s.source.max_samples
        for f in range(p.file, len(s.files)):
            for row in read_file(s.files[f], s.skip_bad, p.start):
                if row.index < p.row:  # the row at `start`, read again to find the next one's place
                    continue
                if 0 <= limit <= p.rows_before:
                    self.position = replace(p, file=len(s.files))
                    return
                s.rows_read += 1
                result = tokenize_row(row, self.formats.of(row), s.tokenizer, s.cfg, s.template)
                if p.sample == 0:  # counted once, when the row is first read
                    self.dropped.update(result.dropped)
                self.kept_rows += bool(result.samples)
                here = Start.at(row)
                after = Position(f, row.index + 1, 0, p.rows_before + 1, here)
                for k in range(p.sample, len(result.samples)):
                    more = k + 1 < len(result.samples)
                    self.position = replace(p, row=row.index, sample=k + 1, start=here) if more else after
                    yield (f, row.index, here.offset, here.line, k), _arrays(result.samples[k])
                p = self.position = after
            p = self.position = Position(f + 1, 0, 0, p.rows_before, Start())


def _arrays(tok: Any) -> Sample:
    """(input_ids, labels) as int32 arrays, the sample's encoded pictures when it has any (the buffer holds
    a picture only while its sample waits there) and its tokens' loss weights when it has them (float32, as the
    cache stores them, so both paths train the same numbers)."""
    arrays = np.asarray(tok.input_ids, dtype=np.int32), np.asarray(tok.labels, dtype=np.int32)
    pictures = images_of(tok)
    weights = weights_of(tok)
    if weights is not None:
        return *arrays, list(pictures), np.asarray(weights, dtype=np.float32)
    return (*arrays, list(pictures)) if pictures else arrays
