"""verl config keys -> shardtune config keys, one table per verl trainer.

Each verl key is mapped (to a shardtune key, with an optional value conversion), ignored with a warning
(where verl's own trainer ignores it, or where ignoring it cannot change what is trained), refused (where
running would change what the user asked for; the message names the closest shardtune setting), or
handled by a function (keys that combine, or whose values are checked item by item; rules.py, lora.py).
A test enumerates every key of both verl configs against these tables.
"""

from __future__ import annotations

from typing import Any

from shardtune.verl import lora, rules
from shardtune.verl.rules import LAUNCHER, READ_BY_ITS_PAIR, Custom, Map, Refuse, Warn

__all__ = ["COMMON", "ENGINE", "LEGACY", "LAUNCHER", "Custom", "Map", "Refuse", "Warn"]

HARMLESS = "shardtune ignores it; it does not change what is trained"
LAUNCH = "the number of processes comes from torchrun"
SPEED = "a speed option shardtune does not implement; the results are the same without it"
WRAP = "FSDP2 wraps each decoder layer (and the root)"
DATA_LOADING = "shardtune tokenizes once into a cache and prepares batches in a background thread (data.prefetch_steps)"
LEGACY_OPTIM = ("verl's fsdp_sft_trainer does not read it (its schedule comes from optim.lr_scheduler and "
                "optim.lr_warmup_steps_ratio), so neither does shardtune: the same run as in verl")

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
    "data.num_workers": Warn(DATA_LOADING),
    "data.apply_chat_template_kwargs": Map("data.apply_chat_template_kwargs"),
    "data.custom_cls": Custom(rules.custom_cls),
    "model.trust_remote_code": Map("model.trust_remote_code"),
    "model.enable_gradient_checkpointing": Map("model.enable_gradient_checkpointing"),
    "model.lora_rank": Map("model.lora_rank"),
    "model.lora_alpha": Map("model.lora_alpha"),
    "model.target_modules": Map("model.target_modules"),
    "model.lora_adapter_path": Map("model.lora_adapter_path"),
    "model.use_shm": Warn(HARMLESS),
    "model.use_liger": Map("model.use_liger"),
    "model.external_lib": Refuse("importing external model code is not supported", closest="model.trust_remote_code"),
    # verl's speculator training (a draft head on a frozen base model): another training objective
    "model.speculator": Refuse("speculator training is not supported", allowed=(None, {}), closest="model.lora_rank"),
    "model.speculator_adapter": Refuse("speculator training is not supported", allowed=(None, {}),
                                       closest="model.lora_rank"),
    "model.freeze_base_model": Refuse("speculator training is not supported", allowed=(None, False),
                                      closest="model.lora_rank"),
    "optim.lr": Map("optim.lr"),
    "optim.betas": Map("optim.betas"),
    "optim.weight_decay": Map("optim.weight_decay"),
    "optim.lr_warmup_steps_ratio": Map("optim.lr_warmup_steps_ratio"),
    "optim.clip_grad": Map("optim.clip_grad"),
    "optim.optimizer": Refuse("shardtune trains with torch AdamW only", allowed=(None, "AdamW", "adamw"),
                              closest="optim.optimizer=AdamW"),
    "optim.optimizer_impl": Refuse("shardtune trains with torch.optim.AdamW", allowed=(None, "torch.optim"),
                                   closest="optim.optimizer_impl=torch.optim"),
    "optim.override_optimizer_config": Custom(rules.override_optimizer),
    "trainer.default_local_dir": Map("trainer.default_local_dir"),
    "trainer.default_hdfs_dir": Map("trainer.remote_dir"),
    "trainer.project_name": Map("trainer.project_name"),
    "trainer.experiment_name": Map("trainer.experiment_name"),
    "trainer.total_epochs": Map("trainer.total_epochs"),
    "trainer.total_training_steps": Map("trainer.total_training_steps"),
    "trainer.logger": Custom(rules.logger),
    "trainer.save_freq": Map("trainer.save_freq"),
    "trainer.test_freq": Custom(rules.test_freq),
    "trainer.nnodes": Warn(LAUNCH),
    "trainer.n_gpus_per_node": Warn(LAUNCH),
    "trainer.max_ckpt_to_keep": Map("trainer.max_ckpt_to_keep"),
    "trainer.resume_mode": Map("trainer.resume_mode"),
    "trainer.resume_from_path": Map("trainer.resume_from_path"),
    "trainer.device": Warn("the device is chosen automatically (CUDA when present)"),
}

# keys of verl's optim/fsdp.yaml that the legacy trainer's optim group brings in but its code never reads
_LEGACY_IGNORED_OPTIM = ("lr_scheduler_type", "warmup_style", "min_lr_ratio", "num_cycles", "lr_warmup_steps",
                         "total_training_steps", "zero_indexed_step")

LEGACY: dict[str, Any] = {
    **COMMON,
    "data.micro_batch_size": Map("data.micro_batch_size_per_gpu", alias=True),  # deprecated in verl
    "data.prompt_key": Map("data.prompt_key"),
    "data.response_key": Map("data.response_key"),
    "data.prompt_dict_keys": Map("data.prompt_dict_keys"),
    "data.response_dict_keys": Map("data.response_dict_keys"),
    "data.multiturn.enable": Custom(rules.multiturn),
    # verl's legacy dataset never reads these three (it uses the top-level names); shardtune honours them
    "data.multiturn.messages_key": Map("data.messages_key"),
    "data.multiturn.tools_key": Map("data.tools_key"),
    "data.multiturn.enable_thinking_key": Map("data.enable_thinking_key"),
    "data.chat_template": Map("data.chat_template"),
    "model.partial_pretrain": Map("model.path"),
    "model.fsdp_config.model_dtype": Map("model.dtype", rules.dtype),
    "model.fsdp_config.wrap_policy.min_num_params": Warn(WRAP),
    "model.fsdp_config.wrap_policy.transformer_layer_cls_to_wrap": Warn(WRAP),
    "model.fsdp_config.wrap_policy.disable": Warn(WRAP),
    "model.fsdp_config.cpu_offload": Custom(rules.legacy_offload),
    "model.fsdp_config.offload_params": READ_BY_ITS_PAIR,  # read by model.fsdp_config.cpu_offload's rule
    "model.strategy": Map("engine.strategy"),
    "optim.lr_scheduler": Map("optim.lr_scheduler_type"),
    "optim.warmup_steps_ratio": Map("optim.lr_warmup_steps_ratio", alias=True),  # its name in verl until mid-2025
    **{f"optim.{k}": Warn(LEGACY_OPTIM) for k in _LEGACY_IGNORED_OPTIM},
    "ulysses_sequence_parallel_size": Map("ulysses_sequence_parallel_size"),
    "use_remove_padding": Map("model.use_remove_padding"),
    "trainer.seed": Map("trainer.seed"),
    "trainer.checkpoint.save_contents": Custom(rules.save_contents),
    "trainer.checkpoint.load_contents": Map("checkpoint.load_contents"),
    "trainer.resume_path": Warn("verl's fsdp_sft_trainer of the versions that had this key never read it (they did "
                                "not resume), so the run starts fresh as it did in verl; to resume, "
                                "trainer.resume_mode=resume_path trainer.resume_from_path=DIR"),
}

ENGINE: dict[str, Any] = {
    **COMMON,
    "data.max_token_len_per_gpu": Custom(lambda key, value, ctx: rules.token_budget(key, value, ctx, alias=False)),
    "data.use_dynamic_bsz": Map("data.use_dynamic_bsz"),
    "data.messages_key": Map("data.messages_key"),
    "data.tools_key": Map("data.tools_key"),
    "data.enable_thinking_key": Map("data.enable_thinking_key"),
    "data.pad_mode": Custom(rules.pad_mode),
    "data.ignore_input_ids_mismatch": Map("data.ignore_input_ids_mismatch"),
    "data.apply_chat_template_kwargs": Custom(rules.chat_template_kwargs),
    "data.enable_thinking_default": READ_BY_ITS_PAIR,  # read by data.apply_chat_template_kwargs's rule
    "data.tokenize_whole_message": Warn("shardtune always renders the whole conversation once and finds each "
                                        "assistant turn in it"),
    # read by verl's SFTDataset, which data.custom_cls can name; on the engine trainer they come with `+`
    "data.prompt_key": Map("data.prompt_key"),
    "data.response_key": Map("data.response_key"),
    "data.prompt_dict_keys": Map("data.prompt_dict_keys"),
    "data.response_dict_keys": Map("data.response_dict_keys"),
    "data.image_key": Map("data.image_key"),  # verl 0.7/0.8's engine YAML; its dataset reads it
    "data.video_key": Map("data.video_key"),
    "checkpoint.save_contents": Custom(rules.save_contents),
    "checkpoint.load_contents": Map("checkpoint.load_contents"),
    "checkpoint.async_save": Map("checkpoint.async_save"),
    "checkpoint.save_lora_only": Warn("shardtune's checkpoints hold the whole model's shards (resume and export read "
                                      "them), so they are not smaller; what is trained is the same. `shardtune export "
                                      "--adapter-only` writes the adapter alone"),
    "checkpoint.strict": Warn("verl's check of the exported weights; shardtune's export always loads every weight "
                              "of the checkpoint"),
    "trainer.seed": Map("trainer.seed", alias=True),  # engine.seed seeds verl's engine trainer
    "trainer.profile_interval": Warn("profiling is not built in; use torch.profiler around shardtune"),
    "trainer.balance_batch": Warn("shardtune plans each step's micro-batches by token count over the ranks "
                                  "(data.use_dynamic_bsz) and weighs the loss by tokens; the results do not "
                                  "depend on it"),
    "model.path": Map("model.path"),
    "model.hf_config_path": Refuse("a separate config path is not supported", closest="model.override_config"),
    "model.tokenizer_path": Map("model.tokenizer_path"),
    "model.custom_chat_template": Map("data.chat_template"),
    "model.override_config": Custom(rules.override_config),
    "model.enable_activation_offload": Map("model.enable_activation_offload"),
    "model.use_remove_padding": Map("model.use_remove_padding"),
    "model.exclude_modules": Map("model.exclude_modules"),
    "model.lora": Custom(lora.group),  # verl 0.9's LoRA group
    "model.use_fused_kernels": Warn(SPEED),
    "model.fused_kernel_options": Warn(SPEED),
    "model.tiled_mlp.enabled": Refuse("tiled MLP is not supported", allowed=(None, False),
                                      closest="model.loss_chunk_size"),
    "model.tiled_mlp.num_shards": Warn(SPEED),
    "model.mtp": rules.enabled_group(rules.MTP, "model.mtp.enable=False"),
    "engine.wrap_policy.min_num_params": Warn(WRAP),
    "engine.wrap_policy.transformer_layer_cls_to_wrap": Warn(WRAP),
    "engine.wrap_policy.disable": Warn(WRAP),
    "engine.param_offload": Custom(rules.engine_offload),
    "engine.offload_policy": READ_BY_ITS_PAIR,  # read by engine.param_offload's rule
    "engine.optimizer_offload": Map("engine.optimizer_offload"),
    "engine.reshard_after_forward": Map("engine.reshard_after_forward"),
    "engine.fsdp_size": Custom(rules.fsdp_size),
    "engine.forward_prefetch": Warn(SPEED),
    "engine.model_dtype": Map("model.dtype", rules.dtype),
    "engine.use_orig_params": Warn("FSDP2 always keeps the original parameters"),
    "engine.seed": Map("trainer.seed"),
    "engine.full_determinism": Warn("CPU runs are deterministic; on GPU set CUBLAS_WORKSPACE_CONFIG yourself"),
    "engine.ulysses_sequence_parallel_size": Map("engine.ulysses_sequence_parallel_size"),
    "engine.entropy_from_logits_with_chunking": Warn("an RL option; SFT computes no entropy"),
    "engine.entropy_checkpointing": Warn("an RL option; SFT computes no entropy"),
    "engine.entropy_from_logits_chunk_size": Warn("an RL option; SFT computes no entropy"),
    "engine.use_no_sync_for_gradient_accumulation": Map("engine.reduce_grads_every_micro_batch", lambda v: not v),
    "engine.pad_to_length": Custom(rules.pad_to_length),
    "engine.pad_to_length_bucket": READ_BY_ITS_PAIR,  # read by engine.pad_to_length's rule
    "engine.qat": rules.enabled_group(rules.QAT, "model.dtype"),
    "engine.turbo_config": Warn("the options of verl's engine.strategy=fsdp_turbo backend"),
    "engine.use_torch_compile": Warn("verl compiles its log-prob helpers with it, a speed option; the results "
                                     "are the same without it"),
    "engine.forward_only": Refuse("forward-only engines do not train", allowed=(None, False)),
    "engine.strategy": Map("engine.strategy"),
    "engine.dtype": Warn("unused by verl's FSDP engine too"),
    "engine.mixed_precision.param_dtype": Map("engine.mixed_precision.param_dtype", rules.dtype),
    "engine.mixed_precision.reduce_dtype": Map("engine.mixed_precision.reduce_dtype", rules.dtype),
    "engine.mixed_precision.buffer_dtype": Warn("buffers keep the model dtype"),
    "engine.use_dynamic_bsz": Map("data.use_dynamic_bsz", alias=True),
    "engine.max_token_len_per_gpu": Custom(lambda key, value, ctx: rules.token_budget(key, value, ctx, alias=True)),
    "engine.micro_batch_size_per_gpu": Map("data.micro_batch_size_per_gpu", alias=True),
    "engine.infer_max_token_len_per_gpu": Warn("an inference option"),
    "engine.infer_micro_batch_size_per_gpu": Warn("an inference option"),
    "optim.lr_warmup_steps": Map("optim.lr_warmup_steps"),
    "optim.total_training_steps": Warn("filled in by the trainer, as in verl"),
    "optim.min_lr_ratio": Map("optim.min_lr_ratio"),
    "optim.num_cycles": Map("optim.num_cycles"),
    "optim.lr_scheduler_type": Map("optim.lr_scheduler_type"),
    "optim.warmup_style": Map("optim.lr_scheduler_type", alias=True),  # verl's deprecated alias
    "optim.zero_indexed_step": Custom(rules.zero_indexed_step),
}
# whole option groups verl defines for RL, profiling and Megatron checkpoints
ENGINE_PREFIX_WARN = {"profiler.": "profiling is not built in; use torch.profiler around shardtune",
                      "checkpoint.mbridge_config.": "Megatron-bridge checkpoint options"}

# shardtune settings implied by the engine trainer, which reads multi-turn data only (not verl keys)
ENGINE_IMPLIED = {"data.format": "messages"}
