"""Tiny models and tokenizers built from code, for the demo, the tests and the benchmarks.

Nothing is downloaded: the tokenizer is byte-level (every text round-trips) with ChatML special tokens,
and the model is a small Qwen2 built from a config with a fixed seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer(
    chat_template: str = CHATML_TEMPLATE,
    special_tokens: list[str] | None = None,
    eos_token: str = "<|im_end|>",
    pad_token: str = "<|endoftext|>",
    bos_token: str | None = None,
):
    """A byte-level BPE tokenizer without merges (256 byte tokens) plus the given special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys((special_tokens or CHATML_SPECIALS) + [eos_token, pad_token]
                                  + ([bos_token] if bos_token else [])))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, pad_token=pad_token, bos_token=bos_token)
    fast.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in (eos_token, pad_token, bos_token)]})
    fast.chat_template = chat_template
    return fast


def tiny_qwen2_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      intermediate: int | None = None, max_positions: int = 2048, tie: bool = False):
    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate or 4 * hidden,
        max_position_embeddings=max_positions, tie_word_embeddings=tie, use_cache=False,
        rope_theta=10000.0,
    )


def save_tiny_model(out: str | Path, seed: int = 0, tokenizer=None, vocab_size: int | None = None,
                    **config_kwargs) -> Path:
    """Write a randomly initialised tiny Qwen2 + byte tokenizer as a Hugging Face folder (safetensors).
    `vocab_size` larger than the tokenizer's gives a head of a real model's size (rows never used as targets)."""
    tokenizer = tokenizer or byte_tokenizer()
    config = tiny_qwen2_config(vocab_size or len(tokenizer), **config_kwargs)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------------------
# Tiny members of the model families users fine-tune: each keeps what makes its family different (sliding
# windows shorter than a chat, soft-capping, sinks, MLA head shapes, experts, Gated DeltaNet layers, a vision
# tower), at a size the CPU tests train in seconds. Text families load as AutoModelForCausalLM; multimodal
# ones are saved as their checkpoint class (`architectures` in config.json), as they are released.

_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             max_position_embeddings=2048, head_dim=16, tie_word_embeddings=False)
_WINDOW = 8  # shorter than the fixture chats, so the window changes the result
_MOE = dict(num_experts_per_tok=2)


def _text_families() -> dict[str, tuple[str, dict]]:
    """family -> (config class name in transformers, its fields beyond `_TEXT`)."""
    sliding = dict(sliding_window=_WINDOW, layer_types=["sliding_attention", "full_attention"])
    return {
        "llama": ("LlamaConfig", {}),
        "qwen3": ("Qwen3Config", {}),
        "phi3": ("Phi3Config", {}),
        "gemma2": ("Gemma2Config", dict(sliding, query_pre_attn_scalar=16)),  # + softcapping (its defaults)
        "gemma3_text": ("Gemma3TextConfig", dict(sliding, query_pre_attn_scalar=16)),
        "gpt_oss": ("GptOssConfig", dict(sliding, num_local_experts=4, intermediate_size=64, **_MOE)),  # + sinks
        "deepseek_v3": ("DeepseekV3Config", dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, head_dim=8, num_key_value_heads=4,
                                                 qk_nope_head_dim=16,
                                                 v_head_dim=16, n_routed_experts=4, n_shared_experts=1, n_group=1,
                                                 topk_group=1, moe_intermediate_size=32, first_k_dense_replace=1, **_MOE)),
        "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, moe_intermediate_size=32, **_MOE)),
        "mixtral": ("MixtralConfig", dict(num_local_experts=4, **_MOE)),
        "olmoe": ("OlmoeConfig", dict(num_experts=4, **_MOE)),
        "qwen3_5_text": ("Qwen3_5TextConfig", dict(layer_types=["linear_attention", "full_attention"],
                                                   linear_num_value_heads=4, linear_num_key_heads=2,
                                                   linear_key_head_dim=16, linear_value_head_dim=16)),
    }


_QWEN_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8,
                    temporal_patch_size=2, spatial_merge_size=2)


def _multimodal_families() -> dict[str, tuple[str, str, dict]]:
    """family -> (config class, its text config class, vision config fields)."""
    return {
        "qwen3_5": ("Qwen3_5Config", "qwen3_5_text", dict(_QWEN_VISION, num_position_embeddings=16)),
        "gemma3": ("Gemma3Config", "gemma3_text", dict(model_type="siglip_vision_model", hidden_size=32,
                                                       intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                                       image_size=32, patch_size=8)),
        "qwen2_5_vl": ("Qwen2_5_VLConfig", "qwen3", dict(_QWEN_VISION, window_size=16, fullatt_block_indexes=[0])),
        "qwen3_vl": ("Qwen3VLConfig", "qwen3", dict(_QWEN_VISION, num_position_embeddings=16,
                                                    deepstack_visual_indexes=[0])),
    }


TEXT_FAMILIES = tuple(_text_families())
MULTIMODAL_FAMILIES = tuple(_multimodal_families())


def tiny_family_config(family: str, tokenizer) -> object:
    """The config of a tiny member of `family` (a name of TEXT_FAMILIES or MULTIMODAL_FAMILIES)."""
    import transformers

    ids = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id)
    if family in _text_families():
        name, fields = _text_families()[family]
        return getattr(transformers, name)(**{**_TEXT, **ids, **fields})
    name, text_family, vision = _multimodal_families()[family]
    text_name, fields = _text_families()[text_family]
    text = {**_TEXT, **ids, **fields}
    if family in ("qwen2_5_vl", "qwen3_vl"):  # their text configs are Qwen2-/Qwen3-shaped with mrope
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        text.pop("layer_types", None)
    config = getattr(transformers, name)(text_config=text, vision_config=vision, tie_word_embeddings=False)
    if family == "gemma3":
        config.mm_tokens_per_image = 4  # (image_size / patch_size)^2 patches pooled to 2 x 2
    return config


def save_tiny_family(family: str, out: str | Path, seed: int = 0, tokenizer=None) -> Path:
    """Write a randomly initialised tiny `family` model (its own checkpoint class) + byte tokenizer."""
    from transformers import AutoModelForImageTextToText

    tokenizer = tokenizer or byte_tokenizer()
    config = tiny_family_config(family, tokenizer)
    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if family in MULTIMODAL_FAMILIES else AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
