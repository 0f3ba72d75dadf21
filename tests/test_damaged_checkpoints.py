"""Resuming from damaged checkpoints: each is verified first (every shard its DCP metadata names is there and
as long as recorded, trainer_state.json parses), the newest intact one is used with a warning, the run's
config.yaml is rewritten only once the resume has worked; LoRA/full mismatches and a full disk are one
clear message each."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import arithmetic_rows, read_metrics, run_cli, write_jsonl

from shardtune.checkpoint import TRACKER, damage, find_resume_path
from shardtune.errors import ConfigError

DISK_FULL = Path(__file__).parent / "scripts" / "disk_full.py"


pytestmark = pytest.mark.slow  # real training runs, relaunched


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("damaged") / "train.jsonl", arithmetic_rows(24, seed=5))


def args(tiny_model, data, run_dir, *extra):
    return [f"model.path={tiny_model}", f"data.train_files={data}", f"trainer.default_local_dir={run_dir}",
            "data.train_batch_size=4", "optim.lr=2e-3", "trainer.total_training_steps=9", "trainer.save_freq=3",
            "trainer.logger=[jsonl]", f"data.cache_dir={run_dir.parent}/cache", *extra]


@pytest.fixture(scope="module")
def finished(tiny_model, data, tmp_path_factory):
    """A run of 9 steps with checkpoints at 3, 6 and 9."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    r = run_cli("train", *args(tiny_model, data, run_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    return run_dir


def _shard(ckpt: Path) -> Path:
    return sorted(ckpt.glob("*.distcp"))[0]


DAMAGE = {
    "deleted shard": (lambda c: _shard(c).unlink(), "the shard __0_0.distcp is missing"),
    "truncated shard": (lambda c: _shard(c).write_bytes(_shard(c).read_bytes()[:1000]), "__0_0.distcp is cut off"),
    "corrupt trainer_state.json": (lambda c: (c / "trainer_state.json").write_text('{"step": 9, "wor'),
                                   "trainer_state.json cannot be read"),
    "trainer_state.json without a step": (lambda c: (c / "trainer_state.json").write_text("[]"), "holds no step"),
    "corrupt RNG file": (lambda c: (c / "rng_rank_0.json").write_text("{"), "rng_rank_0.json cannot be read"),
    "corrupt .metadata": (lambda c: (c / ".metadata").write_bytes(b"\x80garbage"), ".metadata cannot be read"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(finished, tmp_path, case):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    assert damage(run_dir / "global_step_9") is None and find_resume_path(run_dir, "auto", None) == run_dir / "global_step_9"
    harm, needle = DAMAGE[case]
    harm(run_dir / "global_step_9")
    assert needle in damage(run_dir / "global_step_9")
    assert find_resume_path(run_dir, "auto", None) == run_dir / "global_step_6"
    with pytest.raises(ConfigError, match=f"is .*{needle.split()[-1]}.* Fix: point it at a complete checkpoint, "
                                          f"e.g. {run_dir / 'global_step_6'}"):
        find_resume_path(run_dir, "resume_path", str(run_dir / "global_step_9"))


def test_a_garbage_tracker_is_ignored_and_all_damaged_is_refused(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / TRACKER).write_text("\x00\x07garbage")
    assert find_resume_path(run_dir, "auto", None) == run_dir / "global_step_9"  # the newest intact one
    (run_dir / TRACKER).write_text("6")
    assert find_resume_path(run_dir, "auto", None) == run_dir / "global_step_6"  # the tracker's, when intact
    for step in (3, 6, 9):
        _shard(run_dir / f"global_step_{step}").unlink()
    with pytest.raises(ConfigError, match="Every checkpoint in .* is damaged .*global_step_9: the shard"):
        find_resume_path(run_dir, "auto", None)


def test_cli_resumes_from_the_newest_intact_checkpoint_bitwise(tiny_model, data, finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    shard = _shard(run_dir / "global_step_9")
    shard.write_bytes(shard.read_bytes()[:1000])
    (run_dir / TRACKER).write_text("not a number")
    config_before = (run_dir / "config.yaml").read_text()
    # a resume that cannot work (every checkpoint damaged) leaves config.yaml as it was
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    for step in (3, 6):
        _shard(broken / f"global_step_{step}").unlink()
    r = run_cli("train", *args(tiny_model, data, broken, "optim.lr=1e-3"))
    assert r.returncode == 2 and "is damaged" in r.stderr and "Traceback" not in r.stderr
    assert (broken / "config.yaml").read_text() == config_before
    r = run_cli("train", *args(tiny_model, data, run_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resume = next(x for x in lines if x.get("event") == "resume")
    warning = next(x for x in lines if x.get("event") == "warning")
    assert resume["step"] == 6 and "global_step_9 is the shard" in warning["message"] and "cut off" in warning["message"]
    before = {x["step"]: x["train/loss"] for x in read_metrics(finished)}
    after = read_metrics(run_dir)[9:]  # the first run's 9 rows, then the relaunch's
    assert [x["step"] for x in after] == [7, 8, 9]
    assert all(x["train/loss"] == before[x["step"]] for x in after)  # bitwise
    assert damage(run_dir / "global_step_9") is None  # saved again, whole


@pytest.mark.parametrize("lora_now", [True, False], ids=["full-checkpoint-into-lora", "lora-checkpoint-into-full"])
def test_resuming_lora_as_full_or_the_reverse_is_one_clear_refusal(tiny_model, data, finished, tmp_path, lora_now):
    if lora_now:
        source = finished
    else:
        source = tmp_path / "lora"
        r = run_cli("train", *args(tiny_model, data, source, "model.lora_rank=4", "trainer.total_training_steps=3"))
        assert r.returncode == 0, r.stderr[-2000:]
    run_dir = tmp_path / "again"
    shutil.copytree(source, run_dir)
    before = (run_dir / "config.yaml").read_text()
    r = run_cli("train", *args(tiny_model, data, run_dir, *(["model.lora_rank=4"] if lora_now else [])))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    expected = ("is a full fine-tune, and this run trains LoRA adapters" if lora_now
                else "was trained with LoRA (rank 4), and this run is a full fine-tune")
    assert expected in r.stderr and "Fix:" in r.stderr and "shardtune export" in r.stderr
    assert (run_dir / "config.yaml").read_text() == before


def test_disk_full_while_saving_says_no_space_and_keeps_the_earlier_checkpoints(tiny_model, data, finished, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "FULL_AT_STEP": "6"}
    r = subprocess.run([sys.executable, str(DISK_FULL), "train", *args(tiny_model, data, run_dir)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"No space left on the device while saving {run_dir / 'global_step_6'}" in r.stderr
    assert "a relaunch resumes from global_step_3" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not (run_dir / "global_step_6").exists() and damage(run_dir / "global_step_3") is None
    assert (run_dir / TRACKER).read_text() == "3"
    r = run_cli("train", *args(tiny_model, data, run_dir))  # space again: the run resumes and finishes
    assert r.returncode == 0, r.stderr[-2000:]
    before = {x["step"]: x["train/loss"] for x in read_metrics(finished)}
    after = [x for x in read_metrics(run_dir) if x["step"] > 3][-6:]
    assert [x["step"] for x in after] == [4, 5, 6, 7, 8, 9] and all(x["train/loss"] == before[x["step"]] for x in after)


def test_a_remote_store_that_dies_mid_run_leaves_every_local_checkpoint_whole(tiny_model, data, finished, tmp_path):
    """Every step runs, the failed copies are warnings, the local checkpoints stay complete, and the final copy's
    failure ends the run with exit 4 and a message naming the URL."""
    from conftest import SLOW_STEPS

    run_dir, store = tmp_path / "run", tmp_path / "store"
    url = f"file://{store}"
    proc = subprocess.Popen([sys.executable, str(SLOW_STEPS), "train", *args(tiny_model, data, run_dir),
                             f"trainer.remote_dir={url}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        if metrics.exists() and '"step": 4,' in metrics.read_text():
            shutil.rmtree(store, ignore_errors=True)
            store.write_text("the store is gone")  # a file where its folder was: every later copy fails
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 4, err[-3000:]
    assert url in err and "Traceback" not in err, err[-3000:]
    assert [x["step"] for x in read_metrics(run_dir)] == list(range(1, 10))
    events = [json.loads(x) for x in metrics.read_text().splitlines() if '"event": "warning"' in x]
    assert events and all("trainer.remote_dir" in e["message"] for e in events)
    assert all(damage(run_dir / f"global_step_{s}") is None for s in (3, 6, 9))
    assert (run_dir / TRACKER).read_text() == "9"
