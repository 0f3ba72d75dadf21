"""Read rows from parquet, jsonl, json and Hugging Face `save_to_disk` folders, incrementally.

Rows come back one at a time as plain Python dicts together with their origin (file, 0-based row), so every
later error can name the file and the row, and memory stays bounded whatever the file size: parquet and
Arrow files are read in record batches, jsonl line by line, a .json list element by element; remote files
(fsspec URLs) are read the same way, block by block, never copied whole to local disk. Every file is opened
through `open_file` and every path spec expanded by `expand_paths`: the two places that know about storage.

A file can be read from a row on (`Start`) and rows read again by reference (`reread`), which is how a
streamed run resumes: parquet by row group, jsonl by seeking to the byte offset of the row's line (each jsonl
`Row` carries it); json lists and Arrow streams have no index to seek by and are read from their start,
skipping the rows before.

A row that cannot be read (bytes that are not UTF-8, invalid JSON, not an object) raises a `DataError`
naming the file, the line and the fix; with `skip_bad=True` it comes back as a `Row` whose `error` holds
that message instead, so the caller's `data.on_bad_row` policy can count it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shardtune import remote
from shardtune.data.json_rows import NOT_UTF8_FIX, read_json
from shardtune.errors import DataError, ShardtuneError

_BATCH_ROWS = 1024  # rows per Arrow record batch turned into Python dicts at a time


@dataclass(frozen=True)
class Row:
    path: str
    index: int  # 0-based row within its file
    data: dict[str, Any]
    error: str | None = None  # an unreadable row (only with skip_bad=True): the message naming file, line, fix
    seek: tuple[int, int] | None = None  # jsonl: (byte offset, line number) where the row's line starts


@dataclass(frozen=True)
class Start:
    """Where to start reading a file: at its 0-based row `row`; for jsonl also the byte offset and the line
    number of that row's line (a `Row.seek`), so the reader seeks there instead of reading the rows before."""

    row: int = 0
    offset: int = 0
    line: int = 1

    @classmethod
    def at(cls, row: Row) -> Start:
        """The place of a row already read: seeking there reads it again."""
        return cls(row.index, *row.seek) if row.seek else cls(row.index)


def _bad(path: str, index: int, message: str, skip_bad: bool) -> Row:
    if not skip_bad:
        raise DataError(message)
    return Row(path, index, {}, message)


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
            check_links(matches, f"The pattern '{s}'")
            out += matches
        elif os.path.exists(s):
            out.append(s)
        else:
            check_links([s], "data.train_files/data.val_files")
            raise DataError(f"Data file '{s}' does not exist. Fix: check the path in data.train_files/data.val_files.")
    return out


def data_files(spec: str | list[str]) -> list[str]:
    """`expand_paths`, with local folders replaced by the data files they hold, in the order they are read."""
    return [f for p in expand_paths(spec) for f in (folder_files(p) if _is_local_dir(p) else [p])]


def open_file(path: str) -> IO[bytes]:
    """The binary file behind `path`, local or an fsspec URL (every reader opens files through here)."""
    if remote.is_url(path):
        return remote.open_data(path)
    try:
        return open(path, "rb")
    except OSError as e:  # no read permission, a folder where a file was listed, ...
        raise unreadable(path, e) from None


def unreadable(path: str, e: OSError) -> DataError:
    return DataError(f"Data file '{path}' cannot be read ({e.strerror or e}). Fix: check that the file exists and "
                     "that this user may read it (ls -l; chmod/chown).")


def read_rows(paths: list[str], max_rows: int = -1, skip_bad: bool = False) -> Iterator[Row]:
    """Yield rows of all files in order; stop after `max_rows` rows (-1 = all)."""
    n = 0
    for path in paths:
        for row in read_file(path, skip_bad):
            if 0 <= max_rows <= n:
                return
            yield row
            n += 1


def read_file(path: str, skip_bad: bool = False, start: Start = Start()) -> Iterator[Row]:
    """The rows of one file (or local folder) from `start.row` on."""
    if _is_local_dir(path):
        yield from _skip_to(start.row, _read_folder(path, skip_bad))
        return
    if (remote.size(path) if remote.is_url(path) else _local_size(path)) == 0:
        raise DataError(f"Data file '{path}' is empty. Fix: point data.train_files at a file with rows.")
    suffix = PurePosixPath(path).suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path, start.row)
    elif suffix == ".jsonl":
        yield from _read_jsonl(path, skip_bad, start)
    elif suffix == ".json":
        with open_file(path) as raw:
            yield from _skip_to(start.row, read_json(path, raw, skip_bad, Row, _bad))
    elif suffix == ".arrow":  # a datasets save_to_disk shard (an Arrow stream)
        yield from _read_arrow_stream(path, start.row)
    else:
        raise DataError(f"Data file '{path}' has an unsupported type. Fix: use one of {', '.join(remote.DATA_SUFFIXES)} "
                        "or a folder written by datasets' save_to_disk.")


def reread(path: str, places: list[Start], skip_bad: bool = False) -> dict[int, Row]:
    """The rows at these places of one file, by row index, read again without reading the whole file where
    the format allows: jsonl by seeking to each line, parquet by reading only their row groups."""
    places = sorted({p.row: p for p in places}.values(), key=lambda p: p.row)  # each row once, in file order
    suffix = PurePosixPath(path).suffix.lower()
    if suffix == ".jsonl" and all(p.offset or not p.row for p in places):
        with open_file(path) as f:
            out = {}
            for p in places:
                f.seek(p.offset)
                out[p.row] = _jsonl_row(path, p.row, p.line, p.offset, f.readline(), skip_bad)
            return out
    if suffix == ".parquet":
        return _reread_parquet(path, sorted({p.row for p in places}))
    wanted, out = {p.row for p in places}, {}
    for row in read_file(path, skip_bad, Start(min(wanted, default=0))):
        if row.index in wanted:
            out[row.index] = row
            if len(out) == len(wanted):
                break
    return out


def _local_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError as e:
        raise unreadable(path, e) from None


def _is_local_dir(path: str) -> bool:
    return not remote.is_url(path) and os.path.isdir(path)


def _skip_to(first: int, rows: Iterator[Row]) -> Iterator[Row]:
    return (row for row in rows if row.index >= first)


def _read_parquet(path: str, first: int = 0) -> Iterator[Row]:
    """Rows from `first` on: reading starts at the row group that holds it."""
    with open_file(path) as f, _parquet_errors(path):
        pf = pq.ParquetFile(f)
        starts = _group_starts(pf)
        group = max(int(np.searchsorted(starts, first, side="right")) - 1, 0)
        i = int(starts[group])
        groups = list(range(group, pf.num_row_groups))
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, row_groups=groups) if groups else ():
            skip = min(max(first - i, 0), batch.num_rows)  # whole batches before `first` are never converted
            for k, rec in enumerate(batch.slice(skip).to_pylist() if skip < batch.num_rows else ()):
                yield Row(path, i + skip + k, rec)
            i += batch.num_rows


def _reread_parquet(path: str, rows: list[int]) -> dict[int, Row]:
    out = {}
    with open_file(path) as f, _parquet_errors(path):
        pf = pq.ParquetFile(f)
        starts = _group_starts(pf)
        groups = np.searchsorted(starts, rows, side="right") - 1
        for group in sorted(set(groups.tolist())):
            if not 0 <= group < pf.num_row_groups:
                continue
            table = pf.read_row_group(group)
            for row in (r for r, g in zip(rows, groups) if g == group):
                if row - starts[group] < table.num_rows:
                    out[row] = Row(path, row, table.slice(int(row - starts[group]), 1).to_pylist()[0])
    return out


def _group_starts(pf: Any) -> np.ndarray:
    """The first row of each row group."""
    sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])[:-1] if sizes else np.zeros(1, np.int64)


@contextlib.contextmanager
def _parquet_errors(path: str) -> Iterator[None]:
    try:
        yield
    except ShardtuneError:
        raise
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"Data file '{path}' cannot be read as parquet ({type(e).__name__}: {e}). "
                        "Fix: rewrite the file, e.g. with pandas.DataFrame.to_parquet.") from None


def _read_jsonl(path: str, skip_bad: bool, start: Start) -> Iterator[Row]:
    """Rows from `start` on: seeking to its line when its offset is known, else counting lines from the start
    (rows before `start.row` are not parsed)."""
    with open_file(path) as f:
        i, line_no, offset = (start.row, start.line, start.offset) if start.offset else (0, 1, 0)
        f.seek(offset)
        for line in f:
            if line.strip():
                if i >= start.row:
                    yield _jsonl_row(path, i, line_no, offset, line, skip_bad)
                i += 1
            line_no += 1
            offset += len(line)


def _jsonl_row(path: str, i: int, line_no: int, offset: int, line: bytes, skip_bad: bool) -> Row:
    problem = None
    try:
        rec = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        problem = f"bytes that are not UTF-8 (at byte {e.start} of the line). Fix: {NOT_UTF8_FIX}"
    except json.JSONDecodeError as e:
        problem = f"invalid JSON ({e.msg}). Fix: one JSON object per line"
    else:
        if not isinstance(rec, dict):
            problem = f"expected a JSON object, got {type(rec).__name__}. Fix: one JSON object per line"
    if problem is not None:
        if not skip_bad:
            raise DataError(f"{path}, line {line_no}: {problem}.")
        return Row(path, i, {}, f"{path}, line {line_no}: {problem}.", (offset, line_no))
    return Row(path, i, rec, None, (offset, line_no))


def folder_files(path: str) -> list[str]:
    """The data files of a local folder: a `datasets.Dataset.save_to_disk` folder's Arrow stream files (as
    listed in state.json), else the data files directly in it, by name (the rule remote folders follow too)."""
    state_file = Path(path) / "state.json"
    if state_file.is_file():
        return _saved_dataset_files(state_file)
    try:
        entries = sorted(Path(path).iterdir())
    except OSError as e:
        raise DataError(f"Data folder '{path}' cannot be listed ({e.strerror or e}). Fix: check that this user may "
                        "read it (ls -ld; chmod/chown).") from None
    named = [f for f in entries if f.name.endswith(remote.DATA_SUFFIXES)]
    check_links([str(f) for f in named], f"Data folder '{path}'")
    files = [f for f in named if f.is_file()]
    if not files:
        raise DataError(f"Data folder '{path}' is neither a datasets save_to_disk folder (no state.json) "
                        "nor a folder of parquet/jsonl/json files.")
    return [str(f) for f in files]


def _saved_dataset_files(state_file: Path) -> list[str]:
    """The Arrow files a save_to_disk folder's state.json lists, each checked to be there."""
    fix = "write the folder again with datasets.Dataset.save_to_disk (or point data.train_files at its data files)"
    try:
        entries = json.loads(state_file.read_text())["_data_files"]
        names = [entry["filename"] for entry in entries]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{state_file} is not valid JSON ({e}). Fix: {fix}.") from None
    except (KeyError, TypeError):
        raise DataError(f"{state_file} does not list the folder's files (_data_files: [{{filename}}, ...]) as "
                        f"datasets writes it. Fix: {fix}.") from None
    files = [str(state_file.parent / name) for name in names]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DataError(f"{state_file} lists {len(missing)} file(s) that are not there: {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}. Fix: copy the whole folder again, or {fix}.")
    return files


def check_links(paths: list[str], where: str) -> None:
    """Refuse symlinks whose target is gone: reading the rest without a word would train on part of the data."""
    dangling = [p for p in paths if os.path.islink(p) and not os.path.exists(p)]
    if dangling:
        raise DataError(f"{where} holds {len(dangling)} symlink(s) to files that do not exist: "
                        f"{', '.join(dangling[:5])}{' ...' if len(dangling) > 5 else ''}. Fix: restore their targets, "
                        "or remove the links.")


def _read_folder(path: str, skip_bad: bool) -> Iterator[Row]:
    for f in folder_files(path):
        yield from read_file(f, skip_bad)


def _read_arrow_stream(path: str, first: int = 0) -> Iterator[Row]:
    """Rows from `first` on (record batches before it are skipped whole)."""
    try:
        with open_file(path) as f:
            i = 0
            for batch in pa.ipc.open_stream(f):
                if i + batch.num_rows <= first:
                    i += batch.num_rows
                    continue
                for start in range(max(first - i, 0), batch.num_rows, _BATCH_ROWS):
                    for k, rec in enumerate(batch.slice(start, _BATCH_ROWS).to_pylist()):
                        yield Row(path, i + start + k, rec)
                i += batch.num_rows
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"Data file '{path}' cannot be read ({e}).") from None


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
