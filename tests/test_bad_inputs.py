"""Bad input, tried as a new user would: each case ends in one message naming the file, row or key and the fix,
before anything is written, and nothing the user had is lost."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import arithmetic_rows, run_cli, write_jsonl

from shardtune.config import DataConfig, load_config
from shardtune.config.loading import last_of_each, repeated_overrides
from shardtune.data.dataset import build_dataset
from shardtune.data.formats import to_conversation
from shardtune.data.readers import Row, data_files, expand_paths, read_rows
from shardtune.errors import ConfigError, DataError
from shardtune.tiny import CHATML_SPECIALS, byte_tokenizer


def conv_of(data: dict, **kw):
    return to_conversation(Row("f.jsonl", 4, data), "messages", DataConfig(cache_dir=None, **kw))


def call(args) -> dict:
    return {"type": "function", "function": {"name": "f", "arguments": args}}


@pytest.mark.parametrize("tool_calls,key,needle", [
    (5, "messages[1].tool_calls", "expected a list of tool calls, got int"),
    ({"function": {"name": "f"}}, "messages[1].tool_calls", "expected a list of tool calls, got dict"),
    ([call("{x: 1")], "messages[1].tool_calls[0].function.arguments", "not valid JSON"),
    ([call('{"x": 1')], "messages[1].tool_calls[0].function.arguments", "not valid JSON"),
])
def test_bad_tool_calls_name_the_row_and_key(tool_calls, key, needle):
    with pytest.raises(DataError) as e:
        conv_of({"messages": [{"role": "user", "content": "q"},
                              {"role": "assistant", "content": "", "tool_calls": tool_calls}]})
    msg = str(e.value)
    assert msg.startswith(f"f.jsonl, row 4, key '{key}'") and needle in msg and "Fix:" in msg


def test_good_tool_call_arguments_still_parse():
    conv = conv_of({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
                                 "tool_calls": [call('{"x": 1}'), call("")]}]})
    assert conv.messages[1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert conv.messages[1]["tool_calls"][1]["function"]["arguments"] == ""  # no arguments: kept as given


def test_malformed_arguments_are_counted_and_dropped_under_skip(tmp_path):
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
                                                           "tool_calls": [call("{'x': 1}")]}]}
    f = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(3) + [bad])
    ds = build_dataset([str(f)], DataConfig(cache_dir=None, num_proc=1, on_bad_row="skip"), byte_tokenizer())
    assert len(ds) == 3 and ds.stats["dropped"] == {"bad_row": 1}


def saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "hf"
    datasets.Dataset.from_list(arithmetic_rows(4)).save_to_disk(str(folder))
    return folder


def _break_state(folder):
    (folder / "state.json").write_text("{not json")


def _no_data_files_key(folder):
    (folder / "state.json").write_text(json.dumps({"_fingerprint": "x"}))


def _drop_arrow(folder):
    for f in folder.glob("*.arrow"):
        f.unlink()


@pytest.mark.parametrize("damage,needle", [(_break_state, "state.json is not valid JSON"),
                                           (_no_data_files_key, "does not list the folder's files"),
                                           (_drop_arrow, "lists 1 file(s) that are not there")])
def test_damaged_save_to_disk_folder(tmp_path, damage, needle):
    folder = saved_dataset(tmp_path)
    damage(folder)
    with pytest.raises(DataError, match="Fix:") as e:
        data_files(str(folder))
    assert needle in str(e.value) and str(folder) in str(e.value)


def test_unreadable_data_file_names_it(tmp_path, monkeypatch):
    """Root reads any file whatever its mode, so the permission error is raised where the reader opens it."""
    import builtins

    from shardtune.data import readers

    f = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(2))
    real_open = builtins.open

    def denied(path, *args, **kwargs):
        if str(path) == str(f):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(readers, "open", denied, raising=False)  # the module's `open`, shadowing the builtin
    with pytest.raises(DataError, match=r"cannot be read \(Permission denied\)\. Fix: .*chmod") as e:
        list(read_rows(expand_paths(str(f))))
    assert str(f) in str(e.value)


def test_dangling_symlinks_are_named(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", arithmetic_rows(2))
    os.symlink(tmp_path / "gone.jsonl", folder / "b.jsonl")
    for spec in (str(folder), str(folder / "*.jsonl")):
        with pytest.raises(DataError, match="1 symlink\\(s\\) to files that do not exist") as e:
            data_files(spec)
        assert str(folder / "b.jsonl") in str(e.value)


def test_yaml_section_written_twice_names_key_and_both_lines(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 1e-4\ntrainer:\n  seed: 1\noptim:\n  weight_decay: 0.1\n")
    with pytest.raises(ConfigError, match="the key 'optim' is written twice, on line 1 and line 5"):
        load_config(str(f))
    f.write_text("optim:\n  lr: 1e-4\n  lr: 2e-4\n")
    with pytest.raises(ConfigError, match="'lr' is written twice, on line 2 and line 3"):
        load_config(str(f))
    f.write_text("base: &b {lr: 1}\noptim:\n  <<: *b\n  lr: 2.0\n")  # a merge key may be overridden
    with pytest.raises(ConfigError, match="Unknown config key 'base'"):  # (base is no key: parsed fine though)
        load_config(str(f))


def test_a_key_given_twice_on_the_command_line_takes_the_last_and_says_so():
    args = ["optim.lr=1e-4", "data.train_files=a", "optim.lr=2e-4", "model.path=/m"]
    assert load_config(None, args).optim.lr == 2e-4
    assert last_of_each(args) == ["data.train_files=a", "optim.lr=2e-4", "model.path=/m"]
    note = repeated_overrides(args)
    assert "optim.lr=1e-4 then 2e-4 (uses 2e-4)" in note and "train_files" not in note
    assert repeated_overrides(["a=1", "b=1"]) is None and last_of_each(["a=1", "a=1"]) == ["a=1"]


def test_template_syntax_error_names_the_template_not_a_row(tmp_path):
    from shardtune.data.chat import resolve_chat_template

    tok = byte_tokenizer()
    with pytest.raises(DataError) as e:
        resolve_chat_template("{% for m in messages %}{{ m.content }", tok)
    assert "data.chat_template is not valid Jinja" in str(e.value) and "row" not in str(e.value)
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% if x %}never closed")
    with pytest.raises(DataError, match=f"the chat template {jinja} \\(data.chat_template\\) is not valid Jinja"):
        resolve_chat_template(str(jinja), tok)
    broken = byte_tokenizer(chat_template="{{ oops ")
    with pytest.raises(DataError, match="the tokenizer's chat template"):
        resolve_chat_template(None, broken)


def test_token_ids_beyond_the_embedding_are_refused_before_the_model_runs(tmp_path):
    from shardtune.config import ModelConfig
    from shardtune.model import check_token_ids
    from shardtune.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "m")  # embedding: the byte tokenizer's 259 ids
    big = byte_tokenizer(special_tokens=[*CHATML_SPECIALS, "<a1>"])  # the model's ids, and one more
    cfg = DataConfig(cache_dir=None, num_proc=1)
    mcfg = ModelConfig(path=str(model), tokenizer_path=str(tmp_path / "bigtok"))
    plain = write_jsonl(tmp_path / "plain.jsonl", arithmetic_rows(2))
    check_token_ids(mcfg, big, [build_dataset([str(plain)], cfg, big)])  # the extra ids are never used: fine
    spec = write_jsonl(tmp_path / "spec.jsonl", [{"messages": [{"role": "user", "content": "hi <a1>"},
                                                               {"role": "assistant", "content": "ok"}]}])
    with pytest.raises(ConfigError) as e:
        check_token_ids(mcfg, big, [build_dataset([str(spec)], cfg, big)])
    assert f"({spec})" in str(e.value) and f"holds token id {big.convert_tokens_to_ids('<a1>')}" in str(e.value)
    assert "embedding has 259 rows" in str(e.value) and "Fix:" in str(e.value)


def test_render_past_the_end_says_how_many_rows(tiny_model, tmp_path):
    from shardtune.config import validate
    from shardtune.preview import render_sample

    f = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(5))
    cfg = validate(load_config(None, [f"model.path={tiny_model}", f"data.train_files={f}", "data.cache_dir=null"]))
    with pytest.raises(DataError, match="holds 5 rows. Fix: pass an --index from 0 to 4"):
        render_sample(cfg, 5)


def test_unwritable_run_dir_is_found_first(tmp_path, monkeypatch):
    """Root may write anywhere, so the check is shown its answer for a folder it may not write."""
    from shardtune.checkpoint import check_run_dir

    check_run_dir(tmp_path / "new" / "run")  # a folder to be made under a writable one
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(tmp_path))
    with pytest.raises(ConfigError, match=f"'{tmp_path}' is not writable by this user"):
        check_run_dir(tmp_path / "run")


# ------------------------------------------------------------------------------------------------------------
# the CLI, in a subprocess: every case fails before anything is loaded, written or launched


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("bad")
    data = write_jsonl(d / "good.jsonl", arithmetic_rows(8))
    bad_config = d / "bad_config"
    shutil.copytree(tiny_model, bad_config)
    (bad_config / "config.json").write_text("{oops")
    sharded = d / "sharded"
    shutil.copytree(tiny_model, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "lm_head.weight": "model-00001-of-00002.safetensors", "model.norm.weight": "model-00002-of-00002.safetensors"}}))
    cut = d / "cut"
    shutil.copytree(tiny_model, cut)
    (cut / "model.safetensors").write_bytes((tiny_model / "model.safetensors").read_bytes()[:5000])
    (d / "a_file").write_text("mine")
    (d / "dup.yaml").write_text("optim:\n  lr: 1e-4\ntrainer:\n  seed: 1\noptim:\n  weight_decay: 0.1\n")
    return {"dir": d, "data": data, "model": tiny_model, "bad_config": bad_config, "sharded": sharded, "cut": cut}


CLI_CASES = {
    "invalid config.json": (["model.path={bad_config}"], "bad_config/config.json is not valid JSON"),
    "index names a missing shard": (["model.path={sharded}"], "names 1 shard(s) that are not in the folder: "
                                                              "model-00002-of-00002.safetensors"),
    "cut-off safetensors": (["model.path={cut}"], "model.safetensors is cut off"),
    "missing tokenizer_path": (["model.tokenizer_path={dir}/nope"], "model.tokenizer_path='{dir}/nope' is not a folder"),
    "missing lora_adapter_path": (["model.lora_rank=4", "model.lora_adapter_path={dir}/nope"],
                                  "model.lora_adapter_path='{dir}/nope' is not a folder"),
    "adapter folder without adapter_config": (["model.lora_rank=4", "model.lora_adapter_path={dir}"],
                                              "has no adapter_config.json"),
    "override_config changes the vocabulary": (["+model.override_config.vocab_size=512"],
                                               "model.override_config sets vocab_size=512 (the weights have 259)"),
    "run dir is a file": (["trainer.default_local_dir={dir}/a_file"], "'{dir}/a_file' is a file, not a folder"),
    "run dir under a file": (["trainer.default_local_dir={dir}/a_file/run"], "lies under '{dir}/a_file', which is a file"),
    "YAML section twice": (["{dir}/dup.yaml"], "the key 'optim' is written twice, on line 1 and line 5"),
    "--nproc 2, batch of 5": (["data.train_batch_size=5", "--nproc", "2"],
                              "data.train_batch_size=5 must be divisible by the number of data-parallel ranks (2)"),
    "--nproc 2, run dir is a file": (["trainer.default_local_dir={dir}/a_file", "--nproc", "2"],
                                     "'{dir}/a_file' is a file, not a folder"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_refuses_before_anything_is_written(world, case):
    extra, needle = CLI_CASES[case]
    extra = [x.format(**world) for x in extra]
    run_dir = world["dir"] / "run"
    config = [x for x in extra if x.endswith(".yaml")]
    r = run_cli("train", *config, f"model.path={world['model']}", f"data.train_files={world['data']}",
                f"trainer.default_local_dir={run_dir}", f"data.cache_dir={world['dir']}/cache",
                *[x for x in extra if not x.endswith(".yaml")])
    assert r.returncode == 2, r.stderr[-3000:]
    assert needle.format(**world) in r.stderr and "Fix:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "(rank" not in r.stderr  # said once, by the command itself (under --nproc: before any launch)
    assert not run_dir.exists() and not (world["dir"] / "cache").exists()
    assert (world["dir"] / "a_file").read_text() == "mine"


def test_cli_says_once_that_a_repeated_key_takes_its_last_value(world):
    r = run_cli("validate", f"model.path={world['model']}", f"data.train_files={world['data']}",
                "data.cache_dir=null", "optim.lr=1e-4", "optim.lr=2e-4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("optim.lr=1e-4 then 2e-4 (uses 2e-4)") == 1


def test_export_never_overwrites_or_deletes_what_the_user_had(world):
    d = world["dir"]
    run_dir = d / "export_run"
    r = run_cli("train", f"model.path={world['model']}", f"data.train_files={world['data']}", "data.cache_dir=null",
                f"trainer.default_local_dir={run_dir}", "trainer.total_training_steps=1", "data.train_batch_size=4",
                "trainer.logger=[jsonl]")
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = run_dir / "global_step_1"
    r = run_cli("export", str(ckpt), "--out", str(d / "a_file"))  # a file: refused before any weights load
    assert r.returncode == 1 and "is a file" in r.stderr and "Traceback" not in r.stderr
    assert (d / "a_file").read_text() == "mine"
    out = d / "exported"
    out.mkdir()
    mine = {"config.json": "my config", "model-00002-of-00009.safetensors": "my shard", "notes.txt": "my notes"}
    for name, text in mine.items():
        (out / name).write_text(text)
    r = run_cli("export", str(ckpt), "--out", str(out))
    assert r.returncode == 1 and "is not empty" in r.stderr and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert {p.name: p.read_text() for p in out.iterdir()} == mine
    r = run_cli("export", str(ckpt), "--out", str(out), "--overwrite", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "notes.txt").read_text() == "my notes"  # export did not write them: kept
    assert (out / "model-00002-of-00009.safetensors").read_text() == "my shard"
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"  # replaced by the export's
    assert not [p for p in d.iterdir() if ".export-" in p.name]  # the staging folder is gone
    cut = d / "cut_ckpt"
    shutil.copytree(ckpt, cut)
    shard = next(cut.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    r = run_cli("export", str(cut), "--out", str(d / "from_cut"))
    assert r.returncode == 1 and f"the shard {shard.name} is cut off" in r.stderr and "Traceback" not in r.stderr
    assert not (d / "from_cut").exists()


def test_a_cache_that_cannot_be_written_is_one_message(tmp_path, monkeypatch):
    import errno

    from shardtune.data import cache

    f = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(4))
    blocked = tmp_path / "cache_is_a_file"
    blocked.write_text("mine")
    tok = byte_tokenizer()
    with pytest.raises(DataError, match=f"data.cache_dir='{blocked}'.* failed: .*Fix: free space, or set data.cache_dir"):
        build_dataset([str(f)], DataConfig(cache_dir=str(blocked), num_proc=1), tok)
    assert blocked.read_text() == "mine"

    def full(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp / "input_ids.bin"))

    monkeypatch.setattr(cache.ShardWriter, "append", full)
    with pytest.raises(DataError, match="failed: no space left on the device .*input_ids.bin"):
        build_dataset([str(f)], DataConfig(cache_dir=str(tmp_path / "cache"), num_proc=1), tok)


def test_an_adapter_config_that_is_not_json_is_named(tiny_model, tmp_path):
    from shardtune.config import ModelConfig
    from shardtune.model import check_model_path

    (tmp_path / "adapter_config.json").write_text("{cut")
    with pytest.raises(ConfigError, match=f"{tmp_path}/adapter_config.json is not valid JSON"):
        check_model_path(ModelConfig(path=str(tiny_model), lora_rank=4, lora_adapter_path=str(tmp_path)))


@pytest.mark.slow
def test_an_error_under_nproc_ends_in_the_ranks_messages_and_one_line(world):
    bad = write_jsonl(world["dir"] / "no_assistant.jsonl", [{"messages": [{"role": "user", "content": "q"}]}] * 4)
    r = run_cli("train", f"model.path={world['model']}", f"data.train_files={bad}", "data.cache_dir=null",
                f"trainer.default_local_dir={world['dir']}/nproc_run", "data.train_batch_size=4", "--nproc", "2")
    assert r.returncode == 3, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr, r.stderr[-3000:]
    assert f"shardtune: error (rank 0): {bad}, row 0" in r.stderr
    assert r.stderr.rstrip().endswith("exited with code 3; its error is printed above")
