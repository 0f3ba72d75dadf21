"""Tiny models and tokenizers built from code, for the demo, the tests and the benchmarks.

Nothing is downloaded: the tokenizer is byte-level (every text round-trips) with ChatML special tokens,
and the model is a small Qwen2 built from a config with a fixed seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    fast.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in (eos_token, pad_token,
                                                                                            bos_token)]})
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
    deltanet = dict(layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                    linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)
    per_layer = dict(sliding, hidden_size_per_layer_input=8, num_kv_shared_layers=0)  # Gemma 3n/4's per-layer inputs
    moe_shared = dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32, **_MOE)
    mamba2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=8)
    return {
        "llama": ("LlamaConfig", {}),
        "qwen3": ("Qwen3Config", {}),
        "phi3": ("Phi3Config", {}),
        "gemma2": ("Gemma2Config", dict(sliding, query_pre_attn_scalar=16)),  # + softcapping (its defaults)
        "gemma3_text": ("Gemma3TextConfig", dict(sliding, query_pre_attn_scalar=16)),
        "gpt_oss": ("GptOssConfig", dict(sliding, num_local_experts=4, intermediate_size=64, **_MOE)),  # + sinks
        "deepseek_v3": ("DeepseekV3Config", dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, head_dim=8,
                                                 num_key_value_heads=4,
                                                 qk_nope_head_dim=16,
                                                 v_head_dim=16, n_routed_experts=4, n_shared_experts=1, n_group=1,
                                                 topk_group=1, moe_intermediate_size=32, first_k_dense_replace=1,
                                                 **_MOE)),
        "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, moe_intermediate_size=32, **_MOE)),
        "mixtral": ("MixtralConfig", dict(num_local_experts=4, **_MOE)),
        "olmoe": ("OlmoeConfig", dict(num_experts=4, **_MOE)),
        "qwen3_5_text": ("Qwen3_5TextConfig", dict(deltanet)),
        # more families users fine-tune (Phi-4 and Phi-4-mini are Phi-3's class; SmolLM3 has NoPE layers)
        "mistral": ("MistralConfig", dict(sliding_window=_WINDOW)),
        "olmo3": ("Olmo3Config", sliding),
        "cohere2": ("Cohere2Config", sliding),  # + logit_scale
        "smollm3": ("SmolLM3Config", dict(no_rope_layers=[1, 0])),
        "granite": ("GraniteConfig", dict(embedding_multiplier=4.0, residual_multiplier=0.5, logits_scaling=2.0,
                                          attention_multiplier=0.25)),
        "glm4_moe": ("Glm4MoeConfig", dict(n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=32,
                                           first_k_dense_replace=1, n_group=1, topk_group=1, **_MOE)),
        "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=32,
                                                    moe_num_shared_experts=1, moe_layer_start_index=1)),
        "qwen3_next": ("Qwen3NextConfig", dict(deltanet, **moe_shared)),
        "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", dict(deltanet, **moe_shared)),
        "granitemoehybrid": ("GraniteMoeHybridConfig", dict(layer_types=["mamba", "attention"], **mamba2,
                                                            num_local_experts=4, shared_intermediate_size=32, **_MOE)),
        "falcon_h1": ("FalconH1Config", dict(mamba2, mamba_d_ssm=128)),  # attention and mamba side by side
        "jamba": ("JambaConfig", dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                      expert_layer_offset=1, num_experts=4, mamba_d_state=8, mamba_dt_rank=8,
                                      use_mamba_kernels=False, **_MOE)),
        "lfm2": ("Lfm2Config", dict(layer_types=["conv", "full_attention"], conv_L_cache=3)),  # short convolutions
        "gemma3n_text": ("Gemma3nTextConfig", dict(per_layer, laurel_rank=4, altup_num_inputs=2,
                                                   activation_sparsity_pattern=[0.0, 0.0])),
        "gemma4_text": ("Gemma4TextConfig", per_layer),
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
        "gemma4": ("Gemma4Config", "gemma4_text", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                       num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                                       patch_size=8, pooling_kernel_size=2,
                                                       position_embedding_size=64)),
    }


TEXT_FAMILIES = tuple(_text_families())
MULTIMODAL_FAMILIES = tuple(_multimodal_families())


def _text_fields(fields: dict, ids: dict) -> dict:
    text = {**_TEXT, **ids, **fields}
    if "hidden_size_per_layer_input" in text:  # Gemma 3n/4 embed per-layer inputs from the same vocabulary
        text["vocab_size_per_layer_input"] = ids["vocab_size"]
    return text


def tiny_family_config(family: str, tokenizer) -> object:
    """The config of a tiny member of `family` (a name of TEXT_FAMILIES or MULTIMODAL_FAMILIES)."""
    import transformers

    ids = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id)
    if family in _text_families():
        name, fields = _text_families()[family]
        return getattr(transformers, name)(**_text_fields(fields, ids))
    name, text_family, vision = _multimodal_families()[family]
    text_name, fields = _text_families()[text_family]
    text = _text_fields(fields, ids)
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


# Qwen2-VL's chat template, reduced to what the tests use: text and image parts of a message's content
QWEN_VL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_VL_SPECIALS = CHATML_SPECIALS + ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _vlm_config(family: str, tok, layers: int, vision_depth: int, vision_width: int = 32) -> Any:
    """A tiny config of a Qwen-VL family: the language model 64 wide (head 16, mrope sections 2+3+3), the vision
    tower `vision_width` wide (Qwen2-VL's; the others 32), merging 2 x 2 patches into one image token."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_VL_SPECIALS}
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    text = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, max_position_embeddings=2048, rope_parameters=rope,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None, use_cache=False)
    merge = dict(spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_heads=2)
    if family == "qwen2_vl":
        cls, vision = Qwen2VLConfig, dict(depth=vision_depth, embed_dim=vision_width, hidden_size=64, mlp_ratio=2,
                                          patch_size=14, in_chans=3, **merge)
    elif family == "qwen2_5_vl":
        cls, vision = Qwen2_5_VLConfig, dict(depth=vision_depth, hidden_size=32, intermediate_size=64, patch_size=14,
                                             out_hidden_size=64, window_size=56,
                                             fullatt_block_indexes=[vision_depth - 1], **merge)
    elif family in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5"):
        import transformers

        text["head_dim"] = 16
        rope["mrope_interleaved"] = True
        cls = getattr(transformers, {"qwen3_vl": "Qwen3VLConfig", "qwen3_vl_moe": "Qwen3VLMoeConfig",
                                     "qwen3_5": "Qwen3_5Config"}[family])
        vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=64, patch_size=16, out_hidden_size=64,
                      num_position_embeddings=64, **merge)
        if family != "qwen3_5":  # Qwen3.5's tower has no deepstack features
            vision["deepstack_visual_indexes"] = list(range(min(2, vision_depth)))
        if family == "qwen3_vl_moe":
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
        if family == "qwen3_5":  # Gated DeltaNet and attention layers; rope over the whole head (mrope 2+3+3)
            rope["partial_rotary_factor"] = 1.0
            text.update(layer_types=(["linear_attention", "full_attention"] * layers)[:layers],
                        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                        linear_value_head_dim=16)
    else:
        raise ValueError(f"unknown tiny vision-language family {family!r}")
    return cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
               video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
               vision_end_token_id=ids["<|vision_end|>"], eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False)


def save_tiny_vlm(out: str | Path, seed: int = 0, layers: int = 2, vision_depth: int = 2,
                  family: str = "qwen2_vl", vision_width: int = 32, max_image_tokens: int = 16) -> Path:
    """A randomly initialised tiny Qwen-VL model (vision tower, merger, language model: `family` qwen2_vl,
    qwen2_5_vl, qwen3_vl, qwen3_vl_moe or qwen3_5) with the byte tokenizer and the family's image processor
    (small pictures: 4 to `max_image_tokens` image tokens each), as a Hugging Face folder; gemma3:
    `save_tiny_gemma3_vlm`, gemma4: `save_tiny_gemma4_vlm`."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if family in ("gemma3", "gemma4"):
        return (save_tiny_gemma3_vlm if family == "gemma3" else save_tiny_gemma4_vlm)(out, seed, layers)
    tok = byte_tokenizer(QWEN_VL_TEMPLATE, QWEN_VL_SPECIALS)
    config = _vlm_config(family, tok, layers, vision_depth, vision_width)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    patch = config.vision_config.patch_size
    side = patch * 2  # one image token per merged 2 x 2 patches
    Qwen2VLImageProcessorPil(patch_size=patch, min_pixels=side * side * 4,
                             max_pixels=side * side * max_image_tokens).save_pretrained(out)
    return out


# Gemma 3's chat template as released with its instruction-tuned checkpoints (an image part is <start_of_image>)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)
GEMMA3_SPECIALS = ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                   "<end_of_image>", "<image_soft_token>"]
GEMMA3_IMAGE_TOKENS = 16  # a 32 x 32 picture in 8 x 8 patches, one token each: longer than the sliding window


def save_tiny_gemma3_vlm(out: str | Path, seed: int = 0, layers: int = 2) -> Path:
    """A randomly initialised tiny Gemma 3 (SigLIP tower, projector, a language model with a sliding window of
    8 tokens, shorter than a picture's 16 tokens) with a byte tokenizer naming Gemma's image tokens, and the
    family's own processor (Gemma3Processor: AutoProcessor loads it from the folder)."""
    import json

    from transformers import AutoModelForImageTextToText, AutoTokenizer, Gemma3Config, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    out = Path(out)
    byte_tokenizer(GEMMA3_TEMPLATE, GEMMA3_SPECIALS, eos_token="<eos>", pad_token="<pad>",
                   bos_token="<bos>").save_pretrained(out)
    # the processor finds the image tokens by name, as in Gemma's own tokenizer_config.json
    meta = json.loads((out / "tokenizer_config.json").read_text())
    meta["extra_special_tokens"] = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                    "image_token": "<image_soft_token>"}
    (out / "tokenizer_config.json").write_text(json.dumps(meta, indent=2))
    tok = AutoTokenizer.from_pretrained(out)
    text = {**_TEXT, "num_hidden_layers": layers, "vocab_size": len(tok), "sliding_window": _WINDOW,
            "layer_types": (["sliding_attention", "full_attention"] * layers)[:layers],
            "query_pre_attn_scalar": 16, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id, "use_cache": False}
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=GEMMA3_IMAGE_TOKENS,
                          image_token_id=tok.image_token_id, boi_token_id=tok.boi_token_id,
                          eoi_token_id=tok.eoi_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    # transformers starts the projector at zero (every picture then looks alike); a released one is trained
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=32 ** -0.5)
    model.save_pretrained(out, safe_serialization=True)
    Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok,
                    chat_template=GEMMA3_TEMPLATE, image_seq_length=GEMMA3_IMAGE_TOKENS).save_pretrained(out)
    return out


# Gemma 4's chat template as released, reduced to text and image parts (its tools, thinking channels, audio and
# video branches left out): `<|turn>role ... <turn|>`, texts trimmed, an image part written as `\n\n<|image|>\n\n`
GEMMA4_TEMPLATE = (
    "{{ bos_token }}{%- set loop_messages = messages -%}\n"
    "{%- if messages[0]['role'] in ['system', 'developer'] -%}\n"
    "    {{- '<|turn>system\\n' + messages[0]['content'] | trim + '<turn|>\\n' -}}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}\n"
    "    {{- '<|turn>' + role + '\\n' -}}\n"
    "    {%- if message['content'] is string -%}\n        {{- message['content'] | trim -}}\n"
    "    {%- elif message['content'] is sequence -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'text' -%}\n                {{- item['text'] | trim -}}\n"
    "            {%- elif item['type'] == 'image' -%}\n                {{- '\\n\\n<|image|>\\n\\n' -}}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- endif -%}\n    {{- '<turn|>\\n' -}}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{- '<|turn>model\\n' -}}\n{%- endif -%}\n"
)
# the special tokens Gemma 4's tokenizer_config.json names (those of pictures, audio and turns; its processor
# reads the audio ones even for pictures)
GEMMA4_NAMED_TOKENS = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                       "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
                       "sot_token": "<|turn>", "eot_token": "<turn|>"}
GEMMA4_MAX_IMAGE_TOKENS = 70  # the smallest budget its image processor takes: pictures of 8 x 8 patches pooled 2 x 2


def save_tiny_gemma4_vlm(out: str | Path, seed: int = 0, layers: int = 2) -> Path:
    """A randomly initialised tiny Gemma 4 (vision tower, embedder, a language model with per-layer inputs and
    a sliding window of 8 tokens, far shorter than a picture's up to 70, on whose layers a picture's tokens
    attend both ways: use_bidirectional_attention='vision'), a byte tokenizer naming Gemma 4's tokens as its
    tokenizer_config.json does, and its image processor in processor_config.json (its processor also builds a
    video processor, which needs torchvision; without it data/vision.py uses the image processor's rule)."""
    import json

    from transformers import AutoModelForImageTextToText, AutoTokenizer, Gemma4Config
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    out = Path(out)
    byte_tokenizer(GEMMA4_TEMPLATE, ["<bos>", "<eos>", "<pad>", *GEMMA4_NAMED_TOKENS.values(), "<|video|>"],
                   eos_token="<eos>", pad_token="<pad>", bos_token="<bos>").save_pretrained(out)
    meta = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**meta, **GEMMA4_NAMED_TOKENS}, indent=2))
    tok = AutoTokenizer.from_pretrained(out)
    ids = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    text = {**_text_fields(_text_families()["gemma4_text"][1], {"vocab_size": len(tok), **ids}),
            "num_hidden_layers": layers, "layer_types": (["sliding_attention", "full_attention"] * layers)[:layers],
            "use_bidirectional_attention": "vision", "use_cache": False}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, patch_size=8, pooling_kernel_size=2, position_embedding_size=64)
    config = Gemma4Config(text_config=text, vision_config=vision, audio_config=None, image_token_id=tok.image_token_id,
                          boi_token_id=tok.boi_token_id, eoi_token_id=tok.eoi_token_id,
                          video_token_id=tok.convert_tokens_to_ids("<|video|>"), tie_word_embeddings=False, **ids)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)  # its embedder starts random, not at zero as Gemma 3's
    images = Gemma4ImageProcessorPil(patch_size=8, pooling_kernel_size=2, max_soft_tokens=GEMMA4_MAX_IMAGE_TOKENS)
    processor = {"processor_class": "Gemma4Processor", "image_processor": images.to_dict(),
                 "image_seq_length": GEMMA4_MAX_IMAGE_TOKENS}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2, default=int))
    return out
