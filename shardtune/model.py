"""Load a Hugging Face causal LM and its tokenizer from a local folder.

Weights come from safetensors (or GGUF with `model.gguf_file`); pickled `.bin` weights are refused, since
unpickling runs code. The KV cache is always off during training: with packed rows, transformers' sdpa
path isolates sequences by `position_ids` only when no cache is built.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    GenerationConfig,
)

from shardtune import attention, linear_attention, vision
from shardtune.config import ModelConfig
from shardtune.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(cfg: Any) -> torch.dtype:
    """The dtype matmuls run in: bf16 when engine.mixed_precision asks for it (autocast on one process,
    FSDP2's parameter dtype when sharded), else the weights' own dtype (model.dtype)."""
    mp = cfg.engine.mixed_precision.param_dtype
    return DTYPES[mp] if mp != "fp32" else DTYPES[cfg.model.dtype]


def generation_config(model_path: Path, hf_config: Any) -> Any:
    """The base model's generation config, or one derived from its config when the folder has none."""
    try:
        return GenerationConfig.from_pretrained(model_path)
    except OSError:
        return GenerationConfig.from_model_config(hf_config)


def check_model_path(cfg: ModelConfig) -> None:
    """Fail early, before anything heavy, when the model folder cannot be loaded."""
    path = Path(os.path.expanduser(cfg.path))
    if not path.is_dir():
        raise ConfigError(f"model.path='{cfg.path}' is not a folder. Fix: point it at a local Hugging Face model "
                          "folder (config.json + *.safetensors); hub downloads are not used.")
    if cfg.gguf_file:
        if not (path / cfg.gguf_file).is_file():
            raise ConfigError(f"model.gguf_file='{cfg.gguf_file}' is not in {path}.")
        return
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} has no config.json. Fix: point model.path at a Hugging Face model folder.")
    _read_json(path / "config.json", "copy the model folder again, or repair the file")
    if not list(path.glob("*.safetensors")) and list(path.glob("*.bin")):
        raise ConfigError(f"{path} holds only pickled .bin weights, which shardtune refuses to load (unpickling "
                          "runs code). Fix: convert them to safetensors.")
    check_safetensors(path)
    for key, folder, needs in (("model.tokenizer_path", cfg.tokenizer_path, "tokenizer.json or tokenizer_config.json"),
                               ("model.lora_adapter_path", cfg.lora_adapter_path, "adapter_config.json")):
        if folder and not Path(os.path.expanduser(folder)).is_dir():
            raise ConfigError(f"{key}='{folder}' is not a folder. Fix: point it at a local folder with {needs} "
                              "(hub downloads are not used), or drop the key.")
    if cfg.lora_adapter_path:
        adapter = Path(os.path.expanduser(cfg.lora_adapter_path)) / "adapter_config.json"
        if not adapter.is_file():
            raise ConfigError(f"model.lora_adapter_path='{cfg.lora_adapter_path}' has no adapter_config.json: it is "
                              "not a peft adapter folder. Fix: point it at a folder written by save_pretrained of a "
                              "peft model (or `shardtune export --adapter-only`).")
        _read_json(adapter, "export the adapter again (`shardtune export --adapter-only`)")
    load_hf_config(cfg)  # a config transformers can read; model.override_config names fields of it, or is refused


def _read_json(path: Path, fix: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}). Fix: {fix}.") from None


def check_safetensors(folder: Path) -> None:
    """Every shard the safetensors index names is there, and every .safetensors file is as long as its header
    says (a cut-off download or copy), read from the headers only, before any weights are loaded."""
    fix = "copy (or download) the model folder again"
    index = folder / "model.safetensors.index.json"
    files = sorted(folder.glob("*.safetensors"))
    if index.is_file():
        weight_map = _read_json(index, fix).get("weight_map", {})
        missing = sorted({name for name in weight_map.values() if not (folder / name).is_file()})
        if missing:
            raise ConfigError(f"{index} names {len(missing)} shard(s) that are not in the folder: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Fix: {fix}.")
    for f in files:
        size = f.stat().st_size
        try:
            with f.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n)) if 0 < n <= size - 8 else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
        if not isinstance(header, dict):
            raise ConfigError(f"{f} is not a safetensors file (its header cannot be read). Fix: {fix}.")
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if size < 8 + n + end:
            raise ConfigError(f"{f} is cut off: {size} bytes, its header describes {8 + n + end}. Fix: {fix}.")


def liger_usable(cfg: ModelConfig, device: torch.device) -> tuple[bool, str]:
    """Whether `model.use_liger` can take effect here, and if not, the message to show."""
    if not cfg.use_liger:
        return False, ""
    if device.type != "cuda":
        return False, (f"model.use_liger=true needs a CUDA GPU (Liger's kernels are Triton); running on {device.type} "
                       "with the PyTorch path" + (" and the chunked loss" if cfg.loss_chunk_size else "") + ".")
    if importlib.util.find_spec("liger_kernel") is None:
        return False, ("model.use_liger=true but the liger-kernel package is not installed; running the PyTorch "
                       "path. Fix: pip install 'shardtune[liger]'.")
    return True, ""


# config attributes of models whose forward transforms the logits after lm_head (Gemma 2/3, Cohere, Granite)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def check_loss_head(cfg: ModelConfig) -> None:
    """The chunked/fused loss head returns the loss in place of the logits, so it cannot serve a model that
    rescales its logits: refuse before anything is loaded (the engine checks again on every micro-batch)."""
    if cfg.loss_chunk_size <= 0 and not cfg.use_liger:
        return
    hf = load_hf_config(cfg).get_text_config()
    found = [a for a in LOGIT_TRANSFORMS if getattr(hf, a, None) not in (None, 1, 1.0)]
    if found:
        raise ConfigError(f"{hf.model_type} models transform their logits after lm_head ({found[0]}="
                          f"{getattr(hf, found[0])}), which the chunked/fused loss head does not model. "
                          "Fix: model.loss_chunk_size=0 and model.use_liger=false for this model.")


def check_sequence_parallel(cfg: ModelConfig, sp_size: int) -> None:
    """Ulysses splits attention heads over the sequence-parallel ranks: heads must divide evenly, and every
    layer must be attention (a linear-attention layer's recurrence runs along the whole sequence)."""
    if sp_size == 1:
        return
    hf = load_hf_config(cfg)
    if linear_attention.has_linear_attention(hf):
        raise ConfigError(f"engine.ulysses_sequence_parallel_size={sp_size}: {hf.model_type} has linear-attention "
                          "layers, whose recurrent state runs along the whole sequence, which Ulysses splits over "
                          "ranks. Fix: engine.ulysses_sequence_parallel_size=1 for this model.")
    heads = hf.get_text_config().num_attention_heads
    if heads % sp_size:
        raise ConfigError(f"The model has {heads} attention heads, not divisible by the sequence-parallel size "
                          f"{sp_size}. Fix: pick an engine.ulysses_sequence_parallel_size that divides {heads}.")


def check_architecture(cfg: ModelConfig) -> None:
    """Refuse, before any weights are read, what the model's own code would reject or miscompute: an
    attention implementation its class does not have, and MLA configs with grouped KV heads (MLA has one
    key/value per query head; transformers' sdpa and eager paths would repeat them by the ratio)."""
    hf = load_hf_config(cfg)
    cls = concrete_class(hf)
    if cfg.attn_implementation == "sdpa" and cls is not None and not cls._supports_sdpa:
        raise ConfigError(f"model.attn_implementation=sdpa: {cls.__name__} has no sdpa attention (its variants: "
                          f"{', '.join(sorted(attention.variants(hf))) or 'none'}). Fix: "
                          "model.attn_implementation=auto.")
    text = hf.get_text_config()
    if "mla" in attention.variants(hf) and text.num_key_value_heads != text.num_attention_heads:
        raise ConfigError(f"{hf.model_type}: num_key_value_heads={text.num_key_value_heads} differs from "
                          f"num_attention_heads={text.num_attention_heads}, which multi-head latent attention does "
                          "not have. Fix: set num_key_value_heads to num_attention_heads in config.json.")


def load_tokenizer(cfg: ModelConfig) -> Any:
    path = os.path.expanduser(cfg.tokenizer_path or cfg.path)
    key = "model.tokenizer_path" if cfg.tokenizer_path else "model.path"
    if not Path(path).is_dir():  # never a hub lookup
        raise ConfigError(f"{key}='{path}' is not a folder. Fix: point it at a local folder with the tokenizer files.")
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file and not cfg.tokenizer_path else {}
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise ConfigError(f"{key}='{path}': no tokenizer could be read from it ({type(e).__name__}: {e}). Fix: point "
                          "it at a folder with tokenizer.json (and tokenizer_config.json).") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_token_ids(cfg: ModelConfig, tokenizer: Any, datasets: list[Any]) -> None:
    """Every token id the run feeds the model must have a row in its embedding (else the engine fails with an
    IndexError on the first step). Checked on the tokenized data, before the model is built: at once when the
    tokenizer has no more ids than the embedding; else by the data's largest id (a stream, not read ahead, is
    refused by the tokenizer's size)."""
    hf = load_hf_config(cfg)
    rows = getattr(hf.get_text_config(), "vocab_size", None)
    if not rows or len(tokenizer) <= rows:
        return
    where = f"model.tokenizer_path='{cfg.tokenizer_path}'" if cfg.tokenizer_path else f"the tokenizer of '{cfg.path}'"
    fix = ("Fix: use the model's own tokenizer (or one whose ids fit), or a model whose embedding was resized to "
           f"{len(tokenizer)} rows and saved.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else -1
    if pad >= rows:
        raise ConfigError(f"{where} pads with id {pad}, but the model's embedding has {rows} rows "
                          f"(vocab_size in {cfg.path}/config.json). {fix}")
    for data in datasets:
        if not hasattr(data, "datasets"):  # streamed: its ids are not known before it is read
            raise ConfigError(f"{where} has {len(tokenizer)} ids, the model's embedding {rows} rows (vocab_size in "
                              f"{cfg.path}/config.json): ids from {rows} on would fail in the model. {fix}")
        for source, part in zip(data.sources, data.datasets):
            top = max((int(np.max(shard.input_ids)) for shard in part.shards if len(shard.input_ids)), default=-1)
            if top >= rows:
                raise ConfigError(f"The data of source '{source.name}' ({', '.join(source.paths)}) holds token id "
                                  f"{top}, but the model's embedding has {rows} rows (vocab_size in {cfg.path}/"
                                  f"config.json; {where} has {len(tokenizer)} ids). {fix}")


def load_hf_config(cfg: ModelConfig) -> Any:
    """The model's Hugging Face config, with `model.override_config` applied."""
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(os.path.expanduser(cfg.path), trust_remote_code=cfg.trust_remote_code,
                                            **kwargs)
    except (OSError, ValueError, KeyError) as e:  # unknown model_type, a field the config class refuses, ...
        raise ConfigError(f"model.path='{cfg.path}': transformers cannot read its config ({type(e).__name__}: {e}). "
                          "Fix: check config.json (model_type, fields), or upgrade transformers for a newer "
                          "architecture.") from None
    return override_config(config, cfg.override_config) if cfg.override_config else config


# fields that size the weights: a new value would not fit the checkpoint in model.path
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim")


def _shape_changes(fields: dict[str, Any], overrides: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in overrides.items():
        old = fields.get(k)
        if isinstance(v, dict) and isinstance(old, dict):
            out += _shape_changes(old, v, f"{prefix}{k}.")
        elif k in SHAPE_FIELDS and old is not None and v != old:
            out.append(f"{prefix}{k}={v} (the weights have {old})")
    return out


def override_config(config: Any, overrides: dict[str, Any]) -> Any:
    """A copy of `config` with `overrides` set. The config class is rebuilt from the merged fields, so it
    converts legacy names as it does when reading config.json (e.g. `rope_scaling` into `rope_parameters`);
    a mapping merges into a mapping field (a sub-config such as `text_config`). Names the class does not
    know are refused by name, before any weights are read."""
    fields = config.to_dict()
    changed = _shape_changes(fields, overrides)
    if changed:
        raise ConfigError(f"model.override_config sets {', '.join(changed)}: the weights in the model folder have "
                          "other shapes and would not load into it. Fix: drop the key; new tokens need a model whose "
                          "embedding has rows for them (resize and save it first).")
    merged = {**fields, **{k: _merged(fields.get(k), v) for k, v in overrides.items()}}
    try:
        new = type(config).from_dict(merged)
    except Exception as e:  # the config class's own checks (e.g. layer_types vs num_hidden_layers)
        cause = getattr(e, "__cause__", None) or e
        raise ConfigError(f"model.override_config does not make a valid {type(config).__name__}: {cause}") from None
    known = set(fields) | set(getattr(config, "attribute_map", {}))
    unknown = [k for k in overrides if k not in known and k in new.to_dict()]  # kept as-is: nothing read it
    if unknown:
        close = {k: difflib.get_close_matches(k, sorted(fields), n=1) for k in unknown}
        hints = "; ".join(f"{k}" + (f" (did you mean {c[0]}?)" if c else "") for k, c in close.items())
        raise ConfigError(f"model.override_config sets {hints}, which "
                          f"{'is not a field' if len(unknown) == 1 else 'are not fields'} "
                          f"of the model's {type(config).__name__}. Fix: use fields of its config.json.")
    return new


def _merged(old: Any, new: Any) -> Any:
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{k: _merged(old.get(k), v) for k, v in new.items()}}
    return new


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu", attention_device: torch.device | str | None = None,
               compute_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load the weights onto `device`; the attention kernel is chosen for `attention_device` (where the model
    will run, which differs when rank 0 loads on the CPU before sharding onto a GPU). The model is as the
    checkpoint defines it; `shardtune.parallelize` makes it the one that trains."""
    kwargs: dict[str, Any] = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {"use_safetensors": True}
    hf_config = load_hf_config(cfg)
    if cfg.override_config:
        kwargs["config"] = hf_config
    attn = attention_for(cfg, attention_device or device, compute_dtype, hf_config)
    model = auto_class(hf_config).from_pretrained(
        os.path.expanduser(cfg.path), dtype=DTYPES[cfg.dtype], attn_implementation=attn,
        trust_remote_code=cfg.trust_remote_code, **kwargs,
    )
    model.config.use_cache = False
    return model.to(device)


def auto_class(hf_config: Any) -> Any:
    """A vision-language checkpoint loads as its own class (vision tower included), any other as a causal LM."""
    return AutoModelForImageTextToText if vision.is_vision_config(hf_config) else AutoModelForCausalLM


def concrete_class(hf_config: Any) -> type | None:
    """The transformers class `auto_class` builds for this config (for the kernels it declares); None for
    remote-code models."""
    return auto_class(hf_config)._model_mapping.get(type(hf_config), None)


def attention_for(cfg: ModelConfig, device: torch.device | str, compute_dtype: torch.dtype,
                  hf_config: Any = None) -> str | dict[str, str]:
    hf_config = hf_config if hf_config is not None else load_hf_config(cfg)
    text_config = hf_config.get_text_config() if vision.is_vision_config(hf_config) else hf_config
    chosen = attention.choose(cfg.attn_implementation, cfg.use_remove_padding, torch.device(device), compute_dtype,
                              text_config, concrete_class(hf_config))
    return vision.attention_per_part(hf_config, chosen)


def build_from_config(hf_config: Any, cfg: ModelConfig, device: torch.device | str,
                      compute_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An uninitialised model of the right shape (used on the meta device)."""
    model = auto_class(hf_config).from_config(
        hf_config, dtype=DTYPES[cfg.dtype], attn_implementation=attention_for(cfg, device, compute_dtype, hf_config),
        trust_remote_code=cfg.trust_remote_code)
    model.config.use_cache = False
    return model
