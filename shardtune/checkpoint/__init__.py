"""The run directory's checkpoints: the layout (layout.py, over a local folder or an fsspec URL: storage.py),
a checkpoint of the run's parts with DCP (parts.py), the remote copy (mirror.py), and the manager the trainer
talks to (manager.py).

The layout, the storage and the remote copy load without torch (a copier process starts in a moment); the
manager and the DCP parts are loaded when first named.
"""

from typing import Any

from shardtune.checkpoint.layout import (
    LAST,
    TRACKER,
    RunDir,
    damage,
    is_complete,
    problem,
    single_process_ok,
    step_name,
    step_of,
)
from shardtune.checkpoint.mirror import RemoteCheckpoints
from shardtune.checkpoint.storage import FsspecFolder, LocalFolder, Storage

_LAZY = {"CheckpointManager": "manager", "check_fresh_start": "manager", "check_run_dir": "manager",
         "find_resume_path": "manager", "Stateful": "parts", "load": "parts"}

__all__ = ["LAST", "TRACKER", "FsspecFolder", "LocalFolder", "RemoteCheckpoints", "RunDir", "Storage", "damage",
           "is_complete", "problem", "single_process_ok", "step_name", "step_of", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'shardtune.checkpoint' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"shardtune.checkpoint.{_LAZY[name]}"), name)
