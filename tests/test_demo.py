"""The demo learns: the real `shardtune demo`, as a new user runs it, answers most held-out problems."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


@pytest.mark.slow
def test_demo_learns_the_task(tmp_path):
    r = run_cli("demo", "--out", str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "demo.json").read_text())
    assert set(result) == {"accuracy_before", "accuracy_after", "n_eval"} and result["n_eval"] == 100
    assert result["accuracy_before"] <= 0.05
    assert result["accuracy_after"] >= 0.6
    assert "accuracy after training" in r.stdout
