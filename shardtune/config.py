"""Typed, strict configuration.

A run is described by a tree of frozen dataclasses. It is built from an optional YAML file plus
`key=value` overrides (the syntax verl users type), checked key by key (unknown keys get a
did-you-mean, values are checked against the field types) and then across fields by `validate`,
all before any model or data is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from shardtune.errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    format: Literal["auto", "messages", "prompt_response", "alpaca", "sharegpt"] = "auto"
    messages_key: str = "messages"
    tools_key: str = "tools"
    enable_thinking_key: str = "enable_thinking"
    prompt_key: str = "prompt"
    response_key: str = "response"
    prompt_dict_keys: list[str] = field(default_factory=list)
    response_dict_keys: list[str] = field(default_factory=list)
    system_prompt: str | None = None
    chat_template: str | None = None  # a Jinja string or a path to a .jinja file; default: the tokenizer's
    apply_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    ignore_input_ids_mismatch: bool = False
    max_length: int = 1024
    truncation: Literal["error", "left", "right", "drop"] = "error"
    on_bad_row: Literal["error", "skip"] = "error"
    train_max_samples: int = -1
    val_max_samples: int = -1
    train_batch_size: int = 64
    micro_batch_size_per_gpu: int = 4
    use_dynamic_bsz: bool = False  # micro-batches by token budget instead of by count
    max_token_len_per_gpu: int = 8192  # the token budget of one micro-batch on one rank
    shuffle: bool = True
    drop_last: bool = False
    cache_dir: str | None = "~/.cache/shardtune"
    num_proc: int = 0  # tokenization processes; 0 = automatic
    prefetch_steps: int = 2  # steps planned and collated ahead in a background thread (0 = in the loop)


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""
    tokenizer_path: str | None = None
    gguf_file: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2 | shardtune_varlen_sdpa | ...
    dtype: Literal["fp32", "bf16"] = "fp32"  # weights as loaded and updated; bf16 compute: engine.mixed_precision
    enable_gradient_checkpointing: bool = False
    use_remove_padding: bool = True
    lora_rank: int = 0  # 0 = full fine-tuning; > 0 = LoRA adapters of this rank (peft), base weights frozen
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    exclude_modules: list[str] = field(default_factory=list)
    lora_adapter_path: str | None = None  # continue training this adapter (a peft folder)
    # cross-entropy from the hidden states, this many supervised tokens of logits at a time (0 = the plain
    # lm_head + cross_entropy over full logits); see shardtune/loss.py
    loss_chunk_size: int = 0
    use_liger: bool = False  # Liger kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy) on CUDA


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    clip_grad: float = 1.0
    lr_scheduler_type: Literal["constant", "cosine", "linear", "wsd"] = "cosine"
    lr_warmup_steps_ratio: float = 0.03
    lr_warmup_steps: int = -1  # >= 0 overrides the ratio
    min_lr_ratio: float = 0.0
    num_cycles: float = 0.5
    wsd_decay_ratio: float = 0.1  # fraction of the steps spent decaying at the end of a wsd schedule


@dataclass(frozen=True)
class MixedPrecisionConfig:
    param_dtype: Literal["fp32", "bf16"] = "fp32"  # compute dtype of parameters (FSDP2) / autocast (1 process)
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"  # gradient reduction dtype


@dataclass(frozen=True)
class EngineConfig:
    strategy: str = "fsdp2"
    mixed_precision: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)
    param_offload: bool = False  # FSDP2 CPUOffloadPolicy: parameters, gradients and the optimizer step on CPU
    optimizer_offload: bool = False  # the same policy (FSDP2 offloads parameters and optimizer together)
    reshard_after_forward: bool = True
    # false: gradients are reduce-scattered once per step instead of after every micro-batch (fewer
    # collectives; each rank holds unsharded gradients while it accumulates)
    reduce_grads_every_micro_batch: bool = True
    fsdp_size: int = -1  # shard over groups of this many ranks and replicate across groups (-1 = all ranks)
    ulysses_sequence_parallel_size: int = 1  # ranks that split each packed row along the sequence (Ulysses)
    use_torch_compile: bool = False  # torch.compile each decoder layer (dynamic shapes); first step pays the compile
    timeout_minutes: int = 60  # how long a collective may wait (rank 0 tokenizing, a large export) before failing


@dataclass(frozen=True)
class TrainerConfig:
    total_epochs: int = 1
    total_training_steps: int | None = None
    test_freq: int | Literal["after_each_epoch"] = -1  # validate every N steps (and always at the end)
    save_freq: int | Literal["after_each_epoch"] = -1  # save every N steps (a checkpoint is always saved at the end)
    max_ckpt_to_keep: int | None = None  # keep the newest N complete checkpoints (null = all)
    resume_mode: Literal["auto", "disable", "resume_path"] = "auto"
    resume_from_path: str | None = None
    save_hf_at_end: bool = False  # also write full safetensors weights into the last checkpoint's huggingface/
    default_local_dir: str = "checkpoints/{project_name}/{experiment_name}"
    project_name: str = "shardtune"
    experiment_name: str = "run"
    logger: list[str] = field(default_factory=lambda: ["console", "jsonl"])
    seed: int = 42
    early_stopping_patience: int = 0  # validations without improvement before stopping; 0 = off
    early_stopping_min_delta: float = 0.0
    progress_bar: bool = True


CHECKPOINT_CONTENTS = Literal["model", "optimizer", "extra", "hf_model"]


@dataclass(frozen=True)
class CheckpointConfig:
    # model/optimizer: DCP shards; extra: data position, lr schedule, RNG, early stopping; hf_model: full
    # safetensors weights under global_step_N/huggingface/ (config and tokenizer are always there)
    save_contents: list[CHECKPOINT_CONTENTS] = field(default_factory=lambda: ["model", "optimizer", "extra"])
    load_contents: list[CHECKPOINT_CONTENTS] | None = None  # null = everything that was saved
    async_save: bool = False  # write DCP shards in the background while training continues


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # verl's legacy spelling of engine.ulysses_sequence_parallel_size (the larger of the two wins)
    ulysses_sequence_parallel_size: int = 1

    @property
    def sp_size(self) -> int:
        return max(self.engine.ulysses_sequence_parallel_size, self.ulysses_sequence_parallel_size)

    @property
    def run_dir(self) -> Path:
        t = self.trainer
        return Path(t.default_local_dir.format(project_name=t.project_name, experiment_name=t.experiment_name))


LOGGERS = ("console", "jsonl", "file", "tensorboard", "wandb", "mlflow")
LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # sinks that need an optional extra

# ----------------------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> nested dict -> typed dataclasses


@dataclass(frozen=True)
class Override:
    """A command-line value: parsed as YAML, except where the field is a string, which takes the text as typed
    (so `experiment_name=007` stays "007" and `system_prompt=Answer: briefly` is not read as a mapping)."""

    raw: str
    parsed: Any


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=[x,y]"]` -> `{"a.b": Override("1", 1), "c": Override("[x,y]", ["x", "y"])}`."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("+")
        if not sep or not key:
            raise ConfigError(f"Cannot parse the override '{item}'. Fix: write it as key=value, e.g. optim.lr=2e-5.")
        out[key] = Override(raw, _parse_value(raw))
    return out


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"Config key '{dotted}': '{p}' is a value, not a section.")
        node = child
    node[leaf] = value


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Build a `Config` from an optional YAML file and `key=value` overrides, strictly."""
    tree: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file '{path}' does not exist. Fix: pass the path of a YAML file.")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"Config file '{path}' is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"Config file '{path}' must hold a mapping of sections (data:, model:, ...).")
    for key, value in parse_overrides(overrides or []).items():
        set_dotted(tree, key, value)
    return from_dict(Config, tree)


def from_dict(cls: type, tree: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(tree, dict):
        raise ConfigError(f"Config key '{prefix.rstrip('.')}' must be a section (a mapping), got {tree!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in tree.items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix + key, cls, prefix))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            value = value.parsed if isinstance(value, Override) else value
            kwargs[key] = from_dict(hint, value or {}, prefix + key + ".")
        else:
            kwargs[key] = coerce(prefix + key, value, hint)
    return cls(**kwargs)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += all_keys(hints[f.name], prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key_message(key: str, cls: type, prefix: str) -> str:
    candidates = all_keys()
    leaf = key.rsplit(".", 1)[-1]  # a right leaf under a wrong section, e.g. `trainer.lr`
    close = [k for k in candidates if k.rsplit(".", 1)[-1] == leaf][:1]
    close = close or difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    section = prefix.rstrip(".") or "the top level"
    valid = ", ".join(f.name for f in dataclasses.fields(cls))
    return f"Unknown config key '{key}'.{hint} Valid keys in {section}: {valid}."


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the type `hint`, converting only where it is lossless and unsurprising."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if isinstance(value, Override):
        text_field = hint is str or (origin in (typing.Union, types.UnionType) and set(args) == {str, type(None)})
        value = value.raw if text_field and value.raw.strip() not in ("null", "~") else value.parsed
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        reasons = []
        for a in non_none:
            try:
                return coerce(key, value, a)
            except ConfigError as e:
                reasons.append(str(e).split(" must be ", 1)[-1].split(", got ")[0])
        raise ConfigError(f"Config key '{key}' must be {' or '.join(reasons)}, got {value!r}.")
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint_txt = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"Config key '{key}' must be one of {list(args)}, got {value!r}.{hint_txt}")
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a bare value where a list is expected, e.g. trainer.logger=console
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"Config key '{key}' must be a list, got {value!r}. Fix: write {key}=[a,b].")
        return [coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"Config key '{key}' must be a mapping, got {value!r}. Fix: {key}={{k: v}}.")
        return dict(value)
    return _coerce_scalar(key, value, hint)


def _coerce_scalar(key: str, value: Any, hint: Any) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"Config key '{key}' must be true or false, got {value!r}.")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"Config key '{key}' must be an integer, got {value!r}.")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"Config key '{key}' must be a number, got {value!r}.")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"Config key '{key}' must be a string, got {value!r}.")
    raise TypeError(f"unsupported config type {hint} for {key}")


# ----------------------------------------------------------------------------------------------------------
# Cross-field rules


def validate(cfg: Config, world_size: int = 1) -> Config:
    """Check rules that involve several keys (or the world size). Raises `ConfigError`; returns `cfg`."""
    for ok, message in _data_model_rules(cfg, world_size) + _optim_trainer_rules(cfg):
        if not ok:
            raise ConfigError(message)
    _check_parallel(cfg, world_size)
    t = cfg.trainer
    import importlib.util

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
    from shardtune.engine import check_strategy

    check_strategy(cfg.engine.strategy)
    return cfg


def _data_model_rules(cfg: Config, world_size: int) -> list[tuple[bool, str]]:
    d = cfg.data
    return [
        (bool(cfg.model.path), "model.path is required. Fix: model.path=/path/to/hf_model_folder."),
        (bool(d.train_files), "data.train_files is required. Fix: data.train_files=train.parquet (or [a,b])."),
        (d.max_length > 1, f"data.max_length must be > 1, got {d.max_length}."),
        (d.train_batch_size >= 1, f"data.train_batch_size must be >= 1, got {d.train_batch_size}."),
        (d.prefetch_steps >= 0, f"data.prefetch_steps must be >= 0 (0 = no prefetching), got {d.prefetch_steps}."),
        (d.micro_batch_size_per_gpu >= 1, f"data.micro_batch_size_per_gpu must be >= 1, got {d.micro_batch_size_per_gpu}."),
        (not d.use_dynamic_bsz or cfg.model.use_remove_padding,
         "data.use_dynamic_bsz packs by token budget, which bounds memory only for padding-free batches. "
         "Fix: model.use_remove_padding=true (or fixed micro-batches)."),
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


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
