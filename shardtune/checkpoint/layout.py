"""The run directory's checkpoint layout (verl's names), the one place its rules are written, for a local folder
and a remote copy alike:

```
{root}/latest_checkpointed_iteration.txt     # the tracker: the newest complete step, written (atomically) last
{root}/global_step_{N}/                      # one checkpoint; complete once the files of LAST are there
```

A checkpoint is complete once DCP's `.metadata` and `trainer_state.json`, written after every other file, are
both there (`is_complete_folder`, the one completeness rule). The tracker only ever names a complete checkpoint;
a folder a crash left incomplete is never resumed from and never counted by rotation. A complete local folder
can still be damaged afterwards (a shard deleted or cut off): `damage` checks it against its DCP metadata.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path

from shardtune.checkpoint.storage import LocalFolder, Storage

TRACKER = "latest_checkpointed_iteration.txt"
LAST = (".metadata", "trainer_state.json")  # written after every other file: their presence means complete
_STEP = re.compile(r"global_step_(\d+)")


def step_name(step: int) -> str:
    return f"global_step_{step}"


def step_of(name: str) -> int | None:
    """N for a folder named global_step_N, else None."""
    m = _STEP.fullmatch(name)
    return int(m.group(1)) if m else None


def is_complete_folder(storage: Storage, name: str) -> bool:
    """Whether the checkpoint folder `name` of `storage` is complete (see the module's docstring)."""
    return all(storage.exists(f"{name}/{last}") for last in LAST)


def is_complete(path: Path) -> bool:
    """The completeness rule for a local checkpoint folder anywhere (trainer.resume_from_path, export)."""
    return is_complete_folder(LocalFolder(path.parent), path.name)


def damage(path: Path) -> str | None:
    """What is wrong with a local checkpoint folder that `is_complete` calls complete, or None when it is whole:
    trainer_state.json must parse, and every file DCP's .metadata names must be there, at least as long as the
    last byte it records in it (a deleted or cut-off shard). Reads the metadata, never the tensors."""
    import torch.distributed.checkpoint as dcp  # here: the layout (and the remote copier on it) loads without torch

    try:
        record = json.loads((path / "trainer_state.json").read_text())
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            return "trainer_state.json holds no step"
        if not isinstance(record.get("world_size"), int):
            return "trainer_state.json holds no world_size"
    except (OSError, ValueError) as e:
        return f"trainer_state.json cannot be read ({e})"
    for rank_file in sorted(path.glob("*_rank_*.json")):  # per-rank parts (RNG streams)
        try:
            json.loads(rank_file.read_text())
        except (OSError, ValueError) as e:
            return f"{rank_file.name} cannot be read ({e})"
    try:
        with single_process_ok():
            metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a cut-off or overwritten .metadata fails to unpickle in many ways
        return f".metadata cannot be read ({type(e).__name__}: {e})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        f = path / name
        if not f.is_file():
            return f"the shard {name} is missing"
        if f.stat().st_size < end:
            return f"the shard {name} is cut off ({f.stat().st_size} bytes; the metadata records data up to {end})"
    return None


def problem(path: Path) -> str | None:
    """Why a local checkpoint folder cannot be resumed from (incomplete, or damaged), or None."""
    return "incomplete (a save that did not finish)" if not is_complete(path) else damage(path)


@contextlib.contextmanager
def single_process_ok() -> Iterator[None]:
    """DCP warns when used without a process group; one process is a supported, intended case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class RunDir:
    """The checkpoints under one root: their steps, which are complete, the tracker, rotation."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def is_complete(self, step: int) -> bool:
        return is_complete_folder(self.storage, step_name(step))

    def steps(self) -> dict[int, bool]:
        """Every `global_step_N` folder: N -> complete."""
        found = (step_of(name) for name in self.storage.names())
        return {s: self.is_complete(s) for s in sorted(s for s in found if s is not None)}

    def complete_steps(self) -> list[int]:
        return [s for s, done in self.steps().items() if done]

    def incomplete_after(self, step: int) -> list[int]:
        """Checkpoints newer than `step` that a crash left incomplete (skipped on resume)."""
        return [s for s, done in self.steps().items() if s > step and not done]

    def tracker_step(self) -> int | None:
        """The step the tracker names; None when there is none or it holds no step number (overwritten)."""
        try:
            return int(self.storage.read_text(TRACKER).strip()) if self.storage.exists(TRACKER) else None
        except (OSError, ValueError):
            return None

    def write_tracker(self, step: int | None) -> None:
        """Name `step` as the newest checkpoint (None: remove the tracker)."""
        if step is None:
            self.storage.remove(TRACKER)
        else:
            self.storage.write_atomic(TRACKER, str(step))

    def newest_complete(self) -> int | None:
        """The tracker's step when its checkpoint is complete (it always is, unless edited by hand), else the
        newest complete one."""
        step, complete = self.tracker_step(), self.complete_steps()
        return step if step in complete else (complete[-1] if complete else None)

    def rotate(self, max_to_keep: int | None, protect: Collection[int] = (), incomplete_below: int | None = None
               ) -> None:
        """Keep the newest `max_to_keep` complete checkpoints, never those in `protect` (the one just written, one
        being copied); with `incomplete_below`, drop the incomplete folders older than that step too (a remote
        copy a killed upload left: nothing resumes from it). Local incomplete folders are left alone."""
        steps = self.steps()
        complete = [s for s, done in steps.items() if done]
        drop = complete[:-max_to_keep] if max_to_keep and max_to_keep > 0 else []
        if incomplete_below is not None:
            drop += [s for s, done in steps.items() if not done and s < incomplete_below]
        for s in drop:
            if s not in protect:
                self.storage.remove(step_name(s))
