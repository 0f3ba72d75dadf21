"""Run the shardtune CLI under torchrun, with rank 1's training step replaced by one that raises."""

import os
import sys

from shardtune import cli
from shardtune.engine import fsdp2

if os.environ.get("RANK") == "1":

    def fail(self, micro_batches, num_targets):
        raise RuntimeError("injected failure on rank 1")

    fsdp2.FSDP2Engine.train_batch = fail

sys.exit(cli.main(sys.argv[1:]))
