"""The model families as a new user meets them: a tiny member of each (shardtune/tiny.py) trained by the
Trainer with the default config (packed rows, `model.attn_implementation=auto`), the same with padded rows
(`model.use_remove_padding=false`), and on 2 processes (FSDP2, gloo), 3 steps each; multimodal checkpoints
are then exported and read back with their own Auto class.

    python bench/families.py [FAMILY ...]

Beyond the default config the runs set only what a tiny run needs: 3 steps of 16 chats (4 micro-batches of
the default 4 on one process, 2 per rank on two), lr 1e-3 (so 3 steps visibly train), jsonl metrics. One
line per family: the attention `auto` chose, the largest
relative logit difference of a packed row against each of its sequences alone (the model's eager code), the
largest relative difference of the per-step loss and gradient norm, padded vs packed and 2 processes vs 1,
whether the loss fell, and for multimodal checkpoints the export check. Or the error a user would see.
"""

from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

STEPS = 3
LENGTHS = [13, 5, 21]  # two are longer than the tiny families' sliding window (8)
PROBE = torch.arange(3, 40)[None]  # the fixed input whose logits the export must reproduce


def chats(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        msgs = [{"role": "user", "content": f"What is {a}+{b}?" + " please" * rng.randint(0, 6)},
                {"role": "assistant", "content": str(a + b)}]
        if rng.random() < 0.3:
            msgs += [{"role": "user", "content": "And doubled?"}, {"role": "assistant", "content": str(2 * (a + b))}]
        rows.append({"messages": msgs})
    return rows


def train(name: str, root: str, data: str, specs: list[str]) -> None:
    """Worker (one process, or each rank of a torchrun launch): FAMILY:LAYOUT:PATH per run, LAYOUT packed or
    padded. A failure is written to the run's error.txt and the next run goes on."""
    from shardtune import parallel
    from shardtune.config import load_config, validate
    from shardtune.trainer import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    for spec in specs:
        family, layout, path = spec.split(":", 2)
        run_dir = Path(root) / name / f"{family}_{layout}"
        try:
            cfg = validate(load_config(None, [
                f"model.path={path}", f"data.train_files={data}", "data.cache_dir=null", "data.num_proc=1",
                f"trainer.total_training_steps={STEPS}", "data.train_batch_size=16", "optim.lr=1e-3",
                "trainer.logger=[jsonl]",
                f"trainer.default_local_dir={run_dir}", f"model.use_remove_padding={layout == 'packed'}"]),
                world_size=world)
            trainer = Trainer(cfg, parallel.init_world(cfg.sp_size, cfg.engine.timeout_minutes))
            trainer.fit()
            if world == 1 and layout == "packed":
                with torch.no_grad():
                    logits = trainer.engine.model.eval()(input_ids=PROBE, use_cache=False).logits
                torch.save(logits, run_dir / "live_logits.pt")
        except Exception as e:  # the table reports what a user would see
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.txt").write_text(f"{type(e).__name__}: {str(e)[:300]}")
    parallel.shutdown(0)


def launch(nproc: int, *args: str) -> None:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cmd[1:]]
    subprocess.run(cmd, env=env, check=False, timeout=3600)


def metrics(run_dir: Path) -> list[dict]:
    if (run_dir / "error.txt").is_file():
        raise RuntimeError((run_dir / "error.txt").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "step" in r and "event" not in r]


def worst(a: list[dict], b: list[dict]) -> float:
    """Largest relative difference of the per-step loss and gradient norm."""
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1)), "steps differ"
    return max(abs(x[k] - y[k]) / abs(y[k]) for x, y in zip(a, b) for k in ("train/loss", "train/grad_norm"))


def packed_vs_alone(path: Path) -> tuple[str, float]:
    """The attention `auto` picks, and the largest relative logit difference of one packed row of three
    sequences against each sequence alone through the model's eager attention."""
    from shardtune.config import load_config, validate
    from shardtune.model import check_architecture, check_sequence_parallel, load_model
    from shardtune.parallel import World
    from shardtune.parallelize import parallelize

    cfg = validate(load_config(None, [f"model.path={path}", "data.train_files=unused.jsonl"]))
    check_sequence_parallel(cfg.model, cfg.sp_size)
    check_architecture(cfg.model)
    model = parallelize(load_model(cfg.model), cfg, World())
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 250, (n,), generator=g) for n in LENGTHS]
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    with torch.no_grad():
        positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
        logits = model(input_ids=torch.cat(seqs)[None], position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                       max_length_q=max(LENGTHS), max_length_k=max(LENGTHS),
                       use_cache=False).logits[0]
        attn = model.config.get_text_config()._attn_implementation
        model.set_attn_implementation("eager")
        alone = [model(input_ids=s[None], use_cache=False).logits[0] for s in seqs]
    rows = [logits[s:e] for s, e in zip(cu[:-1], cu[1:])]
    return attn, max(((r - a).abs().max() / a.abs().max()).item() for r, a in zip(rows, alone))


def export_check(family: str, src: Path, run_dir: Path, out: Path) -> str:
    """Export the 1-process run's last checkpoint in fp32; the same architecture, every tensor of the input,
    the vision tensors bit for bit, the language model trained, and the export read back with the
    checkpoint's own Auto class gives the live model's logits."""
    import transformers
    from safetensors.torch import load_file

    from shardtune.vision import part_of

    ckpt = max(run_dir.glob("global_step_*"), key=lambda p: int(p.name.split("_")[-1]))
    r = subprocess.run([sys.executable, "-m", "shardtune", "export", str(ckpt), "--out", str(out), "--dtype", "fp32"],
                       capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if r.returncode:
        return f"export fails: {r.stderr.strip().splitlines()[-1][:200]}"
    arch_in, arch_out = (json.loads((d / "config.json").read_text())["architectures"] for d in (src, out))
    before = {k: v for f in glob.glob(str(src / "*.safetensors")) for k, v in load_file(f).items()}
    after = {k: v for f in glob.glob(str(out / "*.safetensors")) for k, v in load_file(f).items()}
    auto = transformers.AutoModelForImageTextToText
    model = auto.from_pretrained(out, dtype=torch.float32).eval()
    buffers = {n for n, _ in model.named_buffers()}  # saved constants (Gemma 4's layer_scalar): kept, not trained
    vision = [k for k in before if part_of(k) != "language" or k in buffers]
    kept = sum(torch.equal(before[k], after[k]) for k in vision if k in after)
    trained = sum(k in after and not torch.equal(before[k], after[k]) for k in before if k not in vision)
    with torch.no_grad():
        got = model(input_ids=PROBE, use_cache=False).logits
    live = torch.load(run_dir / "live_logits.pt")
    logit_diff = ((got - live).abs().max() / live.abs().max()).item()
    ok = (arch_in == arch_out == [type(model).__name__] and before.keys() == after.keys() and kept == len(vision)
          and vision and trained == len(before) - len(vision) and logit_diff < 1e-5)
    return (f"export {'ok' if ok else 'FAILS'}: {arch_out[0]} via {auto.__name__}, {len(after)}/{len(before)} tensors, "
            f"vision + buffers {kept}/{len(vision)} bitwise, language {trained} trained, logits vs live "
            f"{logit_diff:.1e}")


def report(family: str, path: Path, root: Path, multimodal: bool) -> str:
    try:
        attn, alone = packed_vs_alone(path)
        packed = metrics(root / "one" / f"{family}_packed")
        padded = worst(metrics(root / "one" / f"{family}_padded"), packed)
        two = worst(metrics(root / "two" / f"{family}_packed"), packed)
        fell = packed[-1]["train/loss"] < packed[0]["train/loss"]
        ok = alone < 1e-5 and padded < 1e-4 and two < 1e-4 and fell
        line = (f"| {family} | {ok and 'yes' or 'NO'} | {attn} | {alone:.1e} | {padded:.1e} | {two:.1e} | "
                f"{packed[0]['train/loss']:.3f} -> {packed[-1]['train/loss']:.3f} |")
        if multimodal:
            line += f" {export_check(family, path, root / 'one' / f'{family}_packed', root / 'export' / family)} |"
        return line
    except Exception as e:
        return f"| {family} | NO: {type(e).__name__}: {str(e)[:200]} |"


def main(families: list[str]) -> None:
    from shardtune.tiny import MULTIMODAL_FAMILIES, TEXT_FAMILIES, save_tiny_family

    families = families or list(TEXT_FAMILIES + MULTIMODAL_FAMILIES)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in chats(16 * STEPS)))
        dirs = {f: save_tiny_family(f, root / "models" / f) for f in families}
        launch(1, "one", str(root), str(data), *[f"{f}:{layout}:{dirs[f]}" for f in families
                                                 for layout in ("packed", "padded")])
        launch(2, "two", str(root), str(data), *[f"{f}:packed:{dirs[f]}" for f in families])
        print("| family | all hold | auto | packed vs alone (logits) | padded vs packed | 2 procs vs 1 | loss |",
              flush=True)
        for f in families:
            print(report(f, dirs[f], root, f in MULTIMODAL_FAMILIES), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        train(*sys.argv[2:5], sys.argv[5:])
    else:
        main(sys.argv[1:])
