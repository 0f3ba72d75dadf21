"""`python -m shardtune.verl.sft_trainer <verl engine overrides>`: verl's engine-based `sft_trainer` command
line (config `sft_trainer_engine.yaml` with its model/engine/optim/profiler groups: model.path, engine.*,
data.pad_mode, data.use_dynamic_bsz, ...) run by shardtune's trainer with verl's defaults."""

import sys

from shardtune.verl.entry import run
from shardtune.verl.translate import ENGINE


def main(argv: list[str] | None = None) -> int:
    return run(argv, ENGINE)


if __name__ == "__main__":
    sys.exit(main())
