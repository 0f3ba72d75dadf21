"""A weighted mixture of streamed sources, without a model: each source's samples come in the order its own
stream gives them (pass after pass), every batch is full and keeps the weights, the mixture's epoch counts
the passes every source has completed, a resume from any step continues exactly, and the refusals."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import arithmetic_rows, write_jsonl, write_parquet

from shardtune.config import load_config, resolve_sources, validate
from shardtune.data.stream import SampleStream
from shardtune.data.stream_mixture import MixedStream, source_seed
from shardtune.errors import ConfigError, DataError

BATCH, SEED = 8, 5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("smix")
    rng = random.Random(3)
    alpaca = [{"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)}
              for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(9))]
    return {"chat": write_jsonl(d / "chat.jsonl", arithmetic_rows(23, seed=31)),
            "math": write_parquet(d / "math.parquet", alpaca)}  # 9 rows: cycled about twice per chat pass


def config(files, *extra, weights=(0.75, 0.25)):
    train = (f"data.train_files=[{{path: {files['chat']}, name: chat, weight: {weights[0]}}}, "
             f"{{path: {files['math']}, name: math, weight: {weights[1]}, format: alpaca}}]")
    return validate(load_config(None, ["model.path=/m", train, "data.cache_dir=null", "data.streaming=true",
                                       f"data.train_batch_size={BATCH}", "data.shuffle_buffer=6",
                                       "trainer.total_training_steps=10", *extra]))


def mixed(cfg, chatml_tok, seed=SEED):
    return MixedStream(resolve_sources(cfg.data.train_files, cfg.data, cfg.data.train_max_samples), chatml_tok,
                       cfg.data, seed)


def contents(batch):
    return [(batch.sample(p)[0].tolist(), batch.sample(p)[1].tolist(), int(batch.sources[p]))
            for p in range(len(batch.lengths))]


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def alone(cfg, chatml_tok, index, passes):
    """Source `index` streamed by itself with its mixture seed: its samples over `passes` passes, in order,
    and the number of samples in one pass."""
    source = resolve_sources(cfg.data.train_files, cfg.data, cfg.data.train_max_samples)[index]
    stream = SampleStream(source, chatml_tok, cfg.data, source_seed(SEED, index))
    out, per_pass, it = [], 0, iter(stream)
    while True:
        batch = next(it)
        if batch.epoch == passes:
            return out, per_pass
        out += [(batch.sample(p)[0].tolist(), batch.sample(p)[1].tolist()) for p in range(len(batch.lengths))]
        per_pass += len(batch.lengths) if batch.epoch == 0 else 0


def test_each_source_comes_in_its_own_stream_order_and_every_batch_keeps_the_weights(files, chatml_tok):
    cfg = config(files)
    batches = take(mixed(cfg, chatml_tok), 20)  # 120 chat samples (5+ passes of 23), 40 math (4+ passes of 9)
    drawn = [[s[:2] for b in batches for s in contents(b) if s[2] == k] for k in (0, 1)]
    for k in (0, 1):
        reference, per_pass = alone(cfg, chatml_tok, k, passes=6)
        assert drawn[k] == reference[: len(drawn[k])], k
    totals = np.zeros(2)
    for step, b in enumerate(batches, 1):
        counts = np.bincount(b.sources, minlength=2)
        totals += counts
        assert counts.sum() == BATCH and np.all(np.abs(counts - BATCH * np.array([0.75, 0.25])) < 1), counts
        assert np.all(np.abs(totals - step * BATCH * np.array([0.75, 0.25])) <= 1)


def test_the_epoch_counts_the_passes_every_source_has_completed(files, chatml_tok):
    cfg = config(files, weights=(0.5, 0.5))
    per_pass = [alone(cfg, chatml_tok, k, passes=1)[1] for k in (0, 1)]
    assert per_pass == [23, 9]
    totals = np.zeros(2, dtype=int)
    for b in take(mixed(cfg, chatml_tok), 12):
        totals += np.bincount(b.sources, minlength=2)
        done = int(min(totals // per_pass))  # the passes of the source furthest behind
        assert b.epoch + int(b.ends_epoch) == done
    assert done == 2  # 48 chat samples: two whole passes over 23, the math source far ahead


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_resume_from_every_step_continues_exactly_and_rereads_only_buffered_rows(files, chatml_tok, tmp_path, fmt):
    chat = files["chat"] if fmt == "jsonl" else write_parquet(tmp_path / "chat.parquet", arithmetic_rows(23, seed=31))
    cfg = config({**files, "chat": chat})
    stream = mixed(cfg, chatml_tok)
    batches = take(stream, 9)
    for k in range(8):
        stream.consumed(batches[k])
        state = json.loads(json.dumps(stream.state_dict()))
        resumed = mixed(cfg, chatml_tok)
        resumed.load_state_dict(state)
        assert [contents(b) for b in take(resumed, 9 - k - 1)] == [contents(b) for b in batches[k + 1:]], k
        buffered_rows = sum(len({(r[0], r[1]) for r in s["buffer"]}) for s in state["streams"].values())
        assert resumed.rows_reread == buffered_rows and buffered_rows > 0
        assert [b.epoch for b in take(resumed, 1)] == [batches[k + 1].epoch]


def test_refusals_on_resume_and_sources_without_rows(files, chatml_tok, tmp_path):
    cfg = config(files)
    stream = mixed(cfg, chatml_tok)
    stream.consumed(take(stream, 2)[1])
    state = json.loads(json.dumps(stream.state_dict()))
    with pytest.raises(ConfigError, match="would draw other batches"):
        mixed(config(files, weights=(0.5, 0.5)), chatml_tok).load_state_dict(state)
    with pytest.raises(ConfigError, match="would draw other batches"):
        mixed(cfg, chatml_tok, seed=SEED + 1).load_state_dict(state)
    single = validate(load_config(None, ["model.path=/m", f"data.train_files={files['chat']}", "data.cache_dir=null",
                                         "data.streaming=true", "trainer.total_training_steps=3"]))
    one = SampleStream(resolve_sources(single.data.train_files, single.data, -1)[0], chatml_tok, single.data, SEED)
    with pytest.raises(ConfigError, match="streamed a weighted mixture of 2 sources"):
        one.load_state_dict(state)
    with pytest.raises(ConfigError, match="streamed one source"):
        mixed(cfg, chatml_tok).load_state_dict(one.state_dict())
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"messages": [{"role": "user", "content": "no answer"}]}])
    with pytest.raises(DataError, match="No usable rows in .*empty.jsonl"):
        take(mixed(config({**files, "math": empty}, "data.on_bad_row=skip"), chatml_tok), 1)
