"""verl config keys -> shardtune config keys, one table per verl trainer.

Each verl key is mapped (to a shardtune key, with an optional value conversion), ignored with a warning
(where verl's own trainer ignores it, or where ignoring it cannot change what is trained), refused (where
running would change what the user asked for; the message names the closest shardtune setting), or
handled by a function (keys that combine, or whose values are checked item by item). A test enumerates
every key of both verl configs against these tables.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shardtune.errors import ConfigError


@dataclass(frozen=True)
class Map:
    target: str
    convert: Callable[[Any], Any] | None = None
    alias: bool = False  # another verl key gives the target's default; this one counts only when set


@dataclass(frozen=True)
class Warn:
    why: str


@dataclass(frozen=True)
class Refuse:
    why: str
    allowed: tuple = (None,)  # harmless values (verl's default among them), accepted silently
    closest: str = ""  # the nearest shardtune setting, named in the message


@dataclass(frozen=True)
class Custom:
    """`handle(key, value, ctx)` assigns shardtune keys, warns or refuses through `ctx`."""

    handle: Callable[[str, Any, Any], None]


def _dtype(v: Any) -> str:
    names = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}
    if str(v) not in names:
        raise ConfigError(f"model dtype {v!r} is not supported. Fix: fp32 or bf16 (fp16 weights overflow in AdamW).")
    return names[str(v)]


def _multiturn(key: str, value: Any, ctx: Any) -> None:
    """verl's legacy trainer reads prompt/response rows and appends the tokenizer's EOS to every response;
    its multi-turn dataset trains what the chat template renders. The same here: data.append_eos=always
    for prompt/response rows (never a second EOS where the template's turn already ends with it), auto
    (an EOS only where the template writes no end-of-turn token) for messages."""
    ctx.assign("data.format", "messages" if value else "prompt_response", key)
    ctx.assign("data.append_eos", "auto" if value else "always", key)


# verl's own dataset classes, as `data.custom_cls` can name them (a module path, pkg:// or a file of verl's tree)
VERL_DATASETS = {("verl.utils.dataset.sft_dataset", "SFTDataset"): False,
                 ("verl.utils.dataset.multiturn_sft_dataset", "MultiTurnSFTDataset"): True}


def _custom_cls(key: str, value: Any, ctx: Any) -> None:
    """A custom dataset class is code shardtune does not run, except verl's own two, which are the two
    formats: SFTDataset reads prompt/response rows (data.prompt_key, ...), MultiTurnSFTDataset messages."""
    path, name = (value or {}).get("path"), (value or {}).get("name")
    if path is None and name is None:
        return
    module = str(path).removeprefix("pkg://").removesuffix(".py").replace("/", ".")
    multiturn = next((m for (mod, cls), m in VERL_DATASETS.items() if module.endswith(mod) and name == cls), None)
    if multiturn is None:
        ctx.refuse(f"{key}={{path: {path!r}, name: {name!r}}}",
                   "custom dataset classes are not supported (verl's own SFTDataset and MultiTurnSFTDataset are: "
                   "data.format=prompt_response and messages); closest shardtune setting: data.format")
    else:
        _multiturn(key, multiturn, ctx)


def _chat_template_kwargs(key: str, value: Any, ctx: Any) -> None:
    """verl passes data.enable_thinking_default to the chat template as enable_thinking where a row has no
    enable_thinking column; shardtune's rows override data.apply_chat_template_kwargs the same way."""
    kwargs, default_key = dict(value or {}), "data.enable_thinking_default"
    default = ctx.tree["data"].get("enable_thinking_default")
    default = {"none": None, "null": None, "true": True, "false": False}.get(str(default).lower(), default)
    if default is not None and not isinstance(default, bool):
        ctx.refuse(f"{default_key}={default!r}", "one of true, false, none")
    elif default is not None and "enable_thinking" not in kwargs:
        kwargs["enable_thinking"] = default
    ctx.assign("data.apply_chat_template_kwargs", kwargs, key if ctx.is_set(key) else default_key)


def _test_freq(key: str, value: Any, ctx: Any) -> None:
    """Without data.val_files there is nothing to validate: verl's engine trainer then skips validation (its
    legacy one read the ~/data/gsm8k/test.parquet default, which shardtune does not have); so does shardtune."""
    if value not in (None, -1) and not ctx.tree["data"].get("val_files"):
        if ctx.is_set(key):
            ctx.note(key, f"{value!r} asks for validation, but the line gives no data.val_files: no validation runs "
                          "(set data.val_files to validate)")
        value = -1
    ctx.assign("trainer.test_freq", value, key)


def _save_contents(key: str, value: Any, ctx: Any) -> None:
    """shardtune's checkpoints always hold the model shards (resume and `shardtune export` read them): a
    verl line that saves only the Hugging Face weights (`[hf_model]`) gets them too."""
    contents = [value] if isinstance(value, str) else list(value or [])
    if value is not None and "model" not in contents:
        if ctx.is_set(key):
            ctx.note(key, f"{contents}: the model shards are saved too (shardtune resumes and exports from them)")
        contents = ["model", *contents]
    ctx.assign("checkpoint.save_contents", contents if value is not None else None, key)


def _token_budget(key: str, value: Any, ctx: Any, alias: bool) -> None:
    """verl's engine packs micro-batches of max_token_len_per_gpu x the sequence-parallel size tokens and each
    GPU holds its share after the Ulysses split; shardtune's data.max_token_len_per_gpu bounds a micro-batch
    before the split. The same micro-batches: the verl value times the SP size."""
    if value is None:
        return
    sp = int(ctx.tree["engine"].get("ulysses_sequence_parallel_size") or 1)
    if sp > 1 and ctx.is_set(key):
        ctx.note(key, f"{value} per GPU after the sequence-parallel split is data.max_token_len_per_gpu={value * sp} "
                      f"in shardtune, which bounds a micro-batch before the split ({sp} ranks share it)")
    ctx.assign("data.max_token_len_per_gpu", value * sp, key, alias)


def _fsdp_size(key: str, value: Any, ctx: Any) -> None:
    """verl shards over all ranks when fsdp_size is -1 or at least the number of processes."""
    world = int(os.environ.get("WORLD_SIZE", "0"))
    size = -1 if world and isinstance(value, int) and value >= world else value
    ctx.assign("engine.fsdp_size", size, key)


def _pad_mode(key: str, value: Any, ctx: Any) -> None:
    """verl's pad mode is how its dataset hands samples to the engine; shardtune's datasets never pad
    samples, and the batch layout follows model.use_remove_padding, as verl's FSDP engine does."""
    if value not in ("no_padding", "right", "left_right"):
        ctx.refuse(key, f"{value!r} is not one of verl's pad modes (no_padding, right, left_right)")


LOGGER_ALIASES = {"tracking": "wandb", "vemlp_wandb": "wandb", "file": "file"}  # verl's deprecated/vendor names
UNSUPPORTED_LOGGERS = ("swanlab", "clearml", "trackio")


def _logger(key: str, value: Any, ctx: Any) -> None:
    sinks = [value] if isinstance(value, str) else list(value or [])
    dropped = [s for s in sinks if s in UNSUPPORTED_LOGGERS]
    if dropped:
        ctx.warn(key, f"the {', '.join(dropped)} sink{'s are' if len(dropped) > 1 else ' is'} not built in; "
                      "metrics.jsonl holds every metric (trainer.logger also takes tensorboard, wandb, mlflow)")
    ctx.assign("trainer.logger", [LOGGER_ALIASES.get(s, s) for s in sinks if s not in UNSUPPORTED_LOGGERS], key)


# torch.optim.AdamW arguments in verl's optim.override_optimizer_config
ADAMW_SPEED = ("fused", "foreach", "capturable", "differentiable")  # how the step runs, not what it computes
ADAMW_SAME = {"eps": "optim.eps", "lr": "optim.lr", "weight_decay": "optim.weight_decay", "betas": "optim.betas"}
ADAMW_OFF = ("amsgrad", "maximize")  # change the update rule when true


def _override_optimizer(key: str, value: Any, ctx: Any) -> None:
    """verl passes these to the optimizer's constructor after its own arguments (they win)."""
    for name, v in (value or {}).items():
        sub = f"{key}.{name}"
        if name in ADAMW_SAME:
            ctx.assign(ADAMW_SAME[name], v, sub)
        elif name in ADAMW_SPEED:
            ctx.warn(sub, "shardtune picks torch's fused AdamW kernel where it covers the parameters (foreach "
                          "elsewhere); the update is the same")
        elif name in ADAMW_OFF and v:
            ctx.refuse(sub, f"AdamW with {name}=True is another update rule; shardtune trains with plain "
                            "torch.optim.AdamW (closest: leave it out)")
        elif name not in ADAMW_OFF:
            ctx.refuse(sub, "not an argument of torch.optim.AdamW, the optimizer shardtune trains with "
                            f"(AdamW takes {', '.join([*ADAMW_SAME, *ADAMW_OFF, *ADAMW_SPEED])})")


def _override_config(key: str, value: Any, ctx: Any) -> None:
    """verl sets these on the Hugging Face config before the model is built (attn_implementation picks
    the attention kernel); shardtune checks each is a field of the model's config before loading it."""
    fields = dict(value or {})
    if "attn_implementation" in fields:
        ctx.assign("model.attn_implementation", fields.pop("attn_implementation"), f"{key}.attn_implementation")
    if fields:
        ctx.assign("model.override_config", fields, key)


def _legacy_offload(key: str, value: Any, ctx: Any) -> None:
    """verl's legacy trainer offloads (FSDP CPUOffload) only when both cpu_offload and offload_params are on."""
    fsdp = ctx.tree["model"]["fsdp_config"]
    ctx.assign("engine.param_offload", bool(fsdp.get("cpu_offload") and fsdp.get("offload_params")),
               "model.fsdp_config.offload_params" if ctx.is_set("model.fsdp_config.offload_params") else key)


def _engine_offload(key: str, value: Any, ctx: Any) -> None:
    """verl's param_offload (between phases) and offload_policy (FSDP2 CPUOffloadPolicy) are both shardtune's
    CPUOffloadPolicy: they change memory and speed, not the numbers."""
    engine = ctx.tree["engine"]
    ctx.assign("engine.param_offload", bool(engine.get("param_offload") or engine.get("offload_policy")),
               "engine.offload_policy" if ctx.is_set("engine.offload_policy") else key)


READ_BY_ITS_PAIR = Custom(lambda key, value, ctx: None)  # accepted here; the rule of the key it pairs with reads it


LAUNCHER = Custom(lambda key, value, ctx: None)  # read by the entry point that starts the processes


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
    "data.custom_cls": Custom(_custom_cls),
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
    "optim.override_optimizer_config": Custom(_override_optimizer),
    "trainer.default_local_dir": Map("trainer.default_local_dir"),
    "trainer.default_hdfs_dir": Map("trainer.remote_dir"),
    "trainer.project_name": Map("trainer.project_name"),
    "trainer.experiment_name": Map("trainer.experiment_name"),
    "trainer.total_epochs": Map("trainer.total_epochs"),
    "trainer.total_training_steps": Map("trainer.total_training_steps"),
    "trainer.logger": Custom(_logger),
    "trainer.save_freq": Map("trainer.save_freq"),
    "trainer.test_freq": Custom(_test_freq),
    "trainer.nnodes": Warn(LAUNCH),
    "trainer.n_gpus_per_node": Warn(LAUNCH),
    "trainer.max_ckpt_to_keep": Map("trainer.max_ckpt_to_keep"),
    "trainer.resume_mode": Map("trainer.resume_mode"),
    "trainer.resume_from_path": Map("trainer.resume_from_path"),
    "trainer.device": Warn("the device is chosen automatically (CUDA when present)"),
}

# keys of verl's optim/fsdp.yaml that the legacy trainer's optim group brings in but its code never reads
_LEGACY_IGNORED_OPTIM = ("lr_scheduler_type", "warmup_style", "min_lr_ratio", "num_cycles", "lr_warmup_steps",
                         "total_training_steps")

LEGACY: dict[str, Any] = {
    **COMMON,
    "data.micro_batch_size": Map("data.micro_batch_size_per_gpu", alias=True),  # deprecated in verl
    "data.prompt_key": Map("data.prompt_key"),
    "data.response_key": Map("data.response_key"),
    "data.prompt_dict_keys": Map("data.prompt_dict_keys"),
    "data.response_dict_keys": Map("data.response_dict_keys"),
    "data.multiturn.enable": Custom(_multiturn),
    # verl's legacy dataset never reads these three (it uses the top-level names); shardtune honours them
    "data.multiturn.messages_key": Map("data.messages_key"),
    "data.multiturn.tools_key": Map("data.tools_key"),
    "data.multiturn.enable_thinking_key": Map("data.enable_thinking_key"),
    "data.chat_template": Map("data.chat_template"),
    "model.partial_pretrain": Map("model.path"),
    "model.fsdp_config.model_dtype": Map("model.dtype", _dtype),
    "model.fsdp_config.wrap_policy.min_num_params": Warn(WRAP),
    "model.fsdp_config.wrap_policy.transformer_layer_cls_to_wrap": Warn(WRAP),
    "model.fsdp_config.wrap_policy.disable": Warn(WRAP),
    "model.fsdp_config.cpu_offload": Custom(_legacy_offload),
    "model.fsdp_config.offload_params": READ_BY_ITS_PAIR,  # read by model.fsdp_config.cpu_offload's rule
    "model.strategy": Map("engine.strategy"),
    "optim.lr_scheduler": Map("optim.lr_scheduler_type"),
    "optim.warmup_steps_ratio": Map("optim.lr_warmup_steps_ratio", alias=True),  # its name in verl until mid-2025
    **{f"optim.{k}": Warn(LEGACY_OPTIM) for k in _LEGACY_IGNORED_OPTIM},
    "ulysses_sequence_parallel_size": Map("ulysses_sequence_parallel_size"),
    "use_remove_padding": Map("model.use_remove_padding"),
    "trainer.seed": Map("trainer.seed"),
    "trainer.checkpoint.save_contents": Custom(_save_contents),
    "trainer.checkpoint.load_contents": Map("checkpoint.load_contents"),
    "trainer.resume_path": Warn("verl's fsdp_sft_trainer of the versions that had this key never read it (they did "
                                "not resume), so the run starts fresh as it did in verl; to resume, "
                                "trainer.resume_mode=resume_path trainer.resume_from_path=DIR"),
}

ENGINE: dict[str, Any] = {
    **COMMON,
    "data.max_token_len_per_gpu": Custom(lambda key, value, ctx: _token_budget(key, value, ctx, alias=False)),
    "data.use_dynamic_bsz": Map("data.use_dynamic_bsz"),
    "data.messages_key": Map("data.messages_key"),
    "data.tools_key": Map("data.tools_key"),
    "data.enable_thinking_key": Map("data.enable_thinking_key"),
    "data.pad_mode": Custom(_pad_mode),
    "data.ignore_input_ids_mismatch": Map("data.ignore_input_ids_mismatch"),
    "data.apply_chat_template_kwargs": Custom(_chat_template_kwargs),
    "data.enable_thinking_default": READ_BY_ITS_PAIR,  # read by data.apply_chat_template_kwargs's rule
    "data.tokenize_whole_message": Warn("shardtune always renders the whole conversation once and finds each "
                                        "assistant turn in it"),
    # read by verl's SFTDataset, which data.custom_cls can name; on the engine trainer they come with `+`
    "data.prompt_key": Map("data.prompt_key"),
    "data.response_key": Map("data.response_key"),
    "data.prompt_dict_keys": Map("data.prompt_dict_keys"),
    "data.response_dict_keys": Map("data.response_dict_keys"),
    "data.image_key": Refuse("images are not supported (text-only SFT)", allowed=(None, "images"),
                             closest="data.messages_key"),
    "data.video_key": Refuse("videos are not supported (text-only SFT)", allowed=(None, "videos"),
                             closest="data.messages_key"),
    "checkpoint.save_contents": Custom(_save_contents),
    "checkpoint.load_contents": Map("checkpoint.load_contents"),
    "checkpoint.async_save": Map("checkpoint.async_save"),
    "trainer.seed": Map("trainer.seed", alias=True),  # engine.seed seeds verl's engine trainer
    "trainer.profile_interval": Warn("profiling is not built in; use torch.profiler around shardtune"),
    "trainer.balance_batch": Warn("shardtune plans each step's micro-batches by token count over the ranks "
                                  "(data.use_dynamic_bsz) and weighs the loss by tokens; the results do not "
                                  "depend on it"),
    "model.path": Map("model.path"),
    "model.hf_config_path": Refuse("a separate config path is not supported", closest="model.override_config"),
    "model.tokenizer_path": Map("model.tokenizer_path"),
    "model.custom_chat_template": Map("data.chat_template"),
    "model.override_config": Custom(_override_config),
    "model.enable_activation_offload": Map("model.enable_activation_offload"),
    "model.use_remove_padding": Map("model.use_remove_padding"),
    "model.exclude_modules": Map("model.exclude_modules"),
    "model.lora": Warn("Megatron LoRA options; FSDP2 LoRA uses model.lora_rank"),
    "model.use_fused_kernels": Warn(SPEED),
    "model.fused_kernel_options": Warn(SPEED),
    "model.tiled_mlp.enabled": Refuse("tiled MLP is not supported", allowed=(None, False),
                                      closest="model.loss_chunk_size"),
    "model.tiled_mlp.num_shards": Warn(SPEED),
    "model.mtp": Warn("multi-token prediction is an RL / Megatron option group"),
    "engine.wrap_policy.min_num_params": Warn(WRAP),
    "engine.wrap_policy.transformer_layer_cls_to_wrap": Warn(WRAP),
    "engine.wrap_policy.disable": Warn(WRAP),
    "engine.param_offload": Custom(_engine_offload),
    "engine.offload_policy": READ_BY_ITS_PAIR,  # read by engine.param_offload's rule
    "engine.optimizer_offload": Map("engine.optimizer_offload"),
    "engine.reshard_after_forward": Map("engine.reshard_after_forward"),
    "engine.fsdp_size": Custom(_fsdp_size),
    "engine.forward_prefetch": Warn(SPEED),
    "engine.model_dtype": Map("model.dtype", _dtype),
    "engine.use_orig_params": Warn("FSDP2 always keeps the original parameters"),
    "engine.seed": Map("trainer.seed"),
    "engine.full_determinism": Warn("CPU runs are deterministic; on GPU set CUBLAS_WORKSPACE_CONFIG yourself"),
    "engine.ulysses_sequence_parallel_size": Map("engine.ulysses_sequence_parallel_size"),
    "engine.entropy_from_logits_with_chunking": Warn("an RL option; SFT computes no entropy"),
    "engine.entropy_checkpointing": Warn("an RL option; SFT computes no entropy"),
    "engine.use_torch_compile": Warn("verl compiles its log-prob helpers with it, a speed option; the results "
                                     "are the same without it"),
    "engine.forward_only": Refuse("forward-only engines do not train", allowed=(None, False)),
    "engine.strategy": Map("engine.strategy"),
    "engine.dtype": Warn("unused by verl's FSDP engine too"),
    "engine.mixed_precision.param_dtype": Map("engine.mixed_precision.param_dtype", _dtype),
    "engine.mixed_precision.reduce_dtype": Map("engine.mixed_precision.reduce_dtype", _dtype),
    "engine.mixed_precision.buffer_dtype": Warn("buffers keep the model dtype"),
    "engine.use_dynamic_bsz": Map("data.use_dynamic_bsz", alias=True),
    "engine.max_token_len_per_gpu": Custom(lambda key, value, ctx: _token_budget(key, value, ctx, alias=True)),
    "engine.micro_batch_size_per_gpu": Map("data.micro_batch_size_per_gpu", alias=True),
    "engine.infer_max_token_len_per_gpu": Warn("an inference option"),
    "engine.infer_micro_batch_size_per_gpu": Warn("an inference option"),
    "optim.lr_warmup_steps": Map("optim.lr_warmup_steps"),
    "optim.total_training_steps": Warn("filled in by the trainer, as in verl"),
    "optim.min_lr_ratio": Map("optim.min_lr_ratio"),
    "optim.num_cycles": Map("optim.num_cycles"),
    "optim.lr_scheduler_type": Map("optim.lr_scheduler_type"),
    "optim.warmup_style": Map("optim.lr_scheduler_type", alias=True),  # verl's deprecated alias
}
# whole option groups verl defines for RL, profiling and Megatron checkpoints
ENGINE_PREFIX_WARN = {"profiler.": "profiling is not built in; use torch.profiler around shardtune",
                      "checkpoint.mbridge_config.": "Megatron-bridge checkpoint options"}

# shardtune settings implied by the engine trainer, which reads multi-turn data only (not verl keys)
ENGINE_IMPLIED = {"data.format": "messages"}
