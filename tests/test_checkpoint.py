"""Checkpoints: SIGKILL + resume is bitwise identical, resharding across world sizes, rotation, bad paths."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from conftest import (
    SLOW_STEPS,
    arithmetic_rows,
    kill_after,
    losses_by_step,
    read_metrics,
    run_cli,
    torchrun,
    train_args,
    train_once,
    write_jsonl,
)

from shardtune.checkpoint import TRACKER, LocalFolder, RunDir, find_resume_path
from shardtune.errors import ConfigError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 40 rows at a global batch of 8: 5 steps per epoch, so 16 steps cross three epoch boundaries
    return write_jsonl(tmp_path_factory.mktemp("ckpt") / "train.jsonl", arithmetic_rows(40, seed=7))


def args(tiny_model, data, run_dir, *extra):
    return train_args(tiny_model, data, run_dir, "trainer.total_training_steps=16", *extra)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    train_once(*args(tiny_model, data, run_dir))
    return losses_by_step(run_dir)


@pytest.mark.parametrize("save_freq,resume_step", [(3, 6), (5, 5)], ids=["mid-epoch", "epoch-boundary"])
def test_sigkill_then_auto_resume_is_bitwise_identical(tiny_model, data, tmp_path, uninterrupted, save_freq,
                                                       resume_step):
    run_dir = tmp_path / "run"
    cmd = args(tiny_model, data, run_dir, f"trainer.save_freq={save_freq}")
    kill_after(cmd, run_dir, steps=8)
    r = run_cli("train", *cmd, "trainer.resume_mode=auto")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resume = [x for x in lines if x.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["step"] >= resume_step
    after = [x for x in lines[lines.index(resume[0]) :] if "step" in x and "event" not in x]
    assert [x["step"] for x in after] == list(range(resume[0]["step"] + 1, 17))
    for x in after:
        assert x["train/loss"] == uninterrupted[x["step"]], x["step"]  # bitwise
    assert (run_dir / TRACKER).read_text() == "16"
    first_run = [x["step"] for x in lines[: lines.index(resume[0])] if "train/loss" in x]
    assert first_run[:8] == list(range(1, 9))  # the killed run's rows are kept: the file is appended to


def test_reshard_two_processes_to_one_and_back(tiny_model, data, tmp_path):
    a, b, c, d = (tmp_path / n for n in "abcd")
    r = torchrun(2, "train", *args(tiny_model, data, a, "trainer.save_freq=5", "trainer.total_training_steps=10"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("train", *args(tiny_model, data, b, "trainer.total_training_steps=10",
                               "trainer.resume_mode=resume_path",
                               f"trainer.resume_from_path={a / 'global_step_5'}"))
    assert r.returncode == 0, r.stderr
    r = run_cli("train", *args(tiny_model, data, c, "trainer.save_freq=5", "trainer.total_training_steps=10"))
    assert r.returncode == 0, r.stderr
    r = torchrun(2, "train", *args(tiny_model, data, d, "trainer.total_training_steps=10",
                                   f"trainer.resume_from_path={c / 'global_step_5'}"))
    assert r.returncode == 0, r.stderr[-2000:]
    for full, resumed in ((a, b), (c, d)):
        ref = {x["step"]: x["train/loss"] for x in read_metrics(full)}
        got = read_metrics(resumed)
        assert [x["step"] for x in got] == [6, 7, 8, 9, 10]
        for x in got:
            assert math.isclose(x["train/loss"], ref[x["step"]], rel_tol=1e-5)
    events = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines() if '"event": "resume"' in x]
    assert "resharded from 2 to 1" in events[0]["note"]


def test_rotation_keeps_newest_complete_and_skips_incomplete(tiny_model, data, tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli("train", *args(tiny_model, data, run_dir, "trainer.save_freq=2", "trainer.total_training_steps=7",
                               "trainer.max_ckpt_to_keep=2"))
    assert r.returncode == 0, r.stderr
    assert RunDir(LocalFolder(run_dir)).complete_steps() == [6, 7]
    # a save killed half-way: the folder exists without DCP's .metadata / trainer_state.json
    broken = run_dir / "global_step_9"
    shutil.copytree(run_dir / "global_step_7", broken)
    (broken / "trainer_state.json").unlink()
    assert find_resume_path(run_dir, "auto", None) == run_dir / "global_step_7"
    RunDir(LocalFolder(run_dir)).rotate(1)
    assert RunDir(LocalFolder(run_dir)).complete_steps() == [7] and broken.exists()
    (run_dir / TRACKER).write_text("9")  # even a tracker pointing at it does not make it resumable
    assert find_resume_path(run_dir, "auto", None) == run_dir / "global_step_7"


@pytest.mark.parametrize("path", ["does/not/exist/global_step_3", "{run}/config.yaml"])
def test_bad_resume_path_is_a_clear_error_and_touches_nothing(tiny_model, data, tmp_path, path):
    run_dir = tmp_path / "run"
    r = run_cli("train", *args(tiny_model, data, run_dir, "trainer.total_training_steps=1"))
    assert r.returncode == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    r = run_cli("train", *args(tiny_model, data, run_dir, "trainer.resume_mode=resume_path",
                               f"trainer.resume_from_path={path.format(run=run_dir)}"))
    assert r.returncode == 2 and "trainer.resume_from_path" in r.stderr and "Traceback" not in r.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_resume_path_mode_needs_a_path():
    with pytest.raises(ConfigError, match="needs trainer.resume_from_path"):
        find_resume_path(__import__("pathlib").Path("."), "resume_path", None)


def test_export_matches_the_live_model_and_round_trips_the_tokenizer(tiny_model, data, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shardtune.config import load_config, validate
    from shardtune.data.chat import tokenize_conversation
    from shardtune.trainer import Trainer

    run_dir = tmp_path / "run"
    trainer = Trainer(validate(load_config(None, args(tiny_model, data, run_dir, "trainer.total_training_steps=3"))))
    trainer.fit()
    r = run_cli("export", str(run_dir / "global_step_3"), "--out", str(tmp_path / "hf"), "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    live = trainer.engine.model.eval()
    ids = torch.tensor([list(range(5, 60))])
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, live(input_ids=ids, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-6)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.chat_template == trainer.tokenizer.chat_template
    conv = arithmetic_rows(1)[0]["messages"]
    assert tokenize_conversation(conv, tok) == tokenize_conversation(conv, trainer.tokenizer)
    out = exported.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)
    bf16 = run_cli("export", str(run_dir / "global_step_3"), "--out", str(tmp_path / "hf16"))
    assert bf16.returncode == 0 and AutoModelForCausalLM.from_pretrained(tmp_path / "hf16").dtype == torch.bfloat16


def test_export_refuses_what_is_not_a_checkpoint(tmp_path):
    r = run_cli("export", str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "not a complete shardtune checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_epoch_cadence_contents_and_hf_weights(tiny_model, data, tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli("train", *args(tiny_model, data, run_dir, "trainer.total_training_steps=12",
                               "trainer.save_freq=after_each_epoch", "trainer.save_hf_at_end=true",
                               "checkpoint.save_contents=[model,extra]", f"data.val_files={data}",
                               "trainer.test_freq=after_each_epoch"))
    assert r.returncode == 0, r.stderr
    assert RunDir(LocalFolder(run_dir)).complete_steps() == [5, 10, 12]  # 5 steps per epoch, and the end
    assert [x["step"] for x in read_metrics(run_dir) if "val/loss" in x] == [5, 10, 12]
    assert (run_dir / "global_step_12" / "huggingface" / "model.safetensors").is_file()
    assert not (run_dir / "global_step_10" / "huggingface" / "model.safetensors").exists()
    assert b"optimizer" not in (run_dir / "global_step_5" / ".metadata").read_bytes()  # saved without optimizer
    # weights only: the model continues from step 10 but data, schedule and step count start over
    r = run_cli("train", *args(tiny_model, data, tmp_path / "w", "trainer.total_training_steps=2",
                               f"trainer.resume_from_path={run_dir / 'global_step_10'}",
                               "checkpoint.load_contents=[model]"))
    assert r.returncode == 0, r.stderr
    fresh = {x["step"]: x["train/loss"] for x in read_metrics(run_dir)}
    warm = read_metrics(tmp_path / "w")
    assert [x["step"] for x in warm] == [1, 2] and warm[0]["train/loss"] < fresh[1] - 0.5


@pytest.mark.parametrize("nproc", [1, 2])
def test_async_save_then_sigkill_resume(tiny_model, data, tmp_path, uninterrupted, nproc):
    run_dir = tmp_path / "run"
    cmd = args(tiny_model, data, run_dir, "trainer.save_freq=3", "checkpoint.async_save=true")
    kill_after(cmd, run_dir, steps=8, nproc=nproc)
    assert (run_dir / TRACKER).is_file()
    r = (torchrun(2, "train", *cmd) if nproc == 2 else run_cli("train", *cmd))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resume = next(x for x in lines if x.get("event") == "resume")
    after = [x for x in lines[lines.index(resume) :] if "train/loss" in x]
    assert after and after[-1]["step"] == 16
    for x in after:
        if nproc == 1:
            assert x["train/loss"] == uninterrupted[x["step"]]  # bitwise
        else:
            assert math.isclose(x["train/loss"], uninterrupted[x["step"]], rel_tol=1e-5)


def test_an_async_checkpoint_is_complete_before_the_next_save(tiny_model, data, tmp_path):
    """Each step polls the background save: the tracker names step 3 well before step 6 saves again, so a
    pre-emption in between loses nothing (before, the folder waited for the next save to be finalised)."""
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, str(SLOW_STEPS), "train", *args(tiny_model, data, run_dir,
                                                                        "trainer.save_freq=3",
                        "checkpoint.async_save=true", "trainer.total_training_steps=7")],
                       capture_output=True, text=True, timeout=300, env={**os.environ,
                                                                         "TOKENIZERS_PARALLELISM": "false"})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    saved = next(i for i, x in enumerate(lines) if x.get("event") == "checkpoint" and x["step"] == 3)
    step6 = next(i for i, x in enumerate(lines) if x.get("step") == 6 and "train/loss" in x)
    assert saved < step6 and lines[saved]["async"] is True


def test_resuming_on_other_data_is_refused_with_the_way_to_continue_the_weights(tiny_model, data, tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli("train", *args(tiny_model, data, run_dir, "trainer.total_training_steps=3"))
    assert r.returncode == 0, r.stderr[-2000:]
    fewer = ("data.train_max_samples=32", "trainer.total_training_steps=6")
    r = run_cli("train", *args(tiny_model, data, run_dir, *fewer))
    assert r.returncode == 2 and "data position was saved for sources {'train': 40}" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("train", *args(tiny_model, data, tmp_path / "new", *fewer,
                               f"trainer.resume_from_path={run_dir / 'global_step_3'}",
                               "checkpoint.load_contents=[model,optimizer]"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert [x["step"] for x in read_metrics(tmp_path / "new")] == list(range(1, 7))  # the data starts over
