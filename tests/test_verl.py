"""verl drop-in entry points: every verl key is handled, verl command lines run, results match shardtune's own."""

from __future__ import annotations

import math

import pytest
from conftest import arithmetic_rows, read_metrics, torchrun, write_parquet

from shardtune.config import load_config
from shardtune.errors import ConfigError
from shardtune.verl.mapping import (
    ENGINE,
    ENGINE_DEFAULTS,
    ENGINE_PREFIX_WARN,
    LEGACY,
    LEGACY_DEFAULTS,
    Refuse,
    translate,
)

# Every key of verl's two SFT configs (shared/reference/verl_sft.md, sections 3a and 3b).
LEGACY_KEYS = """
data.train_batch_size data.micro_batch_size data.micro_batch_size_per_gpu data.train_files data.val_files
data.train_max_samples data.val_max_samples data.prompt_key data.response_key data.prompt_dict_keys
data.response_dict_keys data.multiturn.enable data.multiturn.messages_key data.multiturn.tools_key
data.multiturn.enable_thinking_key data.max_length data.truncation data.balance_dp_token data.chat_template
data.custom_cls.path data.custom_cls.name data.use_shm data.apply_chat_template_kwargs
model.partial_pretrain model.use_shm model.fsdp_config.model_dtype model.fsdp_config.wrap_policy.min_num_params
model.fsdp_config.cpu_offload model.fsdp_config.offload_params model.external_lib model.enable_gradient_checkpointing
model.trust_remote_code model.lora_rank model.lora_alpha model.target_modules model.use_liger model.strategy
optim.lr optim.betas optim.weight_decay optim.lr_warmup_steps_ratio optim.clip_grad optim.lr_scheduler
optim.optimizer optim.optimizer_impl ulysses_sequence_parallel_size use_remove_padding
trainer.default_local_dir trainer.default_hdfs_dir trainer.project_name trainer.experiment_name trainer.total_epochs
trainer.total_training_steps trainer.logger trainer.seed trainer.save_freq trainer.test_freq trainer.nnodes
trainer.n_gpus_per_node trainer.max_ckpt_to_keep trainer.resume_mode trainer.resume_from_path
trainer.checkpoint.save_contents trainer.checkpoint.load_contents trainer.device
""".split()
ENGINE_KEYS = """
data.train_batch_size data.micro_batch_size_per_gpu data.max_token_len_per_gpu data.use_dynamic_bsz data.train_files
data.val_files data.train_max_samples data.val_max_samples data.messages_key data.tools_key data.enable_thinking_key
data.pad_mode data.max_length data.truncation data.balance_dp_token data.custom_cls.path data.custom_cls.name
data.use_shm data.apply_chat_template_kwargs data.ignore_input_ids_mismatch
checkpoint.save_contents checkpoint.load_contents checkpoint.async_save
trainer.default_local_dir trainer.default_hdfs_dir trainer.project_name trainer.experiment_name trainer.total_epochs
trainer.total_training_steps trainer.logger trainer.seed trainer.save_freq trainer.test_freq trainer.nnodes
trainer.n_gpus_per_node trainer.max_ckpt_to_keep trainer.resume_mode trainer.resume_from_path trainer.device
trainer.profile_interval
model.path model.hf_config_path model.tokenizer_path model.use_shm model.trust_remote_code model.custom_chat_template
model.external_lib model.override_config.attn_implementation model.enable_gradient_checkpointing
model.enable_activation_offload model.use_remove_padding model.lora_rank model.lora_alpha model.target_modules
model.exclude_modules model.lora_adapter_path model.lora model.use_liger model.use_fused_kernels
model.fused_kernel_options.impl_backend model.tiled_mlp.enabled model.tiled_mlp.num_shards model.mtp.enable
engine.wrap_policy.min_num_params engine.param_offload engine.optimizer_offload engine.offload_policy
engine.reshard_after_forward engine.fsdp_size engine.forward_prefetch engine.model_dtype engine.use_orig_params
engine.seed engine.full_determinism engine.ulysses_sequence_parallel_size engine.entropy_from_logits_with_chunking
engine.entropy_checkpointing engine.use_torch_compile engine.forward_only engine.strategy engine.dtype
engine.mixed_precision.param_dtype engine.mixed_precision.reduce_dtype engine.mixed_precision.buffer_dtype
engine.use_dynamic_bsz engine.max_token_len_per_gpu engine.micro_batch_size_per_gpu
engine.infer_max_token_len_per_gpu engine.infer_micro_batch_size_per_gpu
optim.optimizer optim.optimizer_impl optim.lr optim.lr_warmup_steps_ratio optim.lr_warmup_steps
optim.total_training_steps optim.weight_decay optim.betas optim.clip_grad optim.min_lr_ratio optim.num_cycles
optim.lr_scheduler_type optim.warmup_style optim.override_optimizer_config
profiler.tool profiler.enable profiler.all_ranks profiler.ranks profiler.save_path
""".split()


@pytest.mark.parametrize("keys,table,prefixes", [(LEGACY_KEYS, LEGACY, ()), (ENGINE_KEYS, ENGINE, ENGINE_PREFIX_WARN)],
                         ids=["legacy", "engine"])
def test_every_verl_key_is_mapped_warned_or_refused(keys, table, prefixes):
    missing = [k for k in keys if k not in table and not k.startswith(prefixes)]
    assert not missing
    for key in keys:  # mapped keys land on real shardtune keys
        rule = table.get(key)
        if rule is not None and hasattr(rule, "target"):
            assert rule.target in _shardtune_keys(), (key, rule.target)


def _shardtune_keys():
    from shardtune.config import all_keys

    return set(all_keys())


def test_unknown_and_unsupported_keys_are_refused_together():
    with pytest.raises(ConfigError) as e:
        translate(["model.partial_pretrain=/m", "data.custom_cls.path=x.py", "data.trian_files=x"], LEGACY, LEGACY_DEFAULTS)
    assert "data.custom_cls.path" in str(e.value) and "data.trian_files" in str(e.value)


def test_hydra_syntax_defaults_and_aliases(capsys):
    out = translate(["+data.prompt_dict_keys=['question']", "trainer.logger=console", "model.partial_pretrain=/m",
                     "data.multiturn.enable=true", "data.multiturn.messages_key=conv", "trainer.nnodes=1",
                     "optim.optimizer=AdamW"], LEGACY, LEGACY_DEFAULTS)
    cfg = load_config(None, out)
    assert cfg.data.prompt_dict_keys == ["question"] and cfg.trainer.logger == ["console"]
    assert cfg.model.path == "/m" and cfg.data.format == "messages" and cfg.data.messages_key == "conv"
    assert cfg.optim.lr == 1e-5 and cfg.optim.lr_scheduler_type == "cosine" and cfg.optim.lr_warmup_steps_ratio == 0.1
    assert "trainer.nnodes is ignored" in capsys.readouterr().err
    eng = load_config(None, translate(["model.path=/m", "optim.warmup_style=cosine", "data.pad_mode=right"],
                                      ENGINE, ENGINE_DEFAULTS))
    assert eng.optim.lr == 1e-3 and eng.optim.lr_scheduler_type == "cosine" and eng.model.use_remove_padding is False
    assert eng.data.use_dynamic_bsz is True and eng.optim.betas == [0.9, 0.999]
    assert isinstance(ENGINE["engine.forward_only"], Refuse)


@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory):
    d = tmp_path_factory.mktemp("verl")
    rows = [{"data_source": "gsm8k", "prompt": [{"role": "user", "content": f"q{i}"}], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
             "extra_info": {"split": "train", "index": i, "question": f"What is {i}+{i}?",
                            "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"}} for i in range(48)]
    return write_parquet(d / "gsm8k.parquet", rows)


def test_legacy_gsm8k_example_with_sp2_on_two_processes(tiny_model, gsm8k, tmp_path):
    run_dir = tmp_path / "ckpt"
    r = torchrun(2, f"data.train_files={gsm8k}", f"data.val_files={gsm8k}", "data.prompt_key=extra_info",
                 "data.response_key=extra_info", "+data.prompt_dict_keys=['question']",
                 "+data.response_dict_keys=['answer']", "data.micro_batch_size_per_gpu=4", "data.train_batch_size=8",
                 f"model.partial_pretrain={tiny_model}", "ulysses_sequence_parallel_size=2", "use_remove_padding=true",
                 f"trainer.default_local_dir={run_dir}", "trainer.project_name=gsm8k-sft",
                 "trainer.experiment_name=tiny", "trainer.logger=['console']", "trainer.total_epochs=1",
                 "model.enable_gradient_checkpointing=false", "optim.lr=1e-3",
                 module="shardtune.verl.fsdp_sft_trainer")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run_dir / "global_step_6").is_dir() and (run_dir / "latest_checkpointed_iteration.txt").read_text() == "6"
    rows = read_metrics(run_dir)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/mfu"} <= set(rows[-1]) and "val/loss" in rows[-1]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]


def test_engine_entry_multiturn_dynamic_bsz_matches_shardtune_train(tiny_model, tmp_path):
    data = write_parquet(tmp_path / "multi.parquet", arithmetic_rows(32, seed=11, multi_turn=True))
    common = [f"data.train_files={data}", "data.train_batch_size=8", "data.max_token_len_per_gpu=2048",
              "trainer.total_epochs=1", "trainer.logger=console", "model.enable_gradient_checkpointing=false",
              "optim.lr=2e-3"]
    r = torchrun(2, f"model.path={tiny_model}", f"trainer.default_local_dir={tmp_path / 'verl'}", *common,
                 "data.use_dynamic_bsz=true", module="shardtune.verl.sft_trainer")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "verl" / "global_step_4").is_dir()
    # the same run through shardtune's own CLI, with verl's engine defaults spelled out
    r = torchrun(2, "train", f"model.path={tiny_model}", f"trainer.default_local_dir={tmp_path / 'own'}", *common,
                 "data.use_dynamic_bsz=true", "data.max_length=1024", "optim.lr_scheduler_type=constant",
                 "optim.betas=[0.9,0.999]", "optim.lr_warmup_steps_ratio=0", "trainer.seed=42")
    assert r.returncode == 0, r.stderr[-3000:]
    for a, b in zip(read_metrics(tmp_path / "verl"), read_metrics(tmp_path / "own"), strict=True):
        assert math.isclose(a["train/loss"], b["train/loss"], rel_tol=1e-6)


def test_migration_doc_lists_every_key():
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "migrating-from-verl.md").read_text()
    missing = [k for k in {**LEGACY, **ENGINE} if f"| `{k}` |" not in doc]
    assert not missing


@pytest.mark.parametrize("module,model_key,extra", [
    ("shardtune.verl.fsdp_sft_trainer", "model.partial_pretrain", ["data.multiturn.enable=true", "use_remove_padding=true"]),
    ("shardtune.verl.sft_trainer", "model.path", ["data.pad_mode=no_padding"]),
], ids=["legacy", "engine"])
def test_lora_multiturn_then_resume_under_each_entry_point(tiny_model, tmp_path, module, model_key, extra):
    import json

    data = write_parquet(tmp_path / "multi.parquet", arithmetic_rows(32, seed=12, multi_turn=True))
    run_dir = tmp_path / "ckpt"
    common = [f"{model_key}={tiny_model}", f"data.train_files={data}", "data.train_batch_size=8",
              f"trainer.default_local_dir={run_dir}", "model.lora_rank=8", "model.lora_alpha=16",
              "trainer.logger=['console','file']", "model.enable_gradient_checkpointing=false", "optim.lr=1e-3",
              "trainer.save_freq=2", *extra]
    r = torchrun(2, *common, "trainer.total_training_steps=2", module=module)
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(2, *common, "trainer.total_training_steps=4", "trainer.resume_mode=auto", module=module)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text() == "4"
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"resume"' in x]
    assert events and events[0]["step"] == 2
    assert (run_dir / "global_step_4" / "huggingface" / "adapter_config.json").is_file()
