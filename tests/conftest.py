"""Shared fixtures: a tiny model folder, byte-level tokenizers for several chat templates, data files."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread in every test process (this one, the CLI runs and torchrun workers inherit it). Many tests
# compare two runs bit for bit (resumed vs uninterrupted, streamed vs map-style); with two threads per process
# the CPU kernels round differently from run to run when the machine is loaded (about 1e-8 relative, seen in
# 1-process SIGKILL/resume runs under load even with OMP_DYNAMIC=FALSE, MKL_DYNAMIC=FALSE and MKL_CBWR set;
# never with one thread), so those checks would test the machine's load rather than the code.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The longest files, longest first. pytest-xdist's loadfile hands a worker whole files in collection order
# (pyproject.toml's addopts has --no-loadscope-reorder: by default it would start with the files holding the
# most tests, the quick parametrized ones, and leave a long single-test file to run alone at the end), so
# these start first and the short files fill in around them. Measured with --durations; a file not named
# keeps its place after them.
LONGEST_FIRST = (
    "test_distributed.py", "test_memory.py", "test_checkpoint.py", "test_training.py", "test_bad_inputs.py",
    "test_verl.py", "test_tokenize_scale.py", "test_preempt.py", "test_families.py", "test_demo.py",
    "test_images.py", "test_images_gemma4.py", "test_remote.py", "test_qlora.py", "test_images_verl.py", "test_lora.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order kept


TEMPLATES = Path(__file__).parent / "fixtures" / "templates"
SPECIAL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<s>", "</s>", "[INST]", "[/INST]",
    "<|user|>", "<|assistant|>", "<|end|>", "<|system|>", "<tool_call>", "</tool_call>", "<think>", "</think>",
]
# (bos, eos) as the real families set them
TEMPLATE_TOKENS = {
    "chatml_generation": (None, "<|im_end|>"),
    "chatml": (None, "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "qwen25_default_system": (None, "<|im_end|>"),
    "gemma_no_system": ("<bos>", "<end_of_turn>"),
    "mistral_inst": ("<s>", "</s>"),
    "qwen3_thinking": (None, "<|im_end|>"),
    "phi3": ("<s>", "<|end|>"),
}


def template_tokenizer(name: str):
    from shardtune.tiny import byte_tokenizer

    bos, eos = TEMPLATE_TOKENS[name]
    return byte_tokenizer((TEMPLATES / f"{name}.jinja").read_text(), SPECIAL_TOKENS, eos_token=eos,
                          pad_token="<|endoftext|>", bos_token=bos)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from shardtune.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"), seed=0)


def arithmetic_rows(n: int, seed: int = 0, multi_turn: bool = False) -> list[dict]:
    """Chat rows of varied length: sums, sometimes with a system prompt or a second turn."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        msgs = [{"role": "system", "content": "Answer tersely."}] if rng.random() < 0.3 else []
        msgs += [{"role": "user", "content": f"What is {a}+{b}?" + " please" * rng.randint(0, 6)},
                 {"role": "assistant", "content": str(a + b)}]
        if multi_turn or rng.random() < 0.3:
            msgs += [{"role": "user", "content": "And doubled?"}, {"role": "assistant", "content": str(2 * (a + b))}]
        rows.append({"messages": msgs})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    """Run `python -m shardtune ...` in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, "-m", "shardtune", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "step" in r and "event" not in r]


def train_args(model: Path, train: object, run_dir: Path, *extra: str) -> list[str]:
    """The keys of a small training run: global batches of 8 in micro-batches of 4, lr 2e-3, metrics to jsonl,
    the tokenization cache beside the run directory. Each `key=value` of `extra` replaces its key's default
    (given once, so the CLI notes no repeated key) or adds it."""
    keys = {"model.path": model, "data.train_files": train, "trainer.default_local_dir": run_dir,
            "data.train_batch_size": 8, "data.micro_batch_size_per_gpu": 4, "optim.lr": "2e-3",
            "trainer.logger": "[jsonl]", "data.cache_dir": f"{run_dir}_cache"}
    keys.update(item.split("=", 1) for item in extra)
    return [f"{k}={v}" for k, v in keys.items()]


def train_once(*args: str) -> list[dict]:
    """`shardtune train` with these arguments (`--nproc N` among them launches N processes); its metric rows."""
    r = run_cli("train", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = next(a.split("=", 1)[1] for a in args if a.startswith("trainer.default_local_dir="))
    return read_metrics(Path(run_dir))


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["train/loss"] for row in read_metrics(run_dir)}


@pytest.fixture(scope="module")
def tok():
    """A byte-level tokenizer (its own chat template)."""
    from shardtune.tiny import byte_tokenizer

    return byte_tokenizer()


@pytest.fixture(scope="module")
def chatml_tok():
    return template_tokenizer("chatml")


def torchrun(nproc: int, *args: str, script: str | None = None, module: str = "shardtune", timeout: int = 300,
             env: dict | None = None):
    """Launch `torchrun --standalone` with `nproc` CPU workers (gloo) running a module or a test script."""
    target = [script] if script else ["-m", module]
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target, *args]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)


TRAIN_RUNS = Path(__file__).parent / "scripts" / "train_runs.py"


def train_runs(runs: list[list[str]], timeout: int = 600):
    """Train several override lists one after another in one process (one start-up for all; tests/scripts/
    train_runs.py, which `torchrun(..., script=str(TRAIN_RUNS))` runs on several)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(TRAIN_RUNS), json.dumps(runs)], env=env, capture_output=True,
                          text=True, timeout=timeout)


SLOW_STEPS = Path(__file__).parent / "scripts" / "slow_steps.py"


def kill_after(cmd_args, run_dir, steps: int, nproc: int = 1):
    """Start training (torchrun when nproc > 1), SIGKILL all its processes once `steps` steps are logged."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    proc = subprocess.Popen([sys.executable, *launch, str(SLOW_STEPS), "train", *cmd_args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and sum('"train/loss"' in line for line in metrics.read_text().splitlines()) >= steps:
            kill_everything_mentioning(str(run_dir))  # the launcher and every worker, as a node failure would
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def kill_everything_mentioning(text: str) -> None:
    """SIGKILL every process whose command line contains `text` (torchrun's workers live in their own
    process groups, so killing the launcher's group is not enough)."""
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit() or int(proc_dir.name) == os.getpid():
            continue
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            try:
                os.kill(int(proc_dir.name), signal.SIGKILL)
            except ProcessLookupError:
                pass
