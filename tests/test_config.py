"""Typed, strict config: overrides, did-you-mean, types, cross-field rules."""

from __future__ import annotations

import pytest

from shardtune.config import Config, all_keys, load_config, parse_overrides, validate
from shardtune.errors import ConfigError

BASE = ["model.path=/m", "data.train_files=t.jsonl"]


def test_defaults_and_overrides(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("optim:\n  lr: 3.0e-4\ndata:\n  train_files: [a.parquet]\n")
    cfg = load_config(str(yaml_file), ["optim.lr=1e-5", "data.val_files=[x,y]", "trainer.logger=console",
                                       "+model.path=/m", "optim.betas=[0.9,0.99]"])
    assert cfg.optim.lr == 1e-5  # the override wins over the file; YAML's "1e-5" string becomes a float
    assert cfg.data.train_files == ["a.parquet"]
    assert cfg.data.val_files == ["x", "y"]
    assert cfg.trainer.logger == ["console"]  # a bare value where a list is expected
    assert cfg.optim.betas == [0.9, 0.99]
    assert cfg.model.path == "/m"
    assert Config().optim.lr_scheduler_type == "cosine" and Config().optim.clip_grad == 1.0


def test_list_values_with_quotes():
    assert parse_overrides(["data.prompt_dict_keys=['question']"])["data.prompt_dict_keys"].parsed == ["question"]


def test_string_fields_take_the_text_as_typed():
    cfg = load_config(None, ["trainer.experiment_name=007", "data.system_prompt=Answer: briefly",
                             "trainer.project_name=2024-01-01", "model.tokenizer_path=null"])
    assert cfg.trainer.experiment_name == "007" and cfg.data.system_prompt == "Answer: briefly"
    assert cfg.trainer.project_name == "2024-01-01" and cfg.model.tokenizer_path is None


def test_unknown_key_names_it_and_suggests_the_nearest():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.trian_files=x"])
    assert "data.trian_files" in str(e.value) and "data.train_files" in str(e.value)


def test_leaf_under_wrong_section_suggests_the_right_one():
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(None, ["trainer.lr=1"])


@pytest.mark.parametrize("override,needle", [
    ("optim.lr=fast", "optim.lr' must be a number"),
    ("data.max_length=1.5", "data.max_length' must be an integer"),
    ("model.trust_remote_code=yes please", "must be true or false"),
    ("optim.lr_scheduler_type=cosin", "Did you mean 'cosine'"),
    ("data.truncation=middle", "must be one of"),
    ("data=3", "must be a section"),
])
def test_wrong_types(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


@pytest.mark.parametrize("overrides,needle", [
    ([], "model.path is required"),
    (["model.path=/m"], "data.train_files is required"),
    (BASE + ["trainer.test_freq=5"], "data.val_files is empty"),
    (BASE + ["trainer.early_stopping_patience=2"], "needs validation data"),
    (BASE + ["optim.betas=[0.9]"], "optim.betas"),
    (BASE + ["optim.lr_warmup_steps_ratio=1.5"], "lr_warmup_steps_ratio"),
    (BASE + ["trainer.logger=[console,slack]"], "trainer.logger"),
    (BASE + ["engine.strategy=deepspeed"], "engine.strategy"),
    (BASE + ["trainer.default_local_dir=runs/{nope}"], "unknown placeholder"),
    (BASE + ["engine.param_offload=true"], "needs a torchrun job"),
    (BASE + ["trainer.max_ckpt_to_keep=0"], "max_ckpt_to_keep"),
    (BASE + ["model.dtype=fp16"], "must be one of"),
    (BASE + ["data.apply_chat_template_kwargs={add_vision_id: true}"], "labels would not be written"),
])
def test_cross_field_rules(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(load_config(None, overrides))


def test_batch_must_divide_over_ranks():
    cfg = load_config(None, BASE + ["data.train_batch_size=5"])
    validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match="divisible"):
        validate(cfg, world_size=2)


def test_fsdp_alias_is_noted_in_the_run(tiny_model, tmp_path):
    import json

    from conftest import arithmetic_rows, write_jsonl

    from shardtune.trainer import Trainer

    data = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(8))
    cfg = validate(load_config(None, [f"model.path={tiny_model}", f"data.train_files={data}", "engine.strategy=fsdp",
                                      "data.train_batch_size=8", "trainer.total_training_steps=1",
                                      "data.cache_dir=null",
                                      f"trainer.default_local_dir={tmp_path / 'run'}", "trainer.logger=[jsonl]"]))
    Trainer(cfg).fit()
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "note" and "FSDP2" in e["message"] for e in events)


def test_fsdp_alias_and_run_dir():
    cfg = validate(load_config(None, BASE + ["engine.strategy=fsdp", "trainer.project_name=p",
                                             "trainer.experiment_name=e"]))
    assert str(cfg.run_dir) == "checkpoints/p/e"


def test_every_key_documented_in_readme():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing = [k for k in all_keys() if f"`{k}`" not in readme]
    assert not missing, f"README.md does not document: {missing}"
