"""The demo learns: the real `shardtune demo`, as a new user runs it, answers most held-out problems, and
`shardtune chat` on the checkpoint it leaves answers them too, next to the untrained model."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


@pytest.mark.slow
def test_demo_learns_the_task_and_chat_answers_with_its_checkpoint(tmp_path):
    r = run_cli("demo", "--out", str(tmp_path), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "demo.json").read_text())
    assert set(result) == {"accuracy_before", "accuracy_after", "n_eval"} and result["n_eval"] == 100
    assert result["accuracy_before"] <= 0.05
    assert result["accuracy_after"] >= 0.8
    assert "accuracy before training" in r.stdout
    # the accuracies are the evaluation's, logged at step 0 and at the last step, with the table of answers
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scores = [(s["step"], s["eval/exact_match"]) for s in steps if "eval/exact_match" in s]
    assert scores[0] == (0, result["accuracy_before"]) and scores[-1][1] == result["accuracy_after"]
    assert scores[-1][1] > scores[0][1]
    last = tmp_path / "run" / "eval" / f"step_{scores[-1][0]}.jsonl"
    assert sum(json.loads(line)["exact_match"] for line in last.read_text().splitlines()) == 100 * result["accuracy_after"]

    heldout = tmp_path / "heldout20.jsonl"
    heldout.write_text("".join((tmp_path / "heldout.jsonl").read_text().splitlines(keepends=True)[:20]))
    checkpoint = tmp_path / "run" / f"global_step_{scores[-1][0]}"
    r = run_cli("chat", str(checkpoint), "--prompts", str(heldout), "--compare", str(tmp_path / "model"),
                "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 20 and all("answer_compare" in row for row in rows)
    assert sum(row["answer"] == row["response"] for row in rows) >= 16
    assert sum(row["answer_compare"] == row["response"] for row in rows) <= 1  # the untrained model's
