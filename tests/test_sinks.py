"""Metric sinks and plots: TensorBoard events, a wandb offline run, an MLflow file-store run, a PNG of the curves."""

from __future__ import annotations

import pytest
from conftest import arithmetic_rows, read_metrics, run_cli, write_jsonl


@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    d = tmp_path_factory.mktemp("sinks")
    data = write_jsonl(d / "train.jsonl", arithmetic_rows(24, seed=4))
    r = run_cli("train", f"model.path={tiny_model}", f"data.train_files={data}", f"data.val_files={data}",
                f"trainer.default_local_dir={d / 'run'}", "data.train_batch_size=8", "trainer.total_training_steps=4",
                "trainer.test_freq=2", "trainer.logger=[console,tensorboard,wandb,mlflow]", "data.cache_dir=null",
                env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "run"


def test_tensorboard_events_hold_the_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    expected = [r["train/loss"] for r in read_metrics(run_dir)]
    assert losses == pytest.approx(expected, rel=1e-6)
    assert [e.step for e in acc.Scalars("val/loss")] == [2, 4]


def test_wandb_offline_run_is_written(run_dir):
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))


def test_mlflow_run_holds_the_metrics_and_config(run_dir):
    import os

    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FINISHED" and run.data.params["data.train_batch_size"] == "8"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    expected = [r["train/loss"] for r in read_metrics(run_dir)]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(expected, rel=1e-6)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [2, 4]


def test_plot_writes_a_png(run_dir, tmp_path):
    out = tmp_path / "curves.png"
    r = run_cli("plot", str(run_dir), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_of_a_folder_without_metrics_is_a_clear_error(tmp_path):
    r = run_cli("plot", str(tmp_path))
    assert r.returncode != 0 and "metrics.jsonl does not exist" in r.stderr and "Traceback" not in r.stderr
