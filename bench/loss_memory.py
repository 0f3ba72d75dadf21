"""Peak memory of the plain loss (full logits) vs the chunked loss head, on a large-vocabulary model.

    python bench/loss_memory.py [--vocab 151936] [--tokens 4096] [--chunk 1024]

A Qwen2-shaped model with Qwen's vocabulary (hidden 256, 2 layers, untied head, fp32) trains 3 steps on
micro-batches of about `--tokens` supervised tokens, once per setting, each in a fresh process so that its
peak RSS is its own. Prints one line per setting and `peak_rss_ratio_chunked_vs_plain=X`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    from shardtune.config import load_config, validate
    from shardtune.trainer import Trainer

    cfg = validate(load_config(None, [
        f"model.path={args.model}", f"data.train_files={args.data}", "data.cache_dir=null", "data.num_proc=1",
        f"data.max_length={args.tokens}", "data.use_dynamic_bsz=true", f"data.max_token_len_per_gpu={args.tokens}",
        "data.train_batch_size=4", "data.shuffle=false", "trainer.total_training_steps=3", "trainer.logger=[jsonl]",
        f"trainer.default_local_dir={args.out}", "trainer.progress_bar=false", "optim.lr=1e-4",
        f"model.loss_chunk_size={args.chunk}"]))
    start = time.perf_counter()
    history = Trainer(cfg).fit()
    print(json.dumps({"chunk": args.chunk, "wall_s": time.perf_counter() - start,
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "final_loss": history[-1]["train/loss"]}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--tokens", type=int, default=4096, help="supervised tokens per micro-batch (one sample)")
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model"), p.add_argument("--data"), p.add_argument("--out")
    args = p.parse_args()
    if args.child:
        return child(args)

    from shardtune.tiny import save_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="loss_memory_"))
    save_tiny_model(tmp / "model", seed=0, vocab_size=args.vocab, hidden=256, layers=2, heads=4, kv_heads=2,
                    max_positions=args.tokens + 64)
    # one sample fills one micro-batch: a short prompt and a reply of about `tokens` byte tokens
    reply = ("abcdefghij " * (args.tokens // 11))[: args.tokens - 40]
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": reply}]}
            for i in range(12)]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    results = []
    for chunk in (0, args.chunk):
        out = subprocess.run([sys.executable, __file__, "--child", "--chunk", str(chunk), "--model", str(tmp / "model"),
                              "--data", str(tmp / "train.jsonl"), "--out", str(tmp / f"run{chunk}"),
                              "--tokens", str(args.tokens)], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        name = "plain (full logits)" if chunk == 0 else f"chunked ({chunk} tokens)"
        print(f"{name:24s} peak RSS {r['peak_rss_gb']:.2f} GB  wall {r['wall_s']:.1f} s  final loss "
              f"{r['final_loss']:.4f}")
    print(f"peak_rss_ratio_chunked_vs_plain={results[1]['peak_rss_gb'] / results[0]['peak_rss_gb']:.2f}")


if __name__ == "__main__":
    main()
