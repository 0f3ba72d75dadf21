"""Readers, row formats, truncation, bad-row policy and the tokenization cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import arithmetic_rows, write_jsonl, write_parquet

from shardtune.config import DataConfig
from shardtune.data.chat import IGNORE_INDEX
from shardtune.data.dataset import build_dataset
from shardtune.data.formats import detect_format, to_conversation
from shardtune.data.readers import Row, expand_paths, read_rows
from shardtune.errors import DataError


def cfg(**kw) -> DataConfig:
    return DataConfig(cache_dir=None, num_proc=1, **kw)


def conv_of(data: dict, **kw):
    c = cfg(**kw)
    row = Row("f.jsonl", 0, data)
    return to_conversation(row, c.format if c.format != "auto" else detect_format(row, c), c)


def test_messages_format_with_tools_thinking_and_parquet_nones():
    row = {"messages": [{"role": "user", "content": "hi", "tool_calls": None},
                        {"role": "assistant", "content": None, "tool_calls": [
                            {"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
                        {"role": "tool", "content": "r"}, {"role": "assistant", "content": "ok", "train": False}],
           "tools": json.dumps([{"type": "function", "function": {"name": "f"}}]), "enable_thinking": False}
    conv = conv_of(row)
    assert conv.messages[0] == {"role": "user", "content": "hi"}
    assert conv.messages[1]["content"] == "" and conv.messages[1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert conv.messages[3]["train"] is False
    assert conv.tools[0]["function"]["name"] == "f" and conv.template_kwargs == {"enable_thinking": False}


def test_per_message_loss_mask_and_trainable_are_the_train_flag():
    """verl's per-message `loss_mask` (0/1) and `trainable` mean `train`; conflicting or odd values are row errors."""
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "loss_mask": 0},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "trainable": True}]
    conv = conv_of({"messages": msgs})
    assert [m.get("train") for m in conv.messages] == [None, False, None, True]
    assert all("loss_mask" not in m and "trainable" not in m for m in conv.messages)  # never reach the template
    for bad, needle in (({"loss_mask": 2}, "expected 0/1"), ({"loss_mask": 1, "train": False}, "disagrees")):
        with pytest.raises(DataError, match=needle):
            conv_of({"messages": [msgs[0], {**msgs[1], **bad}]})


def test_prompt_response_nested_like_verl_gsm8k():
    row = {"extra_info": {"question": "2+2?", "answer": "4", "split": "train"}, "data_source": "gsm8k"}
    conv = conv_of(row, format="prompt_response", prompt_key="extra_info", response_key="extra_info",
                   prompt_dict_keys=["question"], response_dict_keys=["answer"], system_prompt="Be brief.")
    assert conv.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                             {"role": "assistant", "content": "4"}]


def test_dict_keys_through_a_one_item_list_like_verl():
    """verl's examples/sft/gsm8k/run_gemma_2b.sh: prompt_key=prompt (a one-message chat list) with
    prompt_dict_keys=['content']; verl unwraps one-item lists on the way down."""
    row = {"prompt": [{"role": "user", "content": "2+2?"}], "extra_info": {"answer": "4"}}
    conv = conv_of(row, format="prompt_response", prompt_key="prompt", response_key="extra_info",
                   prompt_dict_keys=["content"], response_dict_keys=["answer"])
    assert conv.messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def test_prompt_response_auto_detected_with_chat_list_prompt():
    conv = conv_of({"prompt": [{"role": "user", "content": "q"}], "response": "a"})
    assert [m["role"] for m in conv.messages] == ["user", "assistant"]


def test_alpaca_and_sharegpt():
    a = conv_of({"instruction": "Add", "input": "2 and 2", "output": "4"})
    assert a.messages == [{"role": "user", "content": "Add\n\n2 and 2"}, {"role": "assistant", "content": "4"}]
    s = conv_of({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                   {"from": "gpt", "value": "a"}]})
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant"]


@pytest.mark.parametrize("data,key,needle", [
    ({"messages": "nope"}, "messages", "not valid JSON"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "unknown role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "expected a string"),
    ({"messages": [{"role": "user", "content": "q"}]}, "messages", "no assistant turn"),
    ({"messages": []}, "messages", "empty"),
    ({"other": 1}, None, "cannot tell the row format"),
])
def test_bad_rows_name_file_row_and_key(data, key, needle):
    with pytest.raises(DataError) as e:
        conv_of(data)
    msg = str(e.value)
    assert msg.startswith("f.jsonl, row 0") and needle in msg and "Fix:" in msg
    if key:
        assert f"key '{key}'" in msg


def test_missing_nested_key():
    with pytest.raises(DataError, match="key 'extra_info.question'"):
        conv_of({"extra_info": {"q": 1}, "r": "a"}, format="prompt_response", prompt_key="extra_info",
                prompt_dict_keys=["question"], response_key="r")


def test_readers_parquet_jsonl_json_glob_and_hf_folder(tmp_path):
    rows = arithmetic_rows(6)
    write_parquet(tmp_path / "a.parquet", rows[:2])
    write_jsonl(tmp_path / "b.jsonl", rows[2:4])
    (tmp_path / "c.json").write_text(json.dumps(rows[4:]))
    paths = expand_paths(str(tmp_path / "*"))
    got = [r.data["messages"][-1]["content"] for r in read_rows(paths)]
    assert sorted(got) == sorted(r["messages"][-1]["content"] for r in rows)
    assert len(list(read_rows(paths, max_rows=3))) == 3
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    hf_rows = list(read_rows(expand_paths(str(tmp_path / "hf"))))
    assert [r.data["messages"] for r in hf_rows] == [r["messages"] for r in rows]


@pytest.mark.parametrize("make,needle", [
    (lambda p: p.with_suffix(".jsonl"), "does not exist"),
    (lambda p: (p.with_suffix(".jsonl").write_text(""), p.with_suffix(".jsonl"))[1], "is empty"),
    (lambda p: (p.with_suffix(".parquet").write_bytes(b"PAR1garbage" * 10), p.with_suffix(".parquet"))[1],
     "cannot be read as parquet"),
    (lambda p: (p.with_suffix(".jsonl").write_text('{"a": 1}\n{oops\n'), p.with_suffix(".jsonl"))[1], "line 2"),
    (lambda p: (p.with_suffix(".csv").write_text("a,b\n"), p.with_suffix(".csv"))[1], "unsupported type"),
])
def test_bad_files(tmp_path, make, needle):
    path = make(tmp_path / "data")
    with pytest.raises(DataError, match=needle):
        list(read_rows(expand_paths(str(path))))


def test_truncation_modes(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": "q" * 30}, {"role": "assistant", "content": "a" * 30}]},
            {"messages": [{"role": "user", "content": "short"}, {"role": "assistant", "content": "ok"}]}]
    f = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError,
                       match=r"t.jsonl, row 0: the conversation is \d+ tokens, longer than data.max_length=60"):
        build_dataset([str(f)], cfg(max_length=60, truncation="error"), tok)
    right = build_dataset([str(f)], cfg(max_length=60, truncation="right"), tok)
    left = build_dataset([str(f)], cfg(max_length=60, truncation="left"), tok)
    drop = build_dataset([str(f)], cfg(max_length=60, truncation="drop"), tok)
    full = build_dataset([str(f)], cfg(max_length=4096), tok)
    ids_full, lab_full = full[0]
    assert len(ids_full) > 60
    assert list(right[0][0]) == list(ids_full[:60]) and list(left[0][0]) == list(ids_full[-60:])
    assert list(right[0][1]) == list(lab_full[:60]) and list(left[0][1]) == list(lab_full[-60:])
    assert right.stats["truncated"] == 1 and len(drop) == 1 and drop.stats["dropped"] == {"too_long": 1}
    # right truncation inside the prompt leaves nothing to train: such rows are dropped and counted
    tiny = build_dataset([str(f)], cfg(max_length=35, truncation="right"), tok)
    assert len(tiny) == 1 and tiny.stats["dropped"] == {"no_trained_tokens": 1}


def test_a_token_budget_below_max_length_holds_when_every_sample_fits(tmp_path, tok):
    """verl accepts data.max_token_len_per_gpu < data.max_length; so does shardtune, as long as no sample is
    longer than the budget: checked per source when the dataset is built, before any model is loaded."""
    from shardtune.config import load_config, validate
    from shardtune.errors import ConfigError

    rows = [{"messages": [{"role": "user", "content": "q" * 30}, {"role": "assistant", "content": "a" * 30}]},
            {"messages": [{"role": "user", "content": "short"}, {"role": "assistant", "content": "ok"}]}]
    f = write_jsonl(tmp_path / "t.jsonl", rows)
    full = build_dataset([str(f)], cfg(max_length=4096), tok)
    longest = int(full.lengths.max())
    fits = build_dataset([str(f)], cfg(max_length=4096, use_dynamic_bsz=True, max_token_len_per_gpu=longest), tok)
    assert np.array_equal(fits.lengths, full.lengths)
    budget = longest - 1
    with pytest.raises(DataError, match=rf"source 't' \(.*t.jsonl\): 1 of 2 samples have more tokens than one "
                                        rf"micro-batch may hold, data.max_token_len_per_gpu={budget} \(the longest "
                                        rf"has {longest}; .* raise data.max_token_len_per_gpu to at least {longest}, "
                                        rf"or set data.max_length={budget}"):
        build_dataset([str(f)], cfg(max_length=4096, use_dynamic_bsz=True, max_token_len_per_gpu=budget), tok)
    line = ["model.path=/m", f"data.train_files={f}", "data.use_dynamic_bsz=true", "data.max_length=4096",
            "data.max_token_len_per_gpu=1024"]
    assert validate(load_config(None, line)).data.max_token_len_per_gpu == 1024
    with pytest.raises(ConfigError, match="a streamed sample could exceed the budget"):  # not read ahead
        validate(load_config(None, [*line, "data.streaming=true", "trainer.total_training_steps=2"]))


def test_bad_row_policy_skip_counts(tmp_path, tok):
    rows = arithmetic_rows(4) + [{"messages": [{"role": "user", "content": "no answer"}]}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d.jsonl, row 4, key 'messages'"):
        build_dataset([str(f)], cfg(), tok)
    ds = build_dataset([str(f)], cfg(on_bad_row="skip"), tok)
    assert len(ds) == 4 and ds.stats["dropped"] == {"bad_row": 1}


def test_cache_is_reused_and_keyed(tmp_path, tok, monkeypatch):
    f = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(20))
    c = DataConfig(cache_dir=str(tmp_path / "cache"), num_proc=1)
    first = build_dataset([str(f)], c, tok)
    assert "cache_hit" not in first.stats
    import shardtune.data.dataset as dataset_mod

    def boom(*a, **k):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(dataset_mod, "tokenize_to_shards", boom)
    second = build_dataset([str(f)], c, tok)
    assert second.stats["cache_hit"]
    for a, b in zip(first.datasets[0].arrays(), second.datasets[0].arrays()):
        assert np.array_equal(a, b)
    with pytest.raises(AssertionError, match="tokenized again"):  # another max_length is another cache entry
        build_dataset([str(f)], DataConfig(cache_dir=str(tmp_path / "cache"), num_proc=1, max_length=512), tok)
    # the batching keys and the source's name and weight do not change the samples: same cache entry
    renamed = [{"path": str(f), "name": "other", "weight": 2.0}]
    assert build_dataset(renamed, DataConfig(cache_dir=str(tmp_path / "cache"), num_proc=1, train_batch_size=3,
                                             shuffle=False), tok).stats["cache_hit"]


def test_multiprocess_tokenization_matches_single(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(600))
    one = build_dataset([str(f)], cfg(), tok).datasets[0].arrays()
    two = build_dataset([str(f)], DataConfig(cache_dir=None, num_proc=2), tok).datasets[0].arrays()
    assert all(np.array_equal(a, b) for a, b in zip(one, two))
    assert (one[1] != IGNORE_INDEX).sum() > 0


def test_malformed_first_row_follows_the_bad_row_policy(tmp_path, tok):
    rows = [{"oops": 1}] + arithmetic_rows(3)
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match="d.jsonl, row 0"):
        build_dataset([str(f)], cfg(), tok)
    ds = build_dataset([str(f)], cfg(on_bad_row="skip"), tok)
    assert len(ds) == 3 and ds.stats["dropped"] == {"bad_row": 1}


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_bytes_that_are_not_utf8_name_file_line_and_fix_and_follow_the_policy(tmp_path, tok, suffix):
    rows = arithmetic_rows(3)
    bad = json.dumps({"messages": [{"role": "user", "content": "caf\u00e9"},
                                   {"role": "assistant", "content": "ok"}]}).encode().replace(b"\\u00e9", b"\xe9")
    lines = [json.dumps(rows[0]).encode(), bad, json.dumps(rows[1]).encode(), json.dumps(rows[2]).encode()]
    f = tmp_path / f"latin1{suffix}"
    f.write_bytes(b"\n".join(lines) + b"\n" if suffix == ".jsonl" else b"[\n" + b",\n".join(lines) + b"\n]\n")
    with pytest.raises(DataError) as e:
        build_dataset([str(f)], cfg(), tok)
    line = 2 if suffix == ".jsonl" else 3  # the .json file opens its list on line 1
    assert f"{f}, line {line}: bytes that are not UTF-8" in str(e.value) and "Fix: re-encode" in str(e.value)
    ds = build_dataset([str(f)], cfg(on_bad_row="skip"), tok)
    assert len(ds) == 3 and ds.stats["dropped"] == {"bad_row": 1} and ds.stats["rows_read"] == 4


def test_invalid_json_lines_follow_the_bad_row_policy(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(arithmetic_rows(1)[0]) + "\n{oops\n[1, 2]\n")
    with pytest.raises(DataError, match=r"d.jsonl, line 2: invalid JSON"):
        build_dataset([str(f)], cfg(), tok)
    ds = build_dataset([str(f)], cfg(on_bad_row="skip"), tok)
    assert len(ds) == 1 and ds.stats["dropped"] == {"bad_row": 2}


def test_json_list_is_read_element_by_element_like_json_load(tmp_path, monkeypatch):
    import shardtune.data.json_rows as json_rows

    rows = arithmetic_rows(40, seed=3) + [{"text": "brackets ] [ } { , and \"quotes\"", "n": 12345678901234,
                                           "x": -1.5e-3},
                                          {"nested": {"a": [1, {"b": "\u00e9\u4e2d\U0001f600"}]}, "s": "\\\\"}]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    monkeypatch.setattr(json_rows, "_JSON_BLOCK", 7)  # tiny blocks: every element crosses block boundaries
    got = list(read_rows([str(f)]))
    assert [r.data for r in got] == rows and [r.index for r in got] == list(range(len(rows)))
    (tmp_path / "cols.json").write_text(json.dumps({"instruction": ["a", "b"], "output": ["1", "2"]}))
    assert [r.data for r in read_rows([str(tmp_path / "cols.json")])] == [
        {"instruction": "a", "output": "1"}, {"instruction": "b", "output": "2"}]
    (tmp_path / "open.json").write_text(json.dumps(rows[:2])[:-1])
    with pytest.raises(DataError, match="open.json, line 1: the list is not closed"):
        list(read_rows([str(tmp_path / "open.json")]))
    (tmp_path / "broken.json").write_text('[{"a": 1},\n {"a": 2} {"a": 3}]')
    with pytest.raises(DataError, match=r"broken.json, line 2: expected ',' or ']' after row 1"):
        list(read_rows([str(tmp_path / "broken.json")]))
