"""Read rows from parquet, jsonl, json and Hugging Face `save_to_disk` folders.

Rows come back as plain Python dicts together with their origin (file, 0-based row), so every later
error can name the file and the row.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardtune import remote
from shardtune.errors import DataError

SUFFIXES = (".parquet", ".jsonl", ".json")


@dataclass(frozen=True)
class Row:
    path: str
    index: int  # 0-based row within its file
    data: dict[str, Any]


def expand_paths(spec: str | list[str]) -> list[str]:
    """One path, a list of paths, or globs -> the existing data files/folders, in a stable order."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for s in specs:
        if remote.is_url(s):  # s3://bucket/sft/*.parquet, hdfs://..., file://...
            out += remote.expand(s)
            continue
        s = os.path.expanduser(s)
        if any(ch in s for ch in "*?["):
            matches = sorted(glob.glob(s, recursive=True))
            if not matches:
                raise DataError(f"No file matches the pattern '{s}'. Fix: check data.train_files/data.val_files.")
            out += matches
        elif os.path.exists(s):
            out.append(s)
        else:
            raise DataError(f"Data file '{s}' does not exist. Fix: check the path in data.train_files/data.val_files.")
    return out


def read_rows(paths: list[str], max_rows: int = -1) -> Iterator[Row]:
    """Yield rows of all files in order; stop after `max_rows` rows (-1 = all)."""
    n = 0
    for path in paths:
        for row in _read_one(path):
            if 0 <= max_rows <= n:
                return
            yield row
            n += 1


def _read_one(path: str) -> Iterator[Row]:
    if remote.is_url(path):
        yield from _read_remote(path)
        return
    if os.path.isdir(path):
        yield from _read_hf_folder(path)
        return
    if os.path.getsize(path) == 0:
        raise DataError(f"Data file '{path}' is empty. Fix: point data.train_files at a file with rows.")
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path)
    elif suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    else:
        raise DataError(f"Data file '{path}' has an unsupported type. Fix: use one of {', '.join(SUFFIXES)} "
                        "or a folder written by datasets' save_to_disk.")


def _read_remote(url: str) -> Iterator[Row]:
    """Rows of a remote file, read from a temporary local copy; rows and errors name the URL."""
    with remote.local_copy(url) as local:
        try:
            for row in _read_one(local):
                yield Row(url, row.index, row.data)
        except DataError as e:
            raise DataError(str(e).replace(local, url)) from None


def _read_parquet(path: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        i = 0
        for batch in pf.iter_batches(batch_size=4096):
            for rec in batch.to_pylist():
                yield Row(path, i, rec)
                i += 1
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"Data file '{path}' cannot be read as parquet ({type(e).__name__}: {e}). "
                        "Fix: rewrite the file, e.g. with pandas.DataFrame.to_parquet.") from None


def _read_jsonl(path: str) -> Iterator[Row]:
    with open(path, encoding="utf-8") as f:
        i = 0
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {line_no}: invalid JSON ({e.msg}). Fix: one JSON object per line.") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}, line {line_no}: expected a JSON object, got {type(rec).__name__}.")
            yield Row(path, i, rec)
            i += 1


def _read_json(path: str) -> Iterator[Row]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} ({e.msg}). "
                        "Fix: a JSON list of objects (or use .jsonl for one object per line).") from None
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()) and data:
        lengths = {len(v) for v in data.values()}  # columnar {"col": [...]} layout
        if len(lengths) == 1:
            keys = list(data)
            data = [dict(zip(keys, vals)) for vals in zip(*data.values())]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of row objects, got {type(data).__name__}.")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(f"{path}, row {i}: expected a JSON object, got {type(rec).__name__}.")
        yield Row(path, i, rec)


def _read_hf_folder(path: str) -> Iterator[Row]:
    """A `datasets.Dataset.save_to_disk` folder: arrow stream files listed in state.json."""
    import pyarrow as pa

    state_file = Path(path) / "state.json"
    if not state_file.is_file():
        files = sorted(Path(path).glob("*.parquet")) + sorted(Path(path).glob("*.jsonl"))
        if not files:
            raise DataError(f"Data folder '{path}' is neither a datasets save_to_disk folder (no state.json) "
                            "nor a folder of parquet/jsonl files.")
        for f in files:
            yield from _read_one(str(f))
        return
    state = json.loads(state_file.read_text())
    i = 0
    for entry in state.get("_data_files", []):
        arrow_path = Path(path) / entry["filename"]
        try:
            with pa.memory_map(str(arrow_path)) as source:
                reader = pa.ipc.open_stream(source)
                for batch in reader:
                    for rec in batch.to_pylist():
                        yield Row(str(arrow_path), i, rec)
                        i += 1
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"Data file '{arrow_path}' cannot be read ({e}).") from None


def files_fingerprint(paths: list[str]) -> list[tuple[str, int, int]]:
    """(absolute path, size, mtime in ns) of every file, for cache keys."""
    out = []
    for p in paths:
        if remote.is_url(p):  # the store's size and ETag / modification time
            out.append(remote.fingerprint(p))
            continue
        files = [Path(p)] if os.path.isfile(p) else sorted(x for x in Path(p).rglob("*") if x.is_file())
        for f in files:
            st = f.stat()
            out.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
    return out
