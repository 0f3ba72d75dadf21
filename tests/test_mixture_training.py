"""Weighted mixtures in real runs: per-step draws by weight, per-source metrics and validation losses, one
vs two processes, SIGKILL + resume, and each source's validation loss against a run on that source alone."""

from __future__ import annotations

import json
import math
import random

import pytest
from conftest import arithmetic_rows, kill_after, read_metrics, run_cli, torchrun, train_once, write_jsonl


def alpaca_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"instruction": f"Multiply {a} by {b}.", "input": "", "output": str(a * b)})
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    return {"chat": write_jsonl(d / "chat.jsonl", arithmetic_rows(60, seed=11)),
            "math": write_jsonl(d / "math.jsonl", alpaca_rows(9, seed=12)),  # smaller than its share: cycled
            "val_chat": write_jsonl(d / "val_chat.jsonl", arithmetic_rows(7, seed=13)),
            "val_math": write_jsonl(d / "val_math.jsonl", alpaca_rows(5, seed=14))}


def args(tiny_model, files, run_dir, *extra, val=("chat", "math")):
    train = (f"data.train_files=[{{path: {files['chat']}, name: chat, weight: 0.75}}, "
             f"{{path: {files['math']}, name: math, weight: 0.25, format: alpaca}}]")
    sources = {"chat": f"{{path: {files['val_chat']}, name: chat}}",
               "math": f"{{path: {files['val_math']}, name: math, format: alpaca}}"}
    return [f"model.path={tiny_model}", train, f"data.val_files=[{', '.join(sources[v] for v in val)}]",
            f"trainer.default_local_dir={run_dir}", "data.train_batch_size=8", "data.micro_batch_size_per_gpu=4",
            "optim.lr=2e-3", "trainer.total_training_steps=12", "trainer.test_freq=4", "trainer.logger=[jsonl]",
            f"data.cache_dir={run_dir}_cache", *extra]


@pytest.fixture(scope="module")
def one_process(tiny_model, files, tmp_path_factory):
    return train_once(*args(tiny_model, files, tmp_path_factory.mktemp("one") / "run"))


def test_every_step_draws_six_of_eight_from_the_three_quarter_source(one_process):
    assert len(one_process) == 12
    for row in one_process:
        assert row["data/samples/chat"] == 6 and row["data/samples/math"] == 2, row
        assert row["data/tokens/chat"] + row["data/tokens/math"] == row["train/global_tokens"]
    validated = [r for r in one_process if "val/loss" in r]
    assert [r["step"] for r in validated] == [4, 8, 12]
    for r in validated:  # the overall loss is token-weighted over both sources, so it lies between them
        low, high = sorted((r["val/loss/chat"], r["val/loss/math"]))
        assert low <= r["val/loss"] <= high


def test_a_source_validation_loss_equals_a_run_validating_on_that_source_alone(tiny_model, files, tmp_path,
                                                                                one_process):
    r = run_cli("train", *args(tiny_model, files, tmp_path / "run", val=("math",)))
    assert r.returncode == 0, r.stderr[-3000:]
    alone = {row["step"]: row for row in read_metrics(tmp_path / "run") if "val/loss" in row}
    for row in one_process:
        if "val/loss" in row:
            assert "val/loss/math" not in alone[row["step"]]  # one validation source: the plain val/loss only
            assert math.isclose(row["val/loss/math"], alone[row["step"]]["val/loss"], rel_tol=1e-9)
            assert row["train/loss"] == alone[row["step"]]["train/loss"]  # validation never changes training


@pytest.mark.dist
def test_two_processes_draw_and_train_what_one_does(tiny_model, files, tmp_path, one_process):
    r = torchrun(2, "train", *args(tiny_model, files, tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    two = read_metrics(tmp_path / "run")
    assert [(r["data/samples/chat"], r["data/tokens/math"]) for r in two] == \
        [(r["data/samples/chat"], r["data/tokens/math"]) for r in one_process]
    for a, b in zip(one_process, two):
        assert math.isclose(a["train/loss"], b["train/loss"], rel_tol=1e-5), (a, b)
        if "val/loss" in a:
            assert math.isclose(a["val/loss/chat"], b["val/loss/chat"], rel_tol=1e-5)


@pytest.mark.slow
def test_sigkill_mid_mixture_then_resume_is_bitwise_identical(tiny_model, files, tmp_path, one_process):
    run_dir = tmp_path / "run"
    cmd = args(tiny_model, files, run_dir, "trainer.save_freq=3")
    kill_after(cmd, run_dir, steps=7)
    r = run_cli("train", *cmd, "trainer.resume_mode=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resume = next(x for x in lines if x.get("event") == "resume")
    after = [x for x in lines[lines.index(resume):] if "step" in x and "event" not in x]
    assert after and after[-1]["step"] == 12
    reference = {row["step"]: row for row in one_process}
    for row in after:
        assert row["train/loss"] == reference[row["step"]]["train/loss"], row["step"]
        assert row["data/tokens/math"] == reference[row["step"]]["data/tokens/math"]
