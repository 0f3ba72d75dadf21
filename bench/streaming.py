"""What streaming costs per step against the map-style (pre-tokenized, cached) path, on the bench shape.

    python bench/streaming.py WORKDIR [--rows 8192] [--batch 64] [--steps 20] [--buffer 1024] [--repeats 2]

Rows are the multi-turn chats of bench/tokenize_scale.py (about 195 tokens each, byte-level tokenizer, ChatML).

1. Data only (no model): the time to produce one step's micro-batches in the loop (data.prefetch_steps=0),
   map-style with a warm cache (planning + collation) against streaming (reading + tokenizing + the shuffle
   buffer + planning + collation), over `--steps` steps after the buffer has filled; the difference is the
   tokenization work a stream adds to every step, which its prefetch thread has to hide.
2. Training: the same steps on the bench model (Qwen2-shaped, hidden 256, 4 layers), prefetching 2 steps as
   by default: median step time and `perf/data_wait_s` (what the prefetch thread did not hide), map-style
   against streaming, alternating `--repeats` times so that both see the same machine load.
Also: the size of a checkpoint's stream state (trainer_state.json's loader entry) per buffered sample.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from shardtune.config import load_config, resolve_sources, validate
from shardtune.data.dataset import build_dataset
from shardtune.data.loader import RankLayout, SampledBatches, StepLoader
from shardtune.data.stream import SampleStream
from shardtune.model import load_tokenizer
from shardtune.tiny import save_tiny_model
from shardtune.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from tokenize_scale import chat_rows  # noqa: E402


def config(work: Path, args: argparse.Namespace, streaming: bool, *extra: str):
    return validate(load_config(None, [
        f"model.path={work / 'model'}", f"data.train_files={work / 'rows.jsonl'}", f"data.cache_dir={work / 'cache'}",
        f"data.train_batch_size={args.batch}", "data.micro_batch_size_per_gpu=16", "data.max_length=2048",
        f"data.streaming={str(streaming).lower()}", f"data.shuffle_buffer={args.buffer}",
        f"trainer.total_training_steps={args.steps}", "trainer.logger=[jsonl]", "trainer.save_freq=-1",
        "trainer.resume_mode=disable", "optim.lr=1e-4", *extra]))


def data_only(work: Path, args: argparse.Namespace, streaming: bool) -> dict:
    """Seconds per step to draw and prepare a step in the loop, after the first `skip` steps."""
    cfg = config(work, args, streaming, "data.prefetch_steps=0")
    tokenizer = load_tokenizer(cfg.model)
    if streaming:
        data = SampleStream(resolve_sources(cfg.data.train_files, cfg.data)[0], tokenizer, cfg.data, cfg.trainer.seed)
    else:
        data = SampledBatches(build_dataset(cfg.data.train_files, cfg.data, tokenizer, progress=False), cfg.data,
                              cfg.trainer.seed)
    loader = StepLoader(data, cfg.data, RankLayout(), packed=True, pad_id=tokenizer.pad_token_id)
    steps = iter(loader)
    skip = -(-min(args.buffer, args.rows) // args.batch) + 1  # the steps that fill the buffer first
    for _ in range(skip):
        next(steps)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        batch = next(steps)
        loader.consumed(batch)
    per_step = (time.perf_counter() - t0) / args.steps
    out = {"s_per_step": per_step}
    if streaming:
        state = json.dumps(loader.state_dict())
        out["state_bytes"] = len(state)
        out["buffered"] = len(loader.state_dict()["buffer"])
    return out


def training(work: Path, args: argparse.Namespace, streaming: bool, k: int) -> dict:
    cfg = config(work, args, streaming, f"trainer.default_local_dir={work / f'run_{streaming}_{k}'}")
    history = Trainer(cfg).fit()[1:]  # the first step warms up
    return {"step_s": statistics.median(h["perf/step_time_s"] for h in history),
            "data_wait_s": statistics.median(h["perf/data_wait_s"] for h in history),
            "max_data_wait_s": max(h["perf/data_wait_s"] for h in history),
            "final_loss": history[-1]["train/loss"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("work", type=Path)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--buffer", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "model").is_dir():
        save_tiny_model(work / "model", seed=0, hidden=256, layers=4, heads=4, kv_heads=2)
    with (work / "rows.jsonl").open("w") as f:
        for row in chat_rows(args.rows):
            f.write(json.dumps(row) + "\n")
    data_only(work, args, streaming=False)  # fills the cache: map-style steps below read it warm
    results: dict[str, list[dict]] = {"map_data": [], "stream_data": [], "map_train": [], "stream_train": []}
    for k in range(args.repeats):
        results["map_data"].append(data_only(work, args, streaming=False))
        results["stream_data"].append(data_only(work, args, streaming=True))
        results["map_train"].append(training(work, args, streaming=False, k=k))
        results["stream_train"].append(training(work, args, streaming=True, k=k))
    med = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in results.items()}
    print(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "median": med, "runs": results}, indent=1))
    overhead = med["stream_data"]["s_per_step"] - med["map_data"]["s_per_step"]
    print(f"data_prep_ms_per_step map={1e3 * med['map_data']['s_per_step']:.1f} "
          f"stream={1e3 * med['stream_data']['s_per_step']:.1f} tokenization_overhead_ms={1e3 * overhead:.1f} "
          f"stream_rows_per_s={args.batch / med['stream_data']['s_per_step']:.0f}")
    print(f"train_step_ms map={1e3 * med['map_train']['step_s']:.1f} stream={1e3 * med['stream_train']['step_s']:.1f} "
          f"data_wait_ms map={1e3 * med['map_train']['data_wait_s']:.2f} "
          f"stream={1e3 * med['stream_train']['data_wait_s']:.2f}")
    per_sample = med['stream_data']['state_bytes'] / med['stream_data']['buffered']
    print(f"stream_state_bytes_per_buffered_sample={per_sample:.1f}")


if __name__ == "__main__":
    main()
