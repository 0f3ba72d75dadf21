"""The configuration schema: one frozen dataclass per section, every key with its default.

README.md documents every key (a test checks that it does); `loading.py` builds these from YAML and
overrides, `rules.py` checks the rules that span several keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# the loss-mask options, shared with data/chat.py's MaskOptions
APPEND_EOS = Literal["auto", "always", "never"]
TRAIN_ON_TURNS = Literal["all", "last"]
THINKING_HISTORY = Literal["as_rendered", "per_turn"]


@dataclass(frozen=True)
class DataConfig:
    # paths/globs (together one source) and source mappings {path, name, weight, ...}: see config/sources.py
    train_files: list[str | dict[str, Any]] = field(default_factory=list)
    val_files: list[str | dict[str, Any]] = field(default_factory=list)
    mixture_unit: Literal["samples", "tokens"] = "samples"  # what the weights of several train sources divide
    format: Literal["auto", "messages", "prompt_response", "alpaca", "sharegpt"] = "auto"
    messages_key: str = "messages"
    tools_key: str = "tools"
    enable_thinking_key: str = "enable_thinking"
    image_key: str = "images"  # the column of a row's pictures, matched in order to its <image> placeholders
    video_key: str = "videos"  # the column of a row's videos (lists of frames), matched to its <video> placeholders
    prompt_key: str = "prompt"
    response_key: str = "response"
    prompt_dict_keys: list[str] = field(default_factory=list)
    response_dict_keys: list[str] = field(default_factory=list)
    system_prompt: str | None = None
    chat_template: str | None = None  # a Jinja string or a path to a .jinja file; default: the tokenizer's
    apply_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    ignore_input_ids_mismatch: bool = False
    # the tokenizer's EOS after the last trained turn: auto = only where the template writes no end-of-turn
    # token there; always; never
    append_eos: APPEND_EOS = "auto"
    train_on_turns: TRAIN_ON_TURNS = "all"  # which assistant turns are trained (a message's `train` wins)
    # per_turn: one sample per trained assistant turn, cut after it, so each turn's reasoning is trained as the
    # template renders a final turn
    thinking_history: THINKING_HISTORY = "as_rendered"
    # a numeric field of each message (of the row, for prompt/response and alpaca rows) that multiplies the loss
    # of that turn's tokens; the step's loss is still divided by its supervised-token count. null = off
    message_weight_key: str | None = None
    max_length: int = 1024
    truncation: Literal["error", "left", "right", "drop"] = "error"
    on_bad_row: Literal["error", "skip"] = "error"
    train_max_samples: int = -1
    val_max_samples: int = -1
    train_batch_size: int = 64
    micro_batch_size_per_gpu: int = 4
    use_dynamic_bsz: bool = False  # micro-batches by token budget instead of by count
    max_token_len_per_gpu: int = 8192  # the token budget of one micro-batch on one rank
    # > 0: each packed micro-batch is padded (a dummy sequence, untrained, outside the loss normalisation) up to a
    # multiple of this many tokens, rounded up to a multiple of the sequence-parallel size, so compiled kernels
    # see few shapes; 0 = off. Needs packed rows (model.use_remove_padding=true)
    pad_to_length_bucket: int = 0
    shuffle: bool = True
    drop_last: bool = False
    # read, tokenize and shuffle training rows as they are trained (data/stream.py) instead of tokenizing and
    # caching them first; needs trainer.total_training_steps
    streaming: bool = False
    shuffle_buffer: int = 10000  # samples a stream shuffles among (data.streaming=true)
    cache_dir: str | None = "~/.cache/shardtune"
    num_proc: int = 0  # tokenization processes; 0 = automatic
    prefetch_steps: int = 2  # steps planned and collated ahead in a background thread (0 = in the loop)


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""
    tokenizer_path: str | None = None
    gguf_file: str | None = None
    trust_remote_code: bool = False
    # Hugging Face config fields set before the model is built, e.g. {attention_dropout: 0.1} (verl's key)
    override_config: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2 | shardtune_varlen | ...
    dtype: Literal["fp32", "bf16"] = "fp32"  # weights as loaded and updated; bf16 compute: engine.mixed_precision
    enable_gradient_checkpointing: bool = False
    use_remove_padding: bool = True
    lora_rank: int = 0  # 0 = full fine-tuning; > 0 = LoRA adapters of this rank (peft), base weights frozen
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    use_dora: bool = False  # weight-decomposed LoRA (DoRA, peft's use_dora): a magnitude vector per adapted weight
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    exclude_modules: list[str] = field(default_factory=list)
    lora_adapter_path: str | None = None  # continue training this adapter (a peft folder)
    # cross-entropy from the hidden states, this many supervised tokens of logits at a time (0 = the plain
    # lm_head + cross_entropy over full logits); see shardtune/loss.py
    loss_chunk_size: int = 0
    neftune_noise_alpha: float = 0.0  # NEFTune: noise on the input embeddings while training (0 = off)
    use_liger: bool = False  # Liger kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy) on CUDA
    # QLoRA (docs/qlora.md): the decoder layers' Linear weights stored in 4 bits and frozen, LoRA trains on top
    load_in_4bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_compute_dtype: Literal["auto", "fp32", "bf16", "float32", "bfloat16"] = "auto"  # auto: the engine's
    bnb_4bit_use_double_quant: bool = True  # the block scales in 8 bits (the 4-bit format always does this)
    # each decoder layer's saved activations (its checkpointed input under gradient checkpointing) held in host
    # memory from its forward to its backward (verl's key; shardtune/offload.py)
    enable_activation_offload: bool = False
    # vision-language models: which parts train (verl's model.lora.freeze_* names); frozen parts get no gradient
    freeze_vision_model: bool = True  # the vision tower (patch embedding and blocks)
    freeze_vision_projection: bool = True  # the projector/merger from vision features into the language model
    freeze_language_model: bool = False


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
    # ce: cross-entropy; dft: each token's cross-entropy scaled by its detached probability (Dynamic Fine-Tuning)
    loss_type: Literal["ce", "dft"] = "ce"
    # false: the schedule counts optimizer steps from 1 (step i takes the rate a 0-based schedule gives step i+1)
    zero_indexed_step: bool = True


@dataclass(frozen=True)
class MixedPrecisionConfig:
    param_dtype: Literal["fp32", "bf16"] = "fp32"  # compute dtype of parameters (FSDP2) / autocast (1 process)
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"  # gradient reduction dtype


# verl's name for the same engine: shardtune builds on FSDP2 (fully_shard) only, FSDP1 is deprecated upstream
ENGINE_ALIASES = {"fsdp": "fsdp2"}


@dataclass(frozen=True)
class EngineConfig:
    strategy: Literal["fsdp2", "fsdp"] = "fsdp2"
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

    @property
    def grads_reduced_once_per_step(self) -> bool:
        """Unsharded gradients accumulate over the step's micro-batches and are reduced once: when asked,
        and always for replicas (fsdp_size=1), which hold whole gradients anyway."""
        return not self.reduce_grads_every_micro_batch or self.fsdp_size == 1


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
    remote_dir: str | None = None  # an fsspec URL (s3://, gs://, hdfs://, file://) that receives every checkpoint
    project_name: str = "shardtune"
    experiment_name: str = "run"
    logger: list[str] = field(default_factory=lambda: ["console", "jsonl"])
    seed: int = 42
    early_stopping_patience: int = 0  # validations without improvement before stopping; 0 = off
    early_stopping_min_delta: float = 0.0
    # the metric early stopping watches: val/loss (lower is better) or an eval/* score (higher is better)
    early_stopping_metric: str = "val/loss"
    progress_bar: bool = True


CHECKPOINT_CONTENTS = Literal["model", "optimizer", "extra", "hf_model"]


@dataclass(frozen=True)
class CheckpointConfig:
    # model/optimizer: DCP shards; extra: data position, lr schedule, RNG, early stopping; hf_model: full
    # safetensors weights under global_step_N/huggingface/ (config and tokenizer are always there)
    save_contents: list[CHECKPOINT_CONTENTS] = field(default_factory=lambda: ["model", "optimizer", "extra"])
    load_contents: list[CHECKPOINT_CONTENTS] | None = None  # null = everything that was saved
    async_save: bool = False  # write DCP shards in the background while training continues
    save_on_preempt: bool = True  # on SIGTERM: finish the step, save, exit with code 143 (shardtune/preempt.py)


@dataclass(frozen=True)
class EvalConfig:
    """Generation-based evaluation during training (shardtune/evaluate.py)."""

    freq: int | Literal["after_each_epoch"] = -1  # -1 = off; else every N steps (and after the last step)
    # prompt rows in any data format: the conversation up to its last assistant turn is the prompt, that
    # turn's text the reference; empty = data.val_files
    files: list[str] = field(default_factory=list)
    max_samples: int = 100  # the first N prompts (-1 = all)
    max_new_tokens: int = 256
    batch_size: int = 16  # prompts per generate call on one rank
    scorer: str | None = None  # module:function(answer=, reference=, messages=) -> float | {name: float}


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
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
# sinks that need an optional extra
LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
