"""fsspec URLs (`hdfs://`, `s3://`, `gs://`, `file://`, ...): checking them, opening their filesystem, naming
their errors; and data files read from URLs and globs. (The remote copy of checkpoints, `trainer.remote_dir`,
is checkpoint/mirror.py, over the same filesystems.)

Data (`data.train_files` / `val_files`): URLs and globs (`s3://bucket/sft/*.parquet`) are expanded here;
each file is read through fsspec in blocks (never copied whole to local disk), so a file larger than the
local disk can be tokenized or streamed; its cache fingerprint is the URL with the size and the ETag or
modification time the store reports.

Credentials come only from each filesystem's own environment and config files (AWS_* variables and
~/.aws, GOOGLE_APPLICATION_CREDENTIALS, the Hadoop configuration): shardtune never takes them as
settings, and refuses URLs that embed them, so they cannot reach logs, config.yaml or metrics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import urlsplit

from shardtune.config.urls import DATA_SUFFIXES, HDFS_SETUP, check_url, is_url
from shardtune.errors import ConfigError, DataError, ShardtuneError, StorageError

__all__ = ["DATA_SUFFIXES", "check_url", "is_url"]  # the config's URL rules, used with the data files here

DATA_BLOCK_SIZE = 8 << 20  # bytes fetched at a time from a remote data file


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URL; listings are never cached (other writers change them)."""
    import fsspec

    check_url(url, "the URL")
    try:
        return fsspec.core.url_to_fs(url, use_listings_cache=False)
    except (ImportError, OSError) as e:
        scheme = urlsplit(url).scheme
        if scheme in ("hdfs", "viewfs"):
            raise ConfigError(f"'{url}': pyarrow's HDFS client could not start ({e}). Fix: {HDFS_SETUP}.") from None
        raise ConfigError(f"'{url}' cannot be opened: {e}") from None


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Errors of the store (network, permissions, a missing bucket) as one message naming what failed."""
    try:
        yield
    except ShardtuneError:
        raise
    except Exception as e:
        raise StorageError(f"{what} failed ({type(e).__name__}: {e}). Fix: check the URL, the network, and the "
                           "credentials in the filesystem's standard environment (e.g. AWS_* variables).") from None


# -- data files ------------------------------------------------------------------------------------------------
def expand(spec: str) -> list[str]:
    """A data URL, a glob of them, or a folder of data files -> the matching file URLs, in a stable order."""
    with storage_errors(f"Listing data files at {spec}"):
        return [_url_of(spec, m) for m in _matches(spec)]


def _matches(spec: str) -> list[str]:
    fs, path = filesystem(spec)
    if any(ch in path for ch in "*?["):
        matches = sorted(fs.glob(path))
        if not matches:
            raise DataError(f"No file matches the pattern '{spec}'. Fix: check data.train_files/data.val_files.")
    elif fs.isdir(path):  # as for a local folder: the data files directly in it, by name
        matches = sorted(p for p in fs.ls(path, detail=False) if p.endswith(DATA_SUFFIXES))
        if not matches:
            raise DataError(f"Data folder '{spec}' holds no parquet/jsonl/json files.")
    elif fs.exists(path):
        matches = [path]
    else:
        raise DataError(f"Data file '{spec}' does not exist. Fix: check the URL in data.train_files/data.val_files.")
    return matches


def _url_of(spec: str, path: str) -> str:
    """The URL of a path fsspec listed under `spec` (s3/gs paths start with the bucket, HDFS ones do not
    name the namenode)."""
    parts = urlsplit(spec)
    p = path.lstrip("/")
    if parts.netloc and not (p == parts.netloc or p.startswith(parts.netloc + "/")):
        return f"{parts.scheme}://{parts.netloc}/{p}"
    return f"{parts.scheme}://{p}" if parts.netloc else f"{parts.scheme}:///{p}"


def open_data(url: str) -> IO[bytes]:
    """One remote data file, opened for reading in blocks of DATA_BLOCK_SIZE bytes (seekable: parquet readers
    fetch only the row groups they read, jsonl readers seek to a line)."""
    fs, path = filesystem(url)
    with storage_errors(f"Reading data file {url}"):
        return fs.open(path, "rb", block_size=DATA_BLOCK_SIZE)


def size(url: str) -> int:
    fs, path = filesystem(url)
    with storage_errors(f"Reading data file {url}"):
        return int(fs.size(path) or 0)


def fingerprint(url: str) -> tuple[str, int, str]:
    """(URL, size, ETag or modification time) for the tokenization cache key."""
    fs, path = filesystem(url)
    with storage_errors(f"Reading the size and version of {url}"):
        info = fs.info(path)
    version = next((info[k] for k in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "updated", "last_modified")
                    if info.get(k) is not None), "")
    return url, int(info.get("size") or 0), str(version)
