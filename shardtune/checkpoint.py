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
import copy
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


class Checkpointer:
    """Saves `global_step_N/` (optionally in the background) and finalises it: side files, tracker, rotation.

    With `checkpoint.async_save`, DCP stages the shards in host memory and writes them on a background
    thread over a separate gloo group while training goes on; the folder is finalised (tracker last) before
    the next save and at the end of the run, so the tracker never names a folder still being written.
    """

    def __init__(self, run_dir: Path, cfg: Any, world: Any, tokenizer: Any, max_to_keep: int | None,
                 model_path: str, on_saved: Any = None, remote: Any = None):
        self.run_dir, self.cfg, self.world, self.tokenizer, self.max_to_keep = run_dir, cfg, world, tokenizer, max_to_keep
        self.model_path = Path(os.path.expanduser(model_path))
        self.on_saved = on_saved or (lambda info: None)  # called on every rank once a checkpoint is complete
        self.pending: tuple[Any, Any] | None = None
        self.remote = remote  # shardtune.remote.RemoteCheckpoints on the main rank, when trainer.remote_dir is set
        self.group = None
        if cfg.async_save and world.distributed:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo")

    def save(self, step: int, engine: Any, trainer_state: dict[str, Any], hf_weights: bool = False) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp

        from shardtune import parallel

        self.wait()
        t0 = time.perf_counter()
        path = step_dir(self.run_dir, step)
        if self.world.is_main and path.exists():  # a leftover of a crashed save at the same step
            shutil.rmtree(path)
        parallel.barrier(self.world)
        state = {k: v for k, v in engine.state_dict().items() if k in self.cfg.save_contents}
        if hf_weights or "hf_model" in self.cfg.save_contents:
            engine.export(str(path / "huggingface"))  # collective: every rank takes part
        rng = rng_state()
        with single_process_ok():
            if self.cfg.async_save:
                future = dcp.async_save(state, checkpoint_id=str(path), process_group=self.group)
            else:
                dcp.save(state, checkpoint_id=str(path))
                future = None
        info = {"step": step, "path": str(path), "async": future is not None}
        self.pending = (future, lambda: self._finalize(path, engine, trainer_state, rng, info, t0))
        if future is None:
            self.wait()
        return info

    def wait(self) -> None:
        """Finish the pending save, if any: every rank's shards written, then side files and the tracker."""
        if self.pending is None:
            return
        future, finalize = self.pending
        self.pending = None
        if future is not None:
            future.result()
        finalize()

    def close(self) -> None:
        """End of the run: the pending save, then the remote copy in flight."""
        self.wait()
        if self.remote is not None:
            self.remote.close()

    def _finalize(self, path: Path, engine: Any, trainer_state: dict[str, Any], rng: dict[str, Any],
                  info: dict[str, Any], t0: float) -> None:
        from shardtune import parallel

        (path / f"rng_rank_{self.world.rank}.json").write_text(json.dumps(rng))
        parallel.barrier(self.world)
        if self.world.is_main:
            self._save_hf_side_files(engine, path / "huggingface")
            _atomic_write(path / "trainer_state.json", json.dumps({**trainer_state, "contents": self.cfg.save_contents}))
            _atomic_write(self.run_dir / TRACKER, str(trainer_state["step"]))
            if self.remote is not None:  # before rotation, which may delete the previous folder
                self.remote.upload(path, trainer_state["step"])
            rotate(self.run_dir, self.max_to_keep, protect=path)
        parallel.barrier(self.world)
        info["seconds"] = round(time.perf_counter() - t0, 3)
        info["bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        self.on_saved(info)

    def _save_hf_side_files(self, engine: Any, out: Path) -> None:
        """Config (with the KV cache back on, for inference), the base model's generation config, tokenizer."""
        from transformers import GenerationConfig

        config = copy.deepcopy(engine.model_config())
        config.use_cache = True
        config.save_pretrained(out)
        try:
            GenerationConfig.from_pretrained(self.model_path).save_pretrained(out)
        except OSError:  # the base model has none: derive one from its config
            GenerationConfig.from_model_config(config).save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        adapter = engine.adapter_config()
        if adapter is not None:  # export rebuilds the adapters from this, then merges them
            adapter.save_pretrained(out)


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


def rotate(run_dir: Path, max_to_keep: int | None, protect: Path | None = None) -> None:
    """Keep the newest `max_to_keep` complete checkpoints (never `protect`, the one just written); incomplete
    folders are left alone."""
    if not max_to_keep or max_to_keep < 1:
        return
    for _, p in complete_checkpoints(run_dir)[:-max_to_keep]:
        if p != protect:
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


def load(path: Path, engine: Any, world: Any, contents: list[str] | None) -> dict[str, Any]:
    """Load what `contents` names (default: all that was saved) and return the trainer state.

    Model and optimizer are resharded by DCP to this world size; RNG streams are restored when the world
    size is the same (they are per rank).
    """
    import torch.distributed.checkpoint as dcp

    trainer_state = json.loads((path / "trainer_state.json").read_text())
    saved = trainer_state.get("contents", ["model", "optimizer", "extra"])
    wanted = [c for c in (contents or saved) if c in saved]
    state = {k: v for k, v in engine.state_dict().items() if k in wanted}
    with single_process_ok():
        dcp.load(state, checkpoint_id=str(path))
    engine.load_state_dict(state)
    trainer_state["loaded"] = wanted
    rng_file = path / f"rng_rank_{world.rank}.json"
    if "extra" in wanted and rng_file.is_file() and trainer_state.get("world_size") == world.world_size:
        set_rng_state(json.loads(rng_file.read_text()))
    return trainer_state
