"""The mask audit: counted per data file by the dataset, printed by `shardtune validate`, logged once per dataset
as a run event; `thinking_history=per_turn` expands rows into samples."""

from __future__ import annotations

import json

from conftest import arithmetic_rows, run_cli, write_jsonl

from shardtune.config import DataConfig
from shardtune.data.chat import IGNORE_INDEX
from shardtune.data.dataset import build_dataset
from shardtune.tiny import byte_tokenizer


def test_dataset_counts_the_audit_per_file(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", arithmetic_rows(20, seed=1, multi_turn=True))
    b = write_jsonl(tmp_path / "b.jsonl", arithmetic_rows(10, seed=2))
    ds = build_dataset([str(a), str(b)], DataConfig(cache_dir=None, num_proc=1), byte_tokenizer())
    audit = ds.stats["mask"]
    assert set(audit) == {str(a), str(b)}
    assert audit[str(a)]["rows"] == audit[str(a)]["samples"] == 20 and audit[str(b)]["rows"] == 10
    assert audit[str(a)]["trained_turns"] == 40 and audit[str(a)]["method_sentinels"] == 20
    assert audit[str(a)]["turns_without_end"] == 0 and audit[str(a)].get("eos_appended", 0) == 0
    # trained tokens are supervised targets: each sample's labels after its first token
    targets = sum(int((ds[k][1][1:] != IGNORE_INDEX).sum()) for k in range(20))
    assert audit[str(a)]["trained_tokens"] == targets and audit[str(a)]["tokens"] == int(ds.lengths[:20].sum())


def test_per_turn_expands_rows_into_samples(tmp_path):
    rows = arithmetic_rows(12, seed=3, multi_turn=True)  # every row has two assistant turns
    f = write_jsonl(tmp_path / "chats.jsonl", rows)
    tok = byte_tokenizer()
    ds = build_dataset([str(f)], DataConfig(cache_dir=None, num_proc=1, thinking_history="per_turn"), tok)
    assert len(ds) == 24 and ds.stats["mask"][str(f)]["per_turn_expansions"] == 12
    first, second = ds[0], ds[1]
    assert len(first[0]) < len(second[0])  # the first sample stops after the first assistant turn
    assert tok.decode(first[0]).endswith(rows[0]["messages"][-3]["content"] + "<|im_end|>\n")


def test_validate_prints_the_audit_and_render_the_method(tiny_model, tmp_path):
    f = write_jsonl(tmp_path / "chats.jsonl", arithmetic_rows(16, seed=4))
    r = run_cli("validate", f"model.path={tiny_model}", f"data.train_files={f}", "data.cache_dir=null")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if "mask audit" in x)
    assert f"mask audit {f}: 16 rows checked -> 16 samples" in line and "0 left open" in line
    assert "of tokens trained" in line and "spans from sentinels 16" in line
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"  # no end-of-turn token
    r = run_cli("render", f"model.path={tiny_model}", f"data.train_files={f}", f"data.chat_template={plain}")
    assert r.returncode == 0, r.stderr
    assert "spans from sentinels" in r.stdout and "EOS appended (the template writes no end-of-turn" in r.stdout


def test_training_logs_the_audit_once_per_dataset(tiny_model, tmp_path):
    f = write_jsonl(tmp_path / "chats.jsonl", arithmetic_rows(16, seed=5))
    r = run_cli("train", f"model.path={tiny_model}", f"data.train_files={f}", f"data.val_files={f}",
                f"trainer.default_local_dir={tmp_path / 'run'}", "data.train_batch_size=8", "data.cache_dir=null",
                "trainer.total_training_steps=1", "trainer.logger=[console,jsonl]")
    assert r.returncode == 0, r.stderr
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    masks = [e for e in events if e.get("event") == "mask"]
    assert [e["data"] for e in masks] == ["train", "val"] and masks[0]["rows"] == 16
    assert 0 < masks[0]["trained_share"] < 1 and "[mask] data=train" in r.stdout
