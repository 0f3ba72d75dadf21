"""verl config keys -> shardtune config keys, in one table per verl trainer.

Each verl key is either mapped (to a shardtune key, with an optional value conversion), ignored with a
warning (where ignoring it cannot change the run's numerics), or refused with a message. verl's own
defaults are applied first, so the same command line means the same run. A test enumerates every key of
both verl configs against these tables.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shardtune.config import parse_overrides
from shardtune.errors import ConfigError


@dataclass(frozen=True)
class Map:
    target: str
    convert: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class Warn:
    why: str


@dataclass(frozen=True)
class Refuse:
    why: str
    allowed: tuple = (None,)  # values that are harmless (verl's defaults) and accepted silently


def _dtype(v: Any) -> str:
    names = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}
    if str(v) not in names:
        raise ConfigError(f"model dtype {v!r} is not supported. Fix: fp32 or bf16.")
    return names[str(v)]


def _pad_mode(v: Any) -> bool:
    if v not in ("no_padding", "right"):
        raise ConfigError(f"data.pad_mode={v!r} is not supported. Fix: no_padding or right.")
    return v == "no_padding"


def _enable_format(v: Any) -> str:
    return "messages" if v else "prompt_response"


HARMLESS = "shardtune ignores it; it does not change what is trained"
LAUNCH = "the number of processes comes from torchrun"
SPEED = "a speed option shardtune does not implement; the results are the same without it"

COMMON: dict[str, Any] = {
    "data.train_batch_size": Map("data.train_batch_size"),
    "data.micro_batch_size_per_gpu": Map("data.micro_batch_size_per_gpu"),
    "data.train_files": Map("data.train_files"),
    "data.val_files": Map("data.val_files"),
    "data.train_max_samples": Map("data.train_max_samples"),
    "data.val_max_samples": Map("data.val_max_samples"),
    "data.max_length": Map("data.max_length"),
    "data.truncation": Map("data.truncation"),
    "data.balance_dp_token": Warn("shardtune always normalises the loss by the global supervised-token count"),
    "data.use_shm": Warn(HARMLESS),
    "data.apply_chat_template_kwargs": Map("data.apply_chat_template_kwargs"),
    "data.custom_cls.path": Refuse("custom dataset classes are not supported; convert the data to a supported format"),
    "data.custom_cls.name": Refuse("custom dataset classes are not supported; convert the data to a supported format"),
    "model.trust_remote_code": Map("model.trust_remote_code"),
    "model.enable_gradient_checkpointing": Map("model.enable_gradient_checkpointing"),
    "model.lora_rank": Map("model.lora_rank"),
    "model.lora_alpha": Map("model.lora_alpha"),
    "model.target_modules": Map("model.target_modules"),
    "model.use_shm": Warn(HARMLESS),
    "model.use_liger": Map("model.use_liger"),
    "model.external_lib": Refuse("importing external model code is not supported"),
    "optim.lr": Map("optim.lr"),
    "optim.betas": Map("optim.betas"),
    "optim.weight_decay": Map("optim.weight_decay"),
    "optim.lr_warmup_steps_ratio": Map("optim.lr_warmup_steps_ratio"),
    "optim.clip_grad": Map("optim.clip_grad"),
    "optim.optimizer": Refuse("shardtune trains with torch AdamW only", allowed=(None, "AdamW", "adamw")),
    "optim.optimizer_impl": Refuse("shardtune uses torch.optim.AdamW", allowed=(None, "torch.optim")),
    "trainer.default_local_dir": Map("trainer.default_local_dir"),
    "trainer.default_hdfs_dir": Refuse("HDFS copies are not supported; copy the run directory yourself"),
    "trainer.project_name": Map("trainer.project_name"),
    "trainer.experiment_name": Map("trainer.experiment_name"),
    "trainer.total_epochs": Map("trainer.total_epochs"),
    "trainer.total_training_steps": Map("trainer.total_training_steps"),
    "trainer.logger": Map("trainer.logger"),
    "trainer.seed": Map("trainer.seed"),
    "trainer.save_freq": Map("trainer.save_freq"),
    "trainer.test_freq": Map("trainer.test_freq"),
    "trainer.nnodes": Warn(LAUNCH),
    "trainer.n_gpus_per_node": Warn(LAUNCH),
    "trainer.max_ckpt_to_keep": Map("trainer.max_ckpt_to_keep"),
    "trainer.resume_mode": Map("trainer.resume_mode"),
    "trainer.resume_from_path": Map("trainer.resume_from_path"),
    "trainer.device": Warn("the device is chosen automatically (CUDA when present)"),
}

LEGACY: dict[str, Any] = {
    **COMMON,
    "data.micro_batch_size": Map("data.micro_batch_size_per_gpu"),  # deprecated in verl
    "data.prompt_key": Map("data.prompt_key"),
    "data.response_key": Map("data.response_key"),
    "data.prompt_dict_keys": Map("data.prompt_dict_keys"),
    "data.response_dict_keys": Map("data.response_dict_keys"),
    "data.multiturn.enable": Map("data.format", _enable_format),
    # verl's legacy dataset never reads these three (it uses the top-level names); shardtune honours them
    "data.multiturn.messages_key": Map("data.messages_key"),
    "data.multiturn.tools_key": Map("data.tools_key"),
    "data.multiturn.enable_thinking_key": Map("data.enable_thinking_key"),
    "data.chat_template": Map("data.chat_template"),
    "model.partial_pretrain": Map("model.path"),
    "model.fsdp_config.model_dtype": Map("model.dtype", _dtype),
    "model.fsdp_config.wrap_policy.min_num_params": Warn("FSDP2 wraps each decoder layer"),
    "model.fsdp_config.cpu_offload": Map("engine.param_offload"),
    "model.fsdp_config.offload_params": Map("engine.param_offload"),
    "model.strategy": Map("engine.strategy"),
    "optim.lr_scheduler": Map("optim.lr_scheduler_type"),
    "ulysses_sequence_parallel_size": Map("ulysses_sequence_parallel_size"),
    "use_remove_padding": Map("model.use_remove_padding"),
    "trainer.checkpoint.save_contents": Map("checkpoint.save_contents"),
    "trainer.checkpoint.load_contents": Map("checkpoint.load_contents"),
}

ENGINE: dict[str, Any] = {
    **COMMON,
    "data.max_token_len_per_gpu": Map("data.max_token_len_per_gpu"),
    "data.use_dynamic_bsz": Map("data.use_dynamic_bsz"),
    "data.messages_key": Map("data.messages_key"),
    "data.tools_key": Map("data.tools_key"),
    "data.enable_thinking_key": Map("data.enable_thinking_key"),
    "data.pad_mode": Map("model.use_remove_padding", _pad_mode),
    "data.ignore_input_ids_mismatch": Map("data.ignore_input_ids_mismatch"),
    "checkpoint.save_contents": Map("checkpoint.save_contents"),
    "checkpoint.load_contents": Map("checkpoint.load_contents"),
    "checkpoint.async_save": Map("checkpoint.async_save"),
    "trainer.profile_interval": Warn("profiling is not built in; use torch.profiler around shardtune"),
    "model.path": Map("model.path"),
    "model.hf_config_path": Refuse("a separate config path is not supported; keep config.json in model.path"),
    "model.tokenizer_path": Map("model.tokenizer_path"),
    "model.custom_chat_template": Map("data.chat_template"),
    "model.override_config.attn_implementation": Map("model.attn_implementation"),
    "model.enable_activation_offload": Refuse("activation offload is not supported", allowed=(None, False)),
    "model.use_remove_padding": Map("model.use_remove_padding"),
    "model.exclude_modules": Map("model.exclude_modules"),
    "model.lora_adapter_path": Map("model.lora_adapter_path"),
    "model.lora": Warn("Megatron LoRA options; FSDP2 LoRA uses model.lora_rank"),
    "model.use_fused_kernels": Warn(SPEED),
    "model.fused_kernel_options.impl_backend": Warn(SPEED),
    "model.tiled_mlp.enabled": Refuse("tiled MLP is not supported", allowed=(None, False)),
    "model.tiled_mlp.num_shards": Warn(SPEED),
    "engine.wrap_policy.min_num_params": Warn("FSDP2 wraps each decoder layer"),
    "engine.param_offload": Map("engine.param_offload"),
    "engine.optimizer_offload": Map("engine.optimizer_offload"),
    "engine.offload_policy": Warn("FSDP2's CPUOffloadPolicy follows engine.param_offload"),
    "engine.reshard_after_forward": Map("engine.reshard_after_forward"),
    "engine.fsdp_size": Map("engine.fsdp_size"),
    "engine.forward_prefetch": Warn(SPEED),
    "engine.model_dtype": Map("model.dtype", _dtype),
    "engine.use_orig_params": Warn("FSDP2 always keeps the original parameters"),
    "engine.seed": Map("trainer.seed"),
    "engine.full_determinism": Warn("CPU runs are deterministic; on GPU set CUBLAS_WORKSPACE_CONFIG yourself"),
    "engine.ulysses_sequence_parallel_size": Map("engine.ulysses_sequence_parallel_size"),
    "engine.entropy_from_logits_with_chunking": Warn("an RL option; SFT computes no entropy"),
    "engine.entropy_checkpointing": Warn("an RL option; SFT computes no entropy"),
    "engine.use_torch_compile": Warn(SPEED),
    "engine.forward_only": Refuse("forward-only engines do not train", allowed=(None, False)),
    "engine.strategy": Map("engine.strategy"),
    "engine.dtype": Warn("unused by verl's FSDP engine too"),
    "engine.mixed_precision.param_dtype": Map("engine.mixed_precision.param_dtype", _dtype),
    "engine.mixed_precision.reduce_dtype": Map("engine.mixed_precision.reduce_dtype", _dtype),
    "engine.mixed_precision.buffer_dtype": Warn("buffers keep the model dtype"),
    "engine.use_dynamic_bsz": Map("data.use_dynamic_bsz"),
    "engine.max_token_len_per_gpu": Map("data.max_token_len_per_gpu"),
    "engine.micro_batch_size_per_gpu": Map("data.micro_batch_size_per_gpu"),
    "engine.infer_max_token_len_per_gpu": Warn("an inference option"),
    "engine.infer_micro_batch_size_per_gpu": Warn("an inference option"),
    "optim.lr_warmup_steps": Map("optim.lr_warmup_steps"),
    "optim.total_training_steps": Warn("filled in by the trainer, as in verl"),
    "optim.min_lr_ratio": Map("optim.min_lr_ratio"),
    "optim.num_cycles": Map("optim.num_cycles"),
    "optim.lr_scheduler_type": Map("optim.lr_scheduler_type"),
    "optim.warmup_style": Map("optim.lr_scheduler_type"),  # verl's deprecated alias
    "optim.override_optimizer_config": Refuse("optimizer overrides are not supported"),
}
ENGINE_PREFIX_WARN = ("profiler.", "model.mtp.")  # whole groups verl defines for RL / profiling

# verl's defaults, as shardtune overrides (applied before the user's keys)
LEGACY_DEFAULTS = [
    "data.train_batch_size=256", "data.micro_batch_size_per_gpu=4", "data.prompt_key=question",
    "data.response_key=answer", "data.format=prompt_response", "data.max_length=1024", "data.truncation=error",
    "model.enable_gradient_checkpointing=true", "optim.lr=1e-5", "optim.betas=[0.9,0.95]",
    "optim.weight_decay=0.01", "optim.lr_warmup_steps_ratio=0.1", "optim.clip_grad=1.0",
    "optim.lr_scheduler_type=cosine", "model.use_remove_padding=false",
    "trainer.default_local_dir=checkpoints/{project_name}/{experiment_name}", "trainer.project_name=gsm8k-sft",
    "trainer.experiment_name=test", "trainer.total_epochs=4", "trainer.seed=1", "trainer.resume_mode=auto",
]
ENGINE_DEFAULTS = [
    "data.train_batch_size=256", "data.micro_batch_size_per_gpu=4", "data.max_token_len_per_gpu=8192",
    "data.use_dynamic_bsz=true", "data.format=messages", "data.max_length=1024", "data.truncation=error",
    "model.enable_gradient_checkpointing=true", "model.use_remove_padding=true", "optim.lr=1e-3",
    "optim.betas=[0.9,0.999]", "optim.weight_decay=0.01", "optim.lr_warmup_steps_ratio=0.0", "optim.clip_grad=1.0",
    "optim.lr_scheduler_type=constant", "trainer.default_local_dir=checkpoints/{project_name}/{experiment_name}",
    "trainer.project_name=gsm8k-sft", "trainer.experiment_name=test", "trainer.total_epochs=4", "trainer.seed=42",
    "trainer.resume_mode=auto",
]


def translate(argv: list[str], table: dict[str, Any], defaults: list[str],
              prefix_warn: tuple[str, ...] = ()) -> list[str]:
    """verl overrides -> shardtune overrides (verl defaults first, then the user's keys in order)."""
    out = list(defaults)
    refused = []
    for key, value in parse_overrides(argv).items():
        rule = table.get(key)
        if rule is None and key.startswith(prefix_warn):
            rule = Warn("a verl option group shardtune does not use")
        if rule is None:
            refused.append(f"{key} (not a key of this verl trainer's config)")
        elif isinstance(rule, Warn):
            if os.environ.get("RANK", "0") == "0":
                print(f"shardtune: warning: verl key {key} is ignored: {rule.why}.", file=sys.stderr)
        elif isinstance(rule, Refuse):
            if value.parsed not in rule.allowed:
                refused.append(f"{key} ({rule.why})")
        elif rule.convert is None:
            out.append(f"{rule.target}={value.raw}")
        else:
            converted = rule.convert(value.parsed)
            if converted is not None:
                out.append(f"{rule.target}={_yaml(converted)}")
    if refused:
        raise ConfigError("These verl keys are not supported by shardtune: " + "; ".join(refused) + ".")
    return out


def _yaml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)

