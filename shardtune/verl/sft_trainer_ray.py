"""`python -m shardtune.verl.sft_trainer_ray <verl engine overrides>`: verl's Ray-launched engine trainer
(`verl.trainer.sft_trainer_ray`, the same `sft_trainer_engine.yaml`). Instead of a Ray worker group,
shardtune starts `trainer.n_gpus_per_node` local processes with torchrun, each running the translated line.
On several nodes, run `torchrun --nnodes N ... -m shardtune.verl.sft_trainer` on each node instead."""

import sys

from shardtune.errors import ConfigError, ShardtuneError
from shardtune.verl.compose import compose
from shardtune.verl.translate import RAY, translate


def main(argv: list[str] | None = None) -> int:
    from shardtune import cli

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        overrides = translate(args, RAY)
        trainer = compose(args, RAY.trainer).tree["trainer"]
        if trainer["nnodes"] != 1:
            raise ConfigError(f"trainer.nnodes={trainer['nnodes']}: shardtune launches the processes of one node. "
                              "Fix: run torchrun --nnodes N --nproc-per-node G ... -m shardtune.verl.sft_trainer "
                              "<the same keys> on each node.")
    except ShardtuneError as e:
        print(f"shardtune: error: {e}", file=sys.stderr)
        return e.exit_code
    return cli._launch_torchrun(int(trainer["n_gpus_per_node"]), None, overrides, debug)


if __name__ == "__main__":
    sys.exit(main())
