"""The on-disk cache of one tokenized source: shards written one at a time, an index written last.

    <cache_dir>/tokenized/<key>/
        shard-<first row>-<end row>/     one per SHARD_ROWS rows read, renamed into place when complete
            input_ids.bin, labels.bin    int32, the shard's samples concatenated (raw, memory-mapped)
            offsets.npy                  int64, n + 1 sample boundaries within the shard
            num_targets.npy              int64, supervised next-token targets per sample
            stats.json                   rows read/kept, drops by reason, truncations, mask audit counters
            images.bin, image_offsets.npy  only when a sample has pictures: their encoded bytes concatenated,
            sample_images.npy            and n_images + 1 byte boundaries, n + 1 image boundaries per sample
            weights.bin                  only with data.message_weight_key: float32, each token's loss weight
        lengths.npy, num_targets.npy     int64 per sample over all shards (read every step by the planner)
        meta.json                        the index: shards in order and the totals; written last

`<key>` hashes everything that decides the samples (files' path/size/mtime, tokenizer, template, data
settings, row limit, shard size). A shard folder is complete exactly when it exists (it is written under a
temporary name and renamed), so an interrupted tokenization resumes at the first missing shard, and the
cache is complete exactly when meta.json exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from shardtune.config import DataConfig
from shardtune.data import vision
from shardtune.data.readers import files_fingerprint

# 2: sharded cache; 3: loss masks from sentinel renders (append_eos, ...); 4: closed_by_eos audited; 5: weights.bin;
# 6: picture markers placed as separate text parts, without their whitespace (Gemma 3/4 picture samples changed);
# 7: videos (a <video> placeholder without its video, once cached as text, is now a bad row)
CACHE_VERSION = 7
SHARD_ROWS = 16384  # rows read per shard: what an interrupted tokenization can lose
# data keys that do not change the tokenized samples (batching, sampling, where the cache lives)
_NOT_IN_KEY = ("train_files", "val_files", "train_max_samples", "val_max_samples", "train_batch_size",
               "micro_batch_size_per_gpu", "use_dynamic_bsz", "max_token_len_per_gpu", "shuffle", "drop_last",
               "cache_dir", "num_proc", "prefetch_steps", "mixture_unit")
_HOST = socket.gethostname().replace("-", "_")  # names temporary shard folders: .tmp-<host>-<pid>-<shard>


class Shard(NamedTuple):
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE_INDEX where not trained
    offsets: np.ndarray  # int64, n + 1 sample boundaries into the two arrays above
    images: np.ndarray | None = None  # uint8, the encoded pictures concatenated (memory-mapped)
    image_offsets: np.ndarray | None = None  # int64, n_images + 1 byte boundaries into `images`
    sample_images: np.ndarray | None = None  # int64, n + 1 boundaries: sample i has images [a, b)
    weights: np.ndarray | None = None  # float32, aligned with labels (data.message_weight_key; None: off)

    def images_of(self, j: int) -> list[bytes]:
        """The encoded pictures of the shard's sample j (none for a text shard)."""
        if self.sample_images is None:
            return []
        a, b = int(self.sample_images[j]), int(self.sample_images[j + 1])
        return [bytes(self.images[self.image_offsets[k]:self.image_offsets[k + 1]]) for k in range(a, b)]


@dataclass(frozen=True)
class ShardSpec:
    start: int  # first row (0-based, over the source's files in order)
    stop: int  # one past the last row this shard may hold

    @property
    def name(self) -> str:
        return f"shard-{self.start:012d}-{self.stop:012d}"


def cache_key(paths: list[str], cfg: DataConfig, tokenizer_fingerprint: str, template: str, max_samples: int,
              shard_rows: int) -> str:
    relevant = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_KEY}
    key = json.dumps({"v": CACHE_VERSION, "files": files_fingerprint(paths), "tokenizer": tokenizer_fingerprint,
                      "template": template, "data": relevant, "max_samples": max_samples, "shard_rows": shard_rows},
                     sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    text += repr(sorted(tokenizer.special_tokens_map.items())) + vision.fingerprint(tokenizer)
    return hashlib.sha256(text.encode()).hexdigest()


def is_complete(folder: Path) -> bool:
    return (folder / "meta.json").is_file()


def complete_shards(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("shard-*") if p.is_dir()} if folder.is_dir() else set()


def remove_stale_temporaries(folder: Path) -> None:
    """Drop half-written shards of processes on this host that no longer run (a killed tokenization)."""
    for tmp in folder.glob(".tmp-*"):
        parts = tmp.name.split("-")
        if len(parts) >= 4 and parts[1] == _HOST and parts[2].isdigit() and not _alive(int(parts[2])):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def add_stats(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Sum counters (numbers, and dicts of numbers such as drops by reason) into `total`."""
    for k, v in part.items():
        if isinstance(v, dict):
            add_stats(total.setdefault(k, {}), v)
        else:
            total[k] = total.get(k, 0) + v
    return total


class ShardWriter:
    """One shard, appended chunk by chunk (token arrays straight to disk), renamed into place by `close`."""

    def __init__(self, folder: Path, spec: ShardSpec):
        self.spec, self.final = spec, folder / spec.name
        self.tmp = folder / f".tmp-{_HOST}-{os.getpid()}-{spec.name}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.ids = open(self.tmp / "input_ids.bin", "wb")  # closed by close() or abort()
        self.labels = open(self.tmp / "labels.bin", "wb")
        self.weights: Any = None  # opened at the first weighted chunk
        self.lengths: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.stats: dict[str, Any] = {}
        self.images: Any = None  # opened at the first picture
        self.image_sizes: list[int] = []
        self.images_per_sample: list[int] = []

    def append(self, ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray, targets: np.ndarray,
               stats: dict[str, Any], images: list[list[bytes]] | None = None,
               weights: np.ndarray | None = None) -> None:
        self.ids.write(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
        self.labels.write(np.ascontiguousarray(labels, dtype=np.int32).tobytes())
        if weights is not None:  # every chunk of a source has them, or none does (one data config)
            if self.weights is None:
                self.weights = open(self.tmp / "weights.bin", "wb")  # closed by close() or abort()
            self.weights.write(np.ascontiguousarray(weights, dtype=np.float32).tobytes())
        self.lengths.append(np.asarray(lengths, dtype=np.int64))
        self.targets.append(np.asarray(targets, dtype=np.int64))
        add_stats(self.stats, stats)
        for pictures in images or [[] for _ in range(len(lengths))]:
            if pictures and self.images is None:
                self.images = open(self.tmp / "images.bin", "wb")  # closed by close() or abort()
            for picture in pictures:
                self.images.write(picture)
                self.image_sizes.append(len(picture))
            self.images_per_sample.append(len(pictures))

    def _close_images(self) -> None:
        if self.images is None:
            return
        self.images.close()
        np.save(self.tmp / "image_offsets.npy", np.concatenate([[0], np.cumsum(self.image_sizes, dtype=np.int64)]))
        np.save(self.tmp / "sample_images.npy",
                np.concatenate([[0], np.cumsum(self.images_per_sample, dtype=np.int64)]))

    def close(self) -> None:
        self.ids.close()
        self.labels.close()
        if self.weights is not None:
            self.weights.close()
        self._close_images()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(self.tmp / "offsets.npy", offsets)
        np.save(self.tmp / "num_targets.npy", np.concatenate(self.targets) if self.targets else np.zeros(0, np.int64))
        (self.tmp / "stats.json").write_text(json.dumps(self.stats))
        try:
            os.rename(self.tmp, self.final)
        except OSError:
            if not self.final.is_dir():  # else another process completed the same shard first: keep theirs
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)

    def abort(self) -> None:
        self.ids.close()
        self.labels.close()
        if self.weights is not None:
            self.weights.close()
        if self.images is not None:
            self.images.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_index(folder: Path, specs: list[ShardSpec]) -> dict[str, Any]:
    """Per-sample arrays over all shards, then meta.json (last: its presence marks the cache complete).
    Returns the totals; writes nothing when no shard holds a sample. Memory: the arrays are filled shard by
    shard through a memory map."""
    table, stats = [], {}
    for spec in specs:
        offsets = np.load(folder / spec.name / "offsets.npy", mmap_mode="r")
        table.append({"name": spec.name, "samples": len(offsets) - 1, "tokens": int(offsets[-1])})
        add_stats(stats, json.loads((folder / spec.name / "stats.json").read_text()))
    n = sum(t["samples"] for t in table)
    if n == 0:
        return {**stats, "samples": 0}
    lengths = np.lib.format.open_memmap(folder / "lengths.npy", mode="w+", dtype=np.int64, shape=(n,))
    targets = np.lib.format.open_memmap(folder / "num_targets.npy", mode="w+", dtype=np.int64, shape=(n,))
    at = 0
    for t in table:
        shard = folder / t["name"]
        lengths[at : at + t["samples"]] = np.diff(np.load(shard / "offsets.npy"))
        targets[at : at + t["samples"]] = np.load(shard / "num_targets.npy")
        at += t["samples"]
    stats.update(samples=n, tokens=int(lengths.sum()), supervised_tokens=int(targets.sum()), shards=len(table))
    lengths.flush()
    targets.flush()
    del lengths, targets
    tmp = folder / f".meta-{os.getpid()}.json"
    tmp.write_text(json.dumps({"version": CACHE_VERSION, "shards": table, "stats": stats}))
    os.replace(tmp, folder / "meta.json")
    return stats


def read_index(folder: Path) -> tuple[list[Shard], np.ndarray, np.ndarray, dict[str, Any]]:
    """The memory-mapped shards (those with samples), per-sample lengths and target counts, and the stats."""
    meta = json.loads((folder / "meta.json").read_text())
    shards = []
    for t in meta["shards"]:
        if t["samples"] == 0:  # every row of the shard dropped: nothing to map
            continue
        shard = folder / t["name"]
        pictures = ((np.memmap(shard / "images.bin", dtype=np.uint8, mode="r"),
                     np.load(shard / "image_offsets.npy"), np.load(shard / "sample_images.npy"))
                    if (shard / "images.bin").is_file() else (None, None, None))
        weights = (np.memmap(shard / "weights.bin", dtype=np.float32, mode="r")
                   if (shard / "weights.bin").is_file() else None)
        shards.append(Shard(np.memmap(shard / "input_ids.bin", dtype=np.int32, mode="r"),
                            np.memmap(shard / "labels.bin", dtype=np.int32, mode="r"),
                            np.load(shard / "offsets.npy", mmap_mode="r"), *pictures, weights))
    lengths = np.load(folder / "lengths.npy", mmap_mode="r")
    targets = np.load(folder / "num_targets.npy", mmap_mode="r")
    return shards, lengths, targets, meta["stats"]
