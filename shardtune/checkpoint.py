"""Checkpoints with torch.distributed.checkpoint (DCP), in verl's layout.

```
{run_dir}/latest_checkpointed_iteration.txt     # the step number, written (atomically) last
{run_dir}/global_step_{N}/
    .metadata, __*.distcp                        # DCP: model + optimizer, sharded, reshardable
    trainer_state.json                           # step, sampler position, scheduler, early stopping
    rng_rank_{r}.json                            # python / numpy / torch (and CUDA) RNG of every rank
    huggingface/                                 # config, generation config, tokenizer, chat template
```

A checkpoint is complete once the tracker names it; a folder without `trainer_state.json` or DCP's
`.metadata` (a crash mid-save) is never resumed from and never counted by rotation.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shardtune.errors import ConfigError

TRACKER = "latest_checkpointed_iteration.txt"
STEP_DIR = re.compile(r"global_step_(\d+)$")


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"global_step_{step}"


def is_complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / "trainer_state.json").is_file()


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tupled(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x: Any) -> Any:
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def save(run_dir: Path, step: int, engine: Any, trainer_state: dict[str, Any], world: Any, tokenizer: Any,
         max_to_keep: int | None) -> dict[str, Any]:
    """Write global_step_{step}/ on every rank, then (rank 0, after all ranks finished) the tracker."""
    import torch.distributed.checkpoint as dcp

    from shardtune import parallel

    t0 = time.perf_counter()
    path = step_dir(run_dir, step)
    if world.is_main and path.exists():  # a leftover of a crashed save at the same step
        shutil.rmtree(path)
    parallel.barrier(world)
    with single_process_ok():
        dcp.save(engine.state_dict(), checkpoint_id=str(path))
    (path / f"rng_rank_{world.rank}.json").write_text(json.dumps(rng_state()))
    parallel.barrier(world)
    if world.is_main:
        engine.model_config().save_pretrained(path / "huggingface")
        tokenizer.save_pretrained(path / "huggingface")
        _atomic_write(path / "trainer_state.json", json.dumps(trainer_state))
        _atomic_write(run_dir / TRACKER, str(step))
        rotate(run_dir, max_to_keep)
    parallel.barrier(world)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"step": step, "path": str(path), "seconds": round(time.perf_counter() - t0, 3), "bytes": size}


@contextlib.contextmanager
def single_process_ok():
    """DCP warns when used without a process group; one process is a supported, intended case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for p in run_dir.glob("global_step_*"):
        m = STEP_DIR.search(p.name)
        if m and is_complete(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def incomplete_after(run_dir: Path, step: int) -> list[Path]:
    """Checkpoint folders newer than `step` that a crash left incomplete (skipped on resume)."""
    out = []
    for p in run_dir.glob("global_step_*"):
        m = STEP_DIR.search(p.name)
        if m and int(m.group(1)) > step and not is_complete(p):
            out.append(p)
    return sorted(out)


def rotate(run_dir: Path, max_to_keep: int | None) -> None:
    """Keep the newest `max_to_keep` complete checkpoints; incomplete folders are left alone."""
    if not max_to_keep or max_to_keep < 1:
        return
    for _, p in complete_checkpoints(run_dir)[:-max_to_keep]:
        shutil.rmtree(p, ignore_errors=True)


def find_resume_path(run_dir: Path, mode: str, resume_from: str | None) -> Path | None:
    """The checkpoint to resume from, or None to start fresh (verl's auto | disable | resume_path)."""
    if mode == "disable":
        return None
    if resume_from:
        path = Path(resume_from)
        if not STEP_DIR.search(path.name) or not path.is_dir():
            raise ConfigError(f"trainer.resume_from_path='{resume_from}' is not a global_step_N checkpoint folder.")
        if not is_complete(path):
            raise ConfigError(f"trainer.resume_from_path='{resume_from}' is incomplete (a save that did not finish). "
                              "Fix: point it at a complete checkpoint.")
        return path
    if mode == "resume_path":
        raise ConfigError("trainer.resume_mode=resume_path needs trainer.resume_from_path.")
    tracker = run_dir / TRACKER
    candidates = complete_checkpoints(run_dir)
    if tracker.is_file():
        step = int(tracker.read_text().strip())
        path = step_dir(run_dir, step)
        if is_complete(path):
            return path
    return candidates[-1][1] if candidates else None


def load(path: Path, engine: Any, world: Any) -> dict[str, Any]:
    """Load model + optimizer (resharded by DCP to this world size) and return the trainer state."""
    import torch.distributed.checkpoint as dcp

    state = engine.state_dict()
    with single_process_ok():
        dcp.load(state, checkpoint_id=str(path))
    engine.load_state_dict(state)
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    rng_file = path / f"rng_rank_{world.rank}.json"
    if rng_file.is_file() and trainer_state.get("world_size") == world.world_size:
        set_rng_state(json.loads(rng_file.read_text()))
    return trainer_state
