"""Rows -> tokenized samples -> cache shards, in bounded memory.

The main process reads rows in order, cuts them into chunks of CHUNK_ROWS and hands them to worker processes
with at most two chunks per worker in flight; results come back in order as flat numpy arrays and are
appended to the current shard on disk. Memory is therefore bounded by the chunks in flight, whatever the
number of rows. Shards already complete (an interrupted run) are read past without tokenizing them again.

Per row: the row format (detected per file from its first row whose keys tell), the conversation, the
tokenized samples (a list: one conversation may become several samples), truncation, and the
`data.on_bad_row` policy, with every drop counted by reason.
"""

from __future__ import annotations

import os
import re
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from shardtune.batch import supervised_count, supervised_counts
from shardtune.config import DataConfig
from shardtune.data.cache import ShardSpec, ShardWriter
from shardtune.data.chat import (
    MaskOptions,
    TemplateMismatch,
    Tokenized,
    Weighted,
    conversation_samples,
    make_sample,
    weights_of,
)
from shardtune.data.formats import detect_format, to_conversation
from shardtune.data.media import check_video_places, place_media, row_has_media, row_has_videos
from shardtune.data.readers import Row
from shardtune.data.vision import image_processing, images_of, media_audit, processor_folder
from shardtune.errors import DataError, row_error

CHUNK_ROWS = 64  # rows per unit of work handed to a worker (what it holds, times two per worker, in flight)


@dataclass
class Chunk:
    """The samples of some rows, flat: what a worker sends back."""

    input_ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    num_targets: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)
    images: list[list[bytes]] | None = None  # the encoded pictures of each sample (None: no sample has one)
    weights: np.ndarray | None = None  # float32, aligned with labels (data.message_weight_key; None: off)


def tokenize_to_shards(rows: Iterator[Row], folder: Path, cfg: DataConfig, tokenizer: Any, template: str,
                       shard_rows: int, done: set[str], progress: bool) -> list[ShardSpec]:
    """Tokenize `rows` into shard folders under `folder`, skipping the shards named in `done`.
    Returns every shard of the source, in order."""
    plan = _ShardPlan(rows, shard_rows, done, cfg)
    nproc = cfg.num_proc or _default_nproc()
    bar = _Progress(progress)
    writer: ShardWriter | None = None
    try:
        for spec, chunk in _in_workers(plan.chunks(), nproc, (tokenizer, cfg, template)):
            if writer is None or writer.spec != spec:
                if writer is not None:
                    writer.close()
                writer = ShardWriter(folder, spec)
            writer.append(chunk.input_ids, chunk.labels, chunk.lengths, chunk.num_targets, chunk.stats, chunk.images,
                          chunk.weights)
            bar.update(chunk.stats["rows_read"])
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    return plan.specs


def _default_nproc() -> int:
    """Up to 8, by the CPUs this process may run on (a container's or a job's share, not the host's)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cpus)


class _ShardPlan:
    """Cuts the row stream into shards of `shard_rows` rows and each shard into chunks; tags every row with its
    file's format; yields only the chunks of shards not yet done. `specs` lists every shard seen."""

    def __init__(self, rows: Iterator[Row], shard_rows: int, done: set[str], cfg: DataConfig):
        self.rows, self.shard_rows, self.done = rows, shard_rows, done
        self.formats = FileFormats(cfg)
        self.specs: list[ShardSpec] = []

    def chunks(self) -> Iterator[tuple[ShardSpec, list[tuple[Row, str | None]]]]:
        start = 0
        while True:
            spec = ShardSpec(start, start + self.shard_rows)
            shard_rows = islice(self.rows, self.shard_rows)
            n = 0
            while chunk := list(islice(shard_rows, CHUNK_ROWS)):
                if n == 0:
                    self.specs.append(spec)
                n += len(chunk)
                tagged = [(row, self.formats.of(row)) for row in chunk]
                if spec.name not in self.done:
                    yield spec, tagged
            if n < self.shard_rows:
                return
            start += self.shard_rows


class FileFormats:
    """The row format of each data file: data.format, else detected from the file's first row whose keys tell
    (a row before it is left to the bad-row policy, like any row whose format cannot be told). `known` maps
    the files detected so far to their format (a streamed run's checkpoint keeps it)."""

    def __init__(self, cfg: DataConfig, known: dict[str, str] | None = None):
        self.cfg, self.known = cfg, dict(known or {})

    def of(self, row: Row) -> str | None:
        if self.cfg.format != "auto":
            return self.cfg.format
        if row.path not in self.known and row.error is None:
            try:
                self.known[row.path] = detect_format(row, self.cfg)
            except DataError:
                return None
        return self.known.get(row.path)


def _in_workers(chunks: Iterator[tuple[ShardSpec, list]], nproc: int, job: tuple) -> Iterator[tuple[ShardSpec, Chunk]]:
    """Tokenized chunks in order; with nproc > 1 and more than one chunk, in worker processes, at most two
    chunks per worker in flight."""
    head = list(islice(chunks, 2))
    if nproc <= 1 or len(head) < 2:
        _init_worker(*job)
        for spec, rows in chain(head, chunks):
            yield spec, _tokenize_chunk(rows)
        return
    with ProcessPoolExecutor(nproc, initializer=_init_worker, initargs=job) as pool:
        window: deque = deque()
        try:
            for spec, rows in chain(head, chunks):
                window.append((spec, pool.submit(_tokenize_chunk, rows)))
                if len(window) >= 2 * nproc:
                    spec, future = window.popleft()
                    yield spec, future.result()
            while window:
                spec, future = window.popleft()
                yield spec, future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class _Progress:
    """A tqdm bar of rows, shown once a source has more than a few thousand rows."""

    def __init__(self, enabled: bool):
        self.enabled, self.rows, self.bar = enabled, 0, None

    def update(self, n: int) -> None:
        self.rows += n
        if self.bar is None and self.enabled and self.rows >= 2000:
            self.bar = tqdm(desc="tokenizing", unit="rows", initial=self.rows, dynamic_ncols=True)
        elif self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------------------
# In the workers


_JOB: tuple[Any, DataConfig, str] | None = None


def _init_worker(tokenizer: Any, cfg: DataConfig, template: str) -> None:
    global _JOB
    _JOB = (tokenizer, cfg, template)


def _tokenize_chunk(rows: list[tuple[Row, str | None]]) -> Chunk:
    tokenizer, cfg, template = _JOB
    ids: list[list[int]] = []
    labels: list[list[int]] = []
    weights: list[list[float]] = []
    images: list[list[bytes]] = []
    dropped: Counter[str] = Counter()
    masks: dict[str, Counter] = {}  # mask audit per data file (chat.AUDIT_KEYS, tokens, trained_tokens)
    truncated = kept_rows = 0
    for row, fmt in rows:
        out = tokenize_row(row, fmt, tokenizer, cfg, template)
        dropped.update(out.dropped)
        truncated += out.truncated
        if out.audit is not None:
            masks.setdefault(row.path, Counter()).update(out.audit)
        ids += [tok.input_ids for tok in out.samples]
        labels += [tok.labels for tok in out.samples]
        weights += [weights_of(tok) for tok in out.samples if weights_of(tok) is not None]
        images += [list(images_of(tok)) for tok in out.samples]
        kept_rows += bool(out.samples)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat_labels = np.fromiter((t for x in labels for t in x), dtype=np.int32, count=int(lengths.sum()))
    stats = {"rows_read": len(rows), "rows_kept": kept_rows, "truncated": truncated, "dropped": dict(dropped),
             "mask": {path: dict(counts) for path, counts in masks.items()}}
    flat_weights = (np.fromiter((w for x in weights for w in x), dtype=np.float32, count=int(lengths.sum()))
                    if cfg.message_weight_key else None)
    return Chunk(np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(lengths.sum())), flat_labels,
                 lengths, supervised_counts(flat_labels, np.concatenate([[0], np.cumsum(lengths)])), stats,
                 images if any(images) else None, flat_weights)


@dataclass
class RowResult:
    """What one row gives: its samples as trained (truncated where the policy says), the drops by reason, the
    samples cut by truncation, and its mask-audit counters (None for a row that could not be read)."""

    samples: list[Tokenized | Weighted]
    dropped: Counter
    truncated: int = 0
    audit: Counter | None = None


def tokenize_row(row: Row, fmt: str | None, tokenizer: Any, cfg: DataConfig, template: str) -> RowResult:
    """One row -> its samples, after truncation and the bad-row policy (the one rule for both the cached and
    the streamed data path). Raises the row's error when the policy says stop."""
    try:
        samples, audit = row_samples(row, fmt, tokenizer, cfg, template)
    except DataError as e:
        return RowResult([], Counter({_bad_row_reason(row, e, cfg): 1}))
    out = RowResult([], Counter(), 0, Counter(audit))
    if not samples:
        out.dropped["no_trained_tokens"] += 1
    for tok in samples:
        tok, reason = truncate(tok, cfg.max_length, cfg.truncation, row)
        if reason not in (None, "truncated"):
            out.dropped[reason] += 1
            continue
        out.truncated += reason == "truncated"
        out.audit.update(tokens=len(tok.labels), trained_tokens=supervised_count(np.asarray(tok.labels)))
        if weights_of(tok) is not None:  # the weights of the supervised tokens (a sample's first token is none)
            out.audit["trained_weight"] += float(np.sum(weights_of(tok)[1:], dtype=np.float64))
        out.samples.append(tok)
    return out


def row_samples(row: Row, fmt: str | None, tokenizer: Any, cfg: DataConfig, template: str
                ) -> tuple[list[Tokenized], Counter]:
    """One row -> its samples (none when it has no turn to train; several with thinking_history=per_turn)
    and its mask-audit counters."""
    if row.error is not None:
        raise DataError(row.error)
    conv = to_conversation(row, fmt or detect_format(row, cfg), cfg)
    messages, media, vision = conv.messages, [], None
    if processor_folder(tokenizer) is not None:  # to a text model '<video>' is text (an HTML tag, say)
        check_video_places(row, messages, cfg.video_key)
    if row_has_media(row, messages, cfg.image_key, cfg.video_key):
        vision = image_processing(tokenizer, template)
        if vision is None:
            raise row_error(row.path, row.index, cfg.image_key,
                            "the row has images or videos, and the model folder has no image processor "
                            "(preprocessor_config.json): a text model cannot see them",
                            "train a vision-language model folder, or drop the images and videos columns")
        if row_has_videos(row, messages, cfg.video_key) and vision.video_marker is None:
            raise row_error(row.path, row.index, cfg.video_key, vision.video_refusal,
                            "train a Qwen2-VL or Qwen2.5-VL checkpoint, give the frames as images, drop the "
                            "videos, or set data.on_bad_row=skip")
        messages, media = place_media(row, messages, cfg.image_key, cfg.video_key, vision.placed,
                                      vision.video_placed)
        messages = marker_parts(messages, [m for m in (vision.placed, vision.video_placed) if m])
    samples, audit = conversation_samples(messages, tokenizer, conv.tools, chat_template=template,
                                          options=MaskOptions.from_config(cfg), weight_key=cfg.message_weight_key,
                                          **{**cfg.apply_chat_template_kwargs, **conv.template_kwargs})
    if vision is not None:
        samples = [vision.expand(s.input_ids, s.labels, media, row, weights_of(s)) for s in samples]
        audit.update(media_audit(samples, vision))
    return samples, audit


def marker_parts(messages: list[dict[str, Any]], markers: list[str]) -> list[dict[str, Any]]:
    """Each message holding image (or video) markers with its content as text parts: the texts between the
    pictures and each marker a part of its own, as an image part renders it. A template treats each part of a
    list on its own (Gemma 3 trims every text part: `Look: ` + image + ` what?` is `Look:<start_of_image>what?`),
    so the pictures must reach it as parts, as the family's processor chat (and verl's split of `<image>`) gives
    them."""
    split = re.compile("(" + "|".join(map(re.escape, markers)) + ")")
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str) and any(marker in content for marker in markers):
            content = [{"type": "text", "text": piece} for piece in split.split(content) if piece]
        out.append({**m, "content": content})
    return out


def _bad_row_reason(row: Row, e: DataError, cfg: DataConfig) -> str:
    """The reason to count a bad row under, or the error (naming file and row) when the policy says stop."""
    if isinstance(e, TemplateMismatch):
        if cfg.ignore_input_ids_mismatch:
            return "template_mismatch"
        raise DataError(f"{row.path}, row {row.index}: {e}") from None
    if cfg.on_bad_row == "skip":
        return "bad_row"
    if str(e).startswith(row.path):
        raise e
    raise DataError(f"{row.path}, row {row.index}: {e}") from None


def truncate(tok: Tokenized, max_length: int, policy: str, row: Row) -> tuple[Tokenized, str | None]:
    """Apply the truncation policy. Returns the sample and None, "truncated" or a reason to drop it."""
    n = len(tok.input_ids)
    reason = None
    if n > max_length:
        if policy == "error":
            raise DataError(
                f"{row.path}, row {row.index}: the conversation is {n} tokens, longer than data.max_length="
                f"{max_length}. Fix: raise data.max_length, or set data.truncation to right, left or drop.")
        if policy == "drop":
            return tok, "too_long"
        if images_of(tok):  # cutting would leave a picture with part of its tokens, or tokens without their picture
            return tok, "too_long_with_images"
        keep = slice(0, max_length) if policy == "right" else slice(n - max_length, n)
        weights = weights_of(tok)
        tok = make_sample(tok.input_ids[keep], tok.labels[keep], None if weights is None else weights[keep])
        reason = "truncated"
    if supervised_count(np.asarray(tok.labels)) == 0:
        return tok, "no_trained_tokens"
    return tok, reason
