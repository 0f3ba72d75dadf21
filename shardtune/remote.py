"""Remote storage through fsspec: checkpoints copied to and resumed from any fsspec URL (`hdfs://`,
`s3://`, `gs://`, `file://`, ...), and data files read from URLs and globs.

Checkpoints (`trainer.remote_dir`, verl's `trainer.default_hdfs_dir`): once a checkpoint is complete on
local disk, the main rank copies `global_step_N/` to `{remote_dir}/global_step_N/` on a background thread
(training never waits for it; see `RemoteCheckpoints`), its DCP `.metadata` and `trainer_state.json` last, then writes the remote
`latest_checkpointed_iteration.txt`. A copy is complete once `trainer_state.json` is there, and the tracker
only ever names a complete copy, so a job killed mid-upload leaves the previous checkpoint in charge.
Rotation (`trainer.max_ckpt_to_keep`) applies to the remote copies too. A relaunch whose run directory holds
no checkpoint as new as the remote's newest complete copy (a requeued job on another node) downloads it
first (the main rank, then the first rank of any node that does not share its run directory, each into a
temporary folder renamed into place) and resumes from it.

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
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import urlsplit

from shardtune.errors import ConfigError, DataError, ShardtuneError, StorageError

# the checkpoint layout (verl's names), also used by checkpoint.py
TRACKER = "latest_checkpointed_iteration.txt"
STEP_DIR = re.compile(r"global_step_(\d+)$")
LAST = (".metadata", "trainer_state.json")  # written after every other file: their presence means complete
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "hdfs": "hdfs", "viewfs": "hdfs"}
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")  # the data files a folder holds (local or remote)
DATA_BLOCK_SIZE = 8 << 20  # bytes fetched at a time from a remote data file


def is_url(path: Any) -> bool:
    return isinstance(path, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


def check_url(url: str, key: str) -> None:
    """Fail before anything is loaded when a URL cannot be used: credentials in it, or no fsspec backend."""
    import fsspec

    parts = urlsplit(url)
    if parts.password:
        raise ConfigError(f"{key} embeds credentials in its URL. Fix: remove them from the URL and give them the "
                          "way the filesystem reads them (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, "
                          "GOOGLE_APPLICATION_CREDENTIALS); shardtune never stores credentials.")
    if parts.scheme in ("hdfs", "viewfs") and not _libhdfs_found():
        raise ConfigError(f"{key}='{url}' needs pyarrow's HDFS client, which loads libhdfs from a Hadoop install, "
                          f"and none was found. Fix: {HDFS_SETUP}.")
    try:
        fsspec.get_filesystem_class(parts.scheme)
    except ValueError:
        raise ConfigError(f"{key}='{url}': fsspec knows no '{parts.scheme}://' filesystem.") from None
    except ImportError:
        extra = EXTRAS.get(parts.scheme)
        fix = f"pip install 'shardtune[{extra}]'" if extra else f"install the fsspec backend for {parts.scheme}://"
        raise ConfigError(f"{key}='{url}' needs the fsspec backend for {parts.scheme}://. Fix: {fix}.") from None


HDFS_SETUP = ("set HADOOP_HOME (or ARROW_LIBHDFS_DIR to the folder of libhdfs.so), JAVA_HOME, and "
              "CLASSPATH=$(hadoop classpath --glob)")


def _libhdfs_found() -> bool:
    """Where pyarrow looks for libhdfs: ARROW_LIBHDFS_DIR, $HADOOP_HOME/lib/native, the library path."""
    import ctypes.util

    home = os.environ.get("HADOOP_HOME")
    folders = [os.environ.get("ARROW_LIBHDFS_DIR"), home and os.path.join(home, "lib", "native")]
    return any(f and os.path.isfile(os.path.join(f, "libhdfs.so")) for f in folders) or bool(
        ctypes.util.find_library("hdfs"))


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


def _join(root: str, *parts: str) -> str:
    return str(PurePosixPath(root, *parts))


class RemoteCheckpoints:
    """Copies of the run's checkpoints under one fsspec URL. Used by the main rank (uploads) and by the
    ranks that fetch a checkpoint for a resume (downloads).

    Uploads run on a background thread and never hold training up: a checkpoint completed while the previous
    copy is still in flight waits, and only the newest such one is copied next (an older one it replaces is
    reported as skipped). A failed copy is reported (`error` in the report) and the newest checkpoint is
    tried again at the next save; `close()` copies the last checkpoint and raises if that fails.
    """

    def __init__(self, url: str, max_to_keep: int | None = None,
                 on_uploaded: Callable[[dict[str, Any]], None] | None = None):
        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url)
        self.max_to_keep = max_to_keep
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="shardtune-upload")
        self.pending: tuple[Path, int, Future] | None = None
        self.waiting: tuple[Path, int] | None = None  # the newest checkpoint not yet copied
        self.on_uploaded = on_uploaded or (lambda info: None)

    # -- upload -----------------------------------------------------------------------------------------------
    def upload(self, local: Path, step: int) -> None:
        """Copy a complete local checkpoint in the background, as soon as the copy in flight is done."""
        if self.waiting is not None:
            self.on_uploaded({"step": self.waiting[1], "skipped": f"global_step_{step} is newer"})
        self.waiting = (local, step)
        self.poll()

    def poll(self) -> None:
        """Report a finished copy and start the waiting one (cheap; called at every save)."""
        if self.pending is not None and self.pending[2].done():
            local, step, future = self.pending
            self.pending = None
            try:
                self.on_uploaded(future.result())
            except StorageError as e:
                self.on_uploaded({"step": step, "error": str(e)})
                if self.waiting is None:  # nothing newer: try this one again at the next save
                    self.waiting = (local, step)
        if self.pending is None and self.waiting is not None:
            (local, step), self.waiting = self.waiting, None
            self.pending = (local, step, self.pool.submit(self._upload_or_raise, local, step))

    def reading(self) -> Path | None:
        """The local checkpoint a copy in flight reads (local rotation must leave it alone)."""
        return self.pending[0] if self.pending is not None else None

    def close(self) -> None:
        """End of the run: `wait`, then release the thread."""
        self.wait()
        self.pool.shutdown()

    def wait(self) -> None:
        """Finish the copy in flight, then copy the newest waiting checkpoint; a failure raises."""
        if self.pending is not None:
            local, step, future = self.pending
            self.pending = None
            try:
                self.on_uploaded(future.result())
            except StorageError:
                if self.waiting is None:
                    self.waiting = (local, step)
        if self.waiting is not None:
            (local, step), self.waiting = self.waiting, None
            self.on_uploaded(self._upload_or_raise(local, step))

    def _upload_or_raise(self, local: Path, step: int) -> dict[str, Any]:
        with storage_errors(f"Copying checkpoint {local} to {self.url}/global_step_{step} (the local checkpoint "
                            "is complete; a relaunch resumes from it)"):
            return self._upload(local, step)

    def _upload(self, local: Path, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        dst = _join(self.root, f"global_step_{step}")
        if self.tracker_step() == step:  # about to replace the copy the tracker names: name an older one first
            self._write_tracker(max((s for s in self.complete_steps() if s != step), default=None))
        if self.fs.exists(dst):
            self.fs.rm(dst, recursive=True)
        last = [local / name for name in LAST]
        files = sorted((p for p in local.rglob("*") if p.is_file()),
                       key=lambda p: (last.index(p) + 1 if p in last else 0, str(p)))
        for f in files:
            target = _join(dst, f.relative_to(local).as_posix())
            if "file" in self.fs.protocol:  # object stores have no folders (and s3fs would create a bucket)
                self.fs.makedirs(str(PurePosixPath(target).parent), exist_ok=True)
            self.fs.put_file(str(f), target)
        self._write_tracker(step)
        self.rotate(step)
        return {"step": step, "url": f"{self.url}/global_step_{step}", "files": len(files),
                "bytes": sum(f.stat().st_size for f in files), "seconds": round(time.perf_counter() - t0, 3)}

    def _write_tracker(self, step: int | None) -> None:
        tracker = _join(self.root, TRACKER)
        if step is None:
            if self.fs.exists(tracker):
                self.fs.rm(tracker)
            return
        tmp = tracker + ".tmp"
        self.fs.pipe_file(tmp, str(step).encode())
        self.fs.mv(tmp, tracker)  # a rename, or a server-side copy on object stores: never half a number

    def rotate(self, keep: int) -> None:
        """Keep the newest `max_to_keep` complete copies (never `keep`, the one just written); drop copies a
        killed upload left incomplete below it (nothing can resume from them)."""
        steps = self.steps()
        complete = sorted(s for s, done in steps.items() if done)
        drop = complete[: -self.max_to_keep] if self.max_to_keep else []
        drop += [s for s, done in steps.items() if not done and s < keep]
        for s in drop:
            if s != keep:
                self.fs.rm(_join(self.root, f"global_step_{s}"), recursive=True)

    # -- listing ----------------------------------------------------------------------------------------------
    def steps(self) -> dict[int, bool]:
        """Every `global_step_N` copy: N -> complete."""
        if not self.fs.exists(self.root):
            return {}
        out = {}
        for entry in self.fs.ls(self.root, detail=False):
            m = STEP_DIR.search(entry.rstrip("/"))
            if m:
                out[int(m.group(1))] = all(self.fs.exists(_join(entry, name)) for name in LAST)
        return out

    def complete_steps(self) -> list[int]:
        return sorted(s for s, done in self.steps().items() if done)

    def tracker_step(self) -> int | None:
        tracker = _join(self.root, TRACKER)
        if not self.fs.exists(tracker):
            return None
        return int(self.fs.cat_file(tracker).decode().strip())

    def newest_complete(self) -> int | None:
        """The tracker's step when its copy is complete (it always is, unless edited by hand), else the
        newest complete copy."""
        step, complete = self.tracker_step(), self.complete_steps()
        return step if step in complete else (complete[-1] if complete else None)

    # -- download ---------------------------------------------------------------------------------------------
    def download(self, step: int, run_dir: Path) -> Path:
        """`global_step_{step}` into `run_dir` (a temporary folder renamed into place), then the tracker."""
        src = _join(self.root, f"global_step_{step}")
        target = run_dir / f"global_step_{step}"
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".global_step_{step}.download-{socket.gethostname()}-", dir=run_dir))
        try:
            for remote_file in self.fs.find(src):
                local = tmp / PurePosixPath(remote_file).relative_to(PurePosixPath(src))
                local.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(remote_file, str(local))
            if target.exists() and not all((target / n).is_file() for n in LAST):
                shutil.rmtree(target)  # a leftover of a crashed save
            if not target.exists():
                os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        tracker_tmp = run_dir / f"{TRACKER}.tmp-{os.getpid()}"
        tracker_tmp.write_text(str(step))
        os.replace(tracker_tmp, run_dir / TRACKER)
        return target


def uploader(cfg: Any, world: Any, on_uploaded: Callable[[dict[str, Any]], None]) -> RemoteCheckpoints | None:
    """The main rank's copier for `trainer.remote_dir`, or None."""
    url = cfg.trainer.remote_dir
    if not url or not world.is_main:
        return None
    return RemoteCheckpoints(url, cfg.trainer.max_ckpt_to_keep, on_uploaded)


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
