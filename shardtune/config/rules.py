"""Cross-field rules: what involves several keys (or the number of processes), checked before any model or
data is loaded."""

from __future__ import annotations

import importlib.util

from shardtune.config.schema import ENGINE_ALIASES, LOGGER_PACKAGES, LOGGERS, Config, ModelConfig
from shardtune.config.sources import resolve_sources, weight_key_problem
from shardtune.config.urls import check_url, is_url
from shardtune.errors import ConfigError


def validate(cfg: Config, world_size: int = 1) -> Config:
    """Check rules that involve several keys (or the world size). Raises `ConfigError`; returns `cfg`."""
    for ok, message in _data_model_rules(cfg, world_size) + _optim_trainer_rules(cfg):
        if not ok:
            raise ConfigError(message)
    _check_parallel(cfg, world_size)
    _check_eval(cfg)
    data = cfg.data
    for key, entries, max_samples in (("data.train_files", data.train_files, data.train_max_samples),
                                      ("data.val_files", data.val_files, data.val_max_samples)):
        sources = resolve_sources(entries, data, max_samples, key)
        for source in sources:
            for path in source.paths:
                if is_url(path):  # credentials in it, or no filesystem for its scheme: refused here
                    check_url(path, key)
        if data.streaming and key == "data.train_files" and len(sources) > 1 and data.mixture_unit == "tokens":
            raise ConfigError(f"data.mixture_unit=tokens divides the weights of {len(sources)} training sources by "
                              "their mean sample lengths, which a stream does not know before it has been read. "
                              "Fix: data.mixture_unit=samples (weights divide samples), or data.streaming=false.")
    trainer = cfg.trainer
    for sink in trainer.logger:
        package = LOGGER_PACKAGES.get(sink)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"trainer.logger includes {sink}, but the '{package}' package is not installed. "
                              f"Fix: pip install 'shardtune[{sink}]', or drop {sink} from trainer.logger.")
    if cfg.model.load_in_4bit and importlib.util.find_spec("torchao") is None:
        raise ConfigError("model.load_in_4bit=true needs torchao (its NF4 tensor shards under FSDP2). "
                          "Fix: pip install 'shardtune[qlora]'.")
    if "{" in trainer.default_local_dir:
        try:
            _ = cfg.run_dir
        except (KeyError, IndexError):
            raise ConfigError(
                f"trainer.default_local_dir='{trainer.default_local_dir}' uses an unknown placeholder. "
                "Fix: only {project_name} and {experiment_name} are filled in."
            ) from None
    if trainer.remote_dir:
        check_url(trainer.remote_dir, "trainer.remote_dir")
    return cfg


def _data_model_rules(cfg: Config, world_size: int) -> list[tuple[bool, str]]:
    data = cfg.data
    return [
        (bool(cfg.model.path), "model.path is required. Fix: model.path=/path/to/hf_model_folder."),
        (bool(data.train_files), "data.train_files is required. Fix: data.train_files=train.parquet (or [a,b])."),
        (data.max_length > 1, f"data.max_length must be > 1, got {data.max_length}."),
        (data.train_batch_size >= 1, f"data.train_batch_size must be >= 1, got {data.train_batch_size}."),
        (data.prefetch_steps >= 0,
         f"data.prefetch_steps must be >= 0 (0 = no prefetching), got {data.prefetch_steps}."),
        (data.shuffle_buffer >= 1, f"data.shuffle_buffer must be >= 1 (samples), got {data.shuffle_buffer}."),
        (not data.streaming or cfg.trainer.total_training_steps is not None,
         "data.streaming=true needs trainer.total_training_steps: a stream's epoch length is unknown until it has "
         "been read, so the run's length (and the learning-rate schedule) cannot come from trainer.total_epochs. "
         "Fix: set trainer.total_training_steps=N."),
        # a tokenized dataset is checked against the budget once built (data/dataset.py); a stream cannot be
        (not (data.streaming and data.use_dynamic_bsz) or data.max_token_len_per_gpu >= data.max_length,
         f"data.max_token_len_per_gpu={data.max_token_len_per_gpu} is below data.max_length={data.max_length}: a "
         "streamed sample could exceed the budget, and a stream is not read ahead to check. Fix: raise "
         "data.max_token_len_per_gpu or lower data.max_length."),
        (data.micro_batch_size_per_gpu >= 1,
         f"data.micro_batch_size_per_gpu must be >= 1, got {data.micro_batch_size_per_gpu}."),
        (data.train_batch_size % max(1, world_size // cfg.sp_size) == 0 or world_size % cfg.sp_size != 0,
         f"data.train_batch_size={data.train_batch_size} must be divisible by the number of data-parallel "
         f"ranks ({world_size // cfg.sp_size}). Fix: pick a multiple of {world_size // cfg.sp_size}."),
        (cfg.model.neftune_noise_alpha >= 0,
         f"model.neftune_noise_alpha must be >= 0 (0 = off), got {cfg.model.neftune_noise_alpha}."),
        (cfg.model.neftune_noise_alpha == 0 or cfg.sp_size == 1,
         "model.neftune_noise_alpha scales the noise by each sequence's length, which a rank of a sequence-parallel "
         "group does not see whole. Fix: engine.ulysses_sequence_parallel_size=1, or model.neftune_noise_alpha=0."),
        (cfg.model.lora_rank >= 0, f"model.lora_rank must be >= 0 (0 = off), got {cfg.model.lora_rank}."),
        (not cfg.model.use_dora or cfg.model.lora_rank > 0, "model.use_dora=true needs model.lora_rank > 0 (LoRA on)."),
        (data.pad_to_length_bucket >= 0,
         f"data.pad_to_length_bucket must be >= 0 tokens (0 = off), got {data.pad_to_length_bucket}."),
        (not data.pad_to_length_bucket or cfg.model.use_remove_padding,
         f"data.pad_to_length_bucket={data.pad_to_length_bucket} pads packed micro-batches, and "
         "model.use_remove_padding=false trains right-padded rows. Fix: model.use_remove_padding=true, or "
         "data.pad_to_length_bucket=0."),
        (cfg.model.loss_chunk_size >= 0,
         f"model.loss_chunk_size must be >= 0 (0 = off), got {cfg.model.loss_chunk_size}."),
        (not (cfg.model.lora_rank and "lm_head" in cfg.model.target_modules and _fused_head(cfg.model)),
         "LoRA on lm_head cannot be combined with the chunked/fused loss head. Fix: drop lm_head from "
         "model.target_modules, or set model.loss_chunk_size=0 and model.use_liger=false."),
        (cfg.model.lora_adapter_path is None or cfg.model.lora_rank > 0,
         "model.lora_adapter_path needs model.lora_rank > 0 (LoRA on)."),
        (not cfg.model.load_in_4bit or cfg.model.lora_rank > 0,
         "model.load_in_4bit=true freezes the base in 4 bits, so only LoRA adapters can train. Fix: set "
         "model.lora_rank > 0 (e.g. 16)."),
        (not (cfg.model.load_in_4bit and cfg.model.use_dora),
         "model.use_dora=true with model.load_in_4bit=true is not offered: DoRA's weight norm reads the base "
         "weight, which is stored in 4 bits here. Fix: drop one of the two."),
        (not cfg.model.load_in_4bit or cfg.model.bnb_4bit_use_double_quant,
         "model.bnb_4bit_use_double_quant=false is not offered: the 4-bit format that FSDP2 shards (torchao's) "
         "always stores the block scales in 8 bits (0.13 instead of 0.5 bit per weight). Fix: set it true."),
        (data.system_prompt is None or data.format in ("auto", "prompt_response", "alpaca"),
         "data.system_prompt applies to prompt/response and alpaca rows only."),
        (weight_key_problem(data) is None, weight_key_problem(data) or ""),
        # shardtune hands the template each picture as its marker text, so a template's own picture count
        # (Qwen-VL's add_vision_id labels) never runs: refused rather than silently not written
        (not data.apply_chat_template_kwargs.get("add_vision_id"),
         "data.apply_chat_template_kwargs.add_vision_id=true is not offered: the 'Picture N:' labels would not be "
         "written (pictures reach the template as its marker text). Fix: drop the key, and write the labels into "
         "the message texts before each <image> if the model needs them."),
        (not (_weighted(cfg) and cfg.model.use_liger),
         "data.message_weight_key weighs each token's loss, which Liger's fused loss does not do. Fix: "
         "model.use_liger=false (with model.loss_chunk_size=4096 for a memory-lean loss), or drop the weights."),
    ]


def _weighted(cfg: Config) -> bool:
    """Some training data carries message weights (the data section's key, or a source's own)."""
    entries = cfg.data.train_files
    return bool(cfg.data.message_weight_key) or any(isinstance(e, dict) and e.get("message_weight_key")
                                                    for e in entries)


def _fused_head(m: ModelConfig) -> bool:
    return m.loss_chunk_size > 0 or m.use_liger


def _optim_trainer_rules(cfg: Config) -> list[tuple[bool, str]]:
    data, trainer, optim = cfg.data, cfg.trainer, cfg.optim
    return [
        (trainer.max_ckpt_to_keep is None or trainer.max_ckpt_to_keep >= 1,
         f"trainer.max_ckpt_to_keep must be >= 1 or null (keep all), got {trainer.max_ckpt_to_keep}."),
        (optim.lr > 0, f"optim.lr must be > 0, got {optim.lr}."),
        (len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas),
         f"optim.betas must be two numbers in [0, 1), got {optim.betas}."),
        (0 <= optim.lr_warmup_steps_ratio < 1,
         f"optim.lr_warmup_steps_ratio must be in [0, 1), got {optim.lr_warmup_steps_ratio}."),
        (0 <= optim.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {optim.min_lr_ratio}."),
        (0 < optim.wsd_decay_ratio <= 1, f"optim.wsd_decay_ratio must be in (0, 1], got {optim.wsd_decay_ratio}."),
        (optim.loss_type != "dft" or not cfg.model.use_liger,
         "optim.loss_type=dft is not implemented in Liger's fused loss. Fix: model.use_liger=false (with "
         "model.loss_chunk_size=4096 for a memory-lean loss), or optim.loss_type=ce."),
        (optim.clip_grad >= 0, f"optim.clip_grad must be >= 0 (0 = no clipping), got {optim.clip_grad}."),
        (trainer.total_epochs >= 1, f"trainer.total_epochs must be >= 1, got {trainer.total_epochs}."),
        (trainer.total_training_steps is None or trainer.total_training_steps >= 1,
         f"trainer.total_training_steps must be >= 1 or null, got {trainer.total_training_steps}."),
        (_is_freq(trainer.test_freq),
         f"trainer.test_freq must be -1, >= 1 or after_each_epoch, got {trainer.test_freq}."),
        (_is_freq(trainer.save_freq),
         f"trainer.save_freq must be -1, >= 1 or after_each_epoch, got {trainer.save_freq}."),
        (cfg.checkpoint.load_contents is None
         or set(cfg.checkpoint.load_contents) <= set(cfg.checkpoint.save_contents) | {"hf_model"},
         "checkpoint.load_contents must be a subset of checkpoint.save_contents."),
        ("model" in cfg.checkpoint.save_contents, "checkpoint.save_contents must include model."),
        (trainer.resume_mode != "resume_path" or bool(trainer.resume_from_path),
         "trainer.resume_mode=resume_path needs trainer.resume_from_path=/path/to/global_step_N."),
        (trainer.test_freq == -1 or bool(data.val_files),
         f"trainer.test_freq={trainer.test_freq} asks for validation but data.val_files is empty. "
         "Fix: set data.val_files or trainer.test_freq=-1."),
        (trainer.early_stopping_patience == 0 or trainer.early_stopping_metric != "val/loss" or bool(data.val_files),
         "trainer.early_stopping_patience needs validation data. Fix: set data.val_files."),
        (trainer.early_stopping_metric == "val/loss" or trainer.early_stopping_metric.startswith("eval/"),
         f"trainer.early_stopping_metric must be val/loss or an eval/* metric (e.g. eval/exact_match), got "
         f"{trainer.early_stopping_metric!r}."),
        (not trainer.early_stopping_metric.startswith("eval/") or cfg.eval.freq != -1,
         f"trainer.early_stopping_metric={trainer.early_stopping_metric} needs the evaluation on. Fix: set eval.freq."),
        (trainer.early_stopping_patience >= 0, "trainer.early_stopping_patience must be >= 0."),
        (all(x in LOGGERS for x in trainer.logger),
         f"trainer.logger entries must be among {list(LOGGERS)}, got {trainer.logger}."),
    ]


def _check_parallel(cfg: Config, world_size: int) -> None:
    engine = cfg.engine
    if engine.timeout_minutes < 1:
        raise ConfigError("engine.timeout_minutes must be >= 1.")
    if (engine.param_offload or engine.optimizer_offload) and world_size == 1:
        raise ConfigError("engine.param_offload / optimizer_offload use FSDP2's CPUOffloadPolicy, which needs a "
                          "torchrun job of 2+ processes. Fix: launch with torchrun (or --nproc), or turn offload off.")
    sp = cfg.sp_size
    if sp > 1:
        if not cfg.model.use_remove_padding:
            raise ConfigError(f"Ulysses sequence parallelism (size {sp}) needs padding-free batches. "
                              "Fix: model.use_remove_padding=true.")
        if world_size % sp:
            raise ConfigError(f"engine.ulysses_sequence_parallel_size={sp} must divide the number of processes "
                              f"({world_size}). Fix: launch a multiple of {sp} processes.")
    if engine.fsdp_size not in (-1, world_size) and (engine.fsdp_size < 1 or world_size % engine.fsdp_size):
        raise ConfigError(f"engine.fsdp_size={engine.fsdp_size} must divide the number of processes ({world_size}). "
                          "Fix: -1 shards over all ranks; a divisor gives hybrid sharding (replicate x shard).")


def _check_eval(cfg: Config) -> None:
    ev = cfg.eval
    if not _is_freq(ev.freq):
        raise ConfigError(f"eval.freq must be -1 (off), >= 1 or after_each_epoch, got {ev.freq}.")
    if ev.max_new_tokens < 1 or ev.batch_size < 1 or ev.max_samples == 0 or ev.max_samples < -1:
        raise ConfigError("eval.max_new_tokens and eval.batch_size must be >= 1, eval.max_samples >= 1 or -1 (all).")
    if ev.freq != -1 and not (ev.files or cfg.data.val_files):
        raise ConfigError(f"eval.freq={ev.freq} needs prompts. Fix: set eval.files, or data.val_files (the "
                          "conversations up to their last assistant turn are the prompts).")
    for path in ev.files:
        if is_url(path):
            check_url(path, "eval.files")
    if ev.scorer is not None:
        from shardtune.evaluate import load_scorer

        load_scorer(ev.scorer)  # importable and callable, before any model is loaded


def _is_freq(x: int | str) -> bool:
    return x == "after_each_epoch" or x == -1 or (isinstance(x, int) and x >= 1)


def notes(cfg: Config) -> list[str]:
    """What the run does differently from what a key's name suggests, recorded as events in metrics.jsonl."""
    out = []
    if cfg.engine.strategy in ENGINE_ALIASES:
        out.append(f"engine.strategy={cfg.engine.strategy} (verl's name) runs "
                   f"{ENGINE_ALIASES[cfg.engine.strategy].upper()} (fully_shard); shardtune does not offer FSDP1")
    if cfg.data.use_dynamic_bsz and not cfg.model.use_remove_padding:
        out.append("data.use_dynamic_bsz with model.use_remove_padding=false: micro-batches are right-padded rows, "
                   "and the token budget data.max_token_len_per_gpu bounds rows x longest row (padding included)")
    return out
