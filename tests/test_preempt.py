"""Preemption: SIGTERM mid-run finishes the step, saves, exits with preempt.EXIT_CODE without a traceback, and
the relaunch continues bitwise as if never stopped (1 process, and 2 under `train --nproc 2`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import (
    SLOW_STEPS,
    arithmetic_rows,
    losses_by_step,
    read_metrics,
    run_cli,
    train_args,
    train_once,
    write_jsonl,
)

from shardtune.checkpoint import TRACKER, LocalFolder, RunDir
from shardtune.preempt import EXIT_CODE

pytestmark = pytest.mark.slow  # real training runs, relaunched
STEPS = "trainer.total_training_steps=12"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("preempt") / "train.jsonl", arithmetic_rows(40, seed=11))


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, data, tmp_path_factory):
    out = {}
    for nproc in (1, 2):
        run_dir = tmp_path_factory.mktemp(f"full{nproc}") / "run"
        train_once(*train_args(tiny_model, data, run_dir, STEPS), *(["--nproc", "2"] if nproc == 2 else []))
        out[nproc] = losses_by_step(run_dir)
    return out


def sigterm_after(cmd: list[str], run_dir, steps: int, everyone: bool):
    """Start `shardtune train` (pausing after every step), SIGTERM it once `steps` steps are logged: the launcher
    only (as Kubernetes does), or with `everyone` every process of the run (as SLURM does)."""
    proc = subprocess.Popen([sys.executable, str(SLOW_STEPS), "train", *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and sum('"train/loss"' in line for line in metrics.read_text().splitlines()) >= steps:
            if everyone:
                signal_everything_mentioning(str(run_dir), signal.SIGTERM)
            else:
                proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=240)
    return proc.returncode, err


def signal_everything_mentioning(text: str, sig: int) -> None:
    from pathlib import Path

    for proc_dir in Path("/proc").iterdir():
        if proc_dir.name.isdigit() and int(proc_dir.name) != os.getpid():
            try:
                if text in (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    os.kill(int(proc_dir.name), sig)
            except (OSError, ProcessLookupError):
                pass


@pytest.mark.parametrize("nproc,everyone", [(1, False), (2, False), (2, True)],
                         ids=["1-process", "2-processes-launcher-signalled", "2-processes-all-signalled"])
def test_sigterm_saves_exits_cleanly_and_resumes_bitwise(tiny_model, data, tmp_path, uninterrupted, nproc, everyone):
    run_dir = tmp_path / "run"
    launch = ["--nproc", "2"] if nproc == 2 else []
    cmd = [*train_args(tiny_model, data, run_dir, STEPS), *launch]
    code, err = sigterm_after(cmd, run_dir, steps=4, everyone=everyone)
    assert code == EXIT_CODE, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"event"' in x]
    stop = next(e for e in events if e["event"] == "preempt")
    step = stop["step"]
    assert stop["saved"] and 4 <= step < 12 and f"stopped after step {step}" in err
    assert RunDir(LocalFolder(run_dir)).complete_steps() == [step]  # the only save: the one SIGTERM asked for
    assert (run_dir / TRACKER).read_text() == str(step)
    r = run_cli("train", *cmd)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_metrics(run_dir)
    after = rows[[x["step"] for x in rows].index(step + 1, step):]  # the relaunch's rows
    assert [x["step"] for x in after] == list(range(step + 1, 13))
    for x in after:
        assert x["train/loss"] == uninterrupted[nproc][x["step"]], x["step"]  # bitwise


def test_sigterm_stops_at_once_while_loading_and_after_the_step_while_training():
    from shardtune import preempt

    try:
        preempt.install()
        assert not preempt.StopAgreement(distributed=False).stop()
        with pytest.raises(preempt.Preempted):  # loading or tokenizing: nothing to save, stop now
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        preempt.install()
        preempt.defer(True)  # the loop runs: the signal only asks
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert preempt.StopAgreement(distributed=False).stop()
    finally:
        preempt.install()  # the flags as new
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
