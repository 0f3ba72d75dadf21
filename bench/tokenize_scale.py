"""Peak memory and throughput of tokenization at two dataset sizes: `shardtune validate` fills the cache.

    python bench/tokenize_scale.py WORKDIR [--rows 20000 100000] [--repo PATH [PATH ...]] [--num-proc 2]

Rows are multi-turn chats recombined from short arithmetic exchanges (2-5 user/assistant pairs, sometimes a
system prompt; about 195 tokens each with the byte-level tokenizer and ChatML). Each size runs
`python -m shardtune validate` in a fresh process with an empty cache; `--repo` picks which checkouts of
shardtune run (e.g. main and a branch, alternating per size so that both see the same machine load).
Reported per run: wall seconds, rows/s (rows / wall, start-up included), CPU seconds of the whole tree
(user + system; less sensitive than wall to other jobs on a shared machine), peak RSS of the largest
process of the tree (what `/usr/bin/time` reports as maximum resident set size) and the peak of the tree's
summed PSS (shared pages counted once), sampled every 50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def short_exchange(rng: random.Random) -> list[dict]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return [{"role": "user", "content": f"What is {a}+{b}?" + " please" * rng.randint(0, 4)},
            {"role": "assistant", "content": f"{a + b}."}]


def chat_rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        msgs = [{"role": "system", "content": "Answer tersely."}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(2, 5)):
            msgs += short_exchange(rng)
        yield {"messages": msgs}


def prepare(work: Path, sizes: list[int]) -> None:
    if not (work / "model").is_dir():  # in a child: this process stays small (see run_validate)
        code = "import sys; from shardtune.tiny import save_tiny_model; save_tiny_model(sys.argv[1], seed=0)"
        subprocess.run([sys.executable, "-c", code, str(work / "model")], check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    for n in sizes:
        path = work / f"rows_{n}.jsonl"
        if not path.is_file():
            with path.open("w") as f:
                for row in chat_rows(n):
                    f.write(json.dumps(row) + "\n")


class TreeSampler(threading.Thread):
    """Peak of the summed PSS of a process and its descendants, sampled every 50 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in procs:
                try:
                    total += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak = max(self.peak, total)
            self.done.wait(0.05)


def run_validate(work: Path, n: int, repo: Path, num_proc: int) -> dict:
    """One `shardtune validate` of `repo`'s code (run from that folder: `-m` imports from the working
    directory first). A child's ru_maxrss starts at its parent's RSS at the fork, so this process imports
    nothing heavy: what wait4 reports is the validate tree's own peak."""
    with tempfile.TemporaryDirectory(dir=work) as cache:
        cmd = [sys.executable, "-m", "shardtune", "validate", f"model.path={work / 'model'}",
               f"data.train_files={work / f'rows_{n}.jsonl'}", f"data.cache_dir={cache}", "data.max_length=1024",
               f"data.num_proc={num_proc}", "trainer.progress_bar=false"]
        env = {**os.environ, "PYTHONPATH": str(repo), "TOKENIZERS_PARALLELISM": "false"}
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        sampler.done.set()
        sampler.join()
    if status != 0:
        raise SystemExit(f"validate failed on {n} rows:\n{out}")
    tokens = re.search(r"(\d+) tokens", out)
    return {"repo": str(repo), "rows": n, "tokens": int(tokens.group(1)) if tokens else None,
            "wall_s": round(wall, 1), "rows_per_s": round(n / wall),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3),
            "peak_tree_pss_gb": round(sampler.peak / 2**30, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--rows", type=int, nargs="+", default=[20000, 100000])
    ap.add_argument("--repo", type=Path, nargs="+", default=[ROOT],
                    help="checkouts of shardtune to run (default: this one)")
    ap.add_argument("--num-proc", type=int, default=2)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work, args.rows)
    results = []
    for n in args.rows:
        for repo in args.repo:
            results.append(run_validate(args.work, n, repo.resolve(), args.num_proc))
            print(json.dumps(results[-1]), flush=True)
    for repo in args.repo:
        mine = [r for r in results if r["repo"] == str(repo.resolve())]
        if len(mine) > 1:
            print(f"{repo}: rss_ratio_{mine[-1]['rows']}_vs_{mine[0]['rows']}="
                  f"{mine[-1]['peak_rss_gb'] / mine[0]['peak_rss_gb']:.2f}")


if __name__ == "__main__":
    main()
