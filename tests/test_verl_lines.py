"""verl users' SFT command lines (bench/verl_user_lines.json): keys of older and newer verl versions, verl's
own dataset classes named through data.custom_cls, `--config-name`, `+` on a key the user's verl lacked, and
the data shapes those lines read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardtune.config import load_config
from shardtune.config.rules import validate
from shardtune.data.formats import to_conversation
from shardtune.data.readers import Row
from shardtune.errors import ConfigError
from shardtune.verl.translate import ENGINE, LEGACY, RAY, translate

LEGACY_BASE = ["model.partial_pretrain=/m", "data.train_files=/t"]
ENGINE_BASE = ["model.path=/m", "data.train_files=/t"]


def config_of(line: list[str], spec=ENGINE):
    return load_config(None, translate(line, spec))


def warnings(err: str, key: str) -> int:
    return err.count(f"verl key {key} is ignored")


def test_optim_warmup_steps_ratio_is_the_ratio_under_its_first_name(capsys):
    """verl's sft_trainer.yaml called it optim.warmup_steps_ratio until mid-2025 (TinyZero-era lines)."""
    assert config_of([*LEGACY_BASE, "optim.warmup_steps_ratio=0.05"], LEGACY).optim.lr_warmup_steps_ratio == 0.05
    assert config_of(LEGACY_BASE, LEGACY).optim.lr_warmup_steps_ratio == 0.1  # verl's default, unchanged
    assert config_of([*LEGACY_BASE, "optim.warmup_steps_ratio=0.05", "optim.lr_warmup_steps_ratio=0.05"],
                     LEGACY).optim.lr_warmup_steps_ratio == 0.05
    with pytest.raises(ConfigError, match="both set shardtune's optim.lr_warmup_steps_ratio, to different values"):
        translate([*LEGACY_BASE, "optim.warmup_steps_ratio=0", "optim.lr_warmup_steps_ratio=0.2"], LEGACY)
    assert capsys.readouterr().err == ""  # mapped, not ignored


def test_resume_path_of_old_verl_warns_once_and_starts_fresh(capsys):
    cfg = config_of([*LEGACY_BASE, "trainer.resume_path=/ck/global_step_5"], LEGACY)
    assert cfg.trainer.resume_from_path is None and cfg.trainer.resume_mode == "auto"
    err = capsys.readouterr().err
    assert warnings(err, "trainer.resume_path") == 1 and "trainer.resume_mode=resume_path" in err


def test_plus_on_a_key_the_users_verl_did_not_have_sets_it(capsys):
    """`+model.fsdp_config.model_dtype=bf16`, `+trainer.nnodes=4`: written for a verl whose YAML lacked
    these keys, where `+` was the way to set them; Hydra today says `Could not append`."""
    cfg = config_of([*LEGACY_BASE, "+model.fsdp_config.model_dtype=bf16", "+trainer.nnodes=4",
                     "+data.max_length=2048", "+optim.lr=2e-5"], LEGACY)
    assert (cfg.model.dtype, cfg.data.max_length, cfg.optim.lr) == ("bf16", 2048, 2e-5)
    assert warnings(capsys.readouterr().err, "trainer.nnodes") == 1


def test_engine_keys_of_newer_verl(capsys):
    cfg = config_of([*ENGINE_BASE, "data.enable_thinking_default=false", "data.tokenize_whole_message=true",
                     "trainer.balance_batch=false"])
    assert cfg.data.apply_chat_template_kwargs == {"enable_thinking": False}
    err = capsys.readouterr().err
    assert warnings(err, "data.tokenize_whole_message") == 1 and warnings(err, "trainer.balance_batch") == 1
    assert config_of([*ENGINE_BASE, "data.enable_thinking_default=none"]).data.apply_chat_template_kwargs == {}
    # an explicit template argument stays as written; the default fills only what is missing
    cfg = config_of([*ENGINE_BASE, "data.enable_thinking_default=true",
                     "data.apply_chat_template_kwargs={enable_thinking: false, x: 1}"])
    assert cfg.data.apply_chat_template_kwargs == {"enable_thinking": False, "x": 1}
    with pytest.raises(ConfigError, match=r"data.enable_thinking_default='maybe' \(one of true, false, none\)"):
        translate([*ENGINE_BASE, "data.enable_thinking_default=maybe"], ENGINE)


def test_token_budget_is_per_gpu_after_the_sequence_parallel_split_as_in_verl(capsys):
    """verl's engine packs max_token_len_per_gpu x SP tokens per micro-batch; shardtune's budget is the
    micro-batch before the split. A users' line: max_length=32768 with 16384 per GPU on SP 2."""
    line = [*ENGINE_BASE, "data.max_length=32768", "data.max_token_len_per_gpu=16384",
            "engine.ulysses_sequence_parallel_size=2"]
    cfg = config_of(line)
    assert cfg.data.max_token_len_per_gpu == 32768
    validate(cfg, world_size=2)  # the budget holds a max_length sample, as in verl
    assert "verl key data.max_token_len_per_gpu: 16384 per GPU after the sequence-parallel split is " \
           "data.max_token_len_per_gpu=32768 in shardtune" in capsys.readouterr().err
    assert config_of([*ENGINE_BASE, "data.max_token_len_per_gpu=2048"]).data.max_token_len_per_gpu == 2048
    assert config_of([*ENGINE_BASE, "engine.ulysses_sequence_parallel_size=4"]).data.max_token_len_per_gpu == 8192 * 4
    assert config_of([*ENGINE_BASE, "engine.max_token_len_per_gpu=1000", "engine.ulysses_sequence_parallel_size=2"]
                     ).data.max_token_len_per_gpu == 2000
    with pytest.raises(ConfigError, match="engine.max_token_len_per_gpu=3000 and data.max_token_len_per_gpu=2048 "):
        translate([*ENGINE_BASE, "data.max_token_len_per_gpu=2048", "engine.max_token_len_per_gpu=3000",
                   "engine.ulysses_sequence_parallel_size=2"], ENGINE)


def test_test_freq_without_val_files_validates_nothing_with_one_note(capsys):
    """A legacy line with trainer.test_freq=5 and no data.val_files (verl read its gsm8k default there)."""
    for spec, base in ((LEGACY, LEGACY_BASE), (ENGINE, ENGINE_BASE)):
        assert config_of([*base, "trainer.test_freq=5"], spec).trainer.test_freq == -1
        assert config_of([*base, "trainer.test_freq=5", "data.val_files=/v"], spec).trainer.test_freq == 5
    err = capsys.readouterr().err
    assert err.count("verl key trainer.test_freq: 5 asks for validation, but the line gives no data.val_files") == 2
    assert config_of([*ENGINE_BASE, "data.val_files=/v", "trainer.test_freq=after_each_epoch"]).trainer.test_freq \
        == "after_each_epoch"


def test_save_contents_without_model_saves_the_model_shards_too(capsys):
    cfg = config_of([*ENGINE_BASE, "checkpoint.save_contents=[hf_model]"])
    assert cfg.checkpoint.save_contents == ["model", "hf_model"]
    assert "verl key checkpoint.save_contents: ['hf_model']: the model shards are saved too" in capsys.readouterr().err
    cfg = config_of([*LEGACY_BASE, "trainer.checkpoint.save_contents=[model,optimizer,extra,hf_model]"], LEGACY)
    assert cfg.checkpoint.save_contents == ["model", "optimizer", "extra", "hf_model"]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("path", ["pkg://verl.utils.dataset.sft_dataset", "verl.utils.dataset.sft_dataset",
                                  "/src/verl/verl/utils/dataset/sft_dataset.py"])
def test_verls_own_sftdataset_named_by_custom_cls_is_the_prompt_response_format(path):
    cfg = config_of([*ENGINE_BASE, f"data.custom_cls.path={path}", "data.custom_cls.name=SFTDataset",
                     "+data.prompt_key=question", "+data.response_key=answer", "+data.prompt_dict_keys=[q]"])
    assert (cfg.data.format, cfg.data.prompt_key, cfg.data.response_key) == ("prompt_response", "question", "answer")
    assert cfg.data.prompt_dict_keys == ["q"] and cfg.data.append_eos == "always"  # verl's SFTDataset adds EOS


def test_verls_own_multiturn_dataset_on_the_legacy_trainer_and_other_classes_refused():
    cfg = config_of([*LEGACY_BASE, "data.custom_cls.path=pkg://verl.utils.dataset.multiturn_sft_dataset",
                     "data.custom_cls.name=MultiTurnSFTDataset"], LEGACY)
    assert cfg.data.format == "messages" and cfg.data.append_eos == "auto"
    with pytest.raises(ConfigError) as e:
        translate([*ENGINE_BASE, "data.custom_cls.path=/my/ds.py", "data.custom_cls.name=MyDS"], ENGINE)
    assert "data.custom_cls={path: '/my/ds.py', name: 'MyDS'} (custom dataset classes are not supported" in str(e.value)
    assert "closest shardtune setting: data.format" in str(e.value)


@pytest.mark.parametrize("flag,spec", [(["--config-name", "sft_trainer_engine"], ENGINE),
                                       (["--config-name=sft_trainer_engine"], ENGINE),
                                       (["-cn", "sft_trainer.yaml"], LEGACY)])
def test_config_name_of_the_trainers_own_yaml_is_accepted(flag, spec):
    base = ENGINE_BASE if spec is ENGINE else LEGACY_BASE
    assert config_of([*flag, *base], spec) == config_of(base, spec)


def test_another_config_name_or_path_is_refused_by_name():
    with pytest.raises(ConfigError) as e:
        translate(["--config-name", "my_sft", "--config-path=/cfg", *ENGINE_BASE], ENGINE)
    assert "'--config-name=my_sft': a Hydra application flag" in str(e.value) and "'--config-path=/cfg'" in str(e.value)


# ---- the data shapes users' lines read -------------------------------------------------------------------

def conversation(line: list[str], row: dict, spec=ENGINE):
    cfg = config_of(line, spec).data
    conv = to_conversation(Row("train.parquet", 0, row), cfg.format, cfg)
    return conv, {**cfg.apply_chat_template_kwargs, **conv.template_kwargs}


CHAT = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def test_data_shapes_of_users_lines():
    # extra_info.solution (a nested key other than verl's question/answer), set with + as users did
    conv, _ = conversation([*LEGACY_BASE, "data.prompt_key=extra_info", "data.response_key=extra_info",
                            "data.prompt_dict_keys=['question']", "+data.response_dict_keys=['solution']"],
                           {"extra_info": {"question": "2+2?", "solution": "4", "index": 0}}, LEGACY)
    assert conv.messages == CHAT
    # empty dict-key lists read the columns themselves
    conv, _ = conversation([*LEGACY_BASE, "data.prompt_key=prompt", "data.response_key=response",
                            "data.prompt_dict_keys=[]", "data.response_dict_keys=[]"],
                           {"prompt": "2+2?", "response": "4"}, LEGACY)
    assert conv.messages == CHAT
    # messages under another column name, tools column null, a per-row enable_thinking flag
    line = [*LEGACY_BASE, "data.multiturn.enable=true", "data.multiturn.messages_key=multiturn",
            "data.multiturn.tools_key=tools", "data.multiturn.enable_thinking_key=enable_thinking"]
    conv, kwargs = conversation(line, {"multiturn": CHAT, "tools": None, "enable_thinking": True}, LEGACY)
    assert conv.messages == CHAT and conv.tools is None and kwargs == {"enable_thinking": True}
    # engine: data.enable_thinking_default where the row has no flag; the row's own flag wins
    line = [*ENGINE_BASE, "data.enable_thinking_default=false"]
    assert conversation(line, {"messages": CHAT})[1] == {"enable_thinking": False}
    assert conversation(line, {"messages": CHAT, "enable_thinking": True})[1] == {"enable_thinking": True}
    # engine + verl's SFTDataset: prompt/response columns
    conv, _ = conversation([*ENGINE_BASE, "data.custom_cls.path=pkg://verl.utils.dataset.sft_dataset",
                            "data.custom_cls.name=SFTDataset", "+data.prompt_key=prompt",
                            "+data.response_key=response"],
                           {"prompt": "2+2?", "response": "4"})
    assert conv.messages == CHAT


def test_every_users_line_translates_or_is_refused_for_a_reason_it_names(monkeypatch):
    """The collected lines (bench/verl_user_lines.json) translate to a shardtune config that passes its rules
    for the line's process count, except: one whose keys no verl SFT config had (verl's Hydra refuses it
    too) and one on verl's TorchTitan backend (refused in one message). (A token budget below max_length, as
    one line has, passes: the data is checked against the budget once tokenized.)
    bench/verl_lines.py trains them."""
    lines = json.loads((Path(__file__).parents[1] / "bench" / "verl_user_lines.json").read_text())
    specs = {"fsdp_sft_trainer": LEGACY, "sft_trainer": ENGINE, "sft_trainer_ray": RAY}
    refused = {}
    for line in lines:
        nproc = line.get("nproc", 2)
        monkeypatch.setenv("WORLD_SIZE", str(nproc))
        args = line["args"]
        for name in ("model", "gsm8k", "sft", "retool", "pr", "mt", "ckpt", "remote"):
            args = [a.replace("{" + name + "}", f"/data/{name}") for a in args]
        try:
            validate(load_config(None, translate(args, specs[line["module"]])), world_size=nproc)
        except ConfigError as e:
            refused[line["source"]] = str(e)
    assert len(lines) >= 40
    expected = {"verl CI run_sft_engine.sh, autumn-2025 version (older engine keys) (id 6473531092)":
                "data.max_prompt_length (not a key of verl's sft_trainer_engine.yaml",
                "TPU SFT on verl's TorchTitan engine, Ray (id 69631226564)":
                "selects verl's TorchTitan backend; shardtune runs PyTorch FSDP2"}
    assert {k: expected.get(k, "") in v for k, v in refused.items()} == dict.fromkeys(expected, True)
