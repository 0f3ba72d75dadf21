"""Padding-free (+ token budget) vs padded batches on long-tailed chat data: same model, samples, steps.

    python bench/packing.py [--steps 6] [--samples 192]

Prints supervised tokens/s, padding ratio and final loss per layout, then `speedup_packed_vs_padded=X`.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from shardtune.config import load_config, validate
from shardtune.tiny import save_tiny_model
from shardtune.trainer import Trainer

WORDS = "the a model learns to answer questions about data with short and long replies".split()


def long_tailed_chats(n: int, seed: int = 0) -> list[dict]:
    """Multi-turn chats whose lengths follow a log-normal law (median ~120 tokens, tail past 1500)."""
    rng = random.Random(seed)

    def text(mean_words: float) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, int(rng.lognormvariate(mean_words, 0.9)))))

    rows = []
    for _ in range(n):
        msgs = []
        for _ in range(1 + int(rng.expovariate(1.0))):
            msgs += [{"role": "user", "content": text(2.0)}, {"role": "assistant", "content": text(2.6)}]
        rows.append({"messages": msgs})
    return rows


LAYOUTS = {
    "padded (micro-batch 8)": ["model.use_remove_padding=false", "data.micro_batch_size_per_gpu=8"],
    "padding-free (micro-batch 8)": ["model.use_remove_padding=true", "data.micro_batch_size_per_gpu=8"],
    "padding-free + token budget 8192": ["model.use_remove_padding=true", "data.use_dynamic_bsz=true",
                                         "data.max_token_len_per_gpu=8192"],
}


def run(layout: list[str], model: Path, data: Path, out: Path, steps: int) -> dict:
    cfg = validate(load_config(None, [
        f"model.path={model}", f"data.train_files={data}", f"trainer.default_local_dir={out}",
        "data.train_batch_size=32", "data.max_length=4096", "data.cache_dir=null", "optim.lr=1e-3",
        f"trainer.total_training_steps={steps}", "trainer.logger=[jsonl]", "trainer.resume_mode=disable",
        "trainer.save_freq=-1", *layout]))
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    history = trainer.fit()
    wall = time.perf_counter() - t0
    rows = history[1:]  # the first step warms up allocator and kernels
    step_time = sum(h["perf/step_time_s"] for h in rows)
    return {"supervised_tokens_per_s": sum(h["train/supervised_tokens"] for h in rows) / step_time,
            "tokens_per_s": sum(h["train/global_tokens"] for h in rows) / step_time,
            "padding_ratio": sum(h["perf/padding_ratio"] for h in rows) / len(rows),
            "final_loss": history[-1]["train/loss"], "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--samples", type=int, default=192)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_tiny_model(tmp / "model", seed=0, hidden=256, layers=4, heads=4, kv_heads=2,
                                max_positions=4096)
        data = tmp / "chats.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in long_tailed_chats(args.samples)))
        results = {}
        for name, layout in LAYOUTS.items():
            results[name] = r = run(layout, model, data, tmp / name.replace(" ", "_"), args.steps)
            print(f"{name:34s} supervised tok/s {r['supervised_tokens_per_s']:8.0f}  all tok/s "
                  f"{r['tokens_per_s']:8.0f}  padding {r['padding_ratio']:.2f}  final loss {r['final_loss']:.4f}",
                  flush=True)
    padded = results["padded (micro-batch 8)"]["supervised_tokens_per_s"]
    best = max(r["supervised_tokens_per_s"] for n, r in results.items() if n.startswith("padding-free"))
    print(f"speedup_packed_vs_padded={best / padded:.2f}")


if __name__ == "__main__":
    main()
