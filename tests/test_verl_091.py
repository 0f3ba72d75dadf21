"""verl 0.9.1's new keys: every key of its composed engine config has a true rule; pad_to_length buckets
packed micro-batches without changing the loss; zero_indexed_step shifts the schedule as verl's does; the
LoRA group reaches peft (DoRA included); QAT and MTP are refused with their reasons; automodel and
fsdp_turbo get the backend message; the migration doc names every composed key."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import arithmetic_rows, read_metrics, run_cli, torchrun, write_jsonl

from shardtune.config import OptimConfig, load_config, validate
from shardtune.data.batching import collate, pad_to_bucket, slice_for_sequence_parallel
from shardtune.data.chat import IGNORE_INDEX
from shardtune.errors import ConfigError
from shardtune.optim import lr_factor
from shardtune.trainer import Trainer
from shardtune.verl.configs import composed_keys
from shardtune.verl.translate import ENGINE, LEGACY, rule_for, translate

BASE = ["model.path=/m", "data.train_files=/t"]


def config_of(line, spec=ENGINE):
    return load_config(None, translate(line, spec))


def refusal(line, spec=ENGINE) -> str:
    with pytest.raises(ConfigError) as e:
        translate([*BASE, *line], spec)
    return str(e.value)


# ---- the composed config ------------------------------------------------------------------------------------

def test_every_key_of_the_composed_091_config_has_a_rule_and_none_gets_the_false_reason():
    tree = ENGINE.trainer.compose(ENGINE.trainer.defaults)
    keys = composed_keys(tree)
    assert {"engine.pad_to_length", "engine.qat.mode", "model.lora.freeze_vision_model", "model.mtp.enable",
            "optim.zero_indexed_step", "checkpoint.save_lora_only", "profiler.finish_hook_cmd"} <= set(keys)
    assert not [k for k in keys if rule_for(k, ENGINE) is None]
    # a key verl 0.9.1 has, set on the line, is never "not a key of verl's config"
    for key, value in [("engine.pad_to_length_bucket", "64"), ("engine.entropy_from_logits_chunk_size", "8"),
                       ("engine.qat.mode", "w4a4"), ("model.mtp.method", "mtp"), ("model.lora.alpha", "8"),
                       ("checkpoint.strict", "false"), ("profiler.relocate_results", "true"),
                       ("engine.turbo_config.distributed.tensor_parallel_size", "2")]:
        translate([*BASE, f"{key}={value}"], ENGINE)


@pytest.mark.parametrize("spec", [LEGACY, ENGINE], ids=["legacy", "engine"])
def test_migration_doc_names_every_composed_key(spec):
    doc = (Path(__file__).parents[1] / "docs" / "migrating-from-verl.md").read_text()
    keys = composed_keys(spec.trainer.compose(spec.trainer.defaults))
    assert not [k for k in keys if f"`{k}`" not in doc]


def test_new_backends_get_the_backend_message_and_the_rest_runs():
    msg = refusal(["engine=automodel", "optim=automodel", "engine.tp_size=1", "optim.init_lr_ratio=0", "optim.lr=2e-5"])
    assert "selects verl's NeMo Automodel backend; shardtune runs PyTorch FSDP2" in msg
    assert "engine.tp_size" in msg and "optim.init_lr_ratio" in msg and "Also" not in msg
    msg = refusal(["engine.strategy=fsdp_turbo", "engine.turbo_config.distributed.fully_shard_parallel_size=2"])
    assert "engine.strategy=fsdp_turbo selects verl's FSDP-Turbo backend" in msg
    assert "engine.turbo_config.distributed.fully_shard_parallel_size" in msg
    for other in ("Megatron-Core", "VeOmni", "TorchTitan"):
        assert other in msg
    assert config_of([*BASE, "engine.strategy=fsdp2"]).engine.strategy == "fsdp2"


def test_qat_and_mtp_are_refused_with_their_reasons(capsys):
    msg = refusal(["engine.qat.enable=true", "model.mtp.enable=true"])
    assert "engine.qat.enable=True (quantization-aware training (NVFP4" in msg and "no CPU path" in msg
    assert "model.mtp.enable=True (multi-token prediction heads are trained by verl's Megatron engine" in msg
    assert "refuses it too" not in msg
    config_of([*BASE, "engine.qat.mode=w4a4"])  # off: its settings are read only when it is on
    assert "verl key engine.qat.mode is ignored: read only when engine.qat.enable=true" in capsys.readouterr().err


def test_keys_with_no_meaning_for_sft_or_the_same_result_are_accepted_with_a_note(capsys):
    cfg = config_of([*BASE, "engine.entropy_from_logits_chunk_size=512", "trainer.balance_batch=false",
                     "data.num_workers=2", "checkpoint.save_lora_only=true",
                     "engine.use_no_sync_for_gradient_accumulation=true"])
    assert cfg.engine.reduce_grads_every_micro_batch is False  # verl's no_sync: one reduction per step
    err = capsys.readouterr().err
    for key in ("engine.entropy_from_logits_chunk_size", "trainer.balance_batch", "data.num_workers",
                "checkpoint.save_lora_only"):
        assert f"verl key {key} is ignored" in err
    assert "--adapter-only" in err


# ---- pad_to_length --------------------------------------------------------------------------------------------

def test_pad_to_length_maps_to_the_bucket_and_needs_packed_rows(capsys):
    assert config_of([*BASE, "engine.pad_to_length=true"]).data.pad_to_length_bucket == 1024  # verl's default
    cfg = config_of([*BASE, "engine.pad_to_length=true", "engine.pad_to_length_bucket=128"])
    assert cfg.data.pad_to_length_bucket == 128
    assert config_of([*BASE, "engine.pad_to_length_bucket=128"]).data.pad_to_length_bucket == 0
    assert "read only when engine.pad_to_length=true" in capsys.readouterr().err
    padded = config_of([*BASE, "engine.pad_to_length=true", "model.use_remove_padding=false"])
    with pytest.raises(ConfigError, match="pads packed micro-batches"):
        validate(padded)


@pytest.mark.parametrize("bucket,sp", [(16, 1), (16, 3), (7, 2)])
def test_bucketed_row_is_a_multiple_with_an_untrained_dummy_sequence(bucket, sp):
    rng = np.random.default_rng(0)
    samples = [(rng.integers(5, 50, n), np.where(np.arange(n) > 2, rng.integers(5, 50, n), IGNORE_INDEX))
               for n in (9, 13, 4)]
    mb = collate(samples, packed=True, pad_id=0)
    out = pad_to_bucket(mb, bucket, sp, pad_id=0)
    step = -(-bucket // sp) * sp
    length = out.input_ids.shape[1]
    assert length % step == 0 and length - mb.input_ids.shape[1] < step and length >= 26
    assert out.num_targets == mb.num_targets and int((out.targets != IGNORE_INDEX).sum()) == mb.num_targets
    assert torch.equal(out.input_ids[:, :26], mb.input_ids) and out.cu_seqlens[-1] == length
    assert torch.equal(out.cu_seqlens[:-1], mb.cu_seqlens) or length == 26
    if sp > 1:  # the split adds nothing more
        assert slice_for_sequence_parallel(out, sp, 0, 0).input_ids.shape[1] * sp == length


def test_loss_with_bucketing_equals_without(tiny_model, tmp_path):
    """The same run with data.pad_to_length_bucket=64: every step's loss and gradient norm agree (fp32, CPU)."""
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(24, seed=5))

    def run(name, *extra):
        cfg = validate(load_config(None, [
            f"model.path={tiny_model}", f"data.train_files={data}", "data.cache_dir=null", "data.num_proc=1",
            "data.train_batch_size=8", "data.use_dynamic_bsz=true", "data.max_token_len_per_gpu=256",
            "optim.lr=1e-3", "optim.lr_warmup_steps=0", f"trainer.default_local_dir={tmp_path / name}",
            "trainer.total_training_steps=3", "trainer.logger=[jsonl]", *extra]))
        return Trainer(cfg).fit()

    plain, bucketed = run("plain"), run("bucketed", "data.pad_to_length_bucket=64")
    assert len(plain) == 3
    assert all(h["perf/padding_ratio"] == 0 for h in plain) and all(h["perf/padding_ratio"] > 0 for h in bucketed)
    for a, b in zip(plain, bucketed, strict=True):
        for key in ("train/loss", "train/grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5), (key, plain, bucketed)


@pytest.mark.slow
def test_bucketing_under_ulysses_sp2_equals_one_plain_process(tiny_model, tmp_path):
    """Bucket 45 on 2 processes with SP=2 (rounded up to 46, so the split adds nothing) against 1 plain process."""
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(16, seed=6))
    common = [f"model.path={tiny_model}", f"data.train_files={data}", "data.train_batch_size=8",
              "data.micro_batch_size_per_gpu=2", "optim.lr=2e-3", "optim.lr_warmup_steps=1",
              "trainer.total_training_steps=2", "trainer.logger=[jsonl]"]
    r = run_cli("train", *common, f"trainer.default_local_dir={tmp_path / 'one'}", f"data.cache_dir={tmp_path}/c1")
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(2, "train", *common, f"trainer.default_local_dir={tmp_path / 'sp'}", f"data.cache_dir={tmp_path}/c2",
                 "engine.ulysses_sequence_parallel_size=2", "data.pad_to_length_bucket=45")
    assert r.returncode == 0, r.stderr[-3000:]
    one, sp = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "sp")
    assert len(one) == 2 and all(h["perf/padding_ratio"] > 0 for h in sp)
    for a, b in zip(one, sp, strict=True):
        for key in ("train/loss", "train/grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5), (key, one, sp)


# ---- optim.zero_indexed_step ----------------------------------------------------------------------------------

def test_zero_indexed_step_false_counts_the_schedule_from_one(capsys):
    zero, one = OptimConfig(lr_scheduler_type="cosine", lr_warmup_steps=2), \
        OptimConfig(lr_scheduler_type="cosine", lr_warmup_steps=2, zero_indexed_step=False)
    assert [lr_factor(s, one, 10) for s in range(9)] == [lr_factor(s + 1, zero, 10) for s in range(9)]
    assert lr_factor(0, one, 10) != lr_factor(0, zero, 10)
    cosine = config_of([*BASE, "optim.lr_scheduler_type=cosine", "optim.zero_indexed_step=false"])
    assert cosine.optim.zero_indexed_step is False
    # verl's constant schedule never reads it: the same rates as verl
    assert config_of([*BASE, "optim.zero_indexed_step=false"]).optim.zero_indexed_step is True
    assert "verl's constant schedule does not read it" in capsys.readouterr().err
    assert config_of([*BASE, "optim.warmup_style=cosine", "optim.zero_indexed_step=false"]).optim.zero_indexed_step is False


# ---- the LoRA group -------------------------------------------------------------------------------------------

def test_lora_group_maps_to_peft_keys_with_hf_module_names(capsys):
    cfg = config_of([*BASE, "model.lora.rank=16", "model.lora.alpha=8", "model.lora.dropout=0.1",
                     "model.lora.target_modules=[linear_qkv,linear_fc2]", "model.lora.type=canonical_lora"])
    m = cfg.model
    assert (m.lora_rank, m.lora_alpha, m.lora_dropout, m.use_dora) == (16, 8, 0.1, False)
    assert m.target_modules == ["q_proj", "k_proj", "v_proj", "down_proj"]
    assert "verl key model.lora: rank 16" in capsys.readouterr().err
    full = config_of([*BASE, "model.lora.rank=8", "model.lora.type=dora"]).model
    assert full.use_dora and full.lora_alpha == 32  # the group's alpha default
    assert full.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert config_of([*BASE, "model.lora.alpha=8"]).model.lora_rank == 0  # rank 0: the group is off
    assert "the LoRA group is off" in capsys.readouterr().err
    assert config_of([*BASE, "model.lora_rank=8"]).model.lora_alpha == 16  # the flat keys as before


@pytest.mark.parametrize("line,needle", [
    (["model.lora.rank=8", "model.lora.type=vlm_lora", "model.lora.freeze_vision_model=false"],
     "vlm_lora then trains that part's full weights beside the adapters"),
    (["model.lora.rank=8", "model.lora.type=vlm_lora", "model.lora.freeze_language_model=false"],
     "LoRA adapters with a trainable base language model are not supported"),
    (["model.lora.rank=8", "model.lora.target_modules=['*.layers.0.*.linear_qkv']"], "a Megatron module name or pattern"),
    (["model.lora.rank=8", "model.lora.dropout_position=post"], "peft applies LoRA dropout to the adapter's input"),
    (["model.lora.rank=8", "model.lora_rank=4"], "both set shardtune's model.lora_rank, to different values"),
    (["model.lora.rank=8", "model.lora.type=qlora"], "one of lora, vlm_lora, canonical_lora, dora"),
])
def test_lora_group_refusals_say_why(line, needle):
    assert needle in refusal(line)


def test_vlm_lora_with_frozen_vision_runs_as_lora():
    cfg = config_of([*BASE, "model.lora.rank=4", "model.lora.type=vlm_lora"])
    assert cfg.model.lora_rank == 4 and not cfg.model.use_dora
    assert cfg.model.freeze_vision_model and cfg.model.freeze_vision_projection and not cfg.model.freeze_language_model
    assert config_of([*BASE, "data.image_key=pictures"]).data.image_key == "pictures"  # images are read now


def test_dora_reaches_peft(tiny_model):
    from transformers import AutoModelForCausalLM

    from shardtune.parallelize import add_lora

    cfg = config_of([f"model.path={tiny_model}", "data.train_files=/t", "model.lora.rank=4", "model.lora.type=dora",
                     "model.lora.target_modules=[linear_proj]"])
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model), cfg, None)  # the world is not read
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("o_proj" in n for n in names)
    assert any("lora_magnitude_vector" in n for n in names)  # DoRA's magnitude, trained with the adapter


def test_the_release_lines_translate_or_get_the_backend_message():
    """bench/verl_091_lines.json (verl 0.9.1's examples/sft lines): each reads into a shardtune config or is
    refused in the one message naming another backend (bench/verl_lines.py runs them)."""
    import json

    lines = json.loads((Path(__file__).parents[1] / "bench" / "verl_091_lines.json").read_text())
    outcomes = {"ran": 0, "backend": 0}
    for line in lines:
        args = [a.replace("{sft}", "/d/sft.parquet").replace("{model}", "/m").replace("{ckpt}", "/ck")
                for a in line["args"]]
        try:
            load_config(None, translate(args, ENGINE))
            outcomes["ran"] += 1
        except ConfigError as e:
            assert "selects verl's" in str(e) and "shardtune runs PyTorch FSDP2" in str(e), (line["source"], str(e))
            outcomes["backend"] += 1
    assert outcomes == {"ran": 10, "backend": 15}  # 8 example lines + 2 new-key lines; 15 of other backends
