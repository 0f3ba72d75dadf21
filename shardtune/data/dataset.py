"""Files -> rows -> conversations -> tokens, truncated and cached on disk.

`build_dataset` returns a `TokenizedDataset`: flat int32 arrays of input ids and labels plus offsets,
memory-mapped from a cache folder keyed by a hash of (files, tokenizer, template, data config), so a second
run skips tokenization. Bad rows follow `data.on_bad_row`; dropped rows are counted by reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shardtune.config import DataConfig
from shardtune.data.chat import (
    IGNORE_INDEX,
    MaskOptions,
    TemplateMismatch,
    Tokenized,
    conversation_samples,
    resolve_chat_template,
)
from shardtune.data.formats import detect_format, to_conversation
from shardtune.data.readers import Row, expand_paths, files_fingerprint, read_rows
from shardtune.errors import DataError

CACHE_VERSION = 2  # 2: loss masks from sentinel renders (data.append_eos, train_on_turns, thinking_history)
_CHUNK = 256


@dataclass
class TokenizedDataset:
    input_ids: np.ndarray  # int32, all samples concatenated
    labels: np.ndarray  # int32, aligned with input_ids, IGNORE_INDEX where not trained
    offsets: np.ndarray  # int64, len = n + 1
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[a:b], self.labels[a:b]

    def __post_init__(self) -> None:
        self.lengths = np.diff(self.offsets)  # read on every step by the batch planner: compute once

    def num_targets(self, indices: np.ndarray) -> int:
        """Supervised next-token targets of these samples (labels after each sample's first token)."""
        return int(sum(int((self.labels[self.offsets[i] + 1 : self.offsets[i + 1]] != IGNORE_INDEX).sum())
                       for i in indices))


def build_dataset(files: list[str], cfg: DataConfig, tokenizer: Any, max_samples: int = -1,
                  progress: bool = True) -> TokenizedDataset:
    paths = expand_paths(files)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("The tokenizer has no fast (Rust) version; shardtune needs its character offsets to "
                        "place the loss mask. Fix: use a tokenizer folder with tokenizer.json.")
    template = resolve_chat_template(cfg.chat_template, tokenizer)
    cache = _cache_path(paths, cfg, tokenizer, template, max_samples)
    if cache is not None and (cache / "meta.json").is_file():
        return _load(cache)
    samples, stats = _tokenize_all(paths, cfg, tokenizer, template, max_samples, progress)
    if not samples:
        raise DataError(f"No usable rows in {paths} (dropped: {dict(stats['dropped'])}). "
                        "Fix: check the data format keys and data.max_length.")
    ds = _pack(samples, stats)
    if cache is not None:
        _save(ds, cache)
        ds.stats["cache"] = str(cache)
    return ds


# ----------------------------------------------------------------------------------------------------------
# Tokenization


def _tokenize_all(paths, cfg, tokenizer, template, max_samples, progress):
    rows = list(read_rows(paths, max_samples))
    formats = _formats_per_file(rows, cfg)
    jobs = [rows[i : i + _CHUNK] for i in range(0, len(rows), _CHUNK)]
    nproc = cfg.num_proc or min(8, os.cpu_count() or 1)
    bar = _progress(len(rows), progress)
    samples: list[Tokenized] = []
    dropped: Counter[str] = Counter()
    truncated = 0
    masks: dict[str, Counter] = {}

    def consume(result):
        nonlocal truncated
        got, drops, n_trunc, mask = result
        samples.extend(got)
        dropped.update(drops)
        truncated += n_trunc
        for path, counts in mask.items():
            masks.setdefault(path, Counter()).update(counts)
        if bar is not None:
            bar.update(sum(c["rows"] for c in mask.values()) + drops["bad_row"] + drops["template_mismatch"])

    if nproc > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(nproc, initializer=_init_worker, initargs=(tokenizer,)) as pool:
            for result in pool.map(_tokenize_chunk, jobs, [formats] * len(jobs), [cfg] * len(jobs),
                                   [template] * len(jobs)):
                consume(result)
    else:
        _init_worker(tokenizer)
        for job in jobs:
            consume(_tokenize_chunk(job, formats, cfg, template))
    if bar is not None:
        bar.close()
    stats = {"rows_read": len(rows), "rows_kept": len(samples), "dropped": dict(dropped), "truncated": truncated,
             "mask": {path: dict(c) for path, c in masks.items()}}  # per file, see chat.AUDIT_KEYS
    return samples, stats


def _formats_per_file(rows: list[Row], cfg: DataConfig) -> dict[str, str]:
    """Each file's format, from its first row whose keys tell (a malformed first row is handled by the
    bad-row policy like any other row, in the tokenization loop)."""
    out: dict[str, str] = {}
    for row in rows:
        if row.path not in out:
            if cfg.format != "auto":
                out[row.path] = cfg.format
                continue
            try:
                out[row.path] = detect_format(row, cfg)
            except DataError:
                pass
    return out


def _progress(total: int, enabled: bool):
    if not enabled or total < 2000:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="tokenizing", unit="rows", dynamic_ncols=True)


_TOKENIZER = None


def _init_worker(tokenizer: Any) -> None:
    global _TOKENIZER
    _TOKENIZER = tokenizer


def _tokenize_chunk(rows: list[Row], formats: dict[str, str], cfg: DataConfig, template: str):
    samples, drops, n_trunc, mask = [], Counter(), 0, {}
    for row in rows:
        try:
            conv = to_conversation(row, formats.get(row.path) or detect_format(row, cfg), cfg)
            got, audit = conversation_samples(conv.messages, _TOKENIZER, conv.tools, chat_template=template,
                                              options=MaskOptions.from_config(cfg),
                                              **{**cfg.apply_chat_template_kwargs, **conv.template_kwargs})
        except TemplateMismatch as e:
            if cfg.ignore_input_ids_mismatch:
                drops["template_mismatch"] += 1
                continue
            raise DataError(f"{row.path}, row {row.index}: {e}") from None
        except DataError as e:
            if cfg.on_bad_row == "skip":
                drops["bad_row"] += 1
                continue
            if str(e).startswith(row.path):
                raise
            raise DataError(f"{row.path}, row {row.index}: {e}") from None
        counts = mask.setdefault(row.path, Counter())
        counts.update(audit)
        if not got:
            drops["no_trained_tokens"] += 1
        for tok in got:
            tok, reason = truncate(tok, cfg.max_length, cfg.truncation, row)
            if reason == "truncated":
                n_trunc += 1
            elif reason is not None:
                drops[reason] += 1
                continue
            counts.update(tokens=len(tok.labels), trained_tokens=sum(x != IGNORE_INDEX for x in tok.labels[1:]))
            samples.append(tok)
    return samples, drops, n_trunc, mask


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
        keep = slice(0, max_length) if policy == "right" else slice(n - max_length, n)
        tok = Tokenized(tok.input_ids[keep], tok.labels[keep])
        reason = "truncated"
    # position 0 has nothing before it to predict it from, so it never counts as trained
    if all(label == IGNORE_INDEX for label in tok.labels[1:]):
        return tok, "no_trained_tokens"
    return tok, reason


# ----------------------------------------------------------------------------------------------------------
# Packing into flat arrays and the on-disk cache


def _pack(samples: list[Tokenized], stats: dict[str, Any]) -> TokenizedDataset:
    lengths = np.fromiter((len(s.input_ids) for s in samples), dtype=np.int64, count=len(samples))
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter((t for s in samples for t in s.input_ids), dtype=np.int32, count=int(offsets[-1]))
    labels = np.fromiter((t for s in samples for t in s.labels), dtype=np.int32, count=int(offsets[-1]))
    return TokenizedDataset(ids, labels, offsets, stats)


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((text + repr(sorted(tokenizer.special_tokens_map.items()))).encode()).hexdigest()


def _cache_path(paths, cfg: DataConfig, tokenizer, template: str, max_samples: int) -> Path | None:
    if not cfg.cache_dir:
        return None
    relevant = {k: v for k, v in asdict(cfg).items()
                if k not in ("train_files", "val_files", "train_max_samples", "val_max_samples", "train_batch_size",
                             "micro_batch_size_per_gpu", "shuffle", "drop_last", "cache_dir", "num_proc")}
    key = json.dumps({"v": CACHE_VERSION, "files": files_fingerprint(paths), "tokenizer": _tokenizer_fingerprint(tokenizer),
                      "template": template, "data": relevant, "max_samples": max_samples}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return Path(os.path.expanduser(cfg.cache_dir)) / "tokenized" / digest


def _save(ds: TokenizedDataset, cache: Path) -> None:
    """Write to a temporary folder and rename it into place, so a crash never leaves a half cache."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tmp-"))
    try:
        np.save(tmp / "input_ids.npy", ds.input_ids)
        np.save(tmp / "labels.npy", ds.labels)
        np.save(tmp / "offsets.npy", ds.offsets)
        (tmp / "meta.json").write_text(json.dumps(ds.stats))
        os.replace(tmp, cache)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (cache / "meta.json").is_file():  # another process may have won the race; else re-raise
            raise


def _load(cache: Path) -> TokenizedDataset:
    stats = json.loads((cache / "meta.json").read_text())
    stats["cache"] = str(cache)
    stats["cache_hit"] = True
    arrays = [np.load(cache / f"{name}.npy", mmap_mode="r") for name in ("input_ids", "labels", "offsets")]
    return TokenizedDataset(*arrays, stats=stats)
