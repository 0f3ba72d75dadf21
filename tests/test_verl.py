"""verl drop-in entry points: every verl key is handled, Hydra's syntax means what it means in verl, verl's
own command lines (shapes of its examples and CI scripts) run on 2 processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import arithmetic_rows, read_metrics, torchrun, write_parquet

from shardtune.config import all_keys, load_config
from shardtune.errors import ConfigError
from shardtune.verl.mapping import Map
from shardtune.verl.translate import ENGINE, LEGACY, rule_for, translate, units

# Every key of verl's two SFT configs with the groups their `defaults` select (sft_trainer.yaml with
# optim/fsdp.yaml; sft_trainer_engine.yaml with model/hf_model, engine/fsdp, optim/fsdp, profiler), as of
# verl 2026-01.
OPTIM_GROUP = """
optim.optimizer optim.optimizer_impl optim.lr optim.lr_warmup_steps_ratio optim.total_training_steps
optim.weight_decay optim.lr_warmup_steps optim.betas optim.clip_grad optim.min_lr_ratio optim.num_cycles
optim.lr_scheduler_type optim.warmup_style optim.override_optimizer_config
""".split()
LEGACY_KEYS = OPTIM_GROUP + """
data.train_batch_size data.micro_batch_size data.micro_batch_size_per_gpu data.train_files data.val_files
data.train_max_samples data.val_max_samples data.prompt_key data.response_key data.prompt_dict_keys
data.response_dict_keys data.multiturn.enable data.multiturn.messages_key data.multiturn.tools_key
data.multiturn.enable_thinking_key data.max_length data.truncation data.balance_dp_token data.chat_template
data.custom_cls.path data.custom_cls.name data.use_shm data.apply_chat_template_kwargs
model.partial_pretrain model.use_shm model.fsdp_config.model_dtype model.fsdp_config.wrap_policy.min_num_params
model.fsdp_config.cpu_offload model.fsdp_config.offload_params model.external_lib model.enable_gradient_checkpointing
model.trust_remote_code model.lora_rank model.lora_alpha model.target_modules model.use_liger model.strategy
optim.lr_scheduler ulysses_sequence_parallel_size use_remove_padding
trainer.default_local_dir trainer.default_hdfs_dir trainer.project_name trainer.experiment_name trainer.total_epochs
trainer.total_training_steps trainer.logger trainer.seed trainer.save_freq trainer.test_freq trainer.nnodes
trainer.n_gpus_per_node trainer.max_ckpt_to_keep trainer.resume_mode trainer.resume_from_path
trainer.checkpoint.save_contents trainer.checkpoint.load_contents trainer.device
""".split()
ENGINE_KEYS = OPTIM_GROUP + """
data.train_batch_size data.micro_batch_size_per_gpu data.max_token_len_per_gpu data.use_dynamic_bsz data.train_files
data.val_files data.train_max_samples data.val_max_samples data.messages_key data.tools_key data.enable_thinking_key
data.pad_mode data.max_length data.truncation data.balance_dp_token data.custom_cls.path data.custom_cls.name
data.use_shm data.apply_chat_template_kwargs data.ignore_input_ids_mismatch data.image_key data.video_key
checkpoint.save_contents checkpoint.load_contents checkpoint.async_save checkpoint.mbridge_config.memory_efficient
trainer.default_local_dir trainer.default_hdfs_dir trainer.project_name trainer.experiment_name trainer.total_epochs
trainer.total_training_steps trainer.logger trainer.seed trainer.save_freq trainer.test_freq trainer.nnodes
trainer.n_gpus_per_node trainer.max_ckpt_to_keep trainer.resume_mode trainer.resume_from_path trainer.device
trainer.profile_interval
model.path model.hf_config_path model.tokenizer_path model.use_shm model.trust_remote_code model.custom_chat_template
model.external_lib model.override_config.attn_implementation model.override_config.rope_scaling
model.enable_gradient_checkpointing model.enable_activation_offload model.use_remove_padding model.lora_rank
model.lora_alpha model.target_modules model.exclude_modules model.lora_adapter_path model.lora model.use_liger
model.use_fused_kernels model.fused_kernel_options.impl_backend model.tiled_mlp.enabled model.tiled_mlp.num_shards
model.mtp.enable
engine.wrap_policy.min_num_params engine.param_offload engine.optimizer_offload engine.offload_policy
engine.reshard_after_forward engine.fsdp_size engine.forward_prefetch engine.model_dtype engine.use_orig_params
engine.seed engine.full_determinism engine.ulysses_sequence_parallel_size engine.entropy_from_logits_with_chunking
engine.entropy_checkpointing engine.use_torch_compile engine.forward_only engine.strategy engine.dtype
engine.mixed_precision.param_dtype engine.mixed_precision.reduce_dtype engine.mixed_precision.buffer_dtype
engine.use_dynamic_bsz engine.max_token_len_per_gpu engine.micro_batch_size_per_gpu
engine.infer_max_token_len_per_gpu engine.infer_micro_batch_size_per_gpu
profiler.tool profiler.enable profiler.all_ranks profiler.ranks profiler.save_path
""".split()


def config_of(line: list[str], spec=ENGINE):
    return load_config(None, translate(line, spec))


@pytest.mark.parametrize("keys,spec", [(LEGACY_KEYS, LEGACY), (ENGINE_KEYS, ENGINE)], ids=["legacy", "engine"])
def test_every_verl_key_has_a_rule(keys, spec):
    default_tree = spec.trainer.compose(spec.trainer.defaults)
    composed_keys = [k for k, _ in units(default_tree, spec)]
    assert not [k for k in keys + composed_keys if rule_for(k, spec) is None]
    targets = {r.target for r in spec.table.values() if isinstance(r, Map)}
    assert targets <= set(all_keys())


@pytest.mark.parametrize("spec,required", [(LEGACY, "model.partial_pretrain=/m"), (ENGINE, "model.path=/m")],
                         ids=["legacy", "engine"])
def test_verl_defaults_reach_shardtune(spec, required):
    cfg = config_of([required, "data.train_files=/t.parquet"], spec)
    if spec is LEGACY:  # sft_trainer.yaml over optim/fsdp.yaml
        assert (cfg.optim.lr, cfg.optim.lr_scheduler_type, cfg.optim.lr_warmup_steps_ratio) == (1e-5, "cosine", 0.1)
        assert cfg.optim.betas == [0.9, 0.95] and cfg.trainer.seed == 1 and cfg.model.use_remove_padding is False
        assert cfg.data.format == "prompt_response" and cfg.data.prompt_key == "question"
    else:  # sft_trainer_engine.yaml with its groups
        assert (cfg.optim.lr, cfg.optim.lr_scheduler_type, cfg.optim.lr_warmup_steps_ratio) == (1e-3, "constant", 0.0)
        assert cfg.optim.betas == [0.9, 0.999] and cfg.trainer.seed == 42 and cfg.model.use_remove_padding is True
        assert cfg.data.use_dynamic_bsz is True and cfg.data.max_token_len_per_gpu == 8192
        assert cfg.data.format == "messages"
    assert str(cfg.run_dir) == "checkpoints/gsm8k-sft/test"  # verl's interpolated default
    assert cfg.trainer.total_epochs == 4 and cfg.model.enable_gradient_checkpointing is True


def test_hydra_override_syntax(capsys, monkeypatch):
    monkeypatch.setenv("SFT_ROOT", "/data/sft")
    cfg = config_of([
        "model.path=/m", "data.train_files=${oc.env:SFT_ROOT}/train.parquet",
        "++data.val_files=['/v/a.parquet','/v/b.parquet']",  # ++ sets an existing key
        "data.train_max_samples=100",
        "trainer.experiment_name='run 7, final'",  # quoting keeps spaces and commas
        "trainer.default_local_dir=/ck/${trainer.project_name}/${trainer.experiment_name}",
        "trainer.project_name=proj",
        "~optim.lr",  # removed: verl reads its default
        "optim.lr=5e-4", "~optim.lr",
        "model.override_config={attention_dropout: 0.1, rope_scaling: {type: linear, factor: 2.0}}",
        "+optim.override_optimizer_config.eps=1e-6",
        "+trainer.my_note=hello",  # + adds a key verl's trainer never reads: a warning
        "hydra.run.dir=outputs/x",
    ])
    assert cfg.data.train_files == ["/data/sft/train.parquet"]
    assert cfg.data.val_files == ["/v/a.parquet", "/v/b.parquet"] and cfg.data.train_max_samples == 100
    assert str(cfg.run_dir) == "/ck/proj/run 7, final"  # interpolations resolved against the final config
    assert cfg.optim.lr == 1e-3 and cfg.optim.eps == 1e-6
    assert cfg.model.override_config == {"attention_dropout": 0.1, "rope_scaling": {"type": "linear", "factor": 2.0}}
    err = capsys.readouterr().err
    assert "verl key trainer.my_note is ignored" in err and "verl key hydra.run.dir is ignored" in err


@pytest.mark.parametrize("line,needle", [
    (["data.trian_files=x"], "data.trian_files (not a key of verl's sft_trainer_engine.yaml, which refuses it too. "
                             "Did you mean data.train_files?"),
    (["trainer.logger=console,wandb"], "a comma makes it a Hydra sweep"),
    (["data.train_files=~/x.parquet"], "is not a Hydra override"),
    (["~trainer.nope"], "Could not delete from config"),
    (["engine=fsdp9"], "no such config group option (options: fsdp, fsdp2)"),
    (["trainer.experiment_name=${trainer.nope}"], "an interpolation does not resolve"),
    (["optim=adafactor"], "no such config group option"),
    (["--config-name=my_sft"], "a Hydra application flag"),
])
def test_hydra_errors_are_verls_and_collected(line, needle):
    with pytest.raises(ConfigError) as e:
        translate(["model.path=/m", "data.train_files=/t", *line], ENGINE)
    assert needle in str(e.value)


def test_without_hydra_the_error_names_the_extra(monkeypatch):
    for name in ("hydra", "hydra._internal.config_loader_impl", "hydra.core.override_parser.overrides_parser"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match=r"pip install 'shardtune\[verl\]'"):
        translate(["model.path=/m"], ENGINE)


def test_config_groups_restating_the_defaults():
    base = ["model.path=/m", "data.train_files=/t"]
    plain = config_of(base)
    assert config_of([*base, "engine=fsdp", "optim=fsdp", "model=hf_model", "profiler=profiler"]) == plain
    # groups are applied before keys, whatever the order on the line (Hydra's rule)
    assert config_of([*base, "optim.lr=2e-5", "optim=fsdp"]).optim.lr == 2e-5
    assert config_of([*base, "engine=fsdp2"]).engine.strategy == "fsdp2"
    assert config_of(["model.partial_pretrain=/m", "data.train_files=/t", "optim=fsdp"], LEGACY).optim.lr == 1e-5
    with pytest.raises(ConfigError, match="no such config group option"):
        translate(["model.partial_pretrain=/m", "data.train_files=/t", "optim=megatron9"], LEGACY)


# verl's run_sft_engine.sh with BACKEND=megatron / veomni (its CI matrix), model and data made local
ENGINE_CI = ["data.train_files=/d/train.parquet", "data.val_files=/d/test.parquet", "data.train_batch_size=128",
             "data.pad_mode=no_padding", "data.truncation=error", "data.use_dynamic_bsz=True",
             "data.max_token_len_per_gpu=2048", "data.messages_key=messages", "model.path=/m",
             "model.use_remove_padding=True", "trainer.test_freq=after_each_epoch", "trainer.save_freq=-1",
             "trainer.logger=['console','file']", "trainer.project_name=verl_sft_test",
             "trainer.experiment_name=gsm8k", "trainer.total_epochs=2", "trainer.total_training_steps=2",
             "trainer.default_local_dir=/ck", "trainer.resume_mode=disable"]
OPTIM_CI = ["optim.lr=1e-5", "optim.lr_warmup_steps_ratio=0.2", "optim.weight_decay=0.1", "optim.betas=[0.9,0.95]",
            "optim.clip_grad=1.0"]
MEGATRON = ["engine=megatron", "optim=megatron", *OPTIM_CI, "optim.lr_warmup_init=0", "optim.lr_decay_style=cosine",
            "optim.min_lr=1e-6", "engine.tensor_model_parallel_size=2", "engine.pipeline_model_parallel_size=2",
            "engine.virtual_pipeline_model_parallel_size=2", "engine.context_parallel_size=2",
            "engine.use_mbridge=True"]
VEOMNI = ["engine=veomni", "optim=veomni", *OPTIM_CI, "optim.lr_min=1e-6", "optim.lr_scheduler_type=cosine",
          "engine.ulysses_parallel_size=2", "engine.data_parallel_size=4"]
# verl's TorchTitan engine (newer verl; a users' TPU line)
TORCHTITAN = ["engine=torchtitan", "optim=torchtitan", *OPTIM_CI, "optim.min_lr_factor=0.1", "optim.decay_type=cosine",
              "engine.tensor_parallel_size=1", "engine.data_parallel_shard_size=8", "engine.attn_type=varlen"]


@pytest.mark.parametrize("backend,name,only", [
    (MEGATRON, "Megatron-Core", ["optim.lr_warmup_init", "optim.lr_decay_style", "optim.min_lr",
                                 "engine.tensor_model_parallel_size", "engine.use_mbridge"]),
    (VEOMNI, "VeOmni", ["optim.lr_min", "engine.ulysses_parallel_size", "engine.data_parallel_size"]),
    (TORCHTITAN, "TorchTitan", ["optim.min_lr_factor", "optim.decay_type", "engine.tensor_parallel_size",
                                "engine.data_parallel_shard_size", "engine.attn_type"]),
], ids=["megatron", "veomni", "torchtitan"])
def test_other_backends_refused_in_one_message_then_the_rest_runs(backend, name, only):
    with pytest.raises(ConfigError) as e:
        translate(ENGINE_CI + backend, ENGINE)
    msg = str(e.value)
    assert f"selects verl's {name} backend; shardtune runs PyTorch FSDP2" in msg and "Also" not in msg
    assert all(k in msg for k in only) and "optim.lr=" not in msg
    rest = [x for x in backend if not x.startswith(("engine=", "optim=")) and x.split("=")[0] not in only
            and not x.startswith(("engine.pipeline", "engine.virtual", "engine.context"))]
    cfg = config_of(ENGINE_CI + rest)
    assert cfg.optim.lr == 1e-5 and cfg.optim.weight_decay == 0.1


def test_ray_entry_refuses_backends_and_several_nodes(capsys):
    from shardtune.verl.sft_trainer_ray import main

    assert main(["trainer.nnodes=1", "trainer.n_gpus_per_node=8", *ENGINE_CI, *MEGATRON]) == 2  # verl CI, mode=ray
    assert "selects verl's Megatron-Core backend" in capsys.readouterr().err
    assert main(["trainer.nnodes=2", *ENGINE_CI]) == 2
    assert "run torchrun --nnodes N" in capsys.readouterr().err


def test_legacy_trainer_accepts_its_optim_group_as_verl_reads_it(capsys):
    line = ["model.partial_pretrain=/m", "data.train_files=/t", "optim.lr_scheduler_type=constant",
            "optim.min_lr_ratio=0.1", "optim.warmup_style=cosine", "optim.lr_warmup_steps=5", "optim.num_cycles=2",
            "optim.total_training_steps=7", "optim.override_optimizer_config={eps: 1e-6, fused: true}"]
    cfg = config_of(line, LEGACY)
    # verl's fsdp_sft_trainer builds its schedule from optim.lr_scheduler and the warmup ratio only
    assert (cfg.optim.lr_scheduler_type, cfg.optim.min_lr_ratio, cfg.optim.lr_warmup_steps) == ("cosine", 0.0, -1)
    assert cfg.optim.num_cycles == 0.5 and cfg.optim.eps == 1e-6  # its optimizer does take the overrides
    err = capsys.readouterr().err
    assert err.count("verl's fsdp_sft_trainer does not read it") == 6 and "optim.override_optimizer_config.fused" in err


@pytest.mark.parametrize("line,needle", [
    (["optim.warmup_style=cosine", "optim.lr_scheduler_type=constant"], "optim.lr_scheduler_type"),
    (["engine.use_dynamic_bsz=false", "data.use_dynamic_bsz=true"], "data.use_dynamic_bsz"),
    (["optim.lr=1e-5", "+optim.override_optimizer_config.lr=2e-5"], "optim.lr"),
    (["engine.seed=3", "trainer.seed=4"], "trainer.seed"),
])
def test_two_keys_setting_one_shardtune_key_differently_is_an_error(line, needle):
    with pytest.raises(ConfigError, match=f"both set shardtune's {needle}, to different values"):
        translate(["model.path=/m", "data.train_files=/t", *line], ENGINE)


def test_keys_that_agree_or_stand_alone_run():
    base = ["model.path=/m", "data.train_files=/t"]
    assert config_of([*base, "optim.warmup_style=cosine"]).optim.lr_scheduler_type == "cosine"
    assert config_of([*base, "optim.warmup_style=cosine",
                      "optim.lr_scheduler_type=cosine"]).optim.lr_scheduler_type == "cosine"
    cfg = config_of([*base, "data.pad_mode=no_padding", "model.use_remove_padding=False", "data.use_dynamic_bsz=True"])
    assert cfg.model.use_remove_padding is False and cfg.data.use_dynamic_bsz is True  # verl's CI variant
    assert config_of([*base, "data.pad_mode=right"]).model.use_remove_padding is True  # layout: use_remove_padding
    assert config_of([*base, "engine.offload_policy=true"]).engine.param_offload is True
    assert config_of([*base,
                      "trainer.default_hdfs_dir=hdfs://nn:8020/ckpt"]).trainer.remote_dir == "hdfs://nn:8020/ckpt"
    assert config_of([*base, "engine.fsdp_size=8"]).engine.fsdp_size == 8  # no WORLD_SIZE: left to shardtune


def test_fsdp_size_at_least_the_world_means_all_ranks_as_in_verl(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert config_of(["model.path=/m", "data.train_files=/t", "engine.fsdp_size=8"]).engine.fsdp_size == -1


def test_override_optimizer_config_maps_what_adamw_takes(capsys):
    base = ["model.path=/m", "data.train_files=/t"]
    cfg = config_of([*base,
                     "+optim.override_optimizer_config={eps: 1e-7, foreach: true, amsgrad: false, betas: [0.8, 0.9]}"])
    assert cfg.optim.eps == 1e-7 and cfg.optim.betas == [0.8, 0.9]
    assert "override_optimizer_config.foreach is ignored" in capsys.readouterr().err
    with pytest.raises(ConfigError) as e:
        translate([*base, "+optim.override_optimizer_config={amsgrad: true, bf16_stochastic_round: true}"], ENGINE)
    assert "amsgrad" in str(e.value) and "bf16_stochastic_round (not an argument of torch.optim.AdamW" in str(e.value)


def test_loggers_verl_knows():
    base = ["model.path=/m", "data.train_files=/t"]
    assert config_of([*base, "trainer.logger=['console','tracking']"]).trainer.logger == ["console", "wandb"]
    assert config_of([*base, "trainer.logger=console"]).trainer.logger == ["console"]
    assert config_of([*base, "trainer.logger=[console,swanlab]"]).trainer.logger == ["console"]


def test_refusals_name_the_closest_shardtune_setting():
    with pytest.raises(ConfigError) as e:
        translate(["model.path=/m", "data.train_files=/t", "model.tiled_mlp.enabled=true",
                   "optim.optimizer=Lion"], ENGINE)
    assert "closest shardtune setting: model.loss_chunk_size" in str(e.value)
    assert "optim.optimizer='Lion'" in str(e.value)


def test_model_override_config_is_checked_before_loading_and_changes_the_estimate(tiny_model, capsys):
    from shardtune.memory import model_shape
    from shardtune.verl.sft_trainer import main

    code = main([f"model.path={tiny_model}", "data.train_files=/nope.parquet",
                 "model.override_config={attention_dropout: 0.1, attention_dropot: 0.2}"])
    err = capsys.readouterr().err
    assert code == 2 and "attention_dropot (did you mean attention_dropout?)" in err and "Loading" not in err
    cfg = config_of([f"model.path={tiny_model}", "data.train_files=/t",
                     "+model.override_config.num_hidden_layers=1",
                     "+model.override_config.layer_types=[full_attention]",
                     "+model.override_config.attn_implementation=eager"])
    assert cfg.model.attn_implementation == "eager"
    full, small = model_shape(config_of([f"model.path={tiny_model}",
                                         "data.train_files=/t"]).model), model_shape(cfg.model)
    assert small.layers == 1 and full.layers == 2 and small.params < full.params


def test_same_run_as_shardtune_spelled_out():
    """A verl engine line and shardtune's own keys for it give the same config."""
    verl = config_of(ENGINE_CI + ["engine=fsdp", "optim=fsdp", *OPTIM_CI, "optim.min_lr_ratio=0.1",
                                  "optim.lr_scheduler_type=cosine", "engine.fsdp_size=-1", "engine.strategy=fsdp2"])
    own = load_config(None, [
        "model.path=/m", "data.train_files=[/d/train.parquet]", "data.val_files=[/d/test.parquet]",
        "data.format=messages",
        "data.train_batch_size=128", "data.use_dynamic_bsz=true", "data.max_token_len_per_gpu=2048",
        "model.enable_gradient_checkpointing=true", "optim.lr=1e-5", "optim.lr_warmup_steps_ratio=0.2",
        "optim.weight_decay=0.1", "optim.betas=[0.9,0.95]", "optim.min_lr_ratio=0.1", "optim.lr_scheduler_type=cosine",
        "trainer.test_freq=after_each_epoch", "trainer.logger=[console,file]", "trainer.project_name=verl_sft_test",
        "trainer.experiment_name=gsm8k", "trainer.total_epochs=2", "trainer.total_training_steps=2",
        "trainer.default_local_dir=/ck", "trainer.resume_mode=disable", "trainer.seed=42"])
    assert verl == own


def test_migration_doc_lists_every_key():
    doc = (Path(__file__).parents[1] / "docs" / "migrating-from-verl.md").read_text()
    missing = [k for k in {**LEGACY.table, **ENGINE.table} if f"| `{k}` |" not in doc]
    assert not missing


# ---- verl's command lines on 2 processes --------------------------------------------------------------------

@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory):
    """Rows as verl's examples/data_preprocess/gsm8k.py writes them."""
    d = tmp_path_factory.mktemp("verl")
    rows = [{"data_source": "gsm8k", "prompt": [{"role": "user", "content": f"q{i}"}], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
             "extra_info": {"split": "train", "index": i, "question": f"What is {i}+{i}?",
                            "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"}} for i in range(48)]
    return write_parquet(d / "gsm8k.parquet", rows)


def events(run_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == kind]


@pytest.mark.slow
def test_legacy_ci_line_sp2_liger_hf_checkpoints(tiny_model, gsm8k, tmp_path):
    """tests/special_e2e/sft/run_sft.sh with SP_SIZE=2 LIGER=True (verl's e2e_sft workflow)."""
    run_dir = tmp_path / "ckpt"
    r = torchrun(2, f"data.train_files={gsm8k}", f"data.val_files={gsm8k}", "data.prompt_key=extra_info",
                 "data.response_key=extra_info", "data.prompt_dict_keys=['question']",
                 "data.response_dict_keys=['answer']", "data.multiturn.enable=False",
                 "data.multiturn.messages_key=messages", "optim.lr=1e-3", "data.micro_batch_size_per_gpu=2",
                 "data.train_batch_size=8", "model.strategy=fsdp", f"model.partial_pretrain={tiny_model}",
                 "model.lora_rank=0", "model.lora_alpha=16", "model.target_modules=all-linear", "model.use_liger=True",
                 "ulysses_sequence_parallel_size=2", "use_remove_padding=True", f"trainer.default_local_dir={run_dir}",
                 "trainer.project_name=verl-test", "trainer.experiment_name=tiny-sft-minimal",
                 "trainer.total_training_steps=3", "trainer.save_freq=1",
                 "trainer.checkpoint.save_contents=[model,optimizer,extra,hf_model]", "trainer.max_ckpt_to_keep=1",
                 "trainer.resume_mode=disable", "trainer.logger=['console']",
                 "model.enable_gradient_checkpointing=false", module="shardtune.verl.fsdp_sft_trainer")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in run_dir.glob("global_step_*")) == ["global_step_3"]  # max_ckpt_to_keep=1
    assert (run_dir / "global_step_3" / "huggingface" / "model.safetensors").is_file()  # hf_model
    rows = read_metrics(run_dir)
    assert len(rows) == 3 and "val/loss" in rows[-1] and rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert "model.use_liger=true needs a CUDA GPU" in r.stderr  # the PyTorch path on CPU, said once per rank


@pytest.mark.slow
def test_engine_ci_lines_pad_modes_and_sp_give_the_same_losses(tiny_model, tmp_path):
    """run_sft_engine.sh (engine=fsdp optim=fsdp) as test_sft_engine_all.sh runs it: PAD_MODE=no_padding with and
    without remove-padding, and SP=2 with FSDP_SIZE=2 and FSDP2: the same steps, the same losses."""
    data = write_parquet(tmp_path / "train.parquet", arithmetic_rows(32, seed=11, multi_turn=True))
    line = [f"data.train_files={data}", f"data.val_files={data}", "data.train_batch_size=16",
            "data.pad_mode=no_padding",
            "data.truncation=error", "data.use_dynamic_bsz=True", "data.max_token_len_per_gpu=1024",
            "data.messages_key=messages", f"model.path={tiny_model}", "engine=fsdp", "optim=fsdp", "optim.lr=1e-3",
            "optim.lr_warmup_steps_ratio=0.2", "optim.weight_decay=0.1", "optim.betas=[0.9,0.95]",
            "optim.clip_grad=1.0",
            "optim.min_lr_ratio=0.1", "optim.lr_scheduler_type=cosine", "trainer.test_freq=after_each_epoch",
            "trainer.save_freq=-1", "trainer.logger=['console','file']", "trainer.project_name=verl_sft_test",
            "trainer.total_epochs=2", "trainer.total_training_steps=3", "trainer.resume_mode=disable",
            "model.enable_gradient_checkpointing=False"]
    variants = {
        "rmpad": ["model.use_remove_padding=True", "engine.ulysses_sequence_parallel_size=1", "engine.strategy=fsdp",
                  "engine.fsdp_size=2"],
        "padded": ["model.use_remove_padding=False", "engine.ulysses_sequence_parallel_size=1",
                   "engine.strategy=fsdp", "engine.fsdp_size=-1"],
        "sp2": ["model.use_remove_padding=True", "engine.ulysses_sequence_parallel_size=2", "engine.strategy=fsdp2",
                "engine.fsdp_size=2"],
    }
    losses = {}
    for name, extra in variants.items():
        run_dir = tmp_path / name
        args = [*line, *extra, f"trainer.experiment_name={name}", f"trainer.default_local_dir={run_dir}"]
        if name == "rmpad":  # as verl's mode=ray runs it: the entry point starts the processes itself
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
            r = subprocess.run([sys.executable, "-m", "shardtune.verl.sft_trainer_ray", "trainer.nnodes=1",
                                "trainer.n_gpus_per_node=2", *args], env=env, capture_output=True, text=True,
                                timeout=300)
            assert "trainer.n_gpus_per_node is ignored" not in r.stderr
        else:
            r = torchrun(2, *args, module="shardtune.verl.sft_trainer")
        assert r.returncode == 0, r.stderr[-3000:]
        losses[name] = [row["train/loss"] for row in read_metrics(run_dir)]
        notes = " ".join(e["message"] for e in events(run_dir, "note"))
        assert ("right-padded rows" in notes) == (name == "padded")
        assert ("runs FSDP2" in notes) == (name != "sp2")
    assert len(losses["rmpad"]) == 3
    for name in ("padded", "sp2"):
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(losses["rmpad"], losses[name], strict=True)), losses


@pytest.mark.slow
@pytest.mark.parametrize("module,extra", [
    # examples/sft/multiturn/run_qwen2.5_7b_sp4.sh and run_qwen_05_peft.sh shapes, then verl's resume CI step
    ("shardtune.verl.fsdp_sft_trainer", ["data.multiturn.enable=true", "data.multiturn.messages_key=messages",
                                         "data.multiturn.tools_key=tools", "model.fsdp_config.cpu_offload=false",
                                         "model.fsdp_config.offload_params=false", "model.trust_remote_code=true",
                                         "use_remove_padding=true", "trainer.default_hdfs_dir=null"]),
    ("shardtune.verl.sft_trainer", ["engine=fsdp", "optim=fsdp", "data.pad_mode=no_padding",
                                    "checkpoint.save_contents=[model,optimizer,extra]"]),
], ids=["legacy", "engine"])
def test_lora_multiturn_then_resume_under_each_entry_point(tiny_model, tmp_path, module, extra):
    data = write_parquet(tmp_path / "multi.parquet", arithmetic_rows(32, seed=12, multi_turn=True))
    run_dir = tmp_path / "ckpt"
    key = "model.partial_pretrain" if "fsdp_sft" in module else "model.path"
    common = [f"{key}={tiny_model}", f"data.train_files={data}", "data.train_batch_size=8",
              f"trainer.default_local_dir={run_dir}", "model.lora_rank=32", "model.lora_alpha=16",
              "model.target_modules=all-linear", "trainer.logger=['console','file']",
              "model.enable_gradient_checkpointing=false", "optim.lr=1e-3", "trainer.save_freq=2", *extra]
    r = torchrun(2, *common, "trainer.total_training_steps=2", module=module)
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(2, *common, "trainer.total_training_steps=4", "trainer.resume_mode=auto", module=module)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert events(run_dir, "resume")[0]["step"] == 2
    assert (run_dir / "global_step_4" / "huggingface" / "adapter_config.json").is_file()


def test_legacy_prompt_response_rows_end_with_eos_as_in_verl_and_multiturn_as_rendered():
    """verl's legacy dataset appends the EOS to every response; its multi-turn dataset trains the template's render."""
    single = translate(["model.partial_pretrain=/m", "data.train_files=x.parquet"], LEGACY)
    multi = translate(["model.partial_pretrain=/m", "data.train_files=x.parquet", "data.multiturn.enable=true"], LEGACY)
    assert "data.append_eos=always" in single and "data.format=prompt_response" in single
    assert "data.append_eos=auto" in multi and "data.format=messages" in multi
