"""The run directory's checkpoint layout (verl's names), the one place its rules are written, for a local folder
and a remote copy alike:

```
{root}/latest_checkpointed_iteration.txt     # the tracker: the newest complete step, written (atomically) last
{root}/global_step_{N}/                      # one checkpoint; complete once the files of LAST are there
```

A checkpoint is complete once DCP's `.metadata` and `trainer_state.json`, written after every other file, are
both there (`is_complete_folder`, the one completeness rule). The tracker only ever names a complete checkpoint;
a folder a crash left incomplete is never resumed from and never counted by rotation.
"""

from __future__ import annotations

import re
from collections.abc import Collection
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
        if not self.storage.exists(TRACKER):
            return None
        return int(self.storage.read_text(TRACKER).strip())

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
