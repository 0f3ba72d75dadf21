"""Tokenization at scale: sharded cache equal to an in-memory reference, resume after SIGKILL, flat peak
memory, sources (parsing, per-source caches and stats, the combined view) and what `validate` prints."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import arithmetic_rows, run_cli, write_jsonl

import shardtune.data.tokenize as tokenize_mod
from shardtune.config import DataConfig, load_config, resolve_sources, validate
from shardtune.data.chat import IGNORE_INDEX, tokenize_conversation
from shardtune.data.dataset import build_dataset
from shardtune.data.formats import detect_format, to_conversation
from shardtune.data.readers import read_rows
from shardtune.data.tokenize import truncate
from shardtune.errors import ConfigError, DataError

ROOT = Path(__file__).parents[1]


def long_rows(n: int) -> list[dict]:
    """Three-turn chats of about 3,600 tokens each."""
    return [{"messages": [m for k in range(3) for m in (
        {"role": "user", "content": f"q{i}-{k} " + "lorem ipsum dolor " * 30},
        {"role": "assistant", "content": f"a{i}-{k} " + "sit amet consectetur " * 30})]} for i in range(n)]


def mixed_rows(n: int) -> list[dict]:
    """Arithmetic chats with a bad row every 37 rows and an over-long one every 23."""
    rows = arithmetic_rows(n, seed=5)
    for i in range(0, n, 37):
        rows[i] = {"messages": [{"role": "user", "content": "no answer"}]}
    for i in range(11, n, 23):
        rows[i]["messages"][-1]["content"] = "long " * 40
    return rows


def reference(path: Path, cfg: DataConfig, tok) -> tuple[np.ndarray, np.ndarray, np.ndarray, Counter]:
    """The plain path: every row read and tokenized one by one in this process, packed at the end. Returns
    the arrays and the counts of drops by reason (+ "truncated")."""
    ids, labels, offsets, dropped = [], [], [0], Counter()
    for row in read_rows([str(path)], skip_bad=True):
        try:
            if row.error:
                raise DataError(row.error)
            conv = to_conversation(row, detect_format(row, cfg), cfg)
            sample = tokenize_conversation(conv.messages, tok, conv.tools, chat_template=tok.chat_template)
        except DataError:
            dropped["bad_row"] += 1
            continue
        sample, reason = truncate(sample, cfg.max_length, cfg.truncation, row)
        if reason is not None:
            dropped[reason] += 1
        if reason not in (None, "truncated"):
            continue
        ids += sample.input_ids
        labels += sample.labels
        offsets.append(len(ids))
    return np.array(ids, np.int32), np.array(labels, np.int32), np.array(offsets, np.int64), dropped


def assert_equal_to_reference(ds, ref) -> None:
    ids, labels, offsets, dropped = ref
    got = ds.arrays()
    assert np.array_equal(got[0], ids) and np.array_equal(got[1], labels) and np.array_equal(got[2], offsets)
    assert np.array_equal(ds.lengths, np.diff(offsets))
    targets = [int((labels[a + 1 : b] != IGNORE_INDEX).sum()) for a, b in zip(offsets[:-1], offsets[1:])]
    assert ds.target_counts.tolist() == targets
    counts = Counter(ds.stats["dropped"]) + Counter({"truncated": ds.stats["truncated"]})
    assert counts == dropped
    assert all(np.array_equal(ds[i][0], ids[offsets[i] : offsets[i + 1]]) for i in range(0, len(ds), 7))


@pytest.mark.parametrize("num_proc", [1, 2])
def test_sharded_cache_equals_the_in_memory_reference(tmp_path, tok, monkeypatch, num_proc):
    f = write_jsonl(tmp_path / "d.jsonl", mixed_rows(700))
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), num_proc=num_proc, on_bad_row="skip", max_length=200,
                     truncation="right")
    monkeypatch.setattr(tokenize_mod, "CHUNK_ROWS", 24)  # several chunks per shard, one cut by a shard's end
    ref = reference(f, cfg, tok)
    assert ref[3] == {"bad_row": 19, "truncated": 29}  # rows 0, 37, ... bad; 11, 34, ... too long (333 is both)
    built = build_dataset([str(f)], cfg, tok, shard_rows=64).datasets[0]
    assert built.stats["shards"] == 11 and len(built.shards) == 11 and built.stats["rows_read"] == 700
    assert_equal_to_reference(built, ref)
    loaded = build_dataset([str(f)], cfg, tok, shard_rows=64).datasets[0]
    assert loaded.stats["cache_hit"]
    assert_equal_to_reference(loaded, ref)


def test_without_a_cache_folder_nothing_is_left_behind(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    f = write_jsonl(tmp_path / "d.jsonl", mixed_rows(300))
    cfg = DataConfig(cache_dir=None, num_proc=1, on_bad_row="skip", max_length=200, truncation="drop")
    ds = build_dataset([str(f)], cfg, tok, shard_rows=64)
    assert list((tmp_path / "tmp").iterdir()) == []  # the shards are unlinked once mapped ...
    assert_equal_to_reference(ds.datasets[0], reference(f, cfg, tok))  # ... and still readable


_BUILD = """
import sys
from shardtune.config import DataConfig
from shardtune.data.dataset import build_dataset
from shardtune.tiny import byte_tokenizer
build_dataset([sys.argv[1]], DataConfig(cache_dir=sys.argv[2], num_proc=1, max_length=8192), byte_tokenizer(),
              progress=False, shard_rows=int(sys.argv[3]))
"""


@pytest.mark.slow
def test_sigkill_during_tokenization_then_rerun_resumes_and_equals_an_uninterrupted_run(tmp_path, tok, monkeypatch):
    f = write_jsonl(tmp_path / "d.jsonl", long_rows(2000))
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-c", _BUILD, str(f), str(cache), "64"], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.glob("tokenized/*/shard-*"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (folder,) = cache.glob("tokenized/*")
    done = {p.name for p in folder.glob("shard-*")}
    assert 3 <= len(done) < 2000 // 64 and not (folder / "meta.json").exists()

    tokenized = Counter()
    original = tokenize_mod._tokenize_chunk

    def counting(rows):
        tokenized["rows"] += len(rows)
        return original(rows)

    monkeypatch.setattr(tokenize_mod, "_tokenize_chunk", counting)
    cfg = DataConfig(cache_dir=str(cache), num_proc=1, max_length=8192)
    resumed = build_dataset([str(f)], cfg, tok, progress=False, shard_rows=64).datasets[0]
    assert tokenized["rows"] == 2000 - 64 * len(done)  # the complete shards were not tokenized again
    assert not list(folder.glob(".tmp-*"))  # the killed run's half-written shard was removed
    monkeypatch.undo()  # worker processes cannot pickle the counting wrapper
    fresh = build_dataset([str(f)], DataConfig(cache_dir=str(tmp_path / "fresh"), num_proc=2, max_length=8192), tok,
                          progress=False, shard_rows=64).datasets[0]
    for a, b in zip(resumed.arrays(), fresh.arrays()):
        assert np.array_equal(a, b)
    assert np.array_equal(resumed.target_counts, fresh.target_counts)
    assert {k: v for k, v in resumed.stats.items() if k != "cache"} == {k: v for k,
                                                                        v in fresh.stats.items() if k != "cache"}


# The peak of this process is VmHWM (ru_maxrss would keep the RSS of pytest, which forked it, across exec);
# the workers' is ru_maxrss of the children (forked once tokenization starts, so they inherit only the
# start-up footprint).
_PEAK = """
import json, re, resource, sys
from pathlib import Path
from shardtune.config import DataConfig
from shardtune.data.dataset import build_dataset
from shardtune.tiny import byte_tokenizer
ds = build_dataset([sys.argv[1]], DataConfig(cache_dir=sys.argv[2], num_proc=2, max_length=8192), byte_tokenizer(),
                   progress=False)
hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
print(json.dumps({"tokens": int(ds.lengths.sum()), "self": hwm,
                  "workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc (Linux)")
def test_peak_memory_does_not_grow_with_the_number_of_rows(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    peaks = {}
    for n in (600, 6000):  # the small one already keeps every worker busy with a full window of chunks
        f = write_jsonl(tmp_path / f"d{n}.jsonl", long_rows(n))
        out = subprocess.run([sys.executable, "-c", _PEAK, str(f), str(tmp_path / f"cache{n}")], env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        peaks[n] = json.loads(out.stdout.strip().splitlines()[-1])
    small, large = peaks[600], peaks[6000]
    print(peaks)
    assert large["tokens"] > 20_000_000 and large["tokens"] > 9.9 * small["tokens"]
    # an in-memory path holds ~58 bytes per token: 20 M tokens would add ~1.2 GB
    assert large["self"] < 1.2 * small["self"] and large["workers"] < 1.2 * small["workers"]


# ----------------------------------------------------------------------------------------------------------
# Sources


def sources_of(files, **data):
    cfg = validate(load_config(None, ["model.path=m", f"data.train_files={json.dumps(files)}",
                                      *(f"data.{k}={v}" for k, v in data.items())]))
    return resolve_sources(cfg.data.train_files, cfg.data, cfg.data.train_max_samples)


def test_source_entries_resolve_names_weights_and_format_keys():
    (plain,) = sources_of(["data/chat.parquet", "more/chat2.jsonl"])
    assert plain.name == "data" and plain.paths == ("data/chat.parquet", "more/chat2.jsonl") and plain.weight == 1.0
    chat, math, hf = sources_of(["data/chat.parquet", {"path": "math/*.jsonl", "weight": 0.3, "max_samples": 50,
                                                       "format": "alpaca"},
                                 {"path": "s3://bucket/hf_folder/", "name": "hf.v2", "weight": 0.1}],
                                train_max_samples=1000)
    assert (chat.name, math.name, hf.name) == ("chat", "math", "hf.v2")
    assert (chat.weight, math.weight, hf.weight) == pytest.approx((0.6, 0.3, 0.1))
    assert (chat.max_samples, math.max_samples) == (1000, 50)
    assert math.data.format == "alpaca" and chat.data.format == "auto"
    assert sources_of([{"path": "s3://bucket/sft/chat-v2.parquet"}])[0].name == "chat-v2"
    a, b = sources_of([{"path": "a.jsonl", "weight": 3}, {"path": "b.jsonl", "weight": 1}])
    assert (a.weight, b.weight) == (0.75, 0.25)
    assert [s.weight for s in sources_of([{"path": "a.jsonl"}, {"path": "b.jsonl"}])] == [0.5, 0.5]


@pytest.mark.parametrize("files,needle", [
    ([{"path": "a.jsonl", "wieght": 0.5}],
     "Unknown key 'wieght' in the source data.train_files[0]. Did you mean 'weight'?"),
    ([{"path": "a.jsonl", "mesages_key": "m"}], "Did you mean 'messages_key'?"),
    ([{"path": "a.jsonl", "format": "alpacca"}], "Did you mean 'alpaca'?"),
    ([{"weight": 1}], "data.train_files[0] has no path"),
    ([{"path": "a.jsonl", "weight": 0}], "weight must be a positive number"),
    ([{"path": "a.jsonl", "weight": "lots"}], "must be a number"),
    ([{"path": "a.jsonl", "name": "my source"}], "must use only letters"),
    ([{"path": "a.jsonl", "max_samples": 0}], "max_samples must be -1 (all rows) or >= 1"),
    (["x/a.jsonl", {"path": "y/a.jsonl"}], "Two sources in data.train_files are named 'a'"),
    ([{"path": "a.jsonl", "weight": 0.7}, {"path": "b.jsonl", "weight": 0.3}, "c.jsonl"],
     "leaves no share for the source(s) without a weight (c)"),
    ([{"path": "a.jsonl", "format": "messages", "system_prompt": "Be brief."}], "system_prompt applies to"),
])
def test_source_errors_name_the_entry_and_the_fix_before_any_model_is_loaded(files, needle):
    with pytest.raises(ConfigError) as e:
        sources_of(files)
    assert needle in str(e.value)


def test_sources_are_cached_apart_with_their_own_format_keys_and_stats(tmp_path, tok):
    chat = write_jsonl(tmp_path / "chat.jsonl", mixed_rows(120))
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"q": f"Add {i} and {i}", "a": str(2 * i)} for i in range(50)])
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), num_proc=1, on_bad_row="skip", max_length=200,
                     truncation="drop")
    entries = [str(chat), {"path": str(alpaca), "name": "sums", "format": "prompt_response", "prompt_key": "q",
                           "response_key": "a", "max_samples": 40, "weight": 0.25}]
    ds = build_dataset(entries, cfg, tok)
    assert [s.name for s in ds.sources] == ["chat", "sums"] and len(list((tmp_path / "cache/tokenized").iterdir())) == 2
    only_chat = build_dataset([str(chat)], cfg, tok)  # the first source alone: the same cache entry, same samples
    assert only_chat.stats["cache_hit"] and len(only_chat) == len(ds.datasets[0])
    n_chat = len(ds.datasets[0])
    assert len(ds) == n_chat + 40 and ds.starts.tolist() == [0, n_chat, n_chat + 40]
    assert ds.source_of(np.array([0, n_chat - 1, n_chat, len(ds) - 1])).tolist() == [0, 0, 1, 1]
    assert np.array_equal(ds[n_chat + 3][0], ds.datasets[1][3][0]) and np.array_equal(ds[5][1], ds.datasets[0][5][1])
    assert np.array_equal(ds.lengths, np.concatenate([d.lengths for d in ds.datasets]))
    assert ds.num_targets([1, n_chat + 2]) == ds.datasets[0].num_targets([1]) + ds.datasets[1].num_targets([2])
    chat_stats, sums_stats = ds.stats["sources"]["chat"], ds.stats["sources"]["sums"]
    assert sums_stats["rows_read"] == 40 and sums_stats["dropped"] == {}
    assert chat_stats["dropped"] == {"bad_row": 4, "too_long": 5} and chat_stats["rows_read"] == 120
    assert ds.stats["rows_read"] == 160 and ds.stats["dropped"] == chat_stats["dropped"]
    assert ds.stats["tokens"] == int(ds.lengths.sum()) and ds.stats["supervised_tokens"] == int(ds.target_counts.sum())
    user = tok.decode(ds.datasets[1][0][0])
    assert "<|im_start|>user\nAdd 0 and 0<|im_end|>" in user and "<|im_start|>assistant\n0<|im_end|>" in user


def test_validate_prints_each_source(tmp_path, tiny_model):
    chat = write_jsonl(tmp_path / "chat.jsonl", mixed_rows(60))
    math = write_jsonl(tmp_path / "math.jsonl", arithmetic_rows(30, seed=9))
    files = json.dumps([str(chat), {"path": str(math), "weight": 0.25}])
    r = run_cli("validate", f"model.path={tiny_model}", f"data.train_files={files}", f"data.val_files=[{math}]",
                "data.on_bad_row=skip", "data.max_length=200", "data.truncation=drop", "data.cache_dir=null")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "train: 90 rows read" in out and "config and data OK" in out
    assert "  source 'chat' (weight 0.75): 60 rows read, 55 kept, 55 samples; dropped: bad_row 2, too_long 3" in out
    assert "  source 'math' (weight 0.25): 30 rows read, 30 kept, 30 samples; dropped: none" in out
    assert "val: 30 rows read, 30 kept" in out and "  source 'math': 30 rows read" in out
    bars = [line for line in out.splitlines() if line.startswith("    length ")]
    assert bars and sum(int(line.split()[2]) for line in bars) == 55 + 30 + 30  # every sample in one bin
    assert "mask audit " in out  # per data file, under its source


def test_one_source_written_as_a_mapping_trains_exactly_as_the_plain_path(tmp_path, tiny_model):
    from shardtune.trainer import Trainer

    train = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(40, seed=1))
    val_a = write_jsonl(tmp_path / "val_a.jsonl", arithmetic_rows(6, seed=2))
    val_b = write_jsonl(tmp_path / "val_b.jsonl", arithmetic_rows(5, seed=3))

    def fit(name, train_files, val_files, cache):
        cfg = validate(load_config(None, [
            f"model.path={tiny_model}", f"data.train_files={json.dumps(train_files)}",
            f"data.val_files={json.dumps(val_files)}", f"data.cache_dir={cache}", "data.num_proc=1",
            "data.train_batch_size=8", "optim.lr=1e-3", f"trainer.default_local_dir={tmp_path / name}",
            "trainer.total_training_steps=3", "trainer.test_freq=1", "trainer.logger=[jsonl]"]))
        return [(h["train/loss"], h["train/grad_norm"], h["val/loss"]) for h in Trainer(cfg).fit()]

    plain = fit("plain", [str(train)], [str(val_a), str(val_b)], "null")
    mapped = fit("mapped", [{"path": str(train), "name": "arith", "weight": 0.5, "messages_key": "messages"}],
                 [{"path": str(val_a)}, {"path": str(val_b), "format": "messages"}], tmp_path / "cache")
    # training bit for bit: same samples in the same order; validation goes source by source when there are
    # several (for val/loss/<name>), so its micro-batches group samples differently: the same loss to fp32 rounding
    assert [x[:2] for x in plain] == [x[:2] for x in mapped]
    assert all(math.isclose(a[2], b[2], rel_tol=1e-6) for a, b in zip(plain, mapped)), (plain, mapped)
