"""Train several configs one after another in one process or one torchrun launch (what a launch costs is
mostly starting it): `train_runs.py RUNS_JSON`, a JSON list of override lists, one list per run."""

import json
import os
import sys

from shardtune import parallel
from shardtune.config import load_config, validate
from shardtune.trainer import Trainer

for overrides in json.loads(sys.argv[1]):
    cfg = validate(load_config(None, overrides), world_size=int(os.environ.get("WORLD_SIZE", "1")))
    Trainer(cfg, parallel.init_world(cfg.sp_size, cfg.engine.timeout_minutes)).fit()
parallel.shutdown(0)
