"""Several small trainings on picture data in one process or one torchrun launch (one start-up for all):
`train_images.py ROOT MODEL DATA SPEC...`, each SPEC `NAME;key=value;...` (its keys replace the defaults below:
batches of 6 in micro-batches of 2, 3 steps) or `NAME;verl;arg;...` (a verl engine command line, translated as
shardtune.verl.sft_trainer translates it). Run NAME writes ROOT/NAME (metrics.jsonl)."""

import os
import sys

from shardtune import parallel
from shardtune.config import load_config, validate
from shardtune.trainer import Trainer
from shardtune.verl.translate import ENGINE, translate

root, model, data, *specs = sys.argv[1:]
for spec in specs:
    name, *extra = spec.split(";")
    if extra[:1] == ["verl"]:
        overrides = translate(extra[1:], ENGINE)
    else:
        keys = {"model.path": model, "data.train_files": f"[{data}]", "data.cache_dir": "null", "data.num_proc": "1",
                "data.train_batch_size": "6", "data.micro_batch_size_per_gpu": "2",
                "trainer.total_training_steps": "3", "optim.lr": "2e-3", "optim.lr_warmup_steps": "0",
                "trainer.logger": "[jsonl]", "trainer.progress_bar": "false",
                "trainer.default_local_dir": f"{root}/{name}"}
        keys.update(item.split("=", 1) for item in extra)
        overrides = [f"{k}={v}" for k, v in keys.items()]
    cfg = validate(load_config(None, overrides), world_size=int(os.environ.get("WORLD_SIZE", "1")))
    Trainer(cfg, parallel.init_world(cfg.sp_size, cfg.engine.timeout_minutes)).fit()
parallel.shutdown(0)
