"""Preemption: SIGTERM, what SLURM, Kubernetes and most schedulers send some time before they kill a job.

A training process that gets SIGTERM finishes the step in flight, saves a checkpoint (unless
`checkpoint.save_on_preempt=false` or the step is already saved), and exits with `EXIT_CODE`; a relaunch with
`trainer.resume_mode=auto` continues from that checkpoint exactly. The signal reaches the ranks of a job at
different moments (or only some of them), so they agree on the step to stop after with one tiny all-reduce per
step on a gloo group of their own.

Under `shardtune train --nproc N` the launcher takes SIGTERM for the job: torchrun is started with SIGTERM
ignored (torchrun would otherwise kill its workers within 30 s and print a `SignalException` traceback), the
launcher forwards the signal to the workers, and it exits with `EXIT_CODE` once they have saved and exited.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_CODE = 143  # 128 + SIGTERM: stopped on request, after saving (a scheduler may requeue the job)
MARKER_ENV = "SHARDTUNE_PREEMPT_MARKER"  # a file the main rank writes when it stopped for SIGTERM (the launcher's)

_requested = False
_deferred = False  # True while the training loop runs: SIGTERM then waits for the end of the step


class Preempted(BaseException):  # noqa: N818 (a stop, like KeyboardInterrupt, not an error)
    """SIGTERM before training started (loading, tokenizing): nothing to save, the run stops at once."""


def _note(signum: int, frame: object) -> None:
    global _requested
    _requested = True
    if not _deferred:
        raise Preempted()


def install() -> None:
    """From now on SIGTERM stops the run: at once while it loads, after the current step once it trains."""
    global _requested, _deferred
    _requested, _deferred = False, False
    signal.signal(signal.SIGTERM, _note)


def defer(on: bool) -> None:
    """The training loop starts (True) or ends (False): a SIGTERM in between waits for the step to end."""
    global _deferred
    _deferred = on


def request() -> None:
    """Ask for a stop as SIGTERM does (tests, embedding code)."""
    global _requested
    _requested = True


class StopAgreement:
    """Whether any rank got SIGTERM, the same answer on every rank at the same step."""

    def __init__(self, distributed: bool):
        self.group = dist.new_group(backend="gloo") if distributed else None

    def stop(self) -> bool:
        flag = torch.tensor([int(_requested)])
        if self.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())


def report_stopped() -> None:
    """Tell the launcher (when there is one) that the run stopped for SIGTERM: the workers exit 0 so that
    torchrun reports no failure, and the launcher turns this into `EXIT_CODE`."""
    marker = os.environ.get(MARKER_ENV)
    if marker:
        Path(marker).write_text("preempted")


# ---------------------------------------------------------------------------------------------------------
# the launcher's side


def ignore_in_child() -> None:
    """preexec_fn of torchrun: SIGTERM is the launcher's to handle (the workers install their own handler)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def forward_to_children_of(pid: int) -> None:
    """SIGTERM to every child of `pid` (torchrun's workers, which run in sessions of their own)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the command name in parentheses
            try:
                os.kill(int(proc.name), signal.SIGTERM)
            except ProcessLookupError:
                pass
