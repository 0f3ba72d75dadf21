"""GPU smoke benchmark: bf16 FSDP2 training of a ~0.5B Qwen2-shaped model (random init, no hub).

    torchrun --nproc-per-node 1 bench/gpu_smoke.py [--steps 20] [--seq 2048]

Prints tokens/s, an MFU estimate (6 N tokens + causal attention FLOPs; H100/H200 dense bf16 peak 989 TFLOP/s)
and peak memory, and appends a row to bench/RESULTS.md. Run by bench/gpu_smoke.sh.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import tempfile
from pathlib import Path

import torch

from shardtune import parallel
from shardtune.config import load_config, validate
from shardtune.tiny import byte_tokenizer, tiny_qwen2_config
from shardtune.trainer import Trainer

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def flops_per_step(cfg, tokens: int, seq: int) -> float:
    h, layers, inter, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * h // cfg.num_attention_heads
    dense = layers * (3 * h * inter + h * (2 * h + 2 * kv)) + vocab * h  # matmul weights touched per token
    attention = 6 * layers * h * seq * tokens  # causal: half of 12 * L * h * s per token
    return 6 * dense * tokens + attention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq", type=int, default=2048)
    args = ap.parse_args()
    world = parallel.init_world()
    tmp = Path(tempfile.mkdtemp())
    tok = byte_tokenizer()
    config = tiny_qwen2_config(len(tok), hidden=1024, layers=24, heads=16, kv_heads=2, intermediate=4864,
                               max_positions=args.seq)
    from transformers import AutoModelForCausalLM

    if world.is_main:
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(tmp / "model")
        tok.save_pretrained(tmp / "model")
        rng = random.Random(0)
        body = "".join(rng.choice("abcdefgh ") for _ in range(args.seq - 40))
        rows = [{"messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": body}]}] * 64
        (tmp / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    parallel.barrier(world)
    cfg = validate(load_config(None, [
        f"model.path={tmp / 'model'}", f"data.train_files={tmp / 'data.jsonl'}", f"trainer.default_local_dir={tmp / 'run'}",
        f"data.train_batch_size={4 * world.world_size}", "data.micro_batch_size_per_gpu=1", f"data.max_length={args.seq}",
        "engine.mixed_precision.param_dtype=bf16", "optim.lr=1e-4", f"trainer.total_training_steps={args.steps}",
        "trainer.logger=[jsonl]", "trainer.resume_mode=disable", "data.cache_dir=null"]), world.world_size)
    history = Trainer(cfg, world).fit()
    rows = history[3:]  # warm-up excluded
    step = sum(h["perf/step_time_s"] for h in rows) / len(rows)
    tokens = rows[-1]["train/global_tokens"]
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))
    mfu = flops_per_step(config, tokens, args.seq) / step / world.world_size / peak
    line = (f"| {datetime.date.today()} | {name} x{world.world_size} | 0.5B Qwen2-shaped, seq {args.seq}, bf16 | "
            f"{tokens / step:.0f} tok/s | MFU {mfu:.1%} | peak {rows[-1]['perf/max_memory_gb']:.1f} GiB |")
    if world.is_main:
        print(line, flush=True)
        with open(Path(__file__).parent / "RESULTS.md", "a") as f:
            f.write(line + "\n")
    parallel.shutdown(0)


if __name__ == "__main__":
    main()
