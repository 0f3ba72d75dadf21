"""Run `shardtune train ARGS...` in this process and print, as the last line, what the training added to
the resident memory: {"baseline_gib", "peak_gib", "added_gib"}.

The baseline is the resident set just before the engine builds the model: Python, torch, transformers and
the model's code are imported by then (the runtime that memory.py's `runtime` line stands for), and the
tokenizer and the data are loaded. The kernel's high-water mark is reset at that point
(`/proc/self/clear_refs` = 5), so the peak is the training's own.
"""

import json
import sys

import transformers.models.qwen2.modeling_qwen2  # noqa: F401  (the runtime: imported before the baseline)

from shardtune import cli, trainer

GIB = 2**30


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


baseline = {}
_build_engine = trainer.build_engine


def build_engine_after_baseline(*args, **kwargs):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    baseline["kib"] = _status_kib("VmRSS")
    return _build_engine(*args, **kwargs)


trainer.build_engine = build_engine_after_baseline
code = cli.main(["train", *sys.argv[1:]])
peak = _status_kib("VmHWM")
print(json.dumps({"baseline_gib": baseline["kib"] * 1024 / GIB, "peak_gib": peak * 1024 / GIB,
                  "added_gib": (peak - baseline["kib"]) * 1024 / GIB}))
sys.exit(code)
