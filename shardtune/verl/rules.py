"""The kinds of rule a verl key can have (Map, Warn, Refuse, Custom), and the functions of the Custom
rules: keys that combine with others, or whose values are converted or checked item by item. The tables
that give each verl key its rule are in mapping.py."""

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


def dtype(v: Any) -> str:
    names = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}
    if str(v) not in names:
        raise ConfigError(f"model dtype {v!r} is not supported. Fix: fp32 or bf16 (fp16 weights overflow in AdamW).")
    return names[str(v)]


def multiturn(key: str, value: Any, ctx: Any) -> None:
    """verl's legacy trainer reads prompt/response rows and appends the tokenizer's EOS to every response;
    its multi-turn dataset trains what the chat template renders. The same here: data.append_eos=always
    for prompt/response rows (never a second EOS where the template's turn already ends with it), auto
    (an EOS only where the template writes no end-of-turn token) for messages."""
    ctx.assign("data.format", "messages" if value else "prompt_response", key)
    ctx.assign("data.append_eos", "auto" if value else "always", key)


# verl's own dataset classes, as `data.custom_cls` can name them (a module path, pkg:// or a file of verl's tree)
VERL_DATASETS = {("verl.utils.dataset.sft_dataset", "SFTDataset"): False,
                 ("verl.utils.dataset.multiturn_sft_dataset", "MultiTurnSFTDataset"): True}


def custom_cls(key: str, value: Any, ctx: Any) -> None:
    """A custom dataset class is code shardtune does not run, except verl's own two, which are the two
    formats: SFTDataset reads prompt/response rows (data.prompt_key, ...), MultiTurnSFTDataset messages."""
    path, name = (value or {}).get("path"), (value or {}).get("name")
    if path is None and name is None:
        return
    module = str(path).removeprefix("pkg://").removesuffix(".py").replace("/", ".")
    is_multiturn = next((m for (mod, cls), m in VERL_DATASETS.items() if module.endswith(mod) and name == cls), None)
    if is_multiturn is None:
        ctx.refuse(f"{key}={{path: {path!r}, name: {name!r}}}",
                   "custom dataset classes are not supported (verl's own SFTDataset and MultiTurnSFTDataset are: "
                   "data.format=prompt_response and messages); closest shardtune setting: data.format")
    else:
        multiturn(key, is_multiturn, ctx)


def chat_template_kwargs(key: str, value: Any, ctx: Any) -> None:
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


def test_freq(key: str, value: Any, ctx: Any) -> None:
    """Without data.val_files there is nothing to validate: verl's engine trainer then skips validation (its
    legacy one read the ~/data/gsm8k/test.parquet default, which shardtune does not have); so does shardtune."""
    if value not in (None, -1) and not ctx.tree["data"].get("val_files"):
        if ctx.is_set(key):
            ctx.note(key, f"{value!r} asks for validation, but the line gives no data.val_files: no validation runs "
                          "(set data.val_files to validate)")
        value = -1
    ctx.assign("trainer.test_freq", value, key)


def save_contents(key: str, value: Any, ctx: Any) -> None:
    """shardtune's checkpoints always hold the model shards (resume and `shardtune export` read them): a
    verl line that saves only the Hugging Face weights (`[hf_model]`) gets them too."""
    contents = [value] if isinstance(value, str) else list(value or [])
    if value is not None and "model" not in contents:
        if ctx.is_set(key):
            ctx.note(key, f"{contents}: the model shards are saved too (shardtune resumes and exports from them)")
        contents = ["model", *contents]
    ctx.assign("checkpoint.save_contents", contents if value is not None else None, key)


def token_budget(key: str, value: Any, ctx: Any, alias: bool) -> None:
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


def fsdp_size(key: str, value: Any, ctx: Any) -> None:
    """verl shards over all ranks when fsdp_size is -1 or at least the number of processes."""
    world = int(os.environ.get("WORLD_SIZE", "0"))
    size = -1 if world and isinstance(value, int) and value >= world else value
    ctx.assign("engine.fsdp_size", size, key)


def pad_mode(key: str, value: Any, ctx: Any) -> None:
    """verl's pad mode is how its dataset hands samples to the engine; shardtune's datasets never pad
    samples, and the batch layout follows model.use_remove_padding, as verl's FSDP engine does."""
    if value not in ("no_padding", "right", "left_right"):
        ctx.refuse(key, f"{value!r} is not one of verl's pad modes (no_padding, right, left_right)")


LOGGER_ALIASES = {"tracking": "wandb", "vemlp_wandb": "wandb", "file": "file"}  # verl's deprecated/vendor names
UNSUPPORTED_LOGGERS = ("swanlab", "clearml", "trackio")


def logger(key: str, value: Any, ctx: Any) -> None:
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


def override_optimizer(key: str, value: Any, ctx: Any) -> None:
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


def override_config(key: str, value: Any, ctx: Any) -> None:
    """verl sets these on the Hugging Face config before the model is built (attn_implementation picks
    the attention kernel); shardtune checks each is a field of the model's config before loading it."""
    fields = dict(value or {})
    if "attn_implementation" in fields:
        ctx.assign("model.attn_implementation", fields.pop("attn_implementation"), f"{key}.attn_implementation")
    if fields:
        ctx.assign("model.override_config", fields, key)


def legacy_offload(key: str, value: Any, ctx: Any) -> None:
    """verl's legacy trainer offloads (FSDP CPUOffload) only when both cpu_offload and offload_params are on."""
    fsdp = ctx.tree["model"]["fsdp_config"]
    ctx.assign("engine.param_offload", bool(fsdp.get("cpu_offload") and fsdp.get("offload_params")),
               "model.fsdp_config.offload_params" if ctx.is_set("model.fsdp_config.offload_params") else key)


def engine_offload(key: str, value: Any, ctx: Any) -> None:
    """verl's param_offload (between phases) and offload_policy (FSDP2 CPUOffloadPolicy) are both shardtune's
    CPUOffloadPolicy: they change memory and speed, not the numbers."""
    engine = ctx.tree["engine"]
    ctx.assign("engine.param_offload", bool(engine.get("param_offload") or engine.get("offload_policy")),
               "engine.offload_policy" if ctx.is_set("engine.offload_policy") else key)


READ_BY_ITS_PAIR = Custom(lambda key, value, ctx: None)  # accepted here; the rule of the key it pairs with reads it


LAUNCHER = Custom(lambda key, value, ctx: None)  # read by the entry point that starts the processes


def pad_to_length(key: str, value: Any, ctx: Any) -> None:
    """verl 0.9's engine.pad_to_length + pad_to_length_bucket: round each packed micro-batch up to a multiple
    of the bucket (on the whole row before the sequence-parallel split, as shardtune's bucket is)."""
    bucket, bucket_key = ctx.tree["engine"].get("pad_to_length_bucket"), "engine.pad_to_length_bucket"
    if not value:
        if ctx.is_set(bucket_key):
            ctx.warn(bucket_key, "read only when engine.pad_to_length=true, as in verl")
        return
    if not isinstance(bucket, int) or bucket < 1:
        ctx.refuse(f"{bucket_key}={bucket!r}", "a positive number of tokens")
        return
    ctx.assign("data.pad_to_length_bucket", bucket, key if ctx.is_set(key) else bucket_key)


def zero_indexed_step(key: str, value: Any, ctx: Any) -> None:
    """verl counts its cosine schedule's steps from 1 when this is false; its constant schedule never reads it."""
    optim = ctx.tree["optim"]
    kind = optim.get("warmup_style") or optim.get("lr_scheduler_type")
    if kind == "cosine":
        ctx.assign("optim.zero_indexed_step", bool(value), key)
    elif ctx.is_set(key) and value is False:
        ctx.note(key, f"verl's {kind} schedule does not read it (only its cosine schedule counts steps from 1), "
                      "so neither does shardtune: the same rates as in verl")


QAT = ("quantization-aware training (NVFP4 fake quantization, verl 0.9) is not supported: shardtune trains "
       "the weights in model.dtype, and NVFP4 needs Blackwell-class GPU kernels (no CPU path)")
MTP = ("multi-token prediction heads are trained by verl's Megatron engine (a Megatron-Core feature); "
       "shardtune trains the Hugging Face model's next-token loss")


def enabled_group(why: str, closest: str) -> Custom:
    """A group with an `enable` switch shardtune cannot honour: refused when on; its other keys, set while it
    is off, ignored with a warning (verl reads them only when it is on)."""

    def handle(key: str, value: Any, ctx: Any) -> None:
        group = dict(value or {})
        if group.get("enable"):
            ctx.refuse(f"{key}.enable=True", f"{why}; closest shardtune setting: {closest}")
            return
        for k in sorted(group):
            if k != "enable" and ctx.is_set(f"{key}.{k}"):
                ctx.warn(f"{key}.{k}", f"read only when {key}.enable=true")

    return Custom(handle)
