"""`shardtune plot RUN_DIR [--out FILE.png]`: loss, learning rate, throughput and MFU against step, and the
evaluation's scores (eval/*) when the run has them."""

from __future__ import annotations

import json
from pathlib import Path

from shardtune.errors import ShardtuneError

PANELS = [("loss", ["train/loss", "val/loss"]), ("learning rate", ["train/lr"]),
          ("tokens/s", ["perf/tokens_per_s"]), ("MFU", ["perf/mfu"])]


def read_steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ShardtuneError(f"{path} does not exist. Fix: pass a run directory (trainer.default_local_dir).")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    last: dict[int, dict] = {}
    for r in rows:  # a resumed run logs some steps again: the latest value of a step wins
        if "step" in r and "event" not in r:
            last[r["step"]] = r
    return [last[s] for s in sorted(last)]


def plot_run(run_dir: str, out: str | None = None) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ShardtuneError("shardtune plot needs matplotlib. Fix: pip install 'shardtune[plot]'.") from None
    run = Path(run_dir)
    rows = read_steps(run)
    if not rows:
        raise ShardtuneError(f"{run / 'metrics.jsonl'} holds no training steps yet.")
    scores = sorted({k for r in rows for k in r if k.startswith("eval/")})
    panels = PANELS + ([("evaluation", scores)] if scores else [])
    grid_rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(grid_rows, 2, figsize=(11, 3.5 * grid_rows))
    if len(panels) % 2:
        axes.flat[-1].set_visible(False)
    per_source = sorted({k for r in rows for k in r if k.startswith("val/loss/")})  # one curve per val source
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys + (per_source if title == "loss" else []):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if key.startswith(("val/", "eval/")) else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(str(run))
    fig.tight_layout()
    path = Path(out) if out else run / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path
