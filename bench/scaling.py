"""Under torchrun: the shardtune system of bench/compare.py on several processes; writes WORKDIR/scaling.json."""

import json
import sys
import time
from pathlib import Path

from compare import GLOBAL_BATCH, LR, MICRO

from shardtune import parallel
from shardtune.config import load_config, validate
from shardtune.trainer import Trainer

work = Path(sys.argv[1])
world = parallel.init_world()
cfg = validate(load_config(None, [
    f"model.path={work / 'model'}", f"data.train_files={work / 'chats.jsonl'}", f"trainer.default_local_dir={work / 'scale_run'}",
    f"data.train_batch_size={GLOBAL_BATCH}", f"data.micro_batch_size_per_gpu={MICRO}", "data.max_length=4096",
    "data.cache_dir=null", f"optim.lr={LR}", "optim.lr_scheduler_type=constant", "optim.lr_warmup_steps=0",
    "optim.weight_decay=0.0", "trainer.total_epochs=1", "trainer.logger=[jsonl]", "trainer.resume_mode=disable"]),
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
