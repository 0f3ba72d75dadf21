"""Cross-field rules: what involves several keys (or the number of processes), checked before any model or
data is loaded."""

from __future__ import annotations

import importlib.util

from shardtune.config.schema import ENGINE_ALIASES, LOGGER_PACKAGES, LOGGERS, Config, ModelConfig
from shardtune.config.sources import resolve_sources
from shardtune.errors import ConfigError
from shardtune.remote import check_url, is_url


def validate(cfg: Config, world_size: int = 1) -> Config:
    """Check rules that involve several keys (or the world size). Raises `ConfigError`; returns `cfg`."""
    for ok, message in _data_model_rules(cfg, world_size) + _optim_trainer_rules(cfg):
        if not ok:
            raise ConfigError(message)
    _check_parallel(cfg, world_size)
    data = cfg.data
    train_sources = resolve_sources(data.train_files, data, data.train_max_samples, "data.train_files")
    if data.streaming and len(train_sources) > 1:
        raise ConfigError(f"data.streaming=true streams one training source, and data.train_files has "
                          f"{len(train_sources)} ({', '.join(s.name for s in train_sources)}): weighted mixtures "
                          "are drawn from tokenized sources. Fix: list the files as plain paths (one source, read "
                          "in order), or set data.streaming=false to mix them by weight.")
    resolve_sources(data.val_files, data, data.val_max_samples, "data.val_files")
    t = cfg.trainer
    for sink in t.logger:
        package = LOGGER_PACKAGES.get(sink)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"trainer.logger includes {sink}, but the '{package}' package is not installed. "
                              f"Fix: pip install 'shardtune[{sink}]', or drop {sink} from trainer.logger.")
    if "{" in t.default_local_dir:
        try:
            _ = cfg.run_dir
        except (KeyError, IndexError):
            raise ConfigError(
                f"trainer.default_local_dir='{t.default_local_dir}' uses an unknown placeholder. "
                "Fix: only {project_name} and {experiment_name} are filled in."
            ) from None
    if t.remote_dir:
        check_url(t.remote_dir, "trainer.remote_dir")
    for f in cfg.data.train_files + cfg.data.val_files:
        if is_url(f):
            check_url(f, "data.train_files/val_files")
    return cfg


def _data_model_rules(cfg: Config, world_size: int) -> list[tuple[bool, str]]:
    d = cfg.data
    return [
        (bool(cfg.model.path), "model.path is required. Fix: model.path=/path/to/hf_model_folder."),
        (bool(d.train_files), "data.train_files is required. Fix: data.train_files=train.parquet (or [a,b])."),
        (d.max_length > 1, f"data.max_length must be > 1, got {d.max_length}."),
        (d.train_batch_size >= 1, f"data.train_batch_size must be >= 1, got {d.train_batch_size}."),
        (d.prefetch_steps >= 0, f"data.prefetch_steps must be >= 0 (0 = no prefetching), got {d.prefetch_steps}."),
        (d.shuffle_buffer >= 1, f"data.shuffle_buffer must be >= 1 (samples), got {d.shuffle_buffer}."),
        (not d.streaming or cfg.trainer.total_training_steps is not None,
         "data.streaming=true needs trainer.total_training_steps: a stream's epoch length is unknown until it has "
         "been read, so the run's length (and the learning-rate schedule) cannot come from trainer.total_epochs. "
         "Fix: set trainer.total_training_steps=N."),
        (d.micro_batch_size_per_gpu >= 1, f"data.micro_batch_size_per_gpu must be >= 1, got {d.micro_batch_size_per_gpu}."),
        (not d.use_dynamic_bsz or d.max_token_len_per_gpu >= d.max_length,
         f"data.max_token_len_per_gpu={d.max_token_len_per_gpu} is below data.max_length={d.max_length}, so a "
         "sample could exceed the budget. Fix: raise data.max_token_len_per_gpu or lower data.max_length."),
        (d.train_batch_size % max(1, world_size // cfg.sp_size) == 0 or world_size % cfg.sp_size != 0,
         f"data.train_batch_size={d.train_batch_size} must be divisible by the number of data-parallel "
         f"ranks ({world_size // cfg.sp_size}). Fix: pick a multiple of {world_size // cfg.sp_size}."),
        (cfg.model.lora_rank >= 0, f"model.lora_rank must be >= 0 (0 = off), got {cfg.model.lora_rank}."),
        (cfg.model.loss_chunk_size >= 0, f"model.loss_chunk_size must be >= 0 (0 = off), got {cfg.model.loss_chunk_size}."),
        (not (cfg.model.lora_rank and "lm_head" in cfg.model.target_modules and _fused_head(cfg.model)),
         "LoRA on lm_head cannot be combined with the chunked/fused loss head. Fix: drop lm_head from "
         "model.target_modules, or set model.loss_chunk_size=0 and model.use_liger=false."),
        (cfg.model.lora_adapter_path is None or cfg.model.lora_rank > 0,
         "model.lora_adapter_path needs model.lora_rank > 0 (LoRA on)."),
        (d.system_prompt is None or d.format in ("auto", "prompt_response", "alpaca"),
         "data.system_prompt applies to prompt/response and alpaca rows only."),
    ]


def _fused_head(m: ModelConfig) -> bool:
    return m.loss_chunk_size > 0 or m.use_liger


def _optim_trainer_rules(cfg: Config) -> list[tuple[bool, str]]:
    d, t, o = cfg.data, cfg.trainer, cfg.optim
    return [
        (t.max_ckpt_to_keep is None or t.max_ckpt_to_keep >= 1,
         f"trainer.max_ckpt_to_keep must be >= 1 or null (keep all), got {t.max_ckpt_to_keep}."),
        (o.lr > 0, f"optim.lr must be > 0, got {o.lr}."),
        (len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas must be two numbers in [0, 1), got {o.betas}."),
        (0 <= o.lr_warmup_steps_ratio < 1, f"optim.lr_warmup_steps_ratio must be in [0, 1), got {o.lr_warmup_steps_ratio}."),
        (0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}."),
        (0 < o.wsd_decay_ratio <= 1, f"optim.wsd_decay_ratio must be in (0, 1], got {o.wsd_decay_ratio}."),
        (o.clip_grad >= 0, f"optim.clip_grad must be >= 0 (0 = no clipping), got {o.clip_grad}."),
        (t.total_epochs >= 1, f"trainer.total_epochs must be >= 1, got {t.total_epochs}."),
        (t.total_training_steps is None or t.total_training_steps >= 1,
         f"trainer.total_training_steps must be >= 1 or null, got {t.total_training_steps}."),
        (_is_freq(t.test_freq), f"trainer.test_freq must be -1, >= 1 or after_each_epoch, got {t.test_freq}."),
        (_is_freq(t.save_freq), f"trainer.save_freq must be -1, >= 1 or after_each_epoch, got {t.save_freq}."),
        (cfg.checkpoint.load_contents is None or set(cfg.checkpoint.load_contents) <= set(cfg.checkpoint.save_contents) | {"hf_model"},
         "checkpoint.load_contents must be a subset of checkpoint.save_contents."),
        ("model" in cfg.checkpoint.save_contents, "checkpoint.save_contents must include model."),
        (t.resume_mode != "resume_path" or bool(t.resume_from_path),
         "trainer.resume_mode=resume_path needs trainer.resume_from_path=/path/to/global_step_N."),
        (t.test_freq == -1 or bool(d.val_files),
         f"trainer.test_freq={t.test_freq} asks for validation but data.val_files is empty. "
         "Fix: set data.val_files or trainer.test_freq=-1."),
        (t.early_stopping_patience == 0 or bool(d.val_files),
         "trainer.early_stopping_patience needs validation data. Fix: set data.val_files."),
        (t.early_stopping_patience >= 0, "trainer.early_stopping_patience must be >= 0."),
        (all(x in LOGGERS for x in t.logger), f"trainer.logger entries must be among {list(LOGGERS)}, got {t.logger}."),
    ]


def _check_parallel(cfg: Config, world_size: int) -> None:
    e = cfg.engine
    if e.timeout_minutes < 1:
        raise ConfigError("engine.timeout_minutes must be >= 1.")
    if (e.param_offload or e.optimizer_offload) and world_size == 1:
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
    if e.fsdp_size not in (-1, world_size) and (e.fsdp_size < 1 or world_size % e.fsdp_size):
        raise ConfigError(f"engine.fsdp_size={e.fsdp_size} must divide the number of processes ({world_size}). "
                          "Fix: -1 shards over all ranks; a divisor gives hybrid sharding (replicate x shard).")


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
