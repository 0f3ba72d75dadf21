"""The real CLI in a subprocess: training runs, bad input gives one clear message and no traceback."""

from __future__ import annotations

import pytest
from conftest import arithmetic_rows, read_metrics, run_cli, write_jsonl, write_parquet


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    gsm = [{"data_source": "gsm8k", "prompt": [{"role": "user", "content": f"q{i}"}], "ability": "math",
            "extra_info": {"split": "train", "index": i, "question": f"What is {i}+{i}?", "answer": f"#### {2 * i}"}}
           for i in range(24)]
    return {
        "multi": write_parquet(d / "multi.parquet", arithmetic_rows(24, seed=3, multi_turn=True)),
        "gsm8k": write_parquet(d / "gsm8k.parquet", gsm),
        "dir": d,
    }


def common(tiny_model, run_dir):
    return [f"model.path={tiny_model}", f"trainer.default_local_dir={run_dir}", "data.train_batch_size=8",
            "optim.lr=3e-3", "optim.lr_scheduler_type=constant", "trainer.total_epochs=2", "trainer.test_freq=3",
            "trainer.logger=[console,file]", "data.cache_dir=null"]


def test_multi_turn_parquet_trains_with_val_rows(tiny_model, files, tmp_path):
    f = files["multi"]
    r = run_cli("train", *common(tiny_model, tmp_path / "run"), f"data.train_files={f}", f"data.val_files={f}")
    assert r.returncode == 0, r.stderr
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 6 and rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert [x["step"] for x in rows if "val/loss" in x] == [3, 6]
    assert "step 6/6" in r.stdout


def test_verl_gsm8k_layout_trains(tiny_model, files, tmp_path):
    f = files["gsm8k"]
    r = run_cli("train", *common(tiny_model, tmp_path / "run"), f"data.train_files={f}", f"data.val_files={f}",
                "data.prompt_key=extra_info", "data.response_key=extra_info", "+data.prompt_dict_keys=['question']",
                "+data.response_dict_keys=['answer']")
    assert r.returncode == 0, r.stderr
    rows = read_metrics(tmp_path / "run")
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] and "val/loss" in rows[-1]


def test_validate_and_render(tiny_model, files):
    f = files["multi"]
    r = run_cli("validate", f"model.path={tiny_model}", f"data.train_files={f}", "data.cache_dir=null")
    assert r.returncode == 0, r.stderr
    assert "train: 24 rows read, 24 kept" in r.stdout and "config and data OK" in r.stdout
    r = run_cli("render", f"model.path={tiny_model}", f"data.train_files={f}", "--index", "2")
    assert r.returncode == 0, r.stderr
    assert "[[" in r.stdout and "<|im_end|>]]" in r.stdout and "tokens," in r.stdout


def test_train_validate_and_render_build_their_data_through_one_function(tiny_model, files, tmp_path, monkeypatch,
                                                                         capsys):
    """The three commands start from data/build.py's `data_sources`, the one place the config's data files
    become sources: each calls it once (train through `build_data`), and what it returns is what they read
    (here the source cut to 12 of its 24 rows)."""
    import dataclasses
    import json
    import traceback

    from shardtune import cli, preempt
    from shardtune.data import build

    calls, real = [], build.data_sources

    def spy(cfg):
        calls.append(traceback.extract_stack(limit=2)[0].name)
        sources = real(cfg)
        return build.DataSources([dataclasses.replace(sources.train[0], max_samples=12)], sources.val)

    monkeypatch.setattr(build, "data_sources", spy)
    monkeypatch.setattr(preempt, "install", lambda: None)  # train in this process: leave pytest's SIGTERM alone
    keys = [f"model.path={tiny_model}", f"data.train_files={files['multi']}", "data.cache_dir=null"]
    assert cli.main(["validate", *keys]) == 0
    assert cli.main(["render", *keys, "--index", "2", "--color", "never"]) == 0
    assert cli.main(["train", *keys, f"trainer.default_local_dir={tmp_path / 'run'}", "data.train_batch_size=8",
                     "trainer.total_training_steps=1", "trainer.logger=[jsonl]", "trainer.progress_bar=false"]) == 0
    assert calls == ["validate_data", "render_sample", "build_data"]
    out = capsys.readouterr().out
    assert "train: 12 rows read, 12 kept" in out and "<|im_end|>]]" in out
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["samples"] for e in events if e.get("event") == "start"] == [12]


def test_misspelled_key_is_refused_by_name_without_traceback(tmp_path):
    r = run_cli("train", "data.trian_files=x", "model.path=/nope")
    assert r.returncode == 2
    assert "data.trian_files" in r.stderr and "data.train_files" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--debug", "train", "data.trian_files=x")
    assert "Traceback" in r.stderr


def test_missing_model_fails_before_loading(tmp_path, files):
    r = run_cli("train", "model.path=/no/such/model", f"data.train_files={files['multi']}")
    assert r.returncode == 2 and "model.path='/no/such/model' is not a folder" in r.stderr


BAD_ROWS = {
    "missing_key": ({"msgs": [{"role": "user", "content": "q"}]}, "key 'messages': the key is missing"),
    "wrong_type": ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
                   "key 'messages[0].content'"),
    "unknown_role": ({"messages": [{"role": "bot", "content": "a"}]}, "key 'messages[0].role'"),
    "no_assistant": ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    "too_long": ({"messages": [{"role": "user", "content": "q" * 3000}, {"role": "assistant", "content": "a"}]},
                 "longer than data.max_length"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_exit_nonzero_naming_file_row_and_key(tiny_model, tmp_path, case):
    row, needle = BAD_ROWS[case]
    f = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(3) + [row])
    run_dir = tmp_path / "run"
    r = run_cli("train", f"model.path={tiny_model}", f"data.train_files={f}", f"trainer.default_local_dir={run_dir}",
                f"data.cache_dir={tmp_path / 'cache'}")
    assert r.returncode != 0
    assert f"{f}, row 3" in r.stderr and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not run_dir.exists()  # nothing half-written
    assert not any((tmp_path / "cache").rglob("*.npy"))


@pytest.mark.parametrize("content,needle", [(b"", "is empty"), (b"PAR1 not really parquet",
                                                                "cannot be read as parquet")])
def test_bad_files_exit_nonzero(tiny_model, tmp_path, content, needle):
    f = tmp_path / "d.parquet"
    f.write_bytes(content)
    r = run_cli("train", f"model.path={tiny_model}", f"data.train_files={f}",
                f"trainer.default_local_dir={tmp_path}/run")
    assert r.returncode != 0 and needle in r.stderr and str(f) in r.stderr and "Traceback" not in r.stderr


def test_missing_data_file(tiny_model, tmp_path):
    r = run_cli("validate", f"model.path={tiny_model}", f"data.train_files={tmp_path}/nope.parquet")
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
