#!/usr/bin/env bash
# Side by side on this machine: shardtune vs TRL's SFTTrainer vs a plain transformers loop, same model
# (fixed init), same long-tailed multi-turn chats, one epoch each, fp32. Then shardtune on 1 vs 2
# processes. Prints a table and, last, `ratio_vs_trl=<shardtune supervised tok/s / TRL's>`.
#   bash bench/run.sh [--quick]        (needs the bench extra: pip install -e '.[bench]')
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
samples=512
[[ "${1:-}" == "--quick" ]] && samples=192
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export TOKENIZERS_PARALLELISM=false
"$PY" bench/compare.py prepare "$work" --samples "$samples" >/dev/null 2>&1
for system in shardtune trl plain; do
    "$PY" bench/compare.py "$system" "$work" > "$work/$system.log" 2>&1 || { cat "$work/$system.log"; exit 1; }
done
# scaling: the same shardtune run on 2 processes (1 thread each) vs 1 process (2 threads): sharded (FSDP2's
# default) and as whole replicas (engine.fsdp_size=1: one gradient all-reduce per step, the better choice
# for a model this small)
for layout in sharded replicated; do
    extra=""; [[ $layout == replicated ]] && extra="engine.fsdp_size=1"
    "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 bench/scaling.py "$work" $extra \
        > "$work/scaling.log" 2>&1 || { cat "$work/scaling.log"; exit 1; }
    mv "$work/scaling.json" "$work/scaling_$layout.json"
    rm -rf "$work/scale_run"
done
"$PY" - "$work" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
r = {s: json.loads((work / f"{s}.json").read_text()) for s in ("shardtune", "trl", "plain")}
print(f"{'system':10s} {'sup. tok/s':>10s} {'wall s':>8s} {'peak RSS GB':>11s} {'final loss':>10s} {'steps':>5s}")
for s, x in r.items():
    print(f"{s:10s} {x['supervised_tokens_per_s']:10.0f} {x['train_s']:8.1f} {x['peak_rss_gb']:11.2f} "
          f"{x['final_loss']:10.4f} {x['steps']:5d}")
one = r["shardtune"]["supervised_tokens_per_s"]
for layout in ("sharded", "replicated"):
    two = json.loads((work / f"scaling_{layout}.json").read_text())["supervised_tokens_per_s"]
    print(f"shardtune 2 processes, {layout}: {two:.0f} sup. tok/s, efficiency vs 1 process {two / one:.2f} "
          "(same 2 cores: 1 process uses 2 threads)")
print(f"ratio_vs_trl={one / r['trl']['supervised_tokens_per_s']:.2f}")
PY
