"""One GPU, bf16: shardtune vs TRL's SFTTrainer on a 1.5B Qwen2-shaped model (random init, config only) with
packed 4k-token micro-batches of long-tailed chats. Run by bench/gpu.sh; appends rows to bench/RESULTS.md.

    python bench/gpu.py prepare WORK | shardtune WORK | trl WORK | report WORK

shardtune reports its own `perf/mfu` (FLOPs from the HF config with each sequence's attention term, over
the card's dense bf16 peak: shardtune/flops.py); TRL's tokens/s are converted with the same FLOPs count.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
STEPS, WARMUP, TOKENS = 12, 2, 4096
GLOBAL_BATCH = 32  # samples per optimizer step
# BENCH_GPU_DRY_RUN=1: a tiny model and 3 steps, to check the script on a CPU before spending GPU time
DRY = os.environ.get("BENCH_GPU_DRY_RUN") == "1"
if DRY:
    STEPS, WARMUP = 3, 1


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


def run_shardtune(work: Path) -> dict:
    from shardtune.config import load_config, validate
    from shardtune.trainer import Trainer

    cfg = validate(load_config(None, [
        f"model.path={work / 'model'}", f"data.train_files={work / 'chats.jsonl'}", "data.cache_dir=null",
        f"trainer.default_local_dir={work / 'st_run'}", f"data.train_batch_size={GLOBAL_BATCH}",
        f"data.max_length={TOKENS}", "data.truncation=right", "data.use_dynamic_bsz=true",
        f"data.max_token_len_per_gpu={TOKENS}", "engine.mixed_precision.param_dtype=bf16",
        "model.loss_chunk_size=4096", "model.use_liger=true", "model.enable_gradient_checkpointing=false",
        f"trainer.total_training_steps={STEPS}", "trainer.logger=[jsonl]", "trainer.resume_mode=disable",
        "checkpoint.save_contents=[model]", "optim.lr=1e-5"]))
    history = Trainer(cfg).fit()[WARMUP:]
    return {"tokens_per_s": float(np.mean([h["perf/tokens_per_s"] for h in history])),
            "mfu": float(np.mean([h["perf/mfu"] for h in history])),
            "peak_gb": max(h["perf/max_memory_gb"] for h in history), "final_loss": history[-1]["train/loss"]}


def run_trl(work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(x) for x in (work / "chats.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(work / "model")
    attn = "flash_attention_2" if _has("flash_attn") else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(work / "model", attn_implementation=attn, dtype=torch.float32)
    args = SFTConfig(output_dir=str(work / "trl_out"), max_steps=STEPS, per_device_train_batch_size=8,
                     gradient_accumulation_steps=GLOBAL_BATCH // 8, learning_rate=1e-5, bf16=True,
                     logging_steps=1, save_strategy="no", report_to="none", assistant_only_loss=True,
                     max_length=TOKENS, padding_free=attn == "flash_attention_2", use_liger_kernel=_has("liger_kernel"),
                     seed=0, use_cpu=DRY and not torch.cuda.is_available())
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[StepTimer()])
    trainer.train()
    tokens = sum(len(x["input_ids"]) for x in trainer.train_dataset)
    per_step = tokens / len(trainer.train_dataset) * GLOBAL_BATCH
    elapsed = times[-1] - times[WARMUP - 1]
    return {"tokens_per_s": per_step * (len(times) - WARMUP) / elapsed, "attention": attn,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def report(work: Path) -> None:
    import torch

    st = json.loads((work / "shardtune.json").read_text())
    trl_file = work / "trl.json"
    trl = json.loads(trl_file.read_text()) if trl_file.exists() else None
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)"
    mfu_trl = st["mfu"] * trl["tokens_per_s"] / st["tokens_per_s"] if trl else float("nan")
    lines = [f"| {datetime.date.today()} | {card} | shardtune | {st['tokens_per_s']:.0f} | {st['mfu']:.3f} | "
             f"{st['peak_gb']:.1f} |"]
    if trl:
        lines.append(f"| {datetime.date.today()} | {card} | TRL SFTTrainer ({trl['attention']}) | "
                     f"{trl['tokens_per_s']:.0f} | {mfu_trl:.3f} | {trl['peak_gb']:.1f} |")
    print("\n".join(lines))
    if trl:
        print(f"ratio_vs_trl={st['tokens_per_s'] / trl['tokens_per_s']:.2f}")
    if DRY:
        return
    results = Path(__file__).parent / "RESULTS.md"
    results.write_text(results.read_text().rstrip() + "\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    command, work = sys.argv[1], Path(sys.argv[2])
    if command == "prepare":
        prepare(work)
    elif command == "report":
        report(work)
    else:
        result = run_shardtune(work) if command == "shardtune" else run_trl(work)
        (work / f"{command}.json").write_text(json.dumps(result))
        print(json.dumps(result))
