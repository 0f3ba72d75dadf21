"""The data front door: the config's data sources resolved once, and the run's data built from them.

`data_sources(cfg)` is the one function `shardtune train`, `validate` and `render` start from: the typed sources
of data.train_files and data.val_files (config/sources.py). From them:

- `build_data(cfg, tokenizer, world)`: the training `BatchSource` the step loader draws from (tokenized and
  cached sources drawn by a sampler, `SampledBatches`; a `SampleStream` or a `MixedStream` with
  data.streaming) and the validation data (tokenized and cached, every sample once);
- `rows(sources)`: the raw rows of some sources in order (what render shows).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

from shardtune import parallel
from shardtune.config import Config, Source, resolve_sources
from shardtune.data.dataset import CombinedDataset, tokenize_sources
from shardtune.data.loader import BatchSource, SampledBatches
from shardtune.data.readers import Row, expand_paths, read_rows
from shardtune.data.stream import SampleStream
from shardtune.data.stream_mixture import MixedStream
from shardtune.errors import ShardtuneError


class DataSources(NamedTuple):
    train: list[Source]
    val: list[Source]  # empty without data.val_files


def data_sources(cfg: Config) -> DataSources:
    """The sources of data.train_files and data.val_files, in order."""
    data = cfg.data
    val = resolve_sources(data.val_files, data, data.val_max_samples, "data.val_files") if data.val_files else []
    return DataSources(resolve_sources(data.train_files, data, data.train_max_samples), val)


def build_data(cfg: Config, tokenizer: Any, world: parallel.World) -> tuple[BatchSource, CombinedDataset | None]:
    """Training batches and validation data. Rank 0 tokenizes (and fills the cache) first; the other ranks then
    read the cache. Without a cache (data.cache_dir=null) every rank tokenizes for itself, all at once. Streamed
    training data (data.streaming) is only opened here: every rank reads and tokenizes it as it trains."""
    sources = data_sources(cfg)

    def build() -> tuple[BatchSource, CombinedDataset | None]:
        train = train_batches(sources.train, cfg, tokenizer, progress=world.is_main)
        return train, tokenize_sources(sources.val, cfg.data, tokenizer, world.is_main) if sources.val else None

    if not cfg.data.cache_dir:
        return build()
    # rank 0's bad-input error (a corrupt row, a missing file) is every rank's: the others, waiting for the cache,
    # are handed it and stop with the same message (not with a broken connection when rank 0 exits)
    failure, out = None, None
    if world.is_main:
        try:
            out = build()
        except ShardtuneError as e:
            failure = e
    failure = parallel.all_gather_objects(failure, world)[0]
    if failure is not None:
        raise failure
    return out if world.is_main else build()


def train_batches(sources: list[Source], cfg: Config, tokenizer: Any, progress: bool = True) -> BatchSource:
    data, seed = cfg.data, cfg.trainer.seed
    if not data.streaming:
        return SampledBatches(tokenize_sources(sources, data, tokenizer, progress), data, seed)
    return SampleStream(sources[0], tokenizer, data, seed) if len(sources) == 1 else MixedStream(sources, tokenizer,
                                                                                                data, seed)


def rows(sources: list[Source]) -> Iterator[tuple[Source, Row]]:
    """Every row of the sources in order, with its source (each read up to its max_samples)."""
    for source in sources:
        for row in read_rows(expand_paths(list(source.paths)), source.max_samples):
            yield source, row
