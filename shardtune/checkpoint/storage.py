"""Where a run's checkpoints live: a local folder or an fsspec URL, behind the few operations the layout needs.

Paths are relative to the folder, `/`-separated. `write_atomic` never leaves half a file under its name (a
rename locally; a server-side copy on object stores).
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path, PurePosixPath
from typing import Protocol

from shardtune.remote import filesystem


class Storage(Protocol):
    def exists(self, rel: str) -> bool: ...

    def names(self) -> list[str]:
        """The entries directly in the folder (none when it does not exist)."""
        ...

    def read_text(self, rel: str) -> str: ...

    def write_atomic(self, rel: str, text: str) -> None: ...

    def remove(self, rel: str) -> None:
        """A file, or a folder and all in it; nothing when it is not there."""
        ...


class LocalFolder:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def names(self) -> list[str]:
        return [p.name for p in self.root.iterdir()] if self.root.is_dir() else []

    def read_text(self, rel: str) -> str:
        return self.path(rel).read_text()

    def write_atomic(self, rel: str, text: str) -> None:
        # a name of this process's own: ranks of several nodes may write the tracker of a shared folder at once
        path = self.path(rel)
        tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)

    def remove(self, rel: str) -> None:
        path = self.path(rel)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


class FsspecFolder:
    """A folder under an fsspec URL; listings are never cached (other writers change them)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url)

    def path(self, rel: str = "") -> str:
        return str(PurePosixPath(self.root, rel)) if rel else self.root

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def names(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        return [PurePosixPath(p.rstrip("/")).name for p in self.fs.ls(self.root, detail=False)]

    def read_text(self, rel: str) -> str:
        return self.fs.cat_file(self.path(rel)).decode()

    def write_atomic(self, rel: str, text: str) -> None:
        tmp = self.path(rel) + ".tmp"
        self.fs.pipe_file(tmp, text.encode())
        self.fs.mv(tmp, self.path(rel))  # a rename, or a server-side copy on object stores: never half a number

    def remove(self, rel: str) -> None:
        if self.fs.exists(self.path(rel)):
            self.fs.rm(self.path(rel), recursive=True)

    # -- copies between this folder and a local one (the remote mirror) ------------------------------------------
    def put(self, local: Path, rel: str) -> None:
        target = self.path(rel)
        if "file" in self.fs.protocol:  # object stores have no folders (and s3fs would create a bucket)
            self.fs.makedirs(str(PurePosixPath(target).parent), exist_ok=True)
        self.fs.put_file(str(local), target)

    def files(self, rel: str) -> list[str]:
        """Every file below `rel`, relative to it."""
        src = PurePosixPath(self.path(rel))
        return [str(PurePosixPath(f).relative_to(src)) for f in self.fs.find(str(src))]

    def get(self, rel: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(self.path(rel), str(local))
