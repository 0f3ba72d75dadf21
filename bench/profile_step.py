"""Profile shardtune's training step with torch.profiler on the bench workload.

    python bench/profile_step.py [--steps 4] [--trace trace.json] [overrides ...]
    torchrun --nproc-per-node 2 bench/profile_step.py ...      (FSDP2; rank 0 prints and traces)

Builds the bench model and chats (bench/compare.py prepare), trains `--steps` optimizer steps (the first is
warm-up, not recorded), prints the operators by self CPU time and, with --trace, writes a Chrome trace
(open in https://ui.perfetto.dev). Extra `key=value` overrides go to the trainer config.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import compare  # noqa: E402  (bench/compare.py: the shared workload)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--samples", type=int, default=192)
    p.add_argument("--trace")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    from shardtune import parallel
    from shardtune.config import load_config, validate
    from shardtune.trainer import Trainer

    world = parallel.init_world()
    work = Path(tempfile.gettempdir()) / "shardtune_profile"
    if world.is_main:
        compare.prepare(work, args.samples)
    parallel.barrier(world)
    cfg = validate(load_config(None, [*compare.shardtune_overrides(work), "trainer.total_epochs=1",
                                      f"trainer.total_training_steps={args.steps}",
                                      f"trainer.default_local_dir={work / 'run'}", *args.overrides]), world.world_size)
    trainer = Trainer(cfg, world)
    steps = iter(trainer.loader)
    trainer.train_step(next(steps))  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(args.steps - 1):
            with torch.profiler.record_function("train_step"):
                trainer.train_step(next(steps))
    if world.is_main:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        if args.trace:
            prof.export_chrome_trace(args.trace)
    parallel.shutdown(0)


if __name__ == "__main__":
    main()
