"""verl's two SFT configs as verl composes them (its own YAML plus the config groups its `defaults` list
selects), with verl's default values: what a verl command line is applied to.

Both are written down here as data (verl is not imported), as of verl 0.9.1 (`verl/trainer/config/` of its
release on the package registry, 2026-08). verl removed the legacy trainer's `sft_trainer.yaml` in 2026-02;
LEGACY keeps the last one it had, for the scripts written for it. Keys are kept although verl's YAML only
knows them from its dataclasses, from older versions or from newer ones (e.g. `engine.use_dynamic_bsz`,
`wrap_policy.transformer_layer_cls_to_wrap`, `optim.warmup_steps_ratio` before verl renamed it,
`data.image_key` and `data.tokenize_whole_message` of verl 0.7/0.8, `checkpoint.save_lora_only` of the
CheckpointConfig dataclass), so a line written for that version, which sets them without Hydra's `+`, still
reads. Free-form mappings (`model.override_config`, ...) accept new keys, as verl's code reads them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

_CHECKPOINT = {"save_contents": ["model", "optimizer", "extra"], "load_contents": None}
_TRAINER = {
    "default_local_dir": "checkpoints/${trainer.project_name}/${trainer.experiment_name}",
    "default_hdfs_dir": None, "project_name": "gsm8k-sft", "experiment_name": "test", "total_epochs": 4,
    "total_training_steps": None, "logger": ["console", "wandb"], "seed": 1, "save_freq": -1, "test_freq": -1,
    "nnodes": 1, "n_gpus_per_node": 8, "max_ckpt_to_keep": None, "resume_mode": "auto", "resume_from_path": None,
    "device": "cuda",
}
_DATA = {
    "train_batch_size": 256, "micro_batch_size_per_gpu": 4, "train_files": None, "val_files": None,
    "train_max_samples": -1, "val_max_samples": -1, "max_length": 1024, "truncation": "error",
    "balance_dp_token": False, "custom_cls": {"path": None, "name": None}, "use_shm": False,
    "apply_chat_template_kwargs": {}, "num_workers": 8,
}
_WRAP_POLICY = {"min_num_params": 0, "transformer_layer_cls_to_wrap": None, "disable": False}

# optim/fsdp.yaml (FSDPOptimizerConfig), the group both trainers select
OPTIM_FSDP = {
    "optimizer": "AdamW", "optimizer_impl": "torch.optim", "lr": 1e-3, "lr_warmup_steps_ratio": 0.0,
    "total_training_steps": -1, "weight_decay": 0.01, "lr_warmup_steps": -1, "betas": [0.9, 0.999],
    "clip_grad": 1.0, "min_lr_ratio": 0.0, "num_cycles": 0.5, "lr_scheduler_type": "constant",
    "zero_indexed_step": True,  # verl 0.9
    "warmup_style": None, "override_optimizer_config": None,
}

# engine/fsdp.yaml (FSDPEngineConfig); mixed_precision and the last five keys exist in verl's dataclass only
ENGINE_FSDP = {
    "wrap_policy": dict(_WRAP_POLICY), "param_offload": False, "optimizer_offload": False, "offload_policy": False,
    "reshard_after_forward": True, "fsdp_size": -1, "forward_prefetch": False, "model_dtype": "fp32",
    "use_orig_params": False, "seed": 42, "full_determinism": False, "ulysses_sequence_parallel_size": 1,
    "entropy_from_logits_with_chunking": False, "entropy_from_logits_chunk_size": 2048,  # chunk size: verl 0.9
    "use_torch_compile": True, "entropy_checkpointing": False,
    "use_no_sync_for_gradient_accumulation": False, "pad_to_length": False, "pad_to_length_bucket": 1024,  # verl 0.9
    "forward_only": False, "strategy": "fsdp", "dtype": "bfloat16",
    # verl 0.9: NVFP4 quantization-aware training
    "qat": {"enable": False, "mode": "w4a16", "group_size": 16,
            "ignore_patterns": ["lm_head", "embed_tokens", "re:.*mlp.gate$"], "activation_observer": "static_minmax",
            "quantization_config_path": None},
    # verl 0.9: the options of engine.strategy=fsdp_turbo
    "turbo_config": {"distributed": {
        "fully_shard_parallel_size": 16, "tensor_parallel_size": 1, "expert_parallel_size": 1,
        "expert_fully_shard_parallel_size": 1, "ulysses_parallel_size": 1,
        "fsdp_plan": {"param_dtype": "bf16", "reduce_dtype": "fp32", "output_dtype": "bf16",
                      "fsdp_implementation": "native", "num_to_forward_prefetch": 1, "num_to_backward_prefetch": 1}}},
    "mixed_precision": {"param_dtype": None, "reduce_dtype": None, "buffer_dtype": None},
    "use_dynamic_bsz": None, "max_token_len_per_gpu": None, "micro_batch_size_per_gpu": None,
    "infer_max_token_len_per_gpu": None, "infer_micro_batch_size_per_gpu": None,
}

# model/hf_model.yaml (HFModelConfig)
HF_MODEL = {
    "path": None, "hf_config_path": None, "tokenizer_path": None, "use_shm": False, "trust_remote_code": False,
    "custom_chat_template": None, "external_lib": None, "override_config": {}, "enable_gradient_checkpointing": True,
    "enable_activation_offload": False, "use_remove_padding": True, "lora_rank": 0, "lora_alpha": 16,
    "target_modules": "all-linear", "exclude_modules": None, "lora_adapter_path": None,
    "use_liger": False, "use_fused_kernels": False, "fused_kernel_options": {"impl_backend": "torch"},
    "freeze_base_model": False,
    "tiled_mlp": {"enabled": False, "num_shards": 4},
    # verl 0.9: Megatron's multi-token prediction head and speculative decoding
    "mtp": {"enable": False, "enable_train": False, "enable_rollout": False, "detach_encoder": False,
            "mtp_loss_scaling_factor": 0.1, "speculative_algorithm": "EAGLE", "speculative_num_steps": 3,
            "speculative_eagle_topk": 1, "speculative_num_draft_tokens": 4, "method": "mtp",
            "num_speculative_tokens": 1},
    # verl 0.9: the LoRA group (Megatron-Bridge's PEFT settings; module names are Megatron's)
    "lora": {"type": "lora", "merge": False, "rank": 0, "alpha": 32, "dropout": 0.0,
             "target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"], "exclude_modules": [],
             "dropout_position": "pre", "lora_A_init_method": "xavier", "lora_B_init_method": "zero",
             "a2a_experimental": False, "dtype": None, "adapter_path": None, "freeze_vision_model": True,
             "freeze_vision_projection": True, "freeze_language_model": True},
}

# profiler/profiler.yaml; tool_config (per-tool settings, RL-stage oriented) is kept free-form
PROFILER = {"tool": "torch", "enable": False, "all_ranks": False, "ranks": [], "save_path": "outputs/profile",
            "relocate_results": False, "finish_hook_cmd": None, "finish_hook_all_ranks": False,  # verl 0.9
            "finish_hook_ranks": [], "tool_config": {}}

# sft_trainer.yaml (legacy fsdp_sft_trainer): its own sections are merged over the optim group (`_self_` last)
LEGACY_OWN = {
    "data": {
        **_DATA, "micro_batch_size": None, "prompt_key": "question", "response_key": "answer",
        "prompt_dict_keys": None, "response_dict_keys": None,
        "multiturn": {"enable": False, "messages_key": "messages", "tools_key": "tools",
                      "enable_thinking_key": "enable_thinking"},
        "chat_template": None,
    },
    "model": {
        "partial_pretrain": None, "use_shm": False,
        "fsdp_config": {"model_dtype": "fp32", "wrap_policy": dict(_WRAP_POLICY), "cpu_offload": False,
                        "offload_params": False},
        "external_lib": None, "enable_gradient_checkpointing": True, "trust_remote_code": False, "lora_rank": 0,
        "lora_alpha": 16, "target_modules": "all-linear", "use_liger": False, "strategy": "fsdp2",
        "lora_adapter_path": None,
    },
    "optim": {"lr": 1e-5, "betas": [0.9, 0.95], "weight_decay": 0.01, "lr_warmup_steps_ratio": 0.1, "clip_grad": 1.0,
              "lr_scheduler": "cosine",
              "warmup_steps_ratio": None},  # verl until mid-2025: the same ratio's first name
    "ulysses_sequence_parallel_size": 1,
    "use_remove_padding": False,
    # resume_path: verl until mid-2025 (its trainer did not resume and never read it)
    "trainer": {**_TRAINER, "checkpoint": dict(_CHECKPOINT), "resume_path": None},
}

# sft_trainer_engine.yaml (engine-based sft_trainer)
ENGINE_OWN = {
    "data": {
        **_DATA, "max_token_len_per_gpu": 8192, "use_dynamic_bsz": True, "messages_key": "messages",
        "tools_key": "tools", "enable_thinking_key": "enable_thinking", "pad_mode": "no_padding",
        "ignore_input_ids_mismatch": False, "image_key": "images", "video_key": "videos",
        # verl 0.7-era trees: the template's enable_thinking where a row has no enable_thinking column;
        # tokenizing the whole conversation at once instead of turn by turn
        "enable_thinking_default": None, "tokenize_whole_message": False,
    },
    # async_save, strict and save_lora_only: verl's CheckpointConfig dataclass; mbridge_config: verl 0.8
    "checkpoint": {**_CHECKPOINT, "async_save": False, "strict": True, "save_lora_only": False,
                   "mbridge_config": {"memory_efficient": True, "distributed_filesystem": True}},
    "trainer": {**_TRAINER, "seed": 1, "n_gpus_per_node": 1, "profile_interval": [-1, -1],
                "balance_batch": True},  # verl 0.8
}

# verl's other training backends: a group option shardtune refuses, with the backend's name
BACKENDS = {"megatron": "Megatron-Core", "veomni": "VeOmni", "deepspeed": "DeepSpeed", "mindspeed": "MindSpeed",
            "torchtitan": "TorchTitan", "automodel": "NeMo Automodel"}
# engine.strategy values of verl's FSDP group that are other backends (verl 0.9)
OTHER_STRATEGIES = {"fsdp_turbo": "FSDP-Turbo"}


@dataclass(frozen=True)
class VerlTrainer:
    """One verl trainer: its YAML, its config groups (name -> option -> contents) and their defaults."""

    name: str  # the verl module, for messages
    yaml: str
    own: dict[str, Any]
    groups: dict[str, dict[str, dict[str, Any]]]
    defaults: dict[str, str]
    free_form: tuple[str, ...] = field(default=())  # mappings that accept any key

    def compose(self, selected: dict[str, str]) -> dict[str, Any]:
        """verl's config with these group options: each group's contents, then the YAML's own over them."""
        tree: dict[str, Any] = {}
        for group, option in selected.items():
            tree[group] = copy.deepcopy(self.groups[group][option])
        return _merge(tree, copy.deepcopy(self.own))


def composed_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """Every leaf key of a composed config (an empty mapping counts as one key), in the config's order."""
    out = []
    for key, value in tree.items():
        out += composed_keys(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [prefix + key]
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


_FREE_FORM = ("model.override_config", "optim.override_optimizer_config", "data.apply_chat_template_kwargs",
              "model.fused_kernel_options", "profiler.tool_config")

LEGACY = VerlTrainer(
    name="verl.trainer.fsdp_sft_trainer", yaml="sft_trainer.yaml", own=LEGACY_OWN,
    groups={"optim": {"fsdp": OPTIM_FSDP}}, defaults={"optim": "fsdp"}, free_form=_FREE_FORM,
)
ENGINE = VerlTrainer(
    name="verl.trainer.sft_trainer", yaml="sft_trainer_engine.yaml", own=ENGINE_OWN,
    groups={
        "model": {"hf_model": HF_MODEL},
        # verl has one FSDP group; its strategy key picks FSDP1 or FSDP2, so engine=fsdp2 reads as that
        "engine": {"fsdp": ENGINE_FSDP, "fsdp2": {**ENGINE_FSDP, "strategy": "fsdp2"}},
        "optim": {"fsdp": OPTIM_FSDP},
        "profiler": {"profiler": PROFILER},
    },
    defaults={"model": "hf_model", "engine": "fsdp", "optim": "fsdp", "profiler": "profiler"},
    free_form=_FREE_FORM,
)
