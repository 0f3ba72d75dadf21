"""Step metrics and their sinks: console (progress bar or plain lines), jsonl, TensorBoard, wandb, MLflow.
Only the main rank writes. Besides a row per step, the sinks take events and tables (the evaluation's
samples).

`step_metrics` builds one step's row; the names are listed in README.md ("Output"). `metrics.jsonl` holds
one JSON object per optimizer step (`step` from 1); it is appended to, never truncated, so a continued run
extends the same file.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from shardtune import flops
from shardtune.engine.base import StepResult
from shardtune.state import TrainState

if TYPE_CHECKING:  # the data path's type, read here, not imported at run time
    from shardtune.data.loader import StepBatch


def step_metrics(result: StepResult, batch: StepBatch, state: TrainState, *, elapsed: float, data_wait: float,
                 epoch: float, model_config: Any, peak_flops: float, devices: int, device: torch.device,
                 source_names: list[str]) -> dict[str, Any]:
    """The metric row of one optimizer step. `elapsed` includes `data_wait` (the time the loop waited for
    the batch); MFU is the achieved training FLOP/s over the peak of all devices. With several training
    sources, `data/samples/<name>` and `data/tokens/<name>` count what each gave the step."""
    tokens = int(batch.lengths.sum())
    achieved = flops.training_flops(model_config, batch.lengths) / elapsed
    mfu = achieved / (peak_flops * devices)
    per_source = {}
    if len(source_names) > 1:
        for k, name in enumerate(source_names):
            mine = batch.sources == k
            per_source[f"data/samples/{name}"] = int(mine.sum())
            per_source[f"data/tokens/{name}"] = int(batch.lengths[mine].sum())
    return {
        "train/loss": result.loss, "train/grad_norm": result.grad_norm, "train/lr": result.lr, "train/epoch": epoch,
        "train/global_tokens": tokens, "train/supervised_tokens": result.num_targets,
        "train/tokens_seen": state.tokens_seen, "train/skipped_steps": state.skipped_steps,
        "perf/step_time_s": elapsed, "perf/data_wait_s": data_wait,
        "perf/tokens_per_s": tokens / elapsed, "perf/tokens_per_s_per_device": tokens / elapsed / devices,
        "perf/tflops": achieved / 1e12, "perf/mfu": mfu, "train/mfu": mfu,  # train/mfu: verl's name
        "perf/padding_ratio": batch.padded_tokens / (batch.padded_tokens + tokens),
        "perf/micro_batches": len(batch.plans[0]), "perf/max_memory_gb": max_memory_gb(device),
        "data/mean_seq_len": float(batch.lengths.mean()), "data/max_seq_len": int(batch.lengths.max()),
        "data/dropped_rows": batch.drawn.dropped_rows, **per_source, **result.extra,
    }


def max_memory_gb(device: torch.device) -> float:
    """CUDA max allocated on GPU; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class JsonlSink:
    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def event(self, kind: str, info: dict[str, Any]) -> None:
        self.file.write(json.dumps({"event": kind, "time": time.time(), **info}) + "\n")
        self.file.flush()

    def table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        """RUN_DIR/eval/step_N.jsonl for `eval/samples` (RUN_DIR/<name>/step_N.jsonl in general)."""
        folder = self.path.parent / name.split("/")[0]
        folder.mkdir(exist_ok=True)
        (folder / f"step_{step}.jsonl").write_text("".join(json.dumps({"step": step, **r}) + "\n" for r in rows))

    def close(self, ok: bool = True) -> None:
        self.file.close()


class ConsoleSink:
    """A tqdm bar with loss, lr and tokens/s (ETA from tqdm) on a terminal; otherwise plain lines for about
    50 evenly spaced steps, the first, the last and every validation step."""

    def __init__(self, total_steps: int, initial: int, progress_bar: bool):
        self.bar = None
        if progress_bar and sys.stderr.isatty() and not os.environ.get("CI"):
            self.bar = tqdm(total=total_steps, initial=initial, desc="train", unit="step", dynamic_ncols=True)
        self.total = total_steps

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics.get('train/loss', float('nan')):.4f}",
                                 lr=f"{metrics.get('train/lr', 0):.2e}",
                                 tok_s=f"{metrics.get('perf/tokens_per_s', 0):.0f}", refresh=False)
            measured = [f"{k} {v:.4f}" for k, v in metrics.items() if k == "val/loss" or k.startswith("eval/")]
            if measured:
                self.bar.write(f"step {step}: " + "  ".join(measured))
            return
        every = max(1, -(-self.total // 50))  # about 50 lines for a whole run
        evals = [k for k in metrics if k.startswith("eval/")]
        if step % every and step not in (1, self.total) and "val/loss" not in metrics and not evals:
            return
        parts = [f"step {step}/{self.total}"]
        for key, fmt in (("train/loss", ".4f"), ("val/loss", ".4f"), ("train/grad_norm", ".3f"),
                         ("train/lr", ".2e"), ("perf/tokens_per_s", ".0f")):
            if key in metrics:
                parts.append(f"{key} {metrics[key]:{fmt}}")
        parts += [f"{k} {metrics[k]:.4f}" for k in evals]
        print("  ".join(parts), flush=True)

    def event(self, kind: str, info: dict[str, Any]) -> None:
        text = f"[{kind}] " + " ".join(f"{k}={v}" for k, v in info.items())
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        pass  # the means are in the step's line

    def close(self, ok: bool = True) -> None:
        if self.bar is not None:
            self.bar.close()


class TensorBoardSink:
    """Scalars under {run_dir}/tensorboard (the `tensorboard` extra)."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def event(self, kind: str, info: dict[str, Any]) -> None:
        self.writer.add_text(f"event/{kind}", json.dumps(info, default=str))

    def table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        self.writer.add_text(name, markdown_table(rows), step)
        self.writer.flush()

    def close(self, ok: bool = True) -> None:
        self.writer.close()


class WandbSink:
    """Weights & Biases (the `wandb` extra); offline into {run_dir}/wandb unless WANDB_API_KEY or WANDB_MODE
    says otherwise, so it works without network."""

    def __init__(self, run_dir: Path, project: str, name: str, config: dict[str, Any]):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=project, name=name, dir=str(run_dir), config=config, mode=mode, resume="allow")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log(metrics, step=step)

    def event(self, kind: str, info: dict[str, Any]) -> None:
        pass  # events stay in metrics.jsonl and the console

    def table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        import wandb

        columns = list(rows[0]) if rows else []
        self.run.log({name: wandb.Table(columns=columns, data=[[str(r.get(c)) for c in columns] for r in rows])},
                     step=step)

    def close(self, ok: bool = True) -> None:
        self.run.finish()


class MlflowSink:
    """MLflow (the `mlflow` extra). Without MLFLOW_TRACKING_URI it writes a local file store under
    {run_dir}/mlruns (view it with `mlflow ui --backend-store-uri RUN_DIR/mlruns`). A relaunch of the same
    run directory continues the same MLflow run (its id is kept in {run_dir}/mlflow_run_id)."""

    def __init__(self, run_dir: Path, project: str, name: str, config: dict[str, Any]):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 keeps the file store in maintenance mode behind this opt-in; it is the one backend that
            # needs no server or database, which is what a local run wants.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        id_file = run_dir / "mlflow_run_id"
        self.run_id = id_file.read_text().strip() if id_file.exists() else None
        if self.run_id is None:
            experiment = self.client.get_experiment_by_name(project)
            exp_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
            self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
            id_file.write_text(self.run_id)
            params = _flatten(config)
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        self.client.log_batch(self.run_id, metrics=batch)

    def event(self, kind: str, info: dict[str, Any]) -> None:
        pass  # events stay in metrics.jsonl and the console

    def table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        self.client.log_text(self.run_id, markdown_table(rows), f"{name}/step_{step}.md")

    def close(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def markdown_table(rows: list[dict[str, Any]], limit: int = 50) -> str:
    """The first `limit` rows as a Markdown table (TensorBoard and MLflow render it)."""
    if not rows:
        return "(no rows)"
    columns = list(rows[0])

    def cell(v: Any) -> str:
        return (f"{v:.4g}" if isinstance(v, float) else str(v)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows[:limit]]
    return "\n".join(lines) + (f"\n\n({len(rows) - limit} more rows in the run directory)" if len(rows) > limit else "")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Metrics:
    """Fan-out to the configured sinks; a no-op on every rank but the main one."""

    def __init__(self, run_dir: Path, loggers: list[str], is_main: bool, total_steps: int, initial_step: int,
                 progress_bar: bool, project: str = "shardtune", name: str = "run", config: dict | None = None):
        self.sinks: list[Any] = []
        if not is_main:
            return
        if "console" in loggers:
            self.sinks.append(ConsoleSink(total_steps, initial_step, progress_bar))
        # metrics.jsonl is always written: it is the run's record (verl calls this sink `file`)
        self.sinks.append(JsonlSink(run_dir))
        if "tensorboard" in loggers:
            self.sinks.append(TensorBoardSink(run_dir))
        if "wandb" in loggers:
            self.sinks.append(WandbSink(run_dir, project, name, config or {}))
        if "mlflow" in loggers:
            self.sinks.append(MlflowSink(run_dir, project, name, config or {}))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for s in self.sinks:
            s.log(step, metrics)

    def event(self, kind: str, **info: Any) -> None:
        for s in self.sinks:
            s.event(kind, info)

    def table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        """A table of one step (the evaluation's samples): a jsonl file in the run directory, text in
        TensorBoard and MLflow, a W&B Table."""
        for s in self.sinks:
            s.table(step, name, rows)

    def close(self, ok: bool = True) -> None:
        for s in self.sinks:
            s.close(ok)
