"""`python -m shardtune.verl.sft_trainer_ray <verl engine overrides>`: verl's Ray-launched engine trainer
(`verl.trainer.sft_trainer_ray`, the same `sft_trainer_engine.yaml`). Instead of a Ray worker group,
shardtune starts `trainer.n_gpus_per_node` local processes with torchrun, each running the translated line.
On several nodes, run `torchrun --nnodes N ... -m shardtune.verl.sft_trainer` on each node instead."""

import sys

from shardtune import cli
from shardtune.errors import ConfigError
from shardtune.verl.compose import compose
from shardtune.verl.entry import run
from shardtune.verl.translate import RAY


def _launch_local(args: list[str], overrides: list[str], debug: bool) -> int:
    trainer = compose(args, RAY.trainer).tree["trainer"]
    if trainer["nnodes"] != 1:
        raise ConfigError(f"trainer.nnodes={trainer['nnodes']}: shardtune launches the processes of one node. "
                          "Fix: run torchrun --nnodes N --nproc-per-node G ... -m shardtune.verl.sft_trainer "
                          "<the same keys> on each node.")
    return cli.launch_torchrun(int(trainer["n_gpus_per_node"]), None, overrides, debug)


def main(argv: list[str] | None = None) -> int:
    return run(argv, RAY, launch=_launch_local)


if __name__ == "__main__":
    sys.exit(main())
