"""Checkpoints with torch.distributed.checkpoint (DCP), in verl's layout, of a `dict[str, Stateful]`.

```
{run_dir}/latest_checkpointed_iteration.txt     # the step number, written (atomically) last
{run_dir}/global_step_{N}/
    .metadata, __*.distcp                        # DCP: the tensor parts (model, optimizer), sharded, reshardable
    trainer_state.json                           # step, world size, and every other part as JSON
    rng_rank_{r}.json                            # parts kept per rank (RNG of python / numpy / torch / CUDA)
    huggingface/                                 # config, generation config, tokenizer, chat template
```

The parts are named objects with `state_dict()` / `load_state_dict()`: "model" and "optimizer" hold tensors
and go to DCP (as `checkpoint.save_contents` asks); a part with `per_rank = True` gets one JSON file per
rank; every other part is a key of trainer_state.json. Adding state to checkpoints is one entry in that
dict. A checkpoint is complete once DCP's `.metadata` and `trainer_state.json` (written last) are there, and
the tracker only ever names a complete one; a folder without them (a crash mid-save) is never resumed from
and never counted by rotation.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from shardtune import parallel, vision
from shardtune.config import CheckpointConfig, Config, ModelConfig
from shardtune.engine.base import Engine
from shardtune.errors import ConfigError, ShardtuneError
from shardtune.model import generation_config
from shardtune.remote import (  # the layout names, shared with the remote copy
    LAST,
    STEP_DIR,
    TRACKER,
    RemoteCheckpoints,
    storage_errors,
)

TENSOR_PARTS = ("model", "optimizer")  # the parts DCP stores; the rest is JSON ("extra" in save_contents)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"global_step_{step}"


def is_complete(path: Path) -> bool:
    """DCP's `.metadata` and trainer_state.json are written last: with both, every file of the folder is there
    (the same rule judges the remote copies)."""
    return all((path / name).is_file() for name in LAST)


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint folder that `is_complete` calls complete, or None when it is whole:
    trainer_state.json must parse, and every file DCP's .metadata names must be there, at least as long as the
    last byte it records in it (a deleted or cut-off shard). Reads the metadata, never the tensors."""
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


def _per_rank(part: Any) -> bool:
    return getattr(part, "per_rank", False)


class Checkpointer:
    """Saves `global_step_N/` (optionally in the background) and finalises it: side files, tracker, rotation.

    With `checkpoint.async_save`, DCP stages the shards in host memory and writes them on a background
    thread over a separate gloo group while training goes on; `poll` (after every step) finalises the folder
    (tracker last) at the first step after every rank has written its shards, so the tracker never names a
    folder still being written and a checkpoint is usable as soon as it is on disk.
    """

    def __init__(self, run_dir: Path, cfg: CheckpointConfig, world: parallel.World, parts: dict[str, Stateful],
                 engine: Engine, tokenizer: Any, model_path: str, max_to_keep: int | None,
                 on_saved: Callable[..., None] = lambda kind, **info: None, remote: RemoteCheckpoints | None = None):
        self.run_dir, self.cfg, self.world, self.parts = run_dir, cfg, world, parts
        self.engine, self.tokenizer, self.max_to_keep, self.on_saved = engine, tokenizer, max_to_keep, on_saved
        self.remote = remote  # the copies under trainer.remote_dir (main rank only)
        self.model_path = Path(os.path.expanduser(model_path))
        self.pending: tuple[Any, Callable[[], None], Path] | None = None
        self.group = dist.new_group(backend="gloo") if cfg.async_save and world.distributed else None
        # poll's done-check gets a group of its own: DCP's background thread gathers the write results on
        # `self.group`, and a collective from the main thread on the same group can pair with it on one rank
        # and not on the other (an intermittent hang, seen with 2 processes)
        self.done_group = dist.new_group(backend="gloo") if self.group is not None else None

    def save(self, step: int, hf_weights: bool = False) -> None:
        self.wait()
        path = step_dir(self.run_dir, step)
        with self._disk_full(path):
            self._save(path, step, hf_weights)

    def _save(self, path: Path, step: int, hf_weights: bool) -> None:
        t0 = time.perf_counter()
        if self.world.is_main and path.exists():  # a leftover of a crashed save at the same step
            shutil.rmtree(path)
        parallel.barrier(self.world)
        tensors = {k: self.parts[k].state_dict() for k in TENSOR_PARTS if k in self.cfg.save_contents}
        if hf_weights or "hf_model" in self.cfg.save_contents:
            self.engine.export(str(path / "huggingface"))  # collective: every rank takes part
        # the JSON parts as they are now: training goes on while an async save writes
        shared = {k: p.state_dict() for k, p in self.parts.items() if k not in TENSOR_PARTS and not _per_rank(p)}
        own = {k: p.state_dict() for k, p in self.parts.items() if _per_rank(p)}
        future = None
        with single_process_ok():
            if self.cfg.async_save:
                future = dcp.async_save(tensors, checkpoint_id=str(path), process_group=self.group)
            else:
                dcp.save(tensors, checkpoint_id=str(path))
        info = {"step": step, "path": str(path), "async": future is not None}
        self.pending = (future, lambda: self._finalize(path, step, shared, own, info, t0), path)
        if future is None:
            self.wait()

    def wait(self) -> None:
        """Finish the pending save, if any: every rank's shards written, then side files and the tracker."""
        if self.pending is None:
            return
        future, finalize, path = self.pending
        self.pending = None
        with self._disk_full(path):
            if future is not None:
                future.result()
            finalize()

    @contextlib.contextmanager
    def _disk_full(self, path: Path) -> Iterator[None]:
        """A save that runs out of disk space: its folder is removed (the earlier checkpoints stay as they were,
        and the tracker names the newest of them), and the error says so, naming the path."""
        try:
            yield
        except BaseException as e:
            if not _no_space(e, path):
                raise
            if self.world.is_main:
                shutil.rmtree(path, ignore_errors=True)
            intact = [p for _, p in reversed(complete_checkpoints(self.run_dir)) if p != path]
            kept = (f"the earlier checkpoints are intact; a relaunch resumes from {intact[0].name}" if intact
                    else "no earlier checkpoint exists")
            raise ShardtuneError(f"No space left on the device while saving {path} (removed; {kept}). Fix: free space "
                                 f"on {self.run_dir}, keep fewer checkpoints (trainer.max_ckpt_to_keep), or set "
                                 "trainer.default_local_dir on a larger disk, then run the same command again."
                                 ) from None

    def poll(self) -> None:
        """Called by every rank after every step: finalise an asynchronous save once every rank's shards are
        written (one small collective on a gloo group of its own, only while a save is pending), and let the
        remote copier report a finished copy and start the next."""
        if self.pending is not None and self.pending[0] is not None:
            done = torch.tensor([int(self.pending[0].done())])
            if self.done_group is not None:
                dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self.done_group)
            if done.item():
                self.wait()
        if self.remote is not None:
            self.remote.poll()

    def close(self) -> None:
        """End of the run: the pending save, then the remote copies (a failure of the last one raises)."""
        self.wait()
        if self.remote is not None:
            self.remote.close()

    def _finalize(self, path: Path, step: int, shared: dict[str, Any], own: dict[str, Any], info: dict[str, Any],
                  t0: float) -> None:
        for name, state in own.items():
            (path / f"{name}_rank_{self.world.rank}.json").write_text(json.dumps(state))
        parallel.barrier(self.world)
        if self.world.is_main:
            save_hf_side_files(self.engine, self.tokenizer, self.model_path, path / "huggingface")
            record = {"step": step, "world_size": self.world.world_size, "contents": self.cfg.save_contents, **shared}
            _atomic_write(path / "trainer_state.json", json.dumps(record))
            _atomic_write(self.run_dir / TRACKER, str(step))
            if self.remote is not None:
                self.remote.upload(path, step)  # in the background
            # never the folder just written, nor one a remote copy is still reading
            rotate(self.run_dir, self.max_to_keep, protect=(path, self.remote.reading() if self.remote else None))
        parallel.barrier(self.world)
        info["seconds"] = round(time.perf_counter() - t0, 3)
        info["bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        self.on_saved("checkpoint", **info)


def _no_space(e: BaseException, path: Path) -> bool:
    """Whether a save failed for want of disk space: ENOSPC somewhere in the chain, or in DCP's per-rank
    failures; torch.save's zip writer says only "file write failed" / "unexpected pos", so those count when
    the disk is (nearly) full."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if (isinstance(x, OSError) and x.errno == errno.ENOSPC) or "No space left on device" in str(x):
            return True
        if ("file write failed" in str(x) or "unexpected pos" in str(x)) and _nearly_full(path):
            return True
        todo += [x.__cause__, x.__context__]
        todo += [failure[0] for failure in getattr(x, "failures", {}).values()]  # DCP's CheckpointException
    return False


def _nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free < 64 * 2**20
    except OSError:
        return False


def save_hf_side_files(engine: Engine, tokenizer: Any, model_path: Path, out: Path) -> None:
    """Config (with the KV cache back on, for inference), the base model's generation config, tokenizer, the image
    processor's config (vision-language models), and the LoRA adapter config (export rebuilds the adapters from
    it, then merges them)."""
    config = copy.deepcopy(engine.model_config())
    config.use_cache = True
    config.save_pretrained(out)
    generation_config(model_path, config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    vision.copy_processor_files(model_path, out)
    adapter = engine.adapter_config()
    if adapter is not None:
        adapter.save_pretrained(out)


def check_same_kind(path: Path, model: ModelConfig, contents: list[str] | None) -> None:
    """A LoRA checkpoint holds adapter weights (and their optimizer state), a full one every weight: one cannot
    be loaded as the other. Checked before the model is built."""
    if contents is not None and "model" not in contents:
        return
    adapter = path / "huggingface" / "adapter_config.json"
    saved_rank = json.loads(adapter.read_text()).get("r") if adapter.is_file() else 0
    if bool(saved_rank) == bool(model.lora_rank):
        return
    if saved_rank:
        raise ConfigError(f"{path} was trained with LoRA (rank {saved_rank}), and this run is a full fine-tune "
                          "(model.lora_rank=0): its adapter weights cannot be resumed as full weights. Fix: set "
                          f"model.lora_rank={saved_rank} to continue it, or start a full fine-tune from its merged "
                          f"weights: `shardtune export {path} --out DIR`, then model.path=DIR in a new run.")
    raise ConfigError(f"{path} is a full fine-tune, and this run trains LoRA adapters (model.lora_rank="
                      f"{model.lora_rank}): its weights and optimizer state do not fit adapters. Fix: "
                      "model.lora_rank=0 to continue it, or LoRA on its weights: `shardtune export "
                      f"{path} --out DIR`, then model.path=DIR in a new run.")


def load(path: Path, parts: dict[str, Stateful], world: parallel.World, contents: list[str] | None) -> dict[str, Any]:
    """Load what `contents` names (default: all that was saved) into `parts`; returns what happened.

    Model and optimizer are resharded by DCP to this world size; per-rank parts (RNG) are restored when the
    world size is the same. Without "extra" only the weights continue: data, schedule and counters restart.
    """
    record = _upgraded(json.loads((path / "trainer_state.json").read_text()))
    saved = record.get("contents", ["model", "optimizer", "extra"])
    wanted = [c for c in (contents or saved) if c in saved]
    tensors = {k: parts[k].state_dict() for k in TENSOR_PARTS if k in wanted}
    try:
        with single_process_ok():
            dcp.load(tensors, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # damage that the sizes do not show, or another model's shape
        raise ShardtuneError(f"Resuming from {path} failed ({type(e).__name__}: {str(e)[:400]}). Fix: point "
                             "trainer.resume_from_path at an earlier checkpoint of the run, or check that model.* "
                             "is as it was when it was saved.") from None
    for name, state in tensors.items():  # model first: the optimizer's state is keyed by its parameters
        parts[name].load_state_dict(state)
    same_world = record["world_size"] == world.world_size
    if "extra" in wanted:
        for name, part in parts.items():
            rank_file = path / f"{name}_rank_{world.rank}.json"
            if _per_rank(part) and same_world and rank_file.is_file():
                part.load_state_dict(json.loads(rank_file.read_text()))
            elif name not in TENSOR_PARTS and not _per_rank(part) and name in record:
                part.load_state_dict(record[name])
    info = {"path": str(path), "step": record["step"] if "extra" in wanted else 0, "loaded": wanted,
            "saved_world_size": record["world_size"], "world_size": world.world_size}
    if not same_world:
        info["note"] = f"resharded from {record['world_size']} to {world.world_size} processes; RNG streams restart from the seed"
    return info


def _upgraded(record: dict[str, Any]) -> dict[str, Any]:
    """trainer_state.json of checkpoints written before the state was kept by part (one flat mapping)."""
    if "train" in record or "sampler" not in record:
        return record
    train = {k: record[k] for k in ("step", "tokens_seen", "skipped_steps", "best_val", "bad_validations",
                                    "stopped_early") if k in record}
    return {**record, "train": train, "loader": record["sampler"]}


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


def _step_folders(run_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for p in run_dir.glob("global_step_*"):
        m = STEP_DIR.search(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    return [(step, p) for step, p in _step_folders(run_dir) if is_complete(p)]


def incomplete_after(run_dir: Path, step: int) -> list[tuple[Path, str]]:
    """Checkpoint folders newer than `step` that a resume skipped, with why: left incomplete by a crash, or
    damaged afterwards (a shard deleted or cut off, trainer_state.json overwritten)."""
    out = []
    for s, p in _step_folders(run_dir):
        if s > step:
            problem = "incomplete (a save that did not finish)" if not is_complete(p) else damage(p)
            if problem:
                out.append((p, problem))
    return out


def rotate(run_dir: Path, max_to_keep: int | None, protect: tuple[Path | None, ...] = ()) -> None:
    """Keep the newest `max_to_keep` complete checkpoints (never those in `protect`: the one just written, one
    being copied to remote storage); incomplete folders are left alone."""
    if not max_to_keep or max_to_keep < 1:
        return
    for _, p in complete_checkpoints(run_dir)[:-max_to_keep]:
        if p not in protect:
            shutil.rmtree(p, ignore_errors=True)


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
    """The checkpoint to resume from, or None to start fresh (verl's auto | disable | resume_path)."""
    if mode == "disable":
        return None
    if resume_from:
        path = Path(resume_from)
        if not STEP_DIR.search(path.name) or not path.is_dir():
            raise ConfigError(f"trainer.resume_from_path='{resume_from}' is not a global_step_N checkpoint folder.")
        problem = "incomplete (a save that did not finish)" if not is_complete(path) else damage(path)
        if problem:
            intact = [p for _, p in reversed(complete_checkpoints(path.parent)) if p != path and not damage(p)]
            other = f", e.g. {intact[0]}" if intact else ""
            raise ConfigError(f"trainer.resume_from_path='{resume_from}' is {problem}. Fix: point it at a "
                              f"complete checkpoint{other}.")
        return path
    if mode == "resume_path":
        raise ConfigError("trainer.resume_mode=resume_path needs trainer.resume_from_path.")
    candidates = [p for _, p in reversed(complete_checkpoints(run_dir))]
    named = _tracked(run_dir)
    if named is not None and named in candidates:  # the tracker's, then the newest first
        candidates.remove(named)
        candidates.insert(0, named)
    damaged = []
    for path in candidates:
        problem = damage(path)
        if problem is None:
            return path
        damaged.append(f"{path.name}: {problem}")
    if damaged:
        raise ConfigError(f"Every checkpoint in {run_dir} is damaged ({'; '.join(damaged)}), so the run can neither "
                          "resume nor start again among them. Fix: restore a checkpoint (e.g. from "
                          "trainer.remote_dir), or move them away and start afresh.")
    return None


def _tracked(run_dir: Path) -> Path | None:
    """The checkpoint the tracker names; None when there is none or it holds no step number (overwritten)."""
    try:
        return step_dir(run_dir, int((run_dir / TRACKER).read_text().strip()))
    except (OSError, ValueError):
        return None


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
        step = remote.newest_complete()
        local = complete_checkpoints(run_dir)
        if step is not None and refuse_fresh_start:
            raise ConfigError(f"trainer.remote_dir={url} already holds checkpoints of another run (up to "
                              f"global_step_{step}), and this run starts again at step 0: its copies would mix "
                              "with them. Fix: a new trainer.remote_dir, or trainer.resume_mode=auto to continue "
                              "that run.")
        if step is not None and step > (local[-1][0] if local else 0):
            remote.download(step, run_dir)


def check_fresh_start(run_dir: Path, resume_from: Path | None, load_contents: list[str] | None) -> None:
    """A run that starts again at step 0 must not write among another run's checkpoints (rotation and the
    tracker would mix them)."""
    restarts_at_zero = resume_from is None or "extra" not in (load_contents or ["extra"])
    existing = complete_checkpoints(run_dir)
    if restarts_at_zero and existing:
        raise ConfigError(
            f"{run_dir} already holds checkpoints of another run (up to global_step_{existing[-1][0]}), and this "
            "run starts again at step 0: its checkpoints would mix with them. Fix: set a new "
            "trainer.default_local_dir, or trainer.resume_mode=auto to continue that run.")
