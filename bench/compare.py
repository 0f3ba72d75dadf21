"""One system of the side-by-side benchmark, in its own process (so peak RSS is its own).

    python bench/compare.py prepare WORKDIR [--samples N]     # model (fixed init) + long-tailed chats
    python bench/compare.py shardtune|trl|plain WORKDIR       # train one epoch, write WORKDIR/<system>.json

Every system trains the same model from the same weights on the same samples, once each (one epoch of
global batches of 32), fp32, AdamW lr 1e-3 constant, assistant-only loss, so all see the same supervised
tokens; the number reported is supervised tokens / training wall time.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

GLOBAL_BATCH, MICRO, LR = 32, 8, 1e-3


def prepare(work: Path, samples: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from packing import long_tailed_chats

    from shardtune.tiny import byte_tokenizer, save_tiny_model

    generation_template = (Path(__file__).parents[1] / "tests/fixtures/templates/chatml_generation.jinja").read_text()
    save_tiny_model(work / "model", seed=0, tokenizer=byte_tokenizer(generation_template), hidden=256, layers=4,
                    heads=4, kv_heads=2, max_positions=4096)
    rows = long_tailed_chats(samples, seed=1)
    (work / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def supervised_tokens(work: Path) -> int:
    """Counted with shardtune's masks (the same spans TRL takes from the template's generation markers)."""
    from shardtune.config import DataConfig, ModelConfig
    from shardtune.data.dataset import build_dataset
    from shardtune.model import load_tokenizer

    tok = load_tokenizer(ModelConfig(path=str(work / "model")))
    ds = build_dataset([str(work / "chats.jsonl")], DataConfig(cache_dir=None, max_length=4096), tok, progress=False)
    return sum(int((ds[i][1][1:] != -100).sum()) for i in range(len(ds)))


def shardtune_overrides(work: Path) -> list[str]:
    """shardtune's settings for the bench run (also used by bench/profile_step.py and bench/scaling.py)."""
    return [
        f"model.path={work / 'model'}", f"data.train_files={work / 'chats.jsonl'}",
        f"trainer.default_local_dir={work / 'st_run'}",
        f"data.train_batch_size={GLOBAL_BATCH}", f"data.micro_batch_size_per_gpu={MICRO}", "data.max_length=4096",
        "data.cache_dir=null", f"optim.lr={LR}", "optim.lr_scheduler_type=constant", "optim.lr_warmup_steps=0",
        "optim.weight_decay=0.0", "trainer.total_epochs=1", "trainer.logger=[jsonl]", "trainer.resume_mode=disable",
        "model.use_remove_padding=true"]


def run_shardtune(work: Path) -> dict:
    from shardtune.config import load_config, validate
    from shardtune.trainer import Trainer

    cfg = validate(load_config(None, shardtune_overrides(work)))
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    history = trainer.fit()
    return {"train_s": time.perf_counter() - t0, "final_loss": history[-1]["train/loss"], "steps": len(history)}


def run_trl(work: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(x) for x in (work / "chats.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", attn_implementation="sdpa")
    args = SFTConfig(output_dir=str(work / "trl_out"), num_train_epochs=1, per_device_train_batch_size=MICRO,
                     gradient_accumulation_steps=GLOBAL_BATCH // MICRO, learning_rate=LR, lr_scheduler_type="constant",
                     warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="no", report_to="none",
                     assistant_only_loss=True, max_length=4096, use_cpu=True, seed=0, bf16=False,
                     dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    t0 = time.perf_counter()
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_s": time.perf_counter() - t0, "final_loss": losses[-1], "steps": out.global_step}


def run_plain(work: Path) -> dict:
    """A plain transformers loop: right-padded micro-batches, mean loss per token of the step."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from shardtune.config import DataConfig, ModelConfig
    from shardtune.data.batching import collate
    from shardtune.data.dataset import build_dataset
    from shardtune.model import load_tokenizer

    tok = load_tokenizer(ModelConfig(path=str(work / "model")))
    ds = build_dataset([str(work / "chats.jsonl")], DataConfig(cache_dir=None, max_length=4096), tok, progress=False)
    model = AutoModelForCausalLM.from_pretrained(work / "model", attn_implementation="sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    t0 = time.perf_counter()
    loss_value, steps = float("nan"), 0
    for start in range(0, len(order), GLOBAL_BATCH):
        batch = order[start : start + GLOBAL_BATCH]
        micro = [collate([ds[i] for i in batch[k : k + MICRO]], packed=False, pad_id=tok.pad_token_id)
                 for k in range(0, len(batch), MICRO)]
        total = sum(mb.num_targets for mb in micro)
        opt.zero_grad()
        loss_sum = 0.0
        for mb in micro:
            logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits
            loss = F.cross_entropy(logits.flatten(0, 1), mb.targets.flatten(), ignore_index=-100, reduction="sum")
            (loss / total).backward()
            loss_sum += loss.item()
        opt.step()
        loss_value, steps = loss_sum / total, steps + 1
    return {"train_s": time.perf_counter() - t0, "final_loss": loss_value, "steps": steps}


def main() -> None:
    cmd, work = sys.argv[1], Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    if cmd == "prepare":
        samples = int(sys.argv[sys.argv.index("--samples") + 1]) if "--samples" in sys.argv else 256
        prepare(work, samples)
        (work / "supervised_tokens.json").write_text(json.dumps(supervised_tokens(work)))
        return
    result = {"shardtune": run_shardtune, "trl": run_trl, "plain": run_plain}[cmd](work)
    result["supervised_tokens"] = json.loads((work / "supervised_tokens.json").read_text())
    result["supervised_tokens_per_s"] = result["supervised_tokens"] / result["train_s"]
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    (work / f"{cmd}.json").write_text(json.dumps(result))
    print(cmd, json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
