"""One GPU, bf16: shardtune vs TRL's SFTTrainer on a 1.5B Qwen2-shaped model (random init, config only) with
packed 4k-token micro-batches of long-tailed chats. Run by bench/gpu.sh.

    python bench/gpu.py prepare WORK
    python bench/gpu.py shardtune WORK NAME [key=value ...]   # one shardtune variant -> WORK/st-NAME.json
    python bench/gpu.py trl WORK                               # -> WORK/trl.json
    python bench/gpu.py profile WORK [key=value ...]           # torch.profiler of two steps -> BENCH_OUT
    python bench/gpu.py report WORK                            # the table rows (and BENCH_OUT/results.md)

shardtune reports its own `perf/mfu` (FLOPs from the HF config with each sequence's attention term, over
the card's dense bf16 peak: shardtune/flops.py); TRL's tokens/s are converted with the same FLOPs count.
Each shardtune variant also records the measured CUDA peak next to `shardtune validate`'s estimate for
the same config (shardtune/memory.py).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
STEPS, WARMUP, TOKENS = 8, 3, 4096
GLOBAL_BATCH = 128  # samples per optimizer step (~40k tokens: about ten 4k micro-batches)
# BENCH_GPU_DRY_RUN=1: a tiny model and 3 steps, to check the script on a CPU before spending GPU time
DRY = os.environ.get("BENCH_GPU_DRY_RUN") == "1"
if DRY:
    STEPS, WARMUP, GLOBAL_BATCH = 3, 1, 16
OUT = Path(os.environ.get("BENCH_OUT", "."))


def prepare(work: Path) -> None:
    from packing import long_tailed_chats

    from shardtune.tiny import byte_tokenizer, save_tiny_model

    generation = (Path(__file__).parents[1] / "tests/fixtures/templates/chatml_generation.jinja").read_text()
    # Qwen2.5-1.5B's shape; the vocabulary stays Qwen's size so the head costs what it costs there
    shape = dict(hidden=1536, intermediate=8960, layers=28, heads=12)
    if DRY:
        shape = dict(hidden=64, intermediate=128, layers=2, heads=4)
    save_tiny_model(work / "model", seed=0, tokenizer=byte_tokenizer(generation), vocab_size=151936, **shape,
                    kv_heads=2, max_positions=TOKENS, tie=True)
    rows = long_tailed_chats(GLOBAL_BATCH * STEPS, seed=1)
    (work / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def shardtune_config(work: Path, name: str, extra: list[str]):
    from shardtune.config import load_config, validate

    return validate(load_config(None, [
        f"model.path={work / 'model'}", f"data.train_files={work / 'chats.jsonl'}", "data.cache_dir=null",
        f"trainer.default_local_dir={work / ('st-' + name)}", f"data.train_batch_size={GLOBAL_BATCH}",
        f"data.max_length={TOKENS}", "data.truncation=right", "data.use_dynamic_bsz=true",
        f"data.max_token_len_per_gpu={TOKENS}", "engine.mixed_precision.param_dtype=bf16",
        "model.loss_chunk_size=4096", "model.use_liger=true", "model.enable_gradient_checkpointing=false",
        f"trainer.total_training_steps={STEPS}", "trainer.logger=[jsonl]", "trainer.resume_mode=disable",
        "trainer.progress_bar=false", "checkpoint.save_contents=[model]", "optim.lr=1e-5", *extra]))


def run_shardtune(work: Path, name: str, extra: list[str]) -> dict:
    import torch

    from shardtune.memory import GIB, estimate, model_shape
    from shardtune.trainer import Trainer

    cfg = shardtune_config(work, name, extra)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    history = Trainer(cfg).fit()[WARMUP:]
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # the final checkpoint: not needed, and 6 GB of disk
    out = {"name": name, "overrides": extra, "tokens_per_s": float(np.mean([h["perf/tokens_per_s"] for h in history])),
           "mfu": float(np.mean([h["perf/mfu"] for h in history])),
           "step_s": [round(h["perf/step_time_s"], 4) for h in history],
           "micro_batches": history[-1]["perf/micro_batches"],
           "peak_gb": max(h["perf/max_memory_gb"] for h in history), "final_loss": history[-1]["train/loss"]}
    est = estimate(cfg, model_shape(cfg.model), 1)
    out["estimate_gib"] = {k: round(getattr(est, k) / GIB, 3) for k in
                           ("parameters", "gradients", "optimizer", "working", "activations", "logits", "runtime",
                            "total")}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        outside = (total - free - torch.cuda.memory_reserved()) / GIB  # CUDA context, cuBLAS/NCCL workspaces
        out["measured_gib"] = {"allocated_peak": torch.cuda.max_memory_allocated() / GIB,
                               "reserved_peak": torch.cuda.max_memory_reserved() / GIB,
                               "outside_allocator": outside,
                               "process_peak": torch.cuda.max_memory_reserved() / GIB + outside}
        out["estimate_vs_measured"] = est.total / GIB / out["measured_gib"]["process_peak"]
    return out


def run_trl(work: Path) -> dict:
    import pyarrow as pa
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(x) for x in (work / "chats.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(work / "model")
    attn = "flash_attention_2" if _has("flash_attn") else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(work / "model", attn_implementation=attn, dtype=torch.float32)
    args = SFTConfig(output_dir=str(work / "trl_out"), max_steps=STEPS, per_device_train_batch_size=8,
                     gradient_accumulation_steps=GLOBAL_BATCH // 8, learning_rate=1e-5, bf16=not DRY,
                     logging_steps=1, save_strategy="no", report_to="none", assistant_only_loss=True,
                     max_length=TOKENS, gradient_checkpointing=False, padding_free=attn == "flash_attention_2",
                     use_liger_kernel=_has("liger_kernel"),
                     seed=0, use_cpu=DRY and not torch.cuda.is_available())
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # an explicit fingerprint: datasets' own hashing of the table fails with some pyarrow/dill pairs (seen on
    # the GPU machine: "Can't pickle MonthDayNano")
    dataset = Dataset(pa.Table.from_pylist(rows), fingerprint="bench-long-tailed-chats")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok, callbacks=[StepTimer()])
    trainer.train()
    tokens = sum(len(x["input_ids"]) for x in trainer.train_dataset)
    per_step = tokens / len(trainer.train_dataset) * GLOBAL_BATCH
    elapsed = times[-1] - times[WARMUP - 1]
    return {"tokens_per_s": per_step * (len(times) - WARMUP) / elapsed, "attention": attn,
            "liger": _has("liger_kernel"),
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")}


def profile(work: Path, extra: list[str]) -> None:
    """Two steps under torch.profiler (after warm-up): kernels by device time, operators by host time, and
    how much of the step the GPU was busy."""
    import torch
    from torch.profiler import ProfilerActivity

    from shardtune.trainer import Trainer

    cfg = shardtune_config(work, "profile", [f"trainer.total_training_steps={WARMUP + 2}", *extra])
    trainer = Trainer(cfg)
    steps = iter(trainer.loader)
    for _ in range(WARMUP):
        trainer.train_step(next(steps))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(2):
            trainer.train_step(next(steps))
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    lines = [f"wall {wall:.3f} s for 2 steps; GPU kernel time {device_us / 1e6:.3f} s "
             f"(busy {device_us / 1e6 / wall:.0%})", "",
             events.table(sort_by="self_device_time_total", row_limit=30), "",
             events.table(sort_by="self_cpu_time_total", row_limit=25)]
    (OUT / "profile.txt").write_text("\n".join(lines))
    print(lines[0])


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def report(work: Path) -> None:
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)"
    day = datetime.date.today()
    lines = []
    results = {}
    for f in sorted(work.glob("st-*.json")):
        st = json.loads(f.read_text())
        results[st["name"]] = st
        est = st.get("estimate_vs_measured", float("nan"))
        lines.append(f"| {day} | {card} | shardtune {st['name']} | {st['tokens_per_s']:.0f} | {st['mfu']:.3f} | "
                     f"{st['peak_gb']:.1f} | estimate/measured {est:.2f} |")
    trl = json.loads((work / "trl.json").read_text()) if (work / "trl.json").exists() else None
    if trl and "base" in results:
        base = results["base"]
        mfu_trl = base["mfu"] * trl["tokens_per_s"] / base["tokens_per_s"]
        lines.append(f"| {day} | {card} | TRL SFTTrainer ({trl['attention']}, liger {trl['liger']}) | "
                     f"{trl['tokens_per_s']:.0f} | {mfu_trl:.3f} | {trl['peak_gb']:.1f} | |")
        lines.append(f"ratio_vs_trl={base['tokens_per_s'] / trl['tokens_per_s']:.2f}")
    print("\n".join(lines))
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    (OUT / "results.json").write_text(json.dumps({"shardtune": results, "trl": trl}, indent=1))


if __name__ == "__main__":
    command, work = sys.argv[1], Path(sys.argv[2])
    if command == "prepare":
        prepare(work)
    elif command == "report":
        report(work)
    elif command == "profile":
        profile(work, sys.argv[3:])
    elif command == "trl":
        result = run_trl(work)
        (work / "trl.json").write_text(json.dumps(result))
        print(json.dumps(result))
    else:
        result = run_shardtune(work, sys.argv[3], sys.argv[4:])
        (work / f"st-{sys.argv[3]}.json").write_text(json.dumps(result))
        print(json.dumps(result))
