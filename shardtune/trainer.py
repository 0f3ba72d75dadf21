"""The training loop: epochs and steps, the cadence of validation, saving and logging, early stopping.

It sees ready batches and plain numbers: the data path lives in the step loader (data/loader.py), the model,
optimizer and every collective behind the engine, checkpoints of the run's `Stateful` parts in
checkpoint/ (one manager), the metric row and its sinks in metrics.py.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from shardtune import evaluate, flops, parallel, preempt
from shardtune.checkpoint import CheckpointManager
from shardtune.config import Config, dump_yaml, notes, to_dict
from shardtune.data.build import build_data
from shardtune.data.chat import audit_totals
from shardtune.data.loader import RankLayout, StepBatch, StepLoader, planned_steps
from shardtune.data.vision import pixels_for
from shardtune.engine import build_engine
from shardtune.metrics import Metrics, step_metrics
from shardtune.model import check_token_ids, load_tokenizer
from shardtune.state import RNGState, TrainState, seed_everything


class Trainer:
    def __init__(self, cfg: Config, world: parallel.World | None = None):
        self.cfg = cfg
        # without a world given: join the torchrun job of the environment, else one process on CUDA when present
        self.world = world or parallel.init_world(cfg.sp_size, cfg.engine.timeout_minutes)
        seed_everything(cfg.trainer.seed)
        self.run_dir = cfg.run_dir
        # the run directory, where to resume and a wrong resume path are checked before the data is read
        self.checkpoints = CheckpointManager(cfg, self.world,
                                             on_event=lambda kind, **info: self.metrics.event(kind, **info))
        self.tokenizer = load_tokenizer(cfg.model)
        # data problems surface before anything is written to the run directory
        self.train_data, self.val_data = build_data(cfg, self.tokenizer, self.world)
        check_token_ids(cfg.model, self.tokenizer, [d for d in (self.train_data, self.val_data) if d is not None])
        self.eval_on = cfg.eval.freq != -1
        self.eval_prompts = evaluate.load_prompts(cfg) if self.eval_on else []
        self.scorer = evaluate.load_scorer(cfg.eval.scorer)
        w = self.world
        self.loader = StepLoader(self.train_data, cfg.data, RankLayout(w.dp_rank, w.dp_size, w.sp_rank, w.sp_size),
                                 packed=cfg.model.use_remove_padding,
                                 pad_id=self.tokenizer.pad_token_id, pin_memory=w.device.type == "cuda",
                                 pixels=pixels_for(self.tokenizer))
        self.total_steps = planned_steps(cfg.trainer.total_training_steps, cfg.trainer.total_epochs,
                                         self.loader.steps_per_epoch)
        seed_everything(cfg.trainer.seed)  # model init and dropout do not depend on how data was built
        self.engine = build_engine(cfg, w, self.total_steps, self.tokenizer)
        self.state = TrainState()
        parts = {**self.engine.checkpoint_parts(), "train": self.state, "loader": self.loader, "rng": RNGState()}
        self.resumed, self.skipped = self.checkpoints.resume(parts, self.engine, self.tokenizer)
        if w.is_main:  # only now: a resume that fails leaves the run's config.yaml as it was
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.run_dir / "config.yaml")
        trainer_cfg = cfg.trainer
        self.metrics = Metrics(self.run_dir, trainer_cfg.logger, w.is_main, self.total_steps, self.state.step,
                               trainer_cfg.progress_bar, trainer_cfg.project_name, trainer_cfg.experiment_name,
                               to_dict(cfg))
        self.peak_flops = flops.device_peak_flops(w.device, self.engine.compute_dtype)
        self.history: list[dict[str, Any]] = []
        self.stop_agreement = preempt.StopAgreement(w.distributed)
        self.preempted = False  # stopped on SIGTERM (shardtune/preempt.py)

    # ------------------------------------------------------------------------------------------------------
    def fit(self) -> list[dict[str, Any]]:
        self._start_events()
        ok = False
        try:
            if self.state.stopped_early:  # a relaunch of a run that already stopped early (e.g. a requeued job)
                self.metrics.event("early_stop", step=self.state.step, metric=self.cfg.trainer.early_stopping_metric,
                                   best=self._best(), note="already stopped")
            else:
                if self.eval_on and self.state.step == 0:  # the baseline the later evaluations are compared with
                    baseline = self.evaluation()
                    self._record_for_early_stopping(baseline)
                    self._log(0, baseline)
                self._loop()
            ok = True
        finally:
            self.metrics.close(ok)  # an MLflow run is marked FAILED when the loop raised
        return self.history

    def _loop(self) -> None:
        cadence = self.cfg.trainer
        steps, saved = iter(self.loader), None
        preempt.defer(True)  # SIGTERM from here on: finish the step, save, stop (shardtune/preempt.py)
        try:
            # checked before drawing, so the sampler stops there
            while self.state.step < self.total_steps and not self.state.stopped_early and not self.preempted:
                t0 = time.perf_counter()
                batch = next(steps)
                metrics = self.train_step(batch, data_wait=time.perf_counter() - t0)
                if self.val_data is not None and (self._due(cadence.test_freq) or self._last_step()):
                    metrics.update(self.validation_losses())
                if self.eval_on and (self._due(self.cfg.eval.freq) or self._last_step()):
                    metrics.update(self.evaluation())
                stop = self._record_for_early_stopping(metrics)
                self._log(self.state.step, metrics)
                if stop:
                    self.state.stopped_early = True
                    self.metrics.event("early_stop", step=self.state.step, metric=cadence.early_stopping_metric,
                                       best=self._best())
                final = self._last_step() or stop  # always a checkpoint after the last step
                self.preempted = not final and self.stop_agreement.stop()  # SIGTERM on any rank: stop after this step
                saved = self.checkpoints.save_if_due(self.state.step, due=self._due(cadence.save_freq), final=final,
                                                     preempted=self.preempted)
        finally:
            steps = None  # releasing the loader's iterator stops its prefetch thread (also when the loop raised)
        if self.preempted:
            self._report_preemption(saved)

    def _report_preemption(self, saved: Any) -> None:
        self.metrics.event("preempt", step=self.state.step, saved=saved is not None)
        if self.world.is_main:
            what = f"saved {saved}" if saved else "not saved: checkpoint.save_on_preempt=false"
            print(f"shardtune: SIGTERM: stopped after step {self.state.step} ({what}); exit code {preempt.EXIT_CODE}. "
                  "Run the same command again to resume.", file=sys.stderr, flush=True)

    def _log(self, step: int, metrics: dict[str, Any]) -> None:
        self.metrics.log(step, metrics)
        self.history.append({"step": step, **metrics})

    def _record_for_early_stopping(self, metrics: dict[str, Any]) -> bool:
        """Whether to stop: `trainer.early_stopping_metric` (val/loss, lower is better; eval/*, higher is better)
        did not improve for `early_stopping_patience` of the times it was measured."""
        cadence = self.cfg.trainer
        name = cadence.early_stopping_metric
        if name not in metrics:
            return False
        value = metrics[name] if name == "val/loss" else -metrics[name]  # the record keeps a value to minimise
        return self.state.record_validation(value, cadence.early_stopping_patience, cadence.early_stopping_min_delta)

    def _best(self) -> float:
        best = self.state.best_val
        return best if self.cfg.trainer.early_stopping_metric == "val/loss" else -best

    def evaluation(self) -> dict[str, float]:
        """`eval/*`: the prompts answered and scored (evaluate.py); the per-sample table goes to every sink."""
        metrics, rows = evaluate.evaluate(self.engine, self.eval_prompts, self.cfg, self.world, self.scorer)
        self.metrics.table(self.state.step, "eval/samples", rows)
        return metrics

    def _last_step(self) -> bool:
        return self.state.step == self.total_steps

    def _start_events(self) -> None:
        samples = "streamed" if self.train_data.samples is None else self.train_data.samples
        self.metrics.event("start", steps=self.total_steps, steps_per_epoch=self.loader.steps_per_epoch,
                           samples=samples, world_size=self.world.world_size, run_dir=str(self.run_dir))
        for message in notes(self.cfg):
            self.metrics.event("note", message=message)
        for name, data in (("train", self.train_data), ("val", self.val_data)):
            if data is not None and data.stats.get("mask"):  # what the loss masks train, once per dataset
                self.metrics.event("mask", data=name, **audit_totals(data.stats["mask"]))
        if self.resumed:
            self.metrics.event("resume", **self.resumed, data=self.loader.describe())
            if self.skipped:
                self.metrics.event("warning", message=f"resumed from the newest intact checkpoint "
                                   f"({self.resumed['path']}), skipping newer ones: "
                                   + "; ".join(f"{p} is {why}" for p, why in self.skipped.items()),
                                   paths=list(self.skipped))

    def train_step(self, batch: StepBatch, data_wait: float = 0.0) -> dict[str, Any]:
        """One optimizer step; `data_wait` is how long the loop waited for `batch` (counted in the step time)."""
        t0 = time.perf_counter()
        result = self.engine.train_batch(batch.micro_batches, batch.num_targets)
        elapsed = time.perf_counter() - t0 + data_wait
        self.loader.consumed(batch)
        self.state.step += 1
        self.state.skipped_steps += int(result.skipped)
        self.state.tokens_seen += int(batch.lengths.sum())
        return step_metrics(result, batch, self.state, elapsed=elapsed, data_wait=data_wait,
                            epoch=self.loader.epoch_progress(batch), model_config=self.engine.model_config(),
                            peak_flops=self.peak_flops, devices=self.world.world_size,
                            device=self.world.device, source_names=[s.name for s in self.train_data.sources])

    def validation_losses(self) -> dict[str, float]:
        """`val/loss`: token-weighted over every validation sample; with several validation sources also
        `val/loss/<name>`, token-weighted within each source."""
        sums, counts, out = [], [], {}
        for k, source in enumerate(self.val_data.sources):
            loss_sum = count = 0.0
            for micro_batches in self.loader.validation_batches(self.val_data, k):
                s, n = self.engine.eval_batch(micro_batches)
                loss_sum, count = loss_sum + s, count + n
            sums.append(loss_sum)
            counts.append(count)
            if len(self.val_data.sources) > 1:
                out[f"val/loss/{source.name}"] = loss_sum / max(count, 1.0)
        return {"val/loss": sum(sums) / max(sum(counts), 1.0), **out}

    def _due(self, freq: int | str) -> bool:
        """Whether a cadence of N steps, or `after_each_epoch`, falls on the step just taken."""
        if freq == "after_each_epoch":
            return self.loader.at_epoch_end()
        return freq > 0 and self.state.step % freq == 0

