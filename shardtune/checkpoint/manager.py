"""The run directory's checkpoints as the trainer sees them: `CheckpointManager(cfg, world, on_event)` finds
where to resume (before the run directory is touched), `resume(parts, ...)` loads it, and `save_if_due` after
every step saves on the cadence and at the end. Writing a checkpoint is parts.py, the layout layout.py, the
remote copy mirror.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shardtune import parallel
from shardtune.checkpoint.layout import RunDir, damage, problem, step_name, step_of
from shardtune.checkpoint.mirror import RemoteCheckpoints
from shardtune.checkpoint.parts import Stateful, Writer, check_same_kind, load
from shardtune.checkpoint.storage import LocalFolder
from shardtune.config import Config
from shardtune.engine.base import Engine
from shardtune.errors import ConfigError
from shardtune.remote import storage_errors


class CheckpointManager:
    """Created first, before the data is read and anything is written to the run directory: the run directory
    must be writable, a requeued job's newest remote copy is fetched, the checkpoint to resume from found (the
    newest intact one), and another run's checkpoints or a checkpoint of the other kind (LoRA / full) refused,
    so none of these fails after the model is loaded. `on_event(kind, **info)` hears of every save."""

    def __init__(self, cfg: Config, world: parallel.World, on_event: Callable[..., None]):
        self.cfg, self.world, self.on_event = cfg, world, on_event
        self.run_dir = cfg.run_dir
        self.local = RunDir(LocalFolder(self.run_dir))
        check_run_dir(self.run_dir)
        fetch_remote_for_resume(cfg, self.run_dir, world)
        self.resume_from = find_resume_path(self.run_dir, cfg.trainer.resume_mode, cfg.trainer.resume_from_path)
        check_fresh_start(self.run_dir, self.resume_from, cfg.checkpoint.load_contents)
        if self.resume_from is not None:
            check_same_kind(self.resume_from, cfg.model, cfg.checkpoint.load_contents)
        self.writer: Writer | None = None
        self.remote: RemoteCheckpoints | None = None

    def resume(self, parts: dict[str, Stateful], engine: Engine, tokenizer: Any
               ) -> tuple[dict[str, Any] | None, dict[str, str]]:
        """Load the checkpoint found into `parts`; from here on the manager saves these parts. Returns what was
        loaded (None on a fresh start) and the newer checkpoint folders skipped, with why (incomplete or
        damaged)."""
        cfg = self.cfg
        self.writer = Writer(cfg.checkpoint, self.world, parts, engine, tokenizer,
                             Path(os.path.expanduser(cfg.model.path)), complete=self._complete,
                             saved=lambda info: self.on_event("checkpoint", **info))
        if cfg.trainer.remote_dir and self.world.is_main:
            self.remote = RemoteCheckpoints(cfg.trainer.remote_dir, cfg.trainer.max_ckpt_to_keep, self._uploaded)
        if self.resume_from is None:
            return None, {}
        info = load(self.resume_from, parts, self.world, cfg.checkpoint.load_contents)
        newer = [self.run_dir / step_name(s) for s in self.local.steps() if s > info["step"]]
        skipped = {str(p): why for p in newer if (why := problem(p))}
        return {**info, "skipped_incomplete": list(skipped)}, skipped

    def save_if_due(self, step: int, due: bool, final: bool, preempted: bool = False) -> Path | None:
        """After every step, on every rank: finish a background save (and let the remote copier report and start
        the next copy); save when the cadence is `due`; at the run's last step (`final`) save with the HF weights
        if trainer.save_hf_at_end asks; on SIGTERM (`preempted`, preempt.py) save unless
        checkpoint.save_on_preempt=false. After the last or a preempted step, wait for the save and the remote
        copies (a failure of the last copy raises). Returns the checkpoint this call saved, if any."""
        self.writer.poll()
        if self.remote is not None:
            self.remote.poll()
        path = None
        if final or due or (preempted and self.cfg.checkpoint.save_on_preempt):
            path = self.run_dir / step_name(step)
            self.writer.save(path, step, hf_weights=final and self.cfg.trainer.save_hf_at_end)
        if final or preempted:
            self.writer.wait()
            if self.remote is not None:
                self.remote.close()
        return path

    def _complete(self, step: int, path: Path) -> None:
        """The main rank, once `path` is complete: the tracker, the remote copy (in the background), rotation
        (never the folder just written, nor one a remote copy is still reading)."""
        self.local.write_tracker(step)
        if self.remote is not None:
            self.remote.upload(path, step)
        reading = self.remote.reading() if self.remote is not None else None
        self.local.rotate(self.cfg.trainer.max_ckpt_to_keep, protect={step, reading})

    def _uploaded(self, info: dict[str, Any]) -> None:
        """A remote copy finished, failed (retried at the next save) or was skipped for a newer checkpoint."""
        if "error" in info:
            self.on_event("warning", message="copying a checkpoint to trainer.remote_dir failed; the newest "
                                             "checkpoint is copied again at the next save", **info)
        else:
            self.on_event("remote_checkpoint", **info)


def check_run_dir(run_dir: Path) -> None:
    """The run directory (trainer.default_local_dir) is a folder this user can write, or can be made one."""
    fix = "Fix: set trainer.default_local_dir to a folder this user may write."
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"trainer.default_local_dir='{run_dir}' is a file, not a folder. {fix}")
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"trainer.default_local_dir='{run_dir}' lies under '{existing}', which is a file. {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"trainer.default_local_dir='{run_dir}': '{existing}' is not writable by this user"
                          f"{' (or is on a read-only file system)' if existing != run_dir else ''}. {fix}")


def find_resume_path(run_dir: Path, mode: str, resume_from: str | None) -> Path | None:
    """The checkpoint to resume from, or None to start fresh (verl's auto | disable | resume_path): the tracker's,
    else the newest complete one, passing over damaged ones (`layout.problem`)."""
    if mode == "disable":
        return None
    if resume_from:
        return _checked_resume_path(Path(resume_from))
    if mode == "resume_path":
        raise ConfigError("trainer.resume_mode=resume_path needs trainer.resume_from_path.")
    run = RunDir(LocalFolder(run_dir))
    steps = list(reversed(run.complete_steps()))
    named = run.tracker_step()
    if named in steps:  # the tracker's, then the newest first
        steps.remove(named)
        steps.insert(0, named)
    damaged = []
    for s in steps:
        why = damage(run_dir / step_name(s))
        if why is None:
            return run_dir / step_name(s)
        damaged.append(f"{step_name(s)}: {why}")
    if damaged:
        raise ConfigError(f"Every checkpoint in {run_dir} is damaged ({'; '.join(damaged)}), so the run can neither "
                          "resume nor start again among them. Fix: restore a checkpoint (e.g. from "
                          "trainer.remote_dir), or move them away and start afresh.")
    return None


def _checked_resume_path(path: Path) -> Path:
    key = f"trainer.resume_from_path='{path}'"
    if step_of(path.name) is None or not path.is_dir():
        raise ConfigError(f"{key} is not a global_step_N checkpoint folder.")
    why = problem(path)
    if why:
        others = reversed(RunDir(LocalFolder(path.parent)).complete_steps())
        intact = [path.parent / step_name(s) for s in others if step_name(s) != path.name]
        intact = [p for p in intact if not damage(p)]
        raise ConfigError(f"{key} is {why}. Fix: point it at a complete checkpoint"
                          + (f", e.g. {intact[0]}." if intact else "."))
    return path


def fetch_remote_for_resume(cfg: Config, run_dir: Path, world: parallel.World) -> None:
    """With resume_mode=auto, bring the remote's newest complete checkpoint into `run_dir` when the run
    directory has none as new (each node's local rank 0 downloads; every rank waits). A run that starts
    afresh (resume_mode=disable) is refused when the remote already holds checkpoints: they would mix."""
    trainer_cfg = cfg.trainer
    if not trainer_cfg.remote_dir or trainer_cfg.resume_from_path or trainer_cfg.resume_mode not in ("auto", "disable"):
        return
    # the main rank first; then the first rank of every other node, which finds the copy already there when the
    # nodes share the run directory (the usual setup) and downloads its own when each node has a local one
    for turn in (world.is_main, world.local_rank == 0 and not world.is_main):
        if turn:
            _fetch_newer(trainer_cfg.remote_dir, run_dir, refuse_fresh_start=trainer_cfg.resume_mode == "disable")
        parallel.barrier(world)


def _fetch_newer(url: str, run_dir: Path, refuse_fresh_start: bool) -> None:
    with storage_errors(f"Reading the checkpoints at trainer.remote_dir={url}"):
        remote = RemoteCheckpoints(url)
        step = remote.run.newest_complete()
        local = RunDir(LocalFolder(run_dir)).complete_steps()
        if step is not None and refuse_fresh_start:
            raise ConfigError(f"trainer.remote_dir={url} already holds checkpoints of another run (up to "
                              f"{step_name(step)}), and this run starts again at step 0: its copies would mix "
                              "with them. Fix: a new trainer.remote_dir, or trainer.resume_mode=auto to continue "
                              "that run.")
        if step is not None and step > (local[-1] if local else 0):
            remote.download(step, run_dir)


def check_fresh_start(run_dir: Path, resume_from: Path | None, load_contents: list[str] | None) -> None:
    """A run that starts again at step 0 must not write among another run's checkpoints (rotation and the
    tracker would mix them)."""
    restarts_at_zero = resume_from is None or "extra" not in (load_contents or ["extra"])
    existing = RunDir(LocalFolder(run_dir)).complete_steps()
    if restarts_at_zero and existing:
        raise ConfigError(
            f"{run_dir} already holds checkpoints of another run (up to {step_name(existing[-1])}), and this "
            "run starts again at step 0: its checkpoints would mix with them. Fix: set a new "
            "trainer.default_local_dir, or trainer.resume_mode=auto to continue that run.")
