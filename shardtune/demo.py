"""`shardtune demo`: a tiny model learns a chat task on CPU, measured before and after.

The task is word reversal ("Reverse: planet" -> "tenalp"), which a randomly initialised model
cannot do and a small transformer learns in about a hundred steps. Everything is generated here: the
byte-level tokenizer, the Qwen2-shaped model (from a config, fixed seed) and the data; training goes
through the real trainer (config, data pipeline, engine, metrics), exactly as `shardtune train` does, and so
does the measurement: the `eval` section scores exact match of greedy answers on held-out words before
training, during it and at the end. The final checkpoint is left in DIR/run for `shardtune chat`.
All samples have about the same length, so right-padded batches are the faster layout on CPU here.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from shardtune.checkpoint import step_name
from shardtune.config import load_config, validate
from shardtune.tiny import byte_tokenizer, save_tiny_model
from shardtune.trainer import Trainer

N_TRAIN, N_VAL, N_EVAL = 8000, 100, 100
MODEL = {"hidden": 256, "layers": 2, "heads": 4, "kv_heads": 4, "intermediate": 1024, "max_positions": 128, "tie": True}
STEPS = 160  # 98% held-out exact match (120 steps: 88%); about 40 s of wall time on 2 quiet cores
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def make_problems(seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Disjoint train / val / held-out words of 3-6 letters: chat rows, the held-out ones as prompt/response."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < N_TRAIN + N_VAL + N_EVAL:
        words.add("".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6))))
    ordered = sorted(words)
    rng.shuffle(ordered)

    def row(w: str) -> dict:
        return {"messages": [{"role": "user", "content": f"Reverse: {w}"},
                             {"role": "assistant", "content": w[::-1]}]}

    train = [row(w) for w in ordered[:N_TRAIN]]
    val = [row(w) for w in ordered[N_TRAIN : N_TRAIN + N_VAL]]
    heldout = [{"prompt": f"Reverse: {w}", "response": w[::-1]} for w in ordered[N_TRAIN + N_VAL :]]
    return train, val, heldout


def run_demo(out: str, steps: int | None = None, seed: int = 0) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train, val, heldout = make_problems(seed)
    for name, rows in (("train", train), ("val", val), ("heldout", heldout)):
        (out_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = save_tiny_model(out_dir / "model", seed=seed, tokenizer=byte_tokenizer(), **MODEL)
    steps = steps or STEPS
    run_dir = out_dir / "run"
    cfg = validate(load_config(None, [
        f"model.path={model_dir}", f"data.train_files={out_dir / 'train.jsonl'}",
        f"data.val_files={out_dir / 'val.jsonl'}", f"trainer.default_local_dir={run_dir}",
        "data.train_batch_size=64", "data.micro_batch_size_per_gpu=64", "data.max_length=64",
        "data.cache_dir=null", "optim.lr=3e-3", "optim.lr_warmup_steps=20", "trainer.resume_mode=disable",
        "model.use_remove_padding=false", f"trainer.total_training_steps={steps}",
        f"trainer.test_freq={max(1, steps // 3)}", f"trainer.seed={seed}",
        # exact match of greedy answers on the held-out words: before training, every third of it, at the end
        f"eval.files={out_dir / 'heldout.jsonl'}", f"eval.freq={max(1, steps // 4)}", f"eval.max_samples={N_EVAL}",
        "eval.max_new_tokens=12", f"eval.batch_size={N_EVAL}",
    ]))
    history = Trainer(cfg).fit()
    scores = [r["eval/exact_match"] for r in history if "eval/exact_match" in r]
    result = {"accuracy_before": scores[0], "accuracy_after": scores[-1], "n_eval": N_EVAL}
    (out_dir / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    checkpoint = run_dir / step_name(steps)
    print(f"accuracy before training: {scores[0]:.2%}, after: {scores[-1]:.2%} on {N_EVAL} held-out words "
          f"({time.time() - t0:.0f} s in all; metrics in {run_dir / 'metrics.jsonl'}, answers in {run_dir / 'eval'})",
          flush=True)
    print(f"chat with it:  shardtune chat {checkpoint}    (against the untrained model: --compare {model_dir}; "
          f"scripted: --prompts {out_dir / 'heldout.jsonl'})", flush=True)
    return result
