"""Remote storage through fsspec: checkpoints copied to and resumed from a URL, data read from URLs and globs.

Against a real S3-compatible server (moto's standalone server on a free local port, reached through the
standard AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY variables) and `file://` URLs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import pytest
from conftest import arithmetic_rows, read_metrics, run_cli, torchrun, write_parquet

from shardtune import remote
from shardtune.checkpoint import RemoteCheckpoints
from shardtune.config import load_config, validate
from shardtune.errors import ConfigError, DataError, StorageError


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server, and the environment a job finds its endpoint and credentials in."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "shardtune-test",
           "AWS_SECRET_ACCESS_KEY": f"secret-{uuid.uuid4().hex}", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.get_filesystem_class("s3").clear_instance_cache()  # one cached for an earlier module's server
    fs, _ = remote.filesystem("s3://bucket")
    fs.makedirs("bucket", exist_ok=True)  # moto keeps its buckets per process, across servers
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def fake_checkpoint(path: Path, step: int, files: int = 3) -> Path:
    """A folder laid out as a checkpoint (shards, side files, the two files written last)."""
    path.mkdir(parents=True)
    for i in range(files):
        (path / f"__{i}_0.distcp").write_bytes(os.urandom(64))
    (path / "huggingface").mkdir()
    (path / "huggingface" / "config.json").write_text("{}")
    (path / ".metadata").write_bytes(b"meta")
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    return path


def test_upload_rotation_and_download_through_file_urls(tmp_path):
    url = f"file://{tmp_path / 'remote'}"
    uploaded = []
    store = RemoteCheckpoints(url, max_to_keep=2, on_uploaded=uploaded.append)
    for step in (1, 2, 3):
        store.upload(fake_checkpoint(tmp_path / "run" / f"global_step_{step}", step), step)
        store.wait()
    assert store.run.steps() == {2: True, 3: True} and store.run.tracker_step() == 3  # rotated there too
    assert [u["step"] for u in uploaded] == [1, 2, 3] and uploaded[-1]["files"] == 6
    assert uploaded[-1]["url"] == f"{url}/global_step_3"
    # a copy a killed upload left behind is never newest, and is dropped by the next rotation
    (tmp_path / "remote" / "global_step_4").mkdir()
    (tmp_path / "remote" / "global_step_4" / "__0_0.distcp").write_bytes(b"x")
    assert store.run.newest_complete() == 3
    store.upload(fake_checkpoint(tmp_path / "run" / "global_step_5", 5), 5)
    store.wait()
    assert store.run.steps() == {3: True, 5: True}
    target = store.download(5, tmp_path / "fresh")
    assert (tmp_path / "fresh" / "latest_checkpointed_iteration.txt").read_text() == "5"
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "huggingface/config.json", "trainer_state.json"]
    assert not [p for p in (tmp_path / "fresh").iterdir() if "download" in p.name]  # temporary folder renamed


def test_bad_urls_fail_before_anything_is_loaded(tmp_path):
    base = ["model.path=/m", f"data.train_files={tmp_path}/t.jsonl"]
    with pytest.raises(ConfigError, match="embeds credentials"):
        validate(load_config(None, [*base, "trainer.remote_dir=s3://key:secret@bucket/run"]))
    with pytest.raises(ConfigError, match="knows no 'nosuch://' filesystem"):
        validate(load_config(None, [*base, "trainer.remote_dir=nosuch://x"]))
    with pytest.raises(ConfigError,
                       match="loads libhdfs from a Hadoop install, and none was found. Fix: set HADOOP_HOME"):
        validate(load_config(None, [*base, "trainer.default_local_dir=x", "trainer.remote_dir=hdfs://nn:8020/ckpt"]))


def test_data_urls_globs_and_fingerprints(s3, tmp_path):
    fs, _ = remote.filesystem("s3://bucket")
    for name, seed in (("a", 1), ("b", 2)):
        fs.put_file(str(write_parquet(tmp_path / f"{name}.parquet", arithmetic_rows(4, seed=seed))),
                    f"bucket/data/part-{name}.parquet")
    urls = remote.expand("s3://bucket/data/*.parquet")
    assert urls == ["s3://bucket/data/part-a.parquet", "s3://bucket/data/part-b.parquet"]
    assert remote.expand("s3://bucket/data") == urls  # a folder of data files
    from shardtune.data.readers import expand_paths, files_fingerprint, read_rows

    rows = list(read_rows(expand_paths(["s3://bucket/data/*.parquet"])))
    assert len(rows) == 8 and rows[0].path == urls[0] and rows[5].index == 1
    before = files_fingerprint(urls)
    assert files_fingerprint(urls) == before and before[0][1] == fs.info("bucket/data/part-a.parquet")["size"]
    fs.put_file(str(write_parquet(tmp_path / "c.parquet", arithmetic_rows(4, seed=3))), "bucket/data/part-a.parquet")
    assert files_fingerprint(urls)[0] != before[0] and files_fingerprint(urls)[1] == before[1]
    fs.pipe_file("bucket/data/bad.parquet", b"not parquet")
    with pytest.raises(DataError, match="s3://bucket/data/bad.parquet' cannot be read as parquet"):
        list(read_rows(["s3://bucket/data/bad.parquet"]))
    with pytest.raises(DataError, match="No file matches the pattern 's3://bucket/data/\\*.jsonl'"):
        expand_paths(["s3://bucket/data/*.jsonl"])


def test_store_errors_name_what_failed(s3, tmp_path):
    store = RemoteCheckpoints("s3://no-such-bucket/run")
    store.upload(fake_checkpoint(tmp_path / "global_step_1", 1), 1)  # in the background: training goes on
    with pytest.raises(StorageError, match="Copying checkpoint .* to s3://no-such-bucket/run/global_step_1 .*failed"):
        store.wait()
    from shardtune.data.readers import read_rows

    with pytest.raises(StorageError, match="Reading data file s3://no-such-bucket/a.parquet failed"):
        list(read_rows(["s3://no-such-bucket/a.parquet"]))


UPLOAD_SCRIPT = """
import sys
from pathlib import Path
from shardtune.checkpoint import RemoteCheckpoints
store = RemoteCheckpoints(sys.argv[1])
store.upload(Path(sys.argv[2]), int(sys.argv[3]))
store.wait()
"""


def test_sigkill_during_an_upload_never_leaves_the_tracker_on_an_incomplete_copy(s3, tmp_path):
    url = "s3://bucket/killed"
    store = RemoteCheckpoints(url)
    store.upload(fake_checkpoint(tmp_path / "global_step_1", 1), 1)
    store.wait()
    big = fake_checkpoint(tmp_path / "global_step_2", 2, files=400)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", UPLOAD_SCRIPT, url, str(big), "2"], env=env)
    deadline = time.time() + 60
    while time.time() < deadline and len(store.fs.find("bucket/killed/global_step_2")) < 20:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    uploaded = store.fs.find("bucket/killed/global_step_2")
    assert 20 <= len(uploaded) < 400 + 3  # killed mid-copy
    assert store.run.steps() == {1: True,
                                 2: False} and store.run.tracker_step() == 1 and store.run.newest_complete() == 1
    store.upload(big, 2)  # the relaunched run saves step 2 again
    store.wait()
    assert store.run.steps() == {1: True, 2: True} and store.run.tracker_step() == 2


def _lines(tiny_model, data, run_dir, steps, *extra):
    return [f"model.path={tiny_model}", f"data.train_files={data}", "data.train_batch_size=8",
            f"trainer.default_local_dir={run_dir}", "trainer.save_freq=2", f"trainer.total_training_steps={steps}",
            "trainer.logger=['console','file']", "model.enable_gradient_checkpointing=false", "optim.lr=2e-3", *extra]


@pytest.mark.slow
def test_s3_round_trip_resumes_a_requeued_job_with_identical_losses(s3, tiny_model, tmp_path):
    """verl's engine line with trainer.default_hdfs_dir=s3://bucket/run and data read from s3:// parquet by a
    glob, on 2 processes: 4 steps, the local run directory deleted (a new node), 6 steps: the relaunch
    downloads global_step_4 and its losses equal an uninterrupted 6-step run's."""
    fs, _ = remote.filesystem("s3://bucket")
    for i in range(2):
        fs.put_file(str(write_parquet(tmp_path / f"{i}.parquet", arithmetic_rows(16, seed=20 + i, multi_turn=True))),
                    f"bucket/sft/train-{i}.parquet")
    data = "s3://bucket/sft/*.parquet"
    module = "shardtune.verl.sft_trainer"
    r = torchrun(2, *_lines(tiny_model, data, tmp_path / "whole", 6), module=module, env=s3)
    assert r.returncode == 0, r.stderr[-3000:]
    whole = [row["train/loss"] for row in read_metrics(tmp_path / "whole")]
    run_dir, outputs = tmp_path / "run", []
    for steps in (4, 6):
        r = torchrun(2, *_lines(tiny_model, data, run_dir, steps, "trainer.default_hdfs_dir=s3://bucket/run"),
                     module=module, env=s3)
        assert r.returncode == 0, r.stderr[-3000:]
        outputs.append(r.stdout + r.stderr)
        if steps == 4:
            store = RemoteCheckpoints("s3://bucket/run")
            assert store.run.steps() == {2: True, 4: True} and store.run.tracker_step() == 4
            first = [row["train/loss"] for row in read_metrics(run_dir)]
            events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            assert [e["step"] for e in events if e.get("event") == "remote_checkpoint"] == [2, 4]
            text = "".join(p.read_text(errors="ignore") for p in run_dir.rglob("*") if p.is_file())
            assert s3["AWS_SECRET_ACCESS_KEY"] not in text  # not in config.yaml, metrics, checkpoints
            shutil.rmtree(run_dir)
    resumed = [row["train/loss"] for row in read_metrics(run_dir)]
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "resume"] == [4]
    assert first + resumed == whole  # bit for bit
    assert RemoteCheckpoints("s3://bucket/run").run.tracker_step() == 6
    assert not any(s3["AWS_SECRET_ACCESS_KEY"] in out for out in outputs)


@pytest.mark.slow
def test_file_url_background_upload_rotation_and_resume(tiny_model, tmp_path):
    """shardtune's own trainer.remote_dir (file://) with checkpoint.async_save: copies made in the background,
    rotated to max_ckpt_to_keep there too; a relaunch without the local directory continues from it."""
    data = write_parquet(tmp_path / "d.parquet", arithmetic_rows(24, seed=5))
    url = f"file://{tmp_path / 'remote'}"
    own = ["optim.lr_scheduler_type=constant", "optim.lr_warmup_steps_ratio=0", "data.cache_dir=null"]
    extra = [*own, f"trainer.remote_dir={url}", "checkpoint.async_save=true", "trainer.max_ckpt_to_keep=1"]
    r = run_cli("train", *_lines(tiny_model, data, tmp_path / "whole", 6, *own))
    assert r.returncode == 0, r.stderr
    whole = [row["train/loss"] for row in read_metrics(tmp_path / "whole")]
    r = run_cli("train", *_lines(tiny_model, data, tmp_path / "run", 4, *extra))
    assert r.returncode == 0, r.stderr
    assert RemoteCheckpoints(url).run.steps() == {4: True}
    first = [row["train/loss"] for row in read_metrics(tmp_path / "run")]
    shutil.rmtree(tmp_path / "run")
    r = run_cli("train", *_lines(tiny_model, data, tmp_path / "run", 6, *extra))
    assert r.returncode == 0, r.stderr
    assert first + [row["train/loss"] for row in read_metrics(tmp_path / "run")] == whole
    assert RemoteCheckpoints(url).run.steps() == {6: True}
    r = run_cli("train", *_lines(tiny_model, data, tmp_path / "other", 2, *extra, "trainer.resume_mode=disable"))
    assert r.returncode == 2 and "already holds checkpoints of another run (up to global_step_6)" in r.stderr


def test_a_failed_copy_is_reported_and_the_newest_checkpoint_copied_later(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the remote folder should be")
    reports = []
    store = RemoteCheckpoints(f"file://{blocked}/run", on_uploaded=reports.append)
    store.upload(fake_checkpoint(tmp_path / "run" / "global_step_1", 1), 1)
    while not store.pending[2].done():
        time.sleep(0.01)
    blocked.unlink()  # the store is back
    store.upload(fake_checkpoint(tmp_path / "run" / "global_step_2", 2), 2)  # reports the failure, copies 2
    store.wait()
    assert [r["step"] for r in reports] == [1, 2] and "failed" in reports[0]["error"] and "error" not in reports[1]
    assert store.run.tracker_step() == 2 and store.run.steps() == {2: True}


def test_urls_inside_source_mappings_are_checked_before_anything_is_loaded(tmp_path):
    base = ["model.path=/m", f"data.train_files={tmp_path}/t.jsonl"]
    with pytest.raises(ConfigError, match="embeds credentials"):
        validate(load_config(None, [*base, "data.val_files=[{path: 's3://key:secret@bucket/a.parquet', name: v}]"]))
    with pytest.raises(ConfigError, match="knows no 'nosuch://' filesystem"):
        validate(load_config(None, ["model.path=/m", "data.train_files=[{path: 'nosuch://x/a.jsonl', weight: 1}]"]))
