"""LoRA (peft): only adapters train, 1 vs 2 processes agree, export merges (or writes the adapter)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import arithmetic_rows, read_metrics, run_cli, torchrun, train_args, write_jsonl

from shardtune.config import load_config, validate
from shardtune.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("lora") / "train.jsonl", arithmetic_rows(32, seed=9))


def args(tiny_model, data, run_dir, *extra):
    return train_args(tiny_model, data, run_dir, "data.micro_batch_size_per_gpu=2", "optim.lr=1e-2",
                      "model.lora_rank=8",
                      "trainer.total_training_steps=6", *extra)


def test_only_adapters_change_and_loss_falls(tiny_model, data, tmp_path):
    trainer = Trainer(validate(load_config(None, args(tiny_model, data, tmp_path / "run"))))
    model = trainer.engine.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = trainer.fit()
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable  # base weights frozen, adapters trained
    assert {id(p) for g in trainer.engine.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad}


def test_lora_two_processes_equal_one_and_export_merges(tiny_model, data, tmp_path):
    r = run_cli("train", *args(tiny_model, data, tmp_path / "one"))
    assert r.returncode == 0, r.stderr
    r = torchrun(2, "train", *args(tiny_model, data, tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for a, b in zip(one, two, strict=True):
        assert math.isclose(a["train/loss"], b["train/loss"], rel_tol=1e-5)
        assert math.isclose(a["train/grad_norm"], b["train/grad_norm"], rel_tol=1e-5)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = tmp_path / "two" / "global_step_6"
    assert run_cli("export", str(ckpt), "--out", str(tmp_path / "merged"), "--dtype", "fp32").returncode == 0
    r = run_cli("export", str(ckpt), "--out", str(tmp_path / "adapter"), "--adapter-only")
    assert r.returncode == 0, r.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not any("lora" in k for k in merged.state_dict())
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, tmp_path / "adapter")
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
        plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)(input_ids=ids).logits
    assert not torch.allclose(plain, merged(input_ids=ids).logits, atol=1e-3)  # the adapter did something


def test_adapter_only_needs_a_lora_checkpoint(tiny_model, data, tmp_path):
    r = run_cli("train", *args(tiny_model, data, tmp_path / "run", "model.lora_rank=0",
                               "trainer.total_training_steps=1"))
    assert r.returncode == 0, r.stderr
    r = run_cli("export", str(tmp_path / "run" / "global_step_1"), "--out", str(tmp_path / "o"), "--adapter-only")
    assert r.returncode != 0 and "not trained with LoRA" in r.stderr and "Traceback" not in r.stderr
