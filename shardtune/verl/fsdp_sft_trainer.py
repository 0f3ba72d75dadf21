"""`python -m shardtune.verl.fsdp_sft_trainer <verl legacy overrides>`: verl's `fsdp_sft_trainer` command line
(config `sft_trainer.yaml` with its `optim: fsdp` group: model.partial_pretrain, data.multiturn.*, top-level
use_remove_padding and ulysses_sequence_parallel_size, ...) run by shardtune's trainer with verl's defaults."""

import sys

from shardtune.verl.entry import run
from shardtune.verl.translate import LEGACY


def main(argv: list[str] | None = None) -> int:
    return run(argv, LEGACY)


if __name__ == "__main__":
    sys.exit(main())
