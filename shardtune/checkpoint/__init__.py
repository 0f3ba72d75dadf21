"""The run directory's checkpoints: the layout (layout.py, over a local folder or an fsspec URL: storage.py),
a checkpoint of the run's parts with DCP (parts.py), the remote copy (mirror.py), and the manager the trainer
talks to (manager.py)."""

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
from shardtune.checkpoint.manager import CheckpointManager, check_fresh_start, check_run_dir, find_resume_path
from shardtune.checkpoint.mirror import RemoteCheckpoints
from shardtune.checkpoint.parts import Stateful, load
from shardtune.checkpoint.storage import FsspecFolder, LocalFolder, Storage

__all__ = ["LAST", "TRACKER", "CheckpointManager", "FsspecFolder", "LocalFolder", "RemoteCheckpoints", "RunDir",
           "Stateful", "Storage", "check_fresh_start", "check_run_dir", "damage", "find_resume_path", "is_complete",
           "load", "problem", "single_process_ok", "step_name", "step_of"]
