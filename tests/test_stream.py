"""Streamed training data without a model: the shuffle buffer, the same batches as the map-style path when the
buffer holds the whole set, exact resume from every step's state in every file format (re-reading only the
buffered rows), reading rows again by reference, remote files read in blocks, and the config refusals."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import arithmetic_rows, write_jsonl, write_parquet
from test_remote import s3  # noqa: F401  (moto's S3 server, a fixture)

from shardtune import remote
from shardtune.config import load_config, resolve_sources, validate
from shardtune.data import readers
from shardtune.data.dataset import build_dataset
from shardtune.data.loader import SampledBatches
from shardtune.data.readers import Start, read_file, read_rows, reread
from shardtune.data.stream import SampleStream, ShuffleBuffer
from shardtune.errors import ConfigError, DataError


def config(train, *extra):
    return validate(load_config(None, ["model.path=/m", f"data.train_files={train}", "data.cache_dir=null",
                                       "data.num_proc=1", "data.train_batch_size=8", "data.streaming=true",
                                       "trainer.total_training_steps=10", *extra]))


def stream_of(cfg, chatml_tok, seed=42):
    return SampleStream(resolve_sources(cfg.data.train_files, cfg.data, cfg.data.train_max_samples)[0], chatml_tok,
                        cfg.data, seed)


def contents(batch):
    """A global batch as plain lists: its samples' tokens and labels, in order."""
    return [(batch.sample(p)[0].tolist(), batch.sample(p)[1].tolist()) for p in range(len(batch.lengths))]


def take(iterable, n):
    it = iter(iterable)
    return [next(it) for _ in range(n)]


def saved(stream, batch):
    """The state a checkpoint would save once `batch` has trained, through JSON."""
    stream.consumed(batch)
    return json.loads(json.dumps(stream.state_dict()))


# -- the shuffle buffer ---------------------------------------------------------------------------------------
def emitted(buffer, items):
    out = [x for x in (buffer.push(i) for i in items) if x is not None]
    buffer.finish()
    while (x := buffer.pop()) is not None:
        out.append(x)
    return out


@pytest.mark.parametrize("capacity", [1, 7, 100, 1000])
def test_the_buffer_emits_a_permutation_of_the_stream_deterministic_from_the_seed(capacity):
    items = list(range(300))
    a, b, c = (emitted(ShuffleBuffer(capacity, seed), items) for seed in (5, 5, 6))
    assert sorted(a) == items and a == b
    assert (a != c) == (capacity > 1)  # one slot cannot shuffle
    assert emitted(ShuffleBuffer(capacity, 5, shuffle=False), items) == items


def test_a_full_buffer_never_emits_before_the_end_and_drains_in_the_sampler_order():
    import torch

    import shardtune.data.batching as batching

    out = emitted(ShuffleBuffer(50, 42 + 3), list(range(50)))
    assert out == batching.GlobalBatchSampler(50, 8, 42).order(3).tolist()
    assert out == torch.randperm(50, generator=torch.Generator().manual_seed(45)).tolist()


def test_the_buffer_state_round_trips_mid_stream_and_mid_drain():
    items = list(range(200))
    whole = emitted(ShuffleBuffer(30, 1), items)
    for cut in (10, 75, 199, 200):  # while filling, emitting, at the last item, and during the drain
        buf = ShuffleBuffer(30, 1)
        out = [x for x in (buf.push(i) for i in items[:cut]) if x is not None]
        if cut == 200:
            buf.finish()
            out += [buf.pop() for _ in range(7)]
        again = ShuffleBuffer(30, 1)
        again.items, again.draining = list(buf.items), buf.draining
        again.set_generator_state(json.loads(json.dumps(buf.generator_state())))
        if cut < 200:
            out += [x for x in (again.push(i) for i in items[cut:]) if x is not None]
            again.finish()
        while (x := again.pop()) is not None:
            out.append(x)
        assert out == whole, cut


# -- the same batches as the map-style path -----------------------------------------------------------------
@pytest.mark.parametrize("extra", [[], ["data.drop_last=true"], ["data.shuffle=false"], ["data.train_max_samples=30"],
                                   ["data.thinking_history=per_turn", "data.max_length=80", "data.truncation=drop"]],
                         ids=["shuffled", "drop_last", "file_order", "max_samples", "per_turn_and_drops"])
def test_a_buffer_holding_the_whole_set_gives_the_map_style_batches(tmp_path, chatml_tok, extra):
    """42 rows in two files (jsonl, parquet), global batches of 8: three epochs, the last partial batch kept or
    dropped, samples split from one row and rows dropped by truncation, all as the cached path has them."""
    rows = arithmetic_rows(42, seed=3, multi_turn=True)
    write_jsonl(tmp_path / "a.jsonl", rows[:20])
    write_parquet(tmp_path / "b.parquet", rows[20:])
    cfg = config(f"{tmp_path}/*", *extra)
    mapped = SampledBatches(build_dataset(cfg.data.train_files, cfg.data, chatml_tok, cfg.data.train_max_samples),
                            cfg.data, 42)
    stream = stream_of(cfg, chatml_tok)
    n = 3 * mapped.steps_per_epoch
    for a, b in zip(take(mapped, n), take(stream, n)):
        assert (a.epoch, a.step_in_epoch, a.ends_epoch) == (b.epoch, b.step_in_epoch, b.ends_epoch)
        assert contents(a) == contents(b)
        assert a.lengths.tolist() == b.lengths.tolist() and a.target_counts.tolist() == b.target_counts.tolist()
        assert stream.epoch_progress(b) == b.epoch + b.ends_epoch
    if "data.truncation=drop" in extra:
        assert mapped.dropped_rows > 0 and b.dropped_rows == mapped.dropped_rows  # the whole pass is read by then


# -- exact resume ---------------------------------------------------------------------------------------------
def write_format(kind, folder, rows):
    if kind == "jsonl":  # blank lines do not count as rows
        text = "".join(json.dumps(r) + "\n" + ("\n" if i % 5 == 0 else "") for i, r in enumerate(rows))
        (folder / "d.jsonl").write_text(text)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), folder / "d.parquet", row_group_size=6)
    elif kind == "json":
        (folder / "d.json").write_text(json.dumps(rows, indent=1))
    else:
        pytest.importorskip("datasets").Dataset.from_list(rows).save_to_disk(str(folder / "hf"))
    return f"{folder}/*"


def counted_rows(monkeypatch) -> list:
    """A list that grows by one for every row the readers turn into a Python object (a parsed line, a
    converted record)."""
    made, row_type = [], readers.Row
    monkeypatch.setattr(readers, "Row", type("CountedRow", (row_type,), {
        "__init__": lambda self, *a, **k: made.append(1) or row_type.__init__(self, *a, **k)}))
    return made


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "json", "save_to_disk"])
def test_resuming_from_any_step_continues_exactly_and_rereads_only_the_buffer(tmp_path, chatml_tok, kind, monkeypatch):
    """A small buffer (7 samples), rows that give two samples each (a position can fall inside a row), a
    skipped bad row: the state saved after each of 14 steps (three epochs), through JSON, resumes into a new
    stream that gives exactly the batches an uninterrupted one gives next; it reads the buffered rows again
    and the rest from the saved position, never the rows before it."""
    rows = arithmetic_rows(23, seed=4, multi_turn=True)
    rows[9] = {"messages": [{"role": "user", "content": "Nothing to answer."}]}  # a bad row, skipped
    train = write_format(kind, tmp_path, rows)
    cfg = config(train, "data.shuffle_buffer=7", "data.thinking_history=per_turn", "data.on_bad_row=skip")
    stream = stream_of(cfg, chatml_tok)
    whole = take(stream, 14 + 3)
    for k in range(14):
        state = saved(stream, whole[k])
        if kind == "jsonl" and k == 3:
            assert 0 < state["next"]["start"][1] < os.path.getsize(tmp_path / "d.jsonl")  # a byte offset
        resumed = stream_of(cfg, chatml_tok)
        resumed.load_state_dict(state)
        materialized = counted_rows(monkeypatch)
        got = take(resumed, 3)
        monkeypatch.undo()
        assert [contents(b) for b in got] == [contents(b) for b in whole[k + 1 : k + 4]], k
        assert [(b.epoch, b.step_in_epoch, b.ends_epoch) for b in got] == \
            [(b.epoch, b.step_in_epoch, b.ends_epoch) for b in whole[k + 1 : k + 4]]
        assert resumed.rows_reread == len({tuple(r[:2]) for r in state["buffer"]})
        # at most 3 batches, the one ahead and a refilled buffer: 2 samples a row, + the bad row and a partial one
        assert resumed.rows_read <= (4 * 8 + 7) // 2 + 2
        if kind in ("jsonl", "parquet"):  # random access: no row before the position is read again
            assert len(materialized) <= resumed.rows_reread + resumed.rows_read + 1  # + the row at a jsonl seek


def test_a_state_resumes_across_the_end_of_an_epoch_and_counts_drops_once(tmp_path, chatml_tok):
    rows = arithmetic_rows(20, seed=8)
    rows[3] = rows[17] = {"messages": 5}
    train = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = config(train, "data.shuffle_buffer=5", "data.on_bad_row=skip")
    stream = stream_of(cfg, chatml_tok)
    whole = take(stream, 9)
    assert [b.ends_epoch for b in whole] == [False, False, True] * 3
    # 5 buffered + 8 emitted samples: the first batch has read rows 0-13, one of them bad; counted per pass
    assert [b.dropped_rows for b in whole[:4]] == [1, 2, 2, 1]
    resumed = stream_of(cfg, chatml_tok)
    resumed.load_state_dict(saved(stream, whole[1]))
    assert [b.dropped_rows for b in take(resumed, 2)] == [2, 1]
    end = saved(stream, whole[2])  # an epoch's end: the next epoch's start, nothing buffered
    assert (end["epoch"], end["step_in_epoch"], end["buffer"]) == (1, 0, []) and stream.at_epoch_end()


def test_a_resume_refuses_changed_files_another_order_and_the_other_data_path(tmp_path, chatml_tok):
    train = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(20, seed=8))
    cfg = config(train, "data.shuffle_buffer=5")
    stream = stream_of(cfg, chatml_tok)
    state = saved(stream, next(iter(stream)))
    with pytest.raises(ConfigError, match="saved for seed 42, and this run has 7: .* start a new "
                                          "trainer.default_local_dir with trainer.resume_from_path"):
        stream_of(cfg, chatml_tok, seed=7).load_state_dict(state)
    with pytest.raises(ConfigError, match="saved for shuffle_buffer 5, and this run has 6"):
        stream_of(config(train, "data.shuffle_buffer=6"), chatml_tok).load_state_dict(state)
    with pytest.raises(ConfigError, match="did not stream its training data"):
        stream_of(cfg, chatml_tok).load_state_dict({"epoch": 0, "step_in_epoch": 1, "seed": 42})
    mapped = SampledBatches(build_dataset([str(train)], cfg.data, chatml_tok), cfg.data, 42)
    with pytest.raises(ConfigError, match="streamed its training data"):
        mapped.load_state_dict(state)
    write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(21, seed=8))
    with pytest.raises(ConfigError, match="training files changed since the checkpoint"):
        stream_of(cfg, chatml_tok).load_state_dict(state)


def test_a_stream_with_nothing_to_train_says_so(tmp_path, chatml_tok):
    unusable = write_jsonl(tmp_path / "u.jsonl", [{"messages": [{"role": "user", "content": "Hi."}]}] * 3)
    with pytest.raises(DataError, match=r"No usable rows in .*u.jsonl.* \(dropped: \{'bad_row': 3\}\)"):
        next(iter(stream_of(config(unusable, "data.on_bad_row=skip"), chatml_tok)))
    small = write_jsonl(tmp_path / "s.jsonl", arithmetic_rows(5))
    with pytest.raises(DataError, match="fewer samples than one global batch .8., and data.drop_last=true"):
        next(iter(stream_of(config(small, "data.drop_last=true"), chatml_tok)))
    assert len(next(iter(stream_of(config(small), chatml_tok))).lengths) == 5


# -- reading rows again by reference ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["jsonl", "parquet", "json", "save_to_disk"])
def test_reread_gives_the_rows_read_in_order(tmp_path, kind, monkeypatch):
    rows = arithmetic_rows(40, seed=9)
    files = readers.data_files(write_format(kind, tmp_path, rows))
    assert len(files) == 1
    seen = list(read_file(files[0]))
    assert [r.data for r in seen] == rows
    wanted = [seen[i] for i in (33, 2, 17, 18)]
    groups = []
    if kind == "parquet":
        import pyarrow.parquet as pq

        read_group = pq.ParquetFile.read_row_group
        monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, g, *a, **k: groups.append(g) or
                            read_group(self, g, *a, **k))
    got = reread(files[0], [Start.at(r) for r in wanted])
    assert {i: r.data for i, r in got.items()} == {r.index: r.data for r in wanted}
    if kind == "jsonl":
        assert all(got[r.index].seek == r.seek for r in wanted)
    if kind == "parquet":
        assert sorted(groups) == [0, 2, 3, 5]  # rows 2, 17 and 18, 33 in groups of 6: only those are read
    assert [r.data for r in read_file(files[0], start=Start.at(seen[21]))] == rows[21:]  # reading on from a row


# -- remote files ---------------------------------------------------------------------------------------------
def big_rows(n):
    return [{"messages": [{"role": "user", "content": f"Repeat {i}: " + "word " * 300},
                          {"role": "assistant", "content": f"{i}"}]} for i in range(n)]


def test_file_urls_are_streamed_incrementally(tmp_path, chatml_tok, monkeypatch):
    """A stream from a file:// URL gives what the local path gives, and its first batch comes before the
    reader has gone far into the file (it is never copied to local disk first)."""
    path = write_jsonl(tmp_path / "big.jsonl", big_rows(400))
    opened = []
    open_data = remote.open_data
    monkeypatch.setattr(remote, "open_data", lambda url: opened.append(open_data(url)) or opened[-1])
    local = stream_of(config(path, "data.shuffle_buffer=16", "data.max_length=2048"), chatml_tok)
    url = stream_of(config(f"file://{path}", "data.shuffle_buffer=16", "data.max_length=2048"), chatml_tok)
    it = iter(url)
    first = next(it)
    assert len(opened) == 1 and opened[0].tell() < os.path.getsize(path) / 10
    assert contents(first) == contents(next(iter(local)))
    assert [contents(b) for b in take(it, 3)] == [contents(b) for b in take(local, 4)[1:]]


def test_s3_objects_are_streamed_in_blocks_and_resume_by_range(s3, tmp_path, chatml_tok, monkeypatch):  # noqa: F811
    """Against moto's S3 server: a 1.6 MB jsonl object read in 128 KiB blocks gives its first batch after
    fetching a small part of it, the same batches as the local file, and a resumed stream re-reads its
    buffered lines by range."""
    monkeypatch.setattr(remote, "DATA_BLOCK_SIZE", 128 << 10)
    path = write_jsonl(tmp_path / "big.jsonl", big_rows(1000))
    fs, _ = remote.filesystem("s3://bucket")
    fs.put_file(str(path), "bucket/stream/big.jsonl")
    opened = []
    open_data = remote.open_data
    monkeypatch.setattr(remote, "open_data", lambda url: opened.append(open_data(url)) or opened[-1])
    extra = ("data.shuffle_buffer=16", "data.max_length=2048")
    url = stream_of(config("s3://bucket/stream/big.jsonl", *extra), chatml_tok)
    batches = take(url, 3)
    assert opened[0].cache.total_requested_bytes <= 2 * (128 << 10) < os.path.getsize(path) / 4
    assert [contents(b) for b in batches] == [contents(b) for b in take(stream_of(config(path, *extra), chatml_tok), 3)]
    resumed = stream_of(config("s3://bucket/stream/big.jsonl", *extra), chatml_tok)
    resumed.load_state_dict(saved(url, batches[0]))
    assert [contents(b) for b in take(resumed, 2)] == [contents(b) for b in batches[1:]]
    assert resumed.rows_reread == 16 and resumed.rows_read < 40


def test_config_refusals(tmp_path):
    train = tmp_path / "t.jsonl"
    base = ["model.path=/m", f"data.train_files={train}", "data.streaming=true"]
    with pytest.raises(ConfigError, match="data.streaming=true needs trainer.total_training_steps"):
        validate(load_config(None, base))
    two = ["model.path=/m", "data.streaming=true", "trainer.total_training_steps=3",
           f"data.train_files=[{{path: {train}, name: a}}, {{path: {train}, name: b}}]"]
    with pytest.raises(ConfigError, match="data.mixture_unit=tokens divides the weights of 2 training sources"):
        validate(load_config(None, [*two, "data.mixture_unit=tokens"]))
    assert validate(load_config(None, two)).data.mixture_unit == "samples"  # a streamed mixture by samples
    with pytest.raises(ConfigError, match="data.shuffle_buffer must be >= 1"):
        validate(load_config(None, [*base, "trainer.total_training_steps=3", "data.shuffle_buffer=0"]))
    ok = validate(load_config(None, [*base, "trainer.total_training_steps=3", "trainer.save_freq=after_each_epoch",
                                     f"data.train_files=[{{path: {train}, weight: 1, name: one}}]"]))
    assert ok.data.streaming and ok.data.shuffle_buffer == 10000


def test_rows_are_read_in_order_through_the_new_reader(tmp_path):
    rows = arithmetic_rows(30, seed=2)
    write_jsonl(tmp_path / "a.jsonl", rows[:10])
    write_parquet(tmp_path / "b.parquet", rows[10:])
    assert [r.data for r in read_rows(readers.expand_paths(f"{tmp_path}/*"))] == rows
    assert [r.data for r in read_rows([f"file://{tmp_path}/b.parquet"])] == rows[10:]
    assert np.array_equal([r.index for r in read_file(str(tmp_path / "b.parquet"), start=Start(7))], range(7, 20))
