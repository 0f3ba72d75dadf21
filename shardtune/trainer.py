"""The training loop: epochs and steps, the cadence of validation and logging, early stopping.

It sees data plans and plain numbers; the model, optimizer and every collective live behind the engine.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shardtune import checkpoint, flops, parallel
from shardtune.config import Config, dump_yaml, resolve_sources, to_dict
from shardtune.data.batching import (
    GlobalBatchSampler,
    MicroBatch,
    collate,
    equalize,
    fixed_micro_batches,
    split_across_ranks,
    split_to,
    token_budget_micro_batches,
)
from shardtune.data.dataset import TokenizedDataset, build_dataset
from shardtune.engine import build_engine
from shardtune.errors import ConfigError
from shardtune.metrics import Metrics, max_memory_gb
from shardtune.model import load_tokenizer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_datasets(cfg: Config, tokenizer: Any, world: parallel.World) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """Rank 0 tokenizes (and fills the cache) first; the other ranks then read the cache."""
    d = cfg.data
    sources = resolve_sources(d.train_files, d, d.train_max_samples, "data.train_files")
    if len(sources) > 1:  # until the step loader draws batches by weight; validation sources may be several
        raise ConfigError(f"data.train_files holds {len(sources)} sources ({', '.join(s.name for s in sources)}); "
                          "training on a weighted mixture is not available yet. Fix: train on one source (plain "
                          "paths together are one); `shardtune validate` reports each source.")

    def build() -> tuple[TokenizedDataset, TokenizedDataset | None]:
        train = build_dataset(d.train_files, d, tokenizer, d.train_max_samples, progress=world.is_main)
        val = build_dataset(d.val_files, d, tokenizer, d.val_max_samples, progress=world.is_main) if d.val_files else None
        return train, val

    if world.is_main:
        out = build()
        parallel.barrier(world)
    else:
        parallel.barrier(world)
        out = build()
    return out


def _raise_if_error(item: Any) -> Any:
    if isinstance(item, Exception):
        raise item
    return item


@dataclass
class StepBatch:
    """One optimizer step's data: the sampler position, the global batch, every rank's micro-batch plan and
    this rank's collated micro-batches."""

    epoch: int
    step_in_epoch: int
    indices: np.ndarray
    plans: list[list[list[int]]]
    micro_batches: list[MicroBatch]
    num_targets: int  # supervised tokens of the global batch: the loss divisor


class Trainer:
    def __init__(self, cfg: Config, world: parallel.World | None = None):
        self.cfg = cfg
        self.world = world or parallel.World()
        seed_everything(cfg.trainer.seed)
        self.tokenizer = load_tokenizer(cfg.model)
        # data problems surface before anything is written to the run directory
        self.train_data, self.val_data = load_datasets(cfg, self.tokenizer, self.world)
        self.run_dir = cfg.run_dir
        # a wrong resume path is reported before anything in the run directory is touched
        resume_from = checkpoint.find_resume_path(self.run_dir, cfg.trainer.resume_mode, cfg.trainer.resume_from_path)
        restarts_at_zero = resume_from is None or "extra" not in (cfg.checkpoint.load_contents or ["extra"])
        existing = checkpoint.complete_checkpoints(self.run_dir)
        if restarts_at_zero and existing:
            raise ConfigError(
                f"{self.run_dir} already holds checkpoints of another run (up to global_step_{existing[-1][0]}), "
                "and this run starts again at step 0: its checkpoints would mix with them. Fix: set a new "
                "trainer.default_local_dir, or trainer.resume_mode=auto to continue that run.")
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.run_dir / "config.yaml")
        d = cfg.data
        self.sampler = GlobalBatchSampler(len(self.train_data), d.train_batch_size, cfg.trainer.seed, d.shuffle,
                                          d.drop_last)
        t = cfg.trainer
        self.total_steps = t.total_training_steps or t.total_epochs * self.sampler.steps_per_epoch
        seed_everything(cfg.trainer.seed)  # model init and dropout do not depend on how data was built
        self.engine = build_engine(cfg, self.world, self.total_steps, self.tokenizer)
        self.step = 0
        self.skipped_steps = 0
        self.tokens_seen = 0
        self.best_val = math.inf
        self.bad_validations = 0
        self.last_saved = 0
        self.stopped_early = False
        self.checkpointer = checkpoint.Checkpointer(self.run_dir, cfg.checkpoint, self.world, self.tokenizer,
                                                    t.max_ckpt_to_keep, cfg.model.path,
                                                    on_saved=lambda info: self.metrics.event("checkpoint", **info))
        self.resumed: dict[str, Any] | None = None
        if resume_from is not None:
            self._resume(resume_from)
        self.metrics = Metrics(self.run_dir, t.logger, self.world.is_main, self.total_steps, self.step,
                               t.progress_bar, t.project_name, t.experiment_name, to_dict(cfg))
        self.peak_flops = flops.device_peak_flops(self.world.device, self.engine.compute_dtype)
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "skipped_steps": self.skipped_steps, "best_val": self.best_val,
                "bad_validations": self.bad_validations, "stopped_early": self.stopped_early,
                "tokens_seen": self.tokens_seen,
                "sampler": self.sampler.state_dict(),
                "schedule": self.engine.schedule_state(), "world_size": self.world.world_size}

    def _resume(self, path) -> None:
        state = checkpoint.load(path, self.engine, self.world, self.cfg.checkpoint.load_contents)
        self.step = state["step"]
        if "extra" in state["loaded"]:  # without it: the weights continue, data and schedule restart
            self.skipped_steps = state["skipped_steps"]
            self.best_val, self.bad_validations = state["best_val"], state["bad_validations"]
            self.stopped_early = state.get("stopped_early", False)
            self.tokens_seen = state.get("tokens_seen", 0)
            self.sampler.load_state_dict(state["sampler"])
            self.engine.load_schedule_state(state["schedule"])
        else:
            self.step = 0
        self.last_saved = self.step
        self.resumed = {"path": str(path), "step": self.step, "loaded": state["loaded"],
                        "saved_world_size": state["world_size"],
                        "world_size": self.world.world_size,
                        "skipped_incomplete": [str(p) for p in checkpoint.incomplete_after(self.run_dir, self.step)]}
        if state["world_size"] != self.world.world_size:
            self.resumed["note"] = (f"resharded from {state['world_size']} to {self.world.world_size} processes; "
                                    "RNG streams restart from the seed")

    def save(self, final: bool = False) -> None:
        hf_weights = final and self.cfg.trainer.save_hf_at_end
        self.checkpointer.save(self.step, self.engine, self.trainer_state(), hf_weights=hf_weights)
        if final:
            self.checkpointer.wait()
        self.last_saved = self.step

    # ------------------------------------------------------------------------------------------------------
    def plan(self, indices: np.ndarray, data: TokenizedDataset) -> list[list[list[int]]]:
        """Micro-batches (lists of sample indices) for every data-parallel rank."""
        d = self.cfg.data
        shares = split_across_ranks(indices, data.lengths, self.world.dp_size)
        if not d.use_dynamic_bsz:
            return equalize([fixed_micro_batches(s, d.micro_batch_size_per_gpu) for s in shares])
        plans = [token_budget_micro_batches(s, data.lengths, d.max_token_len_per_gpu) for s in shares]
        n = max(len(p) for p in plans)
        return equalize([split_to(p, n, data.lengths) for p in plans])

    def collate(self, micro: list[int], data: TokenizedDataset) -> MicroBatch:
        return collate([data[i] for i in micro], self.cfg.model.use_remove_padding, self.tokenizer.pad_token_id)

    def prepare(self, epoch: int, step_in_epoch: int, indices: np.ndarray) -> StepBatch:
        plans = self.plan(indices, self.train_data)
        micro_batches = [self.collate(m, self.train_data) for m in plans[self.world.dp_rank]]
        if self.world.device.type == "cuda":  # pinned here, in the prefetch thread, not on the step's path
            micro_batches = [mb.pin_memory() for mb in micro_batches]
        return StepBatch(epoch, step_in_epoch, indices, plans, micro_batches, self.train_data.num_targets(indices))

    def steps(self) -> Iterator[StepBatch]:
        """The coming steps, from the sampler's position on. With data.prefetch_steps > 0 a background thread
        plans and collates them that many steps ahead, so the engine does not wait for its next batch."""
        ahead = self.cfg.data.prefetch_steps
        if ahead == 0:
            return (self.prepare(*b) for b in self.sampler)
        from torchdata.nodes import IterableWrapper, Loader, Prefetcher

        loader = Loader(Prefetcher(IterableWrapper(self._prepared_or_error()), prefetch_factor=ahead))
        return (_raise_if_error(item) for item in loader)

    def _prepared_or_error(self) -> Iterator[StepBatch | Exception]:
        """Prepared steps; an error is handed over as an item, so the loop raises it as itself (torchdata would
        re-wrap it with the thread's traceback, losing shardtune's message format)."""
        for b in self.sampler:
            try:
                yield self.prepare(*b)
            except Exception as e:
                yield e
                return

    def fit(self) -> list[dict[str, Any]]:
        self.metrics.event("start", steps=self.total_steps, steps_per_epoch=self.sampler.steps_per_epoch,
                           samples=len(self.train_data), world_size=self.world.world_size,
                           run_dir=str(self.run_dir))
        if self.cfg.engine.strategy == "fsdp":
            self.metrics.event("note", message="engine.strategy=fsdp (verl's name) runs FSDP2 (fully_shard); "
                                               "shardtune does not offer FSDP1")
        if self.resumed:
            self.metrics.event("resume", **self.resumed)
            if self.resumed["skipped_incomplete"]:
                self.metrics.event("warning", message="skipped checkpoint folders a crash left incomplete",
                                   paths=self.resumed["skipped_incomplete"])
        steps, ok = None, False
        try:
            if self.stopped_early:  # a relaunch of a run that already stopped early (e.g. a requeued job)
                self.metrics.event("early_stop", step=self.step, best_val_loss=self.best_val, note="already stopped")
                ok = True
                return self.history
            steps = self.steps()
            while self.step < self.total_steps:  # checked before drawing, so the sampler stops at the step
                t0 = time.perf_counter()
                batch = next(steps)
                metrics = self.train_step(batch, data_wait=time.perf_counter() - t0)
                stop = False
                if self.val_data is not None and (self._due(self.cfg.trainer.test_freq) or self.step == self.total_steps):
                    metrics["val/loss"] = self.validate()
                    stop = self._early_stop(metrics["val/loss"])
                self.metrics.log(self.step, metrics)
                self.history.append({"step": self.step, **metrics})
                if self._due(self.cfg.trainer.save_freq) and self.step < self.total_steps and not stop:
                    self.save()
                if stop:
                    self.stopped_early = True
                    self.metrics.event("early_stop", step=self.step, best_val_loss=self.best_val)
                    break
            if self.step > self.last_saved:  # always a checkpoint after the last step
                self.save(final=True)
            self.checkpointer.wait()
            ok = True
        finally:
            steps = None  # releasing the prefetch node stops its thread
            self.metrics.close(ok)  # an MLflow run is marked FAILED when the loop raised
        return self.history

    def train_step(self, batch: StepBatch, data_wait: float = 0.0) -> dict[str, Any]:
        """One optimizer step; `data_wait` is how long the loop waited for `batch` (counted in the step time)."""
        t0 = time.perf_counter()
        result = self.engine.train_batch(batch.micro_batches, batch.num_targets)
        elapsed = time.perf_counter() - t0 + data_wait
        self.sampler.consumed(batch.epoch, batch.step_in_epoch)
        epoch, step_in_epoch, indices, plans = batch.epoch, batch.step_in_epoch, batch.indices, batch.plans
        self.step += 1
        self.skipped_steps += int(result.skipped)
        lengths = self.train_data.lengths[indices]
        tokens = int(lengths.sum())
        self.tokens_seen += tokens
        padded = 0 if self.cfg.model.use_remove_padding else sum(
            len(m) * int(self.train_data.lengths[m].max()) - int(self.train_data.lengths[m].sum())
            for plan in plans for m in plan if m)
        devices = self.world.world_size
        achieved = flops.training_flops(self.engine.model_config(), lengths) / elapsed
        mfu = achieved / (self.peak_flops * devices)
        dropped = sum(self.train_data.stats.get("dropped", {}).values())
        return {
            "train/loss": result.loss, "train/grad_norm": result.grad_norm, "train/lr": result.lr,
            "train/epoch": epoch + (step_in_epoch + 1) / self.sampler.steps_per_epoch,
            "train/global_tokens": tokens, "train/supervised_tokens": result.num_targets,
            "train/tokens_seen": self.tokens_seen,
            "train/skipped_steps": self.skipped_steps,
            "perf/step_time_s": elapsed, "perf/data_wait_s": data_wait,
            "perf/tokens_per_s": tokens / elapsed, "perf/tokens_per_s_per_device": tokens / elapsed / devices,
            "perf/tflops": achieved / 1e12, "perf/mfu": mfu, "train/mfu": mfu,  # train/mfu: verl's name
            "perf/padding_ratio": padded / (padded + tokens), "perf/micro_batches": len(plans[0]),
            "perf/max_memory_gb": max_memory_gb(self.world.device),
            "data/mean_seq_len": float(lengths.mean()), "data/max_seq_len": int(lengths.max()),
            "data/dropped_rows": dropped,
        }

    def _due(self, freq: int | str) -> bool:
        """Whether a cadence of N steps, or `after_each_epoch`, falls on the step just taken."""
        if freq == "after_each_epoch":
            return self.sampler.step_in_epoch == self.sampler.steps_per_epoch
        return freq > 0 and self.step % freq == 0

    def validate(self) -> float:
        """Token-weighted loss over every validation sample (none dropped, none repeated across ranks)."""
        data = self.val_data
        chunk = self.cfg.data.train_batch_size
        loss_sum = count = 0.0
        for start in range(0, len(data), chunk):
            indices = np.arange(start, min(start + chunk, len(data)))
            plan = self.plan(indices, data)[self.world.dp_rank]
            s, n = self.engine.eval_batch([self.collate(m, data) for m in plan])
            loss_sum, count = loss_sum + s, count + n
        return loss_sum / max(count, 1.0)

    def _early_stop(self, val_loss: float) -> bool:
        t = self.cfg.trainer
        if val_loss < self.best_val - t.early_stopping_min_delta:
            self.best_val, self.bad_validations = val_loss, 0
        else:
            self.bad_validations += 1
        return t.early_stopping_patience > 0 and self.bad_validations >= t.early_stopping_patience
