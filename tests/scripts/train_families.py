"""Train several tiny families in one process or one torchrun launch: `train_families.py NAME ROOT DATA
FAMILY:SP:LORA_RANK:PATH...`. Each run writes ROOT/NAME/FAMILY_spSP[_loraR] (metrics, and on one process a
final checkpoint and the live model's logits on a fixed input, for the export round trip). FAMILY+aux adds
the router's aux loss to the loss (output_router_logits, coefficient 0.5)."""

import os
import sys

import torch

from shardtune import parallel
from shardtune.config import load_config, validate
from shardtune.trainer import Trainer

name, root, data, *specs = sys.argv[1:]
world = None
for spec in specs:
    family, sp, rank, path = spec.split(":", 3)
    run_dir = f"{root}/{name}/{family}_sp{sp}" + (f"_lora{rank}" if int(rank) else "")
    cfg = validate(load_config(None, [
        f"model.path={path}", f"data.train_files={data}", "data.cache_dir=null", "data.num_proc=1",
        "data.train_batch_size=8", "data.micro_batch_size_per_gpu=2", "optim.lr=2e-3", "optim.lr_warmup_steps=1",
        "trainer.total_training_steps=3", "trainer.logger=[jsonl]", f"trainer.default_local_dir={run_dir}",
        f"engine.ulysses_sequence_parallel_size={sp}", f"model.lora_rank={rank}", "model.lora_alpha=8",
        *(["model.override_config={output_router_logits: true, router_aux_loss_coef: 0.5}"]
          if family.endswith("+aux") else [])]),
        world_size=int(os.environ.get("WORLD_SIZE", "1")))
    trainer = Trainer(cfg, parallel.init_world(cfg.sp_size, cfg.engine.timeout_minutes))
    trainer.fit()
    if not trainer.world.distributed:
        model = trainer.engine.model.eval()
        ids = torch.arange(3, 40)[None]
        with torch.no_grad():
            torch.save({"input_ids": ids, "logits": model(input_ids=ids, use_cache=False).logits},
                       f"{run_dir}/live_logits.pt")
parallel.shutdown(0)
