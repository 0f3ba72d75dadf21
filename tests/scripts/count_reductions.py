"""Run `shardtune train ARGS...` under torchrun with torch.profiler on, and print (rank 0) how many gradient
reductions FSDP2 ran per optimizer step: `reductions_per_step=<n>` (its `FSDP::post_backward_reduce` ranges)."""

import sys

import torch

from shardtune import cli, trainer

_fit = trainer.Trainer.fit


def profiled_fit(self):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        history = _fit(self)
    if self.world.is_main:
        n = sum(e.count for e in prof.key_averages() if e.key.startswith("FSDP::post_backward_reduce"))
        print(f"reductions_per_step={n / len(history):g}", flush=True)
    return history


trainer.Trainer.fit = profiled_fit
sys.exit(cli.main(["train", *sys.argv[1:]]))
