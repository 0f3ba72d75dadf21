"""Sources -> tokenized, memory-mapped datasets, one cached per source, and their combined view.

`tokenize_sources(sources, cfg, tokenizer)` tokenizes each source (config/sources.py) into its own cache folder
(data/cache.py, data/tokenize.py) unless the cache is already complete, and returns a `CombinedDataset`: every
source's samples one after another, with the per-source datasets and the sample -> source map the step loader
draws mixtures from. With one source it
is exactly that source's dataset. Without a cache folder (data.cache_dir=null) the shards go to a temporary
folder that is removed once mapped, so memory stays bounded either way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from shardtune.batch import supervised_counts
from shardtune.config import DataConfig, Source, resolve_sources
from shardtune.data.cache import (
    SHARD_ROWS,
    Shard,
    add_stats,
    cache_key,
    complete_shards,
    is_complete,
    read_index,
    remove_stale_temporaries,
    tokenizer_fingerprint,
    write_index,
)
from shardtune.data.chat import resolve_chat_template
from shardtune.data.readers import expand_paths, read_rows
from shardtune.data.tokenize import tokenize_to_shards
from shardtune.errors import DataError


class TokenizedDataset:
    """The samples of one source: (input_ids, labels) pairs stored in one or more shards (memory-mapped from
    the cache, or plain arrays), with per-sample `lengths` and supervised-target counts kept apart so that the
    batch planner reads them without touching the tokens."""

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray,
                 stats: dict[str, Any] | None = None, weights: np.ndarray | None = None):
        """One shard from flat arrays: samples i spans offsets[i]:offsets[i + 1]."""
        offsets = np.asarray(offsets, dtype=np.int64)
        lengths = np.diff(offsets)
        self._setup([Shard(input_ids, labels, offsets, weights=weights)], lengths, supervised_counts(labels, offsets),
                    stats)

    @classmethod
    def from_shards(cls, shards: list[Shard], lengths: np.ndarray, target_counts: np.ndarray,
                    stats: dict[str, Any]) -> TokenizedDataset:
        self = cls.__new__(cls)
        self._setup(shards, lengths, target_counts, stats)
        return self

    def _setup(self, shards: list[Shard], lengths: np.ndarray, target_counts: np.ndarray,
               stats: dict[str, Any] | None) -> None:
        self.shards = shards
        self.lengths = lengths  # int64 tokens per sample
        self.target_counts = target_counts  # int64 supervised next-token targets per sample
        self.stats = stats if stats is not None else {}
        self._first = np.cumsum([0] + [len(s.offsets) - 1 for s in shards])  # first sample of each shard

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple:
        """(input_ids, labels), the encoded pictures as a third item when the sample has any, and the tokens' loss
        weights as a fourth when the source has them (data.message_weight_key; the pictures then may be [])."""
        k = 0 if len(self.shards) == 1 else int(np.searchsorted(self._first, i, side="right")) - 1
        shard, j = self.shards[k], i - int(self._first[k])
        a, b = shard.offsets[j], shard.offsets[j + 1]
        pictures = shard.images_of(j)
        if shard.weights is not None:
            return shard.input_ids[a:b], shard.labels[a:b], pictures, shard.weights[a:b]
        return (shard.input_ids[a:b], shard.labels[a:b], pictures) if pictures else (shard.input_ids[a:b],
                                                                                      shard.labels[a:b])

    def num_targets(self, indices: np.ndarray | list[int]) -> int:
        """Supervised next-token targets of these samples (labels after each sample's first token)."""
        return int(self.target_counts[np.asarray(indices, dtype=np.int64)].sum())

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All samples as flat (input_ids, labels, offsets), read into memory: for tests and small data."""
        offsets = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        ids = np.concatenate([np.zeros(0, np.int32)] + [np.asarray(s.input_ids) for s in self.shards])
        labels = np.concatenate([np.zeros(0, np.int32)] + [np.asarray(s.labels) for s in self.shards])
        return ids, labels, offsets


class CombinedDataset:
    """Several sources' datasets as one: global sample i is sample i - starts[k] of source k, where
    starts[k] is the number of samples of the sources before k. `datasets[k]` and `sources[k]` are source
    k's own dataset and settings (name, weight, ...); `source_of` maps global indices to source ids."""

    def __init__(self, sources: list[Source], datasets: list[TokenizedDataset]):
        self.sources, self.datasets = sources, datasets
        self.starts = np.cumsum([0] + [len(d) for d in datasets])
        single = len(datasets) == 1
        self.lengths = datasets[0].lengths if single else np.concatenate([d.lengths for d in datasets])
        self.target_counts = (datasets[0].target_counts if single
                              else np.concatenate([d.target_counts for d in datasets]))
        self.stats = _combined_stats(sources, datasets)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        k = self.source_of(i)
        return self.datasets[k][i - int(self.starts[k])]

    def source_of(self, indices: int | np.ndarray) -> Any:
        """The source id (position in `sources`) of each global sample index."""
        return np.searchsorted(self.starts, indices, side="right") - 1

    def source_indices(self, k: int) -> np.ndarray:
        """The global indices of source k's samples."""
        return np.arange(self.starts[k], self.starts[k + 1])

    def num_targets(self, indices: np.ndarray | list[int]) -> int:
        return int(self.target_counts[np.asarray(indices, dtype=np.int64)].sum())


def _combined_stats(sources: list[Source], datasets: list[TokenizedDataset]) -> dict[str, Any]:
    """Totals over the sources (drops by reason summed, cache hit only if every source hit) + `sources`: the
    stats of each source by name."""
    total: dict[str, Any] = {}
    for d in datasets:
        add_stats(total, {k: v for k, v in d.stats.items() if isinstance(v, (int, float, dict))
                          and not isinstance(v, bool)})
    if all(d.stats.get("cache_hit") for d in datasets):
        total["cache_hit"] = True
    total["sources"] = {s.name: d.stats for s, d in zip(sources, datasets)}
    return total


def build_dataset(entries: list[str | dict[str, Any]], cfg: DataConfig, tokenizer: Any, max_samples: int = -1,
                  progress: bool = True, shard_rows: int = SHARD_ROWS) -> CombinedDataset:
    """Entries written as in data.train_files, tokenized (for callers that hold entries, not a config: tests, bench;
    a run resolves its sources once, in data/build.py)."""
    return tokenize_sources(resolve_sources(entries, cfg, max_samples), cfg, tokenizer, progress, shard_rows)


def tokenize_sources(sources: list[Source], cfg: DataConfig, tokenizer: Any, progress: bool = True,
                     shard_rows: int = SHARD_ROWS) -> CombinedDataset:
    """The sources, tokenized and cached per source."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("The tokenizer has no fast (Rust) version; shardtune needs its character offsets to "
                        "place the loss mask. Fix: use a tokenizer folder with tokenizer.json.")
    datasets = [build_source(s, tokenizer, progress, shard_rows) for s in sources]
    if cfg.use_dynamic_bsz:
        for source, data in zip(sources, datasets):
            check_token_budget(data.lengths, cfg, f"source '{source.name}' ({', '.join(source.paths)})")
    return CombinedDataset(sources, datasets)


def check_token_budget(lengths: np.ndarray, cfg: DataConfig, what: str) -> None:
    """With data.use_dynamic_bsz every sample must fit one micro-batch's token budget. A budget below
    data.max_length is accepted (as verl does) as long as the data has no sample longer than the budget."""
    over = lengths > cfg.max_token_len_per_gpu
    if over.any():
        longest = int(lengths.max())
        raise DataError(f"{what}: {int(over.sum())} of {len(lengths)} samples have more tokens than one "
                        f"micro-batch may hold, data.max_token_len_per_gpu={cfg.max_token_len_per_gpu} (the longest "
                        f"has {longest}; data.max_length={cfg.max_length} lets them through). Fix: raise "
                        f"data.max_token_len_per_gpu to at least {longest}, or set "
                        f"data.max_length={cfg.max_token_len_per_gpu} so that longer samples are truncated or "
                        "dropped (data.truncation).")


def build_source(source: Source, tokenizer: Any, progress: bool = True,
                 shard_rows: int = SHARD_ROWS) -> TokenizedDataset:
    """One source's dataset: loaded from its cache when complete, else tokenized into it (resuming from the
    shards a previous, interrupted run completed)."""
    cfg = source.data
    paths = expand_paths(list(source.paths))
    template = resolve_chat_template(cfg.chat_template, tokenizer)
    key = cache_key(paths, cfg, tokenizer_fingerprint(tokenizer), template, source.max_samples, shard_rows)
    if not cfg.cache_dir:
        folder = Path(tempfile.mkdtemp(prefix=f"shardtune-{source.name}-"))
        try:
            ds = _tokenized(source, paths, folder, tokenizer, template, progress, shard_rows)
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the shards stay mapped until the dataset is dropped
        del ds.stats["cache"]
        return ds
    folder = Path(os.path.expanduser(cfg.cache_dir)) / "tokenized" / key
    if is_complete(folder):
        return _loaded(folder, cache_hit=True)
    return _tokenized(source, paths, folder, tokenizer, template, progress, shard_rows)


def _tokenized(source: Source, paths: list[str], folder: Path, tokenizer: Any, template: str, progress: bool,
               shard_rows: int) -> TokenizedDataset:
    cfg = source.data
    with _cache_errors(folder, cfg.cache_dir):
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)
        rows = read_rows(paths, source.max_samples, skip_bad=cfg.on_bad_row == "skip")
        specs = tokenize_to_shards(rows, folder, cfg, tokenizer, template, shard_rows, complete_shards(folder),
                                   progress)
        stats = write_index(folder, specs)
    if not stats.get("samples"):
        raise DataError(f"No usable rows in {paths} (dropped: {stats.get('dropped', {})}). "
                        "Fix: check the data format keys and data.max_length.")
    return _loaded(folder, cache_hit=False)


@contextlib.contextmanager
def _cache_errors(folder: Path, cache_dir: str | None) -> Iterator[None]:
    """The cache folder cannot be made or written (a file in its place, no permission, a full disk): one
    message naming it, instead of the OSError of whichever write hit it. Completed shards stay usable."""
    try:
        yield
    except OSError as e:
        if e.filename and not str(e.filename).startswith(str(folder.parents[1])):  # not the cache's own file
            raise
        where = f"data.cache_dir='{cache_dir}'" if cache_dir else "a temporary folder (data.cache_dir=null)"
        problem = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise DataError(f"Writing the tokenized data to {folder} ({where}) failed: {problem}"
                        f"{f' ({e.filename})' if e.filename else ''}. Fix: free space, or set data.cache_dir to a "
                        "folder this user may write on a disk with room; the shards already written are kept and "
                        "reused.") from None


def _loaded(folder: Path, cache_hit: bool) -> TokenizedDataset:
    shards, lengths, targets, stats = read_index(folder)
    stats["cache"] = str(folder)
    if cache_hit:
        stats["cache_hit"] = True
    return TokenizedDataset.from_shards(shards, lengths, targets, stats)


