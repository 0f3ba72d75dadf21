"""Run the shardtune CLI with a pause after every optimizer step, so a test can kill it at a known point."""

import sys
import time

from shardtune import cli
from shardtune.trainer import Trainer

_train_step = Trainer.train_step


def slow_train_step(self, *args, **kwargs):
    out = _train_step(self, *args, **kwargs)
    time.sleep(0.25)
    return out


Trainer.train_step = slow_train_step
cli.WORKER = [__file__]  # `train --nproc N`: the workers pause too
sys.exit(cli.main(sys.argv[1:]))
