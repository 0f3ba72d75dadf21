"""Under torchrun: the shardtune system of bench/compare.py on several processes; writes WORKDIR/scaling.json.

    torchrun --nproc-per-node 2 bench/scaling.py WORKDIR [key=value ...]
"""

import json
import sys
import time
from pathlib import Path

from compare import shardtune_overrides

from shardtune import parallel
from shardtune.config import load_config, validate
from shardtune.trainer import Trainer

work = Path(sys.argv[1])
world = parallel.init_world()
cfg = validate(load_config(None, [*shardtune_overrides(work), f"trainer.default_local_dir={work / 'scale_run'}",
                                  *sys.argv[2:]]),
               world.world_size)
trainer = Trainer(cfg, world)
t0 = time.perf_counter()
history = trainer.fit()
elapsed = time.perf_counter() - t0
if world.is_main:
    tokens = json.loads((work / "supervised_tokens.json").read_text())
    (work / "scaling.json").write_text(json.dumps({"supervised_tokens_per_s": tokens / elapsed, "train_s": elapsed,
                                                   "final_loss": history[-1]["train/loss"]}))
parallel.shutdown(0)
