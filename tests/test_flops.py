"""FLOPs: hand-derived counts, torch's FLOP counter on a real model, MFU in (0, 1) on CPU runs."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

from shardtune.flops import matmul_params_per_token, training_flops
from shardtune.tiny import tiny_qwen2_config


def test_dense_count_by_hand():
    cfg = tiny_qwen2_config(300, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=256)
    # per layer: q,o 64x64 each; k,v 64x32 each; gate/up/down 3 x 64x256; plus the 300x64 head
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 256
    assert matmul_params_per_token(cfg) == 2 * per_layer + 300 * 64
    # attention: 6 x layers x heads x head_dim x sum(s^2), from each sequence's own length
    assert training_flops(cfg, [10, 30]) == 6 * matmul_params_per_token(cfg) * 40 + 6 * 2 * 4 * 16 * (100 + 900)


def test_matches_torch_flop_counter():
    cfg = tiny_qwen2_config(300, hidden=64, layers=2, heads=4, kv_heads=2)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    ids = torch.randint(0, 300, (1, 50))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False).logits.sum().backward()
    dense = 6 * matmul_params_per_token(cfg) * 50
    attention = training_flops(cfg, [50]) - dense
    # eager attention multiplies the full s x s matrix (masked half included): twice the causal count
    assert counter.get_total_flops() == dense + 2 * attention


def test_moe_counts_active_experts_only():
    mixtral = MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=100)
    assert matmul_params_per_token(mixtral) == 4 * 64 * 64 + 2 * 3 * 64 * 128 + 64 * 8 + 100 * 64
    qwen3 = Qwen3MoeConfig(hidden_size=64, moe_intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=4, vocab_size=100)
    assert matmul_params_per_token(qwen3) == 64 * 16 * (2 * 4 + 2 * 2) + 4 * 3 * 64 * 32 + 64 * 16 + 100 * 64
