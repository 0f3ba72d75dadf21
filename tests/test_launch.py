"""Workers never outlive their launcher: kill -9 of torchrun, or of `shardtune train --nproc`, ends the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import arithmetic_rows, write_jsonl

pytestmark = pytest.mark.dist


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) of every process."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]  # the name may hold spaces: parse after it
        out[int(d.name)] = (int(ppid), state, cmd)
    return out


def _descendants(pid: int) -> set[int]:
    procs, found, frontier = _processes(), set(), {pid}
    while frontier:
        frontier = {p for p, (ppid, _, _) in procs.items() if ppid in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    procs = _processes()
    return {p for p in pids if p in procs and procs[p][1] != "Z"}  # a zombie has exited


@pytest.mark.parametrize("launcher", ["torchrun", "shardtune --nproc"])
def test_workers_exit_within_seconds_of_a_killed_launcher(tiny_model, tmp_path, launcher):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(16, seed=4))
    run_dir = tmp_path / "run"
    train = ["train", f"model.path={tiny_model}", f"data.train_files={data}", f"trainer.default_local_dir={run_dir}",
             "data.train_batch_size=4", "trainer.total_training_steps=100000", "trainer.logger=[jsonl]",
             "data.cache_dir=null"]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "shardtune",
            *train]
           if launcher == "torchrun" else [sys.executable, "-m", "shardtune", *train, "--nproc", "2"])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    job: set[int] = set()
    try:
        metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 180
        while not (metrics.exists() and '"train/loss"' in metrics.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "the job did not start training"
            time.sleep(0.1)
        job = _descendants(proc.pid)
        workers = {p for p in job if "torch.distributed.run" not in _processes()[p][2]
                   and "shardtune" in _processes()[p][2]}
        assert len(workers) >= 2, _processes()
        os.kill(proc.pid, signal.SIGKILL)  # only the launcher
        proc.wait()
        deadline = time.monotonic() + 20
        while _alive(job) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(job), f"still running 20 s after the launcher died: {_alive(job)}"
    finally:
        for p in _alive(job | _descendants(proc.pid) | {proc.pid}):
            os.kill(p, signal.SIGKILL)


def test_a_launcher_that_is_pid_1_keeps_its_workers(tmp_path):
    """In a container the launcher is often pid 1: a worker must not take that for a dead parent."""
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    child = "from shardtune.parallel import exit_with_parent; exit_with_parent(); print('worker alive')"
    launcher = (f"import os, subprocess, sys; assert os.getpid() == 1; "
                f"sys.exit(subprocess.run([sys.executable, '-c', {child!r}]).returncode)")
    r = subprocess.run(["unshare", "-Urfp", "--mount-proc", sys.executable, "-c", launcher],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0 and "worker alive" not in r.stdout and "unshare" in r.stderr:
        pytest.skip(f"unshare is not permitted here: {r.stderr.strip()}")
    assert r.returncode == 0 and "worker alive" in r.stdout, (r.returncode, r.stdout, r.stderr)
