"""Several small trainings on picture data in one process or one torchrun launch (one start-up for all):
`train_images.py ROOT MODEL DATA NAME[,key=value...]...`. Run NAME writes ROOT/NAME (metrics.jsonl); its keys
replace the defaults below (batches of 6 in micro-batches of 2, 3 steps)."""

import os
import sys

from shardtune import parallel
from shardtune.config import load_config, validate
from shardtune.trainer import Trainer

root, model, data, *specs = sys.argv[1:]
for spec in specs:
    name, *extra = spec.split(",")
    keys = {"model.path": model, "data.train_files": f"[{data}]", "data.cache_dir": "null", "data.num_proc": "1",
            "data.train_batch_size": "6", "data.micro_batch_size_per_gpu": "2", "trainer.total_training_steps": "3",
            "optim.lr": "2e-3", "optim.lr_warmup_steps": "0", "trainer.logger": "[jsonl]",
            "trainer.progress_bar": "false", "trainer.default_local_dir": f"{root}/{name}"}
    keys.update(item.split("=", 1) for item in extra)
    cfg = validate(load_config(None, [f"{k}={v}" for k, v in keys.items()]),
                   world_size=int(os.environ.get("WORLD_SIZE", "1")))
    Trainer(cfg, parallel.init_world(cfg.sp_size, cfg.engine.timeout_minutes)).fit()
parallel.shutdown(0)
