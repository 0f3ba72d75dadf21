"""The remote copy of the run's checkpoints under `trainer.remote_dir` (verl's `trainer.default_hdfs_dir`), any
fsspec URL (`hdfs://`, `s3://`, `gs://`, `file://`, ...), laid out as the local run directory (layout.py).

Once a checkpoint is complete on local disk, the main rank copies `global_step_N/` on a background thread
(training never waits for it), the files of LAST last, then writes the remote tracker; so a job killed
mid-upload leaves the previous copy in charge. Rotation (`trainer.max_ckpt_to_keep`) applies to the copies
too. A relaunch whose run directory holds no checkpoint as new as the remote's newest complete copy (a
requeued job on another node) downloads it first (into a temporary folder renamed into place).
Credentials come only from each filesystem's own environment (see remote.py).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from shardtune.checkpoint.layout import LAST, RunDir, is_complete, step_name
from shardtune.checkpoint.storage import FsspecFolder, LocalFolder
from shardtune.errors import StorageError
from shardtune.remote import storage_errors


class RemoteCheckpoints:
    """Copies of the run's checkpoints under one fsspec URL. Used by the main rank (uploads) and by the ranks
    that fetch a checkpoint for a resume (downloads).

    Uploads run on a background thread and never hold training up: a checkpoint completed while the previous
    copy is still in flight waits, and only the newest such one is copied next (an older one it replaces is
    reported as skipped). A failed copy is reported (`error` in the report) and the newest checkpoint is tried
    again at the next save; `close()` copies the last checkpoint and raises if that fails.
    """

    def __init__(self, url: str, max_to_keep: int | None = None,
                 on_uploaded: Callable[[dict[str, Any]], None] | None = None):
        self.folder = FsspecFolder(url)
        self.url, self.fs, self.run = self.folder.url, self.folder.fs, RunDir(self.folder)
        self.max_to_keep = max_to_keep
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="shardtune-upload")
        self.pending: tuple[Path, int, Future] | None = None
        self.waiting: tuple[Path, int] | None = None  # the newest checkpoint not yet copied
        self.on_uploaded = on_uploaded or (lambda info: None)

    # -- upload -----------------------------------------------------------------------------------------------
    def upload(self, local: Path, step: int) -> None:
        """Copy a complete local checkpoint in the background, as soon as the copy in flight is done."""
        if self.waiting is not None:
            self.on_uploaded({"step": self.waiting[1], "skipped": f"{step_name(step)} is newer"})
        self.waiting = (local, step)
        self.poll()

    def poll(self) -> None:
        """Report a finished copy and start the waiting one (cheap; called after every step)."""
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

    def reading(self) -> int | None:
        """The step whose local checkpoint a copy in flight reads (local rotation must leave it alone)."""
        return self.pending[1] if self.pending is not None else None

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
        with storage_errors(f"Copying checkpoint {local} to {self.url}/{step_name(step)} (the local checkpoint "
                            "is complete; a relaunch resumes from it)"):
            return self._upload(local, step)

    def _upload(self, local: Path, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        if self.run.tracker_step() == step:  # about to replace the copy the tracker names: name an older one first
            self.run.write_tracker(max((s for s in self.run.complete_steps() if s != step), default=None))
        self.folder.remove(step_name(step))
        last = [local / name for name in LAST]
        files = sorted((p for p in local.rglob("*") if p.is_file()),
                       key=lambda p: (last.index(p) + 1 if p in last else 0, str(p)))
        for f in files:
            self.folder.put(f, f"{step_name(step)}/{f.relative_to(local).as_posix()}")
        self.run.write_tracker(step)
        self.run.rotate(self.max_to_keep, protect={step}, incomplete_below=step)
        return {"step": step, "url": f"{self.url}/{step_name(step)}", "files": len(files),
                "bytes": sum(f.stat().st_size for f in files), "seconds": round(time.perf_counter() - t0, 3)}

    # -- download ---------------------------------------------------------------------------------------------
    def download(self, step: int, run_dir: Path) -> Path:
        """`global_step_{step}` into `run_dir` (a temporary folder renamed into place), then the tracker."""
        name = step_name(step)
        target = run_dir / name
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.download-{socket.gethostname()}-", dir=run_dir))
        try:
            for rel in self.folder.files(name):
                self.folder.get(f"{name}/{rel}", tmp / rel)
            if target.exists() and not is_complete(target):
                shutil.rmtree(target)  # a leftover of a crashed save
            if not target.exists():
                os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        RunDir(LocalFolder(run_dir)).write_tracker(step)
        return target
