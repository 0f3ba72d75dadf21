"""Answers from a model through its own chat template: what `shardtune chat` and the evaluation during
training both use.

Prompts are rendered with `add_generation_prompt=True`, left-padded into batches and decoded with
`model.generate` (greedy unless a temperature is given). A training model is switched to inference for
the call (eval mode, which also turns NEFTune's noise off, KV cache on, plain `sdpa` attention, or `eager`
for models without sdpa, since the packed-row kernels take no cache or padding mask) and switched back
after it. Under FSDP2 every rank must run the same number of forward passes: the caller gives every rank
the same number of prompts and `synced=True` keeps each `generate` call stepping until every rank's
sequences are done.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature <= 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None}


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]], chat_template: str | None = None,
                  template_kwargs: dict[str, Any] | None = None) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         chat_template=chat_template, **(template_kwargs or {}))


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS and every end token of the model's generation config (e.g. <|eot_id|> and
    <|end_of_text|>), so a turn ends where the template ends it."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


@contextmanager
def inference_mode(model: torch.nn.Module):
    """Eval mode, KV cache on and plain sdpa (or eager) attention for the block; the training settings after it."""
    config = model.config.get_text_config()  # a vision-language model's cache switch is its language model's
    was_training, cache, attn = model.training, config.use_cache, _attention(model.config)
    plain = "sdpa" if getattr(model, "_supports_sdpa", True) else "eager"  # Gemma 2, gpt-oss: no sdpa
    model.eval()
    config.use_cache = True
    if attn != plain:
        model.set_attn_implementation(plain)
    try:
        yield
    finally:
        if attn != plain:
            model.set_attn_implementation(attn)
        config.use_cache = cache
        model.train(was_training)


def _attention(config: Any) -> str | dict[str, str]:
    """The attention of each part (a vision-language model's tower keeps its own), to restore after the block."""
    parts = {k: getattr(config, k, None) for k in getattr(config, "sub_configs", {})}
    parts = {k: c._attn_implementation for k, c in parts.items() if c is not None}
    return parts or config._attn_implementation


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, conversations: list[list[dict[str, Any]]], sampling: Sampling,
             batch_size: int = 16, synced: bool = False, streamer: Any = None, chat_template: str | None = None,
             device: torch.device | str | None = None, template_kwargs: dict[str, Any] | None = None) -> list[str]:
    """The model's answer to each conversation (special tokens dropped, surrounding whitespace stripped)."""
    device = device or next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    answers: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens follow every prompt directly
    try:
        with inference_mode(model):
            for start in range(0, len(conversations), batch_size):
                texts = [render_prompt(tokenizer, c, chat_template,
                                       template_kwargs) for c in conversations[start:start + batch_size]]
                batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
                out = model.generate(**batch, max_new_tokens=sampling.max_new_tokens, eos_token_id=stops,
                                     pad_token_id=tokenizer.pad_token_id, use_cache=True, synced_gpus=synced,
                                     streamer=streamer, **sampling.generate_kwargs())
                new = out[:, batch["input_ids"].shape[1]:]
                answers += [a.strip() for a in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return answers
