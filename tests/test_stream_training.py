"""Streamed training data in real runs: the map-style losses when the buffer holds the whole set, SIGKILL +
resume identical to an uninterrupted streamed run without replaying the stream, 1 vs 2 processes, and
`shardtune validate` on the head of a stream."""

from __future__ import annotations

import json
import math

import pytest
from conftest import (
    arithmetic_rows,
    kill_after,
    read_metrics,
    run_cli,
    torchrun,
    train_args,
    write_jsonl,
    write_parquet,
)

from shardtune.config import load_config, validate
from shardtune.trainer import Trainer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """40 rows in a jsonl and a parquet file (row groups of 4): 5 steps of 8 per pass."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("stream")
    rows = arithmetic_rows(40, seed=21)
    write_jsonl(d / "a.jsonl", rows[:20])
    pq.write_table(pa.Table.from_pylist(rows[20:]), d / "b.parquet", row_group_size=4)
    write_parquet(d / "val.parquet", arithmetic_rows(6, seed=22))
    return d


def args(tiny_model, files, run_dir, *extra):
    return train_args(tiny_model, f"[{files}/a.jsonl, {files}/b.parquet]", run_dir, "trainer.total_training_steps=16",
                      "data.cache_dir=null", "data.streaming=true", "data.shuffle_buffer=12", *extra)


def train(cli_args):
    trainer = Trainer(validate(load_config(None, cli_args)))
    return trainer, trainer.fit()


def test_a_buffer_holding_the_whole_set_trains_exactly_as_the_map_style_path(tiny_model, files, tmp_path):
    """8 steps across a pass boundary, validating and saving after each pass: the same losses and gradient
    norms bit for bit, and the cadences fire on the same steps."""
    cadence = ["trainer.total_training_steps=8", f"data.val_files={files}/val.parquet", "data.num_proc=1",
               "trainer.test_freq=after_each_epoch", "trainer.save_freq=after_each_epoch"]
    _, mapped = train(args(tiny_model, files, tmp_path / "map", *cadence, "data.streaming=false"))
    trainer, streamed = train(args(tiny_model, files, tmp_path / "stream", *cadence, "data.shuffle_buffer=40"))
    for key in ("train/loss", "train/grad_norm", "train/global_tokens", "train/supervised_tokens"):
        assert [h[key] for h in streamed] == [h[key] for h in mapped], key
    assert [h["step"] for h in streamed if "val/loss" in h] == [h["step"] for h in mapped if "val/loss" in h] == [5, 8]
    assert sorted(p.name for p in (tmp_path / "stream").glob("global_step_*")) == ["global_step_5", "global_step_8"]
    assert [h["train/epoch"] for h in streamed] == [0, 0, 0, 0, 1, 1, 1, 1]  # finished passes
    assert trainer.loader.steps_per_epoch is None


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, files, tmp_path_factory):
    trainer, history = train(args(tiny_model, files, tmp_path_factory.mktemp("whole") / "run", "data.prefetch_steps=0"))
    return {h["step"]: h["train/loss"] for h in history}, trainer.train_data.rows_read


@pytest.mark.slow
def test_sigkill_mid_pass_then_resume_is_identical_and_does_not_replay_the_stream(tiny_model, files, tmp_path,
                                                                                  uninterrupted):
    """A buffer smaller than the set, killed after 8 steps with checkpoints every 3: the relaunch resumes at
    step 6 (one step into the second pass, the buffer full), its losses equal the uninterrupted run's bit for
    bit, it reads again only the 12 buffered rows, and it reads exactly the rows the uninterrupted run read
    after that position."""
    losses, rows_read = uninterrupted
    run_dir = tmp_path / "run"
    kill_after(args(tiny_model, files, run_dir, "trainer.save_freq=3"), run_dir, steps=8)
    trainer, history = train(args(tiny_model, files, run_dir, "trainer.save_freq=3", "data.prefetch_steps=0"))
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resume = next(e for e in events if e.get("event") == "resume")
    assert resume["step"] == 6
    position = resume["data"]
    assert (position["epoch"], position["step_in_epoch"], position["buffered"]) == (1, 1, 12)
    assert [h["step"] for h in history] == list(range(7, 17))
    assert all(h["train/loss"] == losses[h["step"]] for h in history)  # bitwise
    stream = trainer.train_data
    assert stream.rows_reread == 12
    assert stream.rows_read == rows_read - (40 * position["epoch"] + position["rows_before"])


@pytest.mark.dist
def test_two_processes_stream_and_train_what_one_does(tiny_model, files, tmp_path, uninterrupted):
    """Each rank reads the whole stream and plans its share of each global batch as it arrives, here by
    token budget (several micro-batches of at most 200 tokens per rank): the losses of one process with 2
    fixed micro-batches."""
    losses, _ = uninterrupted
    r = torchrun(2, "train", *args(tiny_model, files, tmp_path / "run", "data.use_dynamic_bsz=true",
                                   "data.max_length=200", "data.max_token_len_per_gpu=200"))
    assert r.returncode == 0, r.stderr[-3000:]
    two = read_metrics(tmp_path / "run")
    assert [row["step"] for row in two] == list(range(1, 17))
    for row in two:
        assert math.isclose(row["train/loss"], losses[row["step"]], rel_tol=1e-5), row["step"]
    assert max(row["perf/micro_batches"] for row in two) > 1


def test_validate_checks_the_head_of_a_stream(tiny_model, files, tmp_path):
    r = run_cli("validate", *args(tiny_model, files, tmp_path / "run", "data.shuffle_buffer=25"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "train: streamed (data.streaming=true) from 2 file(s)" in out and "checked the first 25 rows of" in out
    assert "source 'data': 25 rows read, 25 kept, 25 samples" in out and "mask audit" in out
    assert "train: 16 optimizer steps" in out and "config and data OK" in out
    assert not (tmp_path / "run").exists()


# -- a weighted mixture of streamed sources ------------------------------------------------------------------
def mixture_args(tiny_model, files, run_dir, *extra):
    train = (f"data.train_files=[{{path: {files}/a.jsonl, name: chat, weight: 0.75}}, "
             f"{{path: {files}/b.parquet, name: more, weight: 0.25}}]")
    return [*args(tiny_model, files, run_dir, "data.shuffle_buffer=6", "trainer.total_training_steps=12"), train,
            *extra]


@pytest.fixture(scope="module")
def mixture_run(tiny_model, files, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smix") / "run"
    r = run_cli("train", *mixture_args(tiny_model, files, run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    return read_metrics(run_dir)


def test_a_streamed_mixture_draws_six_of_eight_from_the_three_quarter_source(mixture_run):
    assert [row["step"] for row in mixture_run] == list(range(1, 13))
    for row in mixture_run:
        assert (row["data/samples/chat"], row["data/samples/more"]) == (6, 2), row
        assert row["data/tokens/chat"] + row["data/tokens/more"] == row["train/global_tokens"]
    # 72 chat samples: three whole passes over its 20 rows; "more" has done its first pass by step 10
    assert [row["train/epoch"] for row in mixture_run] == [0] * 9 + [1] * 3


@pytest.mark.slow
def test_a_streamed_mixture_resumes_after_sigkill_bitwise(tiny_model, files, tmp_path, mixture_run):
    run_dir = tmp_path / "run"
    cmd = mixture_args(tiny_model, files, run_dir, "trainer.save_freq=4")
    kill_after(cmd, run_dir, steps=7)
    r = run_cli("train", *cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resume = next(e for e in events if e.get("event") == "resume")
    assert resume["step"] == 4 and resume["data"]["step"] == 4 and resume["data"]["chat"]["buffered"] == 6
    after = [e for e in events[events.index(resume):] if "step" in e and "event" not in e]
    reference = {row["step"]: row for row in mixture_run}
    assert [row["step"] for row in after] == list(range(5, 13))
    for row in after:
        assert row["train/loss"] == reference[row["step"]]["train/loss"], row["step"]
        assert row["data/tokens/more"] == reference[row["step"]]["data/tokens/more"]


@pytest.mark.dist
def test_two_processes_stream_a_mixture_and_train_what_one_does(tiny_model, files, tmp_path, mixture_run):
    r = torchrun(2, "train", *mixture_args(tiny_model, files, tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    two = read_metrics(tmp_path / "run")
    assert [(row["data/tokens/chat"], row["data/tokens/more"]) for row in two] == \
        [(row["data/tokens/chat"], row["data/tokens/more"]) for row in mixture_run]
    for a, b in zip(mixture_run, two):
        assert math.isclose(a["train/loss"], b["train/loss"], rel_tol=1e-5), (a["step"], b["step"])


def test_validate_checks_the_head_of_each_streamed_source(tiny_model, files, tmp_path):
    r = run_cli("validate", *mixture_args(tiny_model, files, tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "a mixture of 2 sources drawn by weight" in out
    assert "checked the first 6 rows of 'chat'" in out and "checked the first 6 rows of 'more'" in out
    assert "source 'chat' (weight 0.75): 6 rows read" in out and "source 'more' (weight 0.25)" in out
