"""A checkpoint of the run's `dict[str, Stateful]` parts with torch.distributed.checkpoint (DCP):

```
global_step_{N}/
    .metadata, __*.distcp       # DCP: the tensor parts (model, optimizer), sharded, reshardable
    trainer_state.json          # step, world size, and every other part as JSON (written last)
    rng_rank_{r}.json           # parts kept per rank (RNG of python / numpy / torch / CUDA)
    huggingface/                # config, generation config, tokenizer, chat template (and LoRA's config)
```

"model" and "optimizer" hold tensors and go to DCP (as `checkpoint.save_contents` asks); a part with
`per_rank = True` gets one JSON file per rank; every other part is a key of trainer_state.json. Adding state to
checkpoints is one entry in that dict (`Trainer.__init__`).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from shardtune import parallel, vision
from shardtune.checkpoint.layout import RunDir, single_process_ok, step_name
from shardtune.checkpoint.storage import LocalFolder
from shardtune.config import CheckpointConfig, ModelConfig
from shardtune.engine.base import Engine
from shardtune.errors import ConfigError, ShardtuneError
from shardtune.model import generation_config

TENSOR_PARTS = ("model", "optimizer")  # the parts DCP stores; the rest is JSON ("extra" in save_contents)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _per_rank(part: Any) -> bool:
    return getattr(part, "per_rank", False)


class Writer:
    """Writes one checkpoint folder (optionally in the background); once it is complete on disk, calls
    `complete(step, path)` on the main rank (the tracker, rotation, the remote copy), then `saved(info)`.

    With `checkpoint.async_save`, DCP stages the shards in host memory and writes them on a background thread over
    a separate gloo group while training goes on; `poll` (after every step) finishes the folder at the first step
    after every rank has written its shards, so the tracker never names a folder still being written.
    """

    def __init__(self, cfg: CheckpointConfig, world: parallel.World, parts: dict[str, Stateful], engine: Engine,
                 tokenizer: Any, model_path: Path, complete: Callable[[int, Path], None],
                 saved: Callable[[dict[str, Any]], None]):
        self.cfg, self.world, self.parts, self.engine, self.tokenizer = cfg, world, parts, engine, tokenizer
        self.model_path, self.complete, self.saved = model_path, complete, saved
        self.pending: tuple[Any, Callable[[], None], Path] | None = None
        self.group = dist.new_group(backend="gloo") if cfg.async_save and world.distributed else None
        # poll's done-check gets a group of its own: DCP's background thread gathers the write results on
        # `self.group`, and a collective from the main thread on the same group can pair with it on one rank
        # and not on the other (an intermittent hang, seen with 2 processes)
        self.done_group = dist.new_group(backend="gloo") if self.group is not None else None

    def save(self, path: Path, step: int, hf_weights: bool = False) -> None:
        self.wait()
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
        self.pending = (future, lambda: self._finish(path, step, shared, own, info, t0), path)
        if future is None:
            self.wait()

    def wait(self) -> None:
        """Finish the pending save, if any: every rank's shards written, then the side files."""
        if self.pending is None:
            return
        future, finish, path = self.pending
        self.pending = None
        with self._disk_full(path):
            if future is not None:
                future.result()
            finish()

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
            steps = reversed(RunDir(LocalFolder(path.parent)).complete_steps())
            intact = [s for s in steps if step_name(s) != path.name]
            kept = (f"the earlier checkpoints are intact; a relaunch resumes from {step_name(intact[0])}" if intact
                    else "no earlier checkpoint exists")
            raise ShardtuneError(f"No space left on the device while saving {path} (removed; {kept}). Fix: free space "
                                 f"on {path.parent}, keep fewer checkpoints (trainer.max_ckpt_to_keep), or set "
                                 "trainer.default_local_dir on a larger disk, then run the same command again."
                                 ) from None

    def poll(self) -> None:
        """Called by every rank after every step: finish an asynchronous save once every rank's shards are
        written (one small collective on a gloo group of its own, only while a save is pending)."""
        if self.pending is not None and self.pending[0] is not None:
            done = torch.tensor([int(self.pending[0].done())])
            if self.done_group is not None:
                dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self.done_group)
            if done.item():
                self.wait()

    def _finish(self, path: Path, step: int, shared: dict[str, Any], own: dict[str, Any], info: dict[str, Any],
                t0: float) -> None:
        for name, state in own.items():
            (path / f"{name}_rank_{self.world.rank}.json").write_text(json.dumps(state))
        parallel.barrier(self.world)
        if self.world.is_main:
            save_hf_side_files(self.engine, self.tokenizer, self.model_path, path / "huggingface")
            record = {"step": step, "world_size": self.world.world_size, "contents": self.cfg.save_contents, **shared}
            tmp = path / "trainer_state.json.tmp"
            tmp.write_text(json.dumps(record))
            tmp.replace(path / "trainer_state.json")  # written last: the folder is complete from here on
            self.complete(step, path)
        parallel.barrier(self.world)
        info["seconds"] = round(time.perf_counter() - t0, 3)
        info["bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        self.saved(info)


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
        info["note"] = (f"resharded from {record['world_size']} to {world.world_size} processes; RNG streams "
                        "restart from the seed")
    return info


def _upgraded(record: dict[str, Any]) -> dict[str, Any]:
    """trainer_state.json of checkpoints written before the state was kept by part (one flat mapping)."""
    if "train" in record or "sampler" not in record:
        return record
    train = {k: record[k] for k in ("step", "tokens_seen", "skipped_steps", "best_val", "bad_validations",
                                    "stopped_early") if k in record}
    return {**record, "train": train, "loader": record["sampler"]}
