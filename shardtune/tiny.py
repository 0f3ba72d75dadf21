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
