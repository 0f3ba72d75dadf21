"""The loop on one process: loss normalisation parity, packing, seeds, schedules, validation, early stop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import arithmetic_rows, read_metrics, write_jsonl

from shardtune.config import OptimConfig, load_config, validate
from shardtune.data.chat import IGNORE_INDEX
from shardtune.errors import ConfigError
from shardtune.optim import lr_factor
from shardtune.trainer import Trainer


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_jsonl(d / "train.jsonl", arithmetic_rows(40, seed=1)), write_jsonl(d / "val.jsonl", arithmetic_rows(10,
                                                                                                                     seed=2))


def run(tiny_model, data_files, tmp_path, *overrides, fit=True):
    train, val = data_files
    cfg = validate(load_config(None, [
        f"model.path={tiny_model}", f"data.train_files={train}", f"data.val_files={val}", "data.cache_dir=null",
        "data.num_proc=1", "data.train_batch_size=8", "optim.lr=1e-3", "optim.lr_warmup_steps=1",
        f"trainer.default_local_dir={tmp_path}/run", "trainer.total_training_steps=5", "trainer.logger=[jsonl]",
        *overrides]))
    trainer = Trainer(cfg)
    return (trainer, trainer.fit()) if fit else trainer


def losses(history, key="train/loss"):
    return [h[key] for h in history]


def assert_close(a, b, rel):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=rel), (a, b)


def test_micro_batch_split_does_not_change_the_step(tiny_model, data_files, tmp_path):
    """1 micro-batch of 8 == 8 micro-batches of 1 == 2 of 4, at every step (global token-mean loss)."""
    _, h8 = run(tiny_model, data_files, tmp_path / "a", "data.micro_batch_size_per_gpu=8")
    _, h1 = run(tiny_model, data_files, tmp_path / "b", "data.micro_batch_size_per_gpu=1")
    _, h4 = run(tiny_model, data_files, tmp_path / "c", "data.micro_batch_size_per_gpu=4")
    assert_close(losses(h8), losses(h1), 1e-6)
    assert_close(losses(h8), losses(h4), 1e-6)
    assert_close(losses(h8, "train/grad_norm"), losses(h1, "train/grad_norm"), 1e-5)
    assert losses(h8)[-1] < losses(h8)[0]


def test_first_step_loss_equals_a_plain_transformers_forward(tiny_model, data_files, tmp_path):
    trainer = run(tiny_model, data_files, tmp_path, "data.micro_batch_size_per_gpu=3", fit=False)
    indices = trainer.loader.batches.sampler.batch(0, 0)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="eager")
    total, count = 0.0, 0
    with torch.no_grad():
        for i in indices:  # one unpadded sequence at a time, the textbook way
            ids, labels = (torch.as_tensor(x.astype("int64"))[None] for x in trainer.train_data.data[i])
            logits = ref(input_ids=ids).logits[0, :-1]
            target = labels[0, 1:]
            total += F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((target != IGNORE_INDEX).sum())
    history = trainer.fit()
    assert math.isclose(history[0]["train/loss"], total / count, rel_tol=1e-6)


def test_padded_and_packed_batches_agree(tiny_model, data_files, tmp_path):
    _, packed = run(tiny_model, data_files, tmp_path / "p", "model.use_remove_padding=true",
                    "data.micro_batch_size_per_gpu=4")
    _, padded = run(tiny_model, data_files, tmp_path / "q", "model.use_remove_padding=false",
                    "data.micro_batch_size_per_gpu=4")
    assert_close(losses(packed), losses(padded), 1e-5)
    assert_close(losses(packed, "train/grad_norm"), losses(padded, "train/grad_norm"), 1e-5)
    assert all(h["perf/padding_ratio"] == 0 for h in packed) and all(h["perf/padding_ratio"] > 0 for h in padded)


def test_packed_logits_equal_each_sequence_alone(tiny_model, data_files, tmp_path):
    trainer = run(tiny_model, data_files, tmp_path, fit=False)
    model = trainer.engine.model.eval()
    data = trainer.train_data.data
    samples = [data[i] for i in range(3)]
    mb = trainer.loader.micro_batches(data.lengths[:3], data.__getitem__)[1][0]
    assert model.config._attn_implementation == "shardtune_varlen"  # auto on CPU with packed rows
    with torch.no_grad():
        by_cu = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False,
                      cu_seq_lens_q=mb.cu_seqlens, cu_seq_lens_k=mb.cu_seqlens).logits[0]
        by_positions = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits[0]
        model.set_attn_implementation("sdpa")  # transformers' own packed path (block mask from position_ids)
        by_hf_sdpa = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits[0]
        start = 0
        for ids, _ in samples:
            alone = model(input_ids=torch.as_tensor(ids.astype("int64"))[None], use_cache=False).logits[0]
            for packed in (by_cu, by_positions, by_hf_sdpa):
                torch.testing.assert_close(packed[start : start + len(ids)], alone, rtol=1e-5, atol=1e-5)
            start += len(ids)


def test_same_seed_same_run_and_metrics_file(tiny_model, data_files, tmp_path):
    _, a = run(tiny_model, data_files, tmp_path / "a", "trainer.test_freq=2")
    _, b = run(tiny_model, data_files, tmp_path / "b", "trainer.test_freq=2")
    assert losses(a) == losses(b)
    rows = read_metrics(tmp_path / "a" / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in rows if "val/loss" in r] == [2, 4, 5]  # every test_freq steps and at the end
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/global_tokens", "perf/tokens_per_s",
                "perf/step_time_s", "perf/max_memory_gb", "perf/padding_ratio", "data/dropped_rows"):
        assert key in rows[0], key
    assert (tmp_path / "a" / "run" / "config.yaml").is_file()


def test_metrics_jsonl_is_appended_not_truncated(tiny_model, data_files, tmp_path):
    run(tiny_model, data_files, tmp_path, "trainer.total_training_steps=2")
    run(tiny_model, data_files, tmp_path, "trainer.total_training_steps=3")  # auto: continues at step 3
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]
    # starting over at step 0 in a folder of checkpoints would mix two runs: refused, nothing written
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        run(tiny_model, data_files, tmp_path, "trainer.resume_mode=disable")
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_validation_loss_is_token_weighted_over_every_sample(tiny_model, data_files, tmp_path):
    trainer = run(tiny_model, data_files, tmp_path, "data.micro_batch_size_per_gpu=3", fit=False)
    val = trainer.val_data
    model = trainer.engine.model.eval()
    total = count = 0
    with torch.no_grad():
        for i in range(len(val)):
            ids, labels = (torch.as_tensor(x.astype("int64")) for x in val[i])
            logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1]
            total += F.cross_entropy(logits, labels[1:], ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels[1:] != IGNORE_INDEX).sum())
    assert math.isclose(trainer.validation_losses()["val/loss"], total / count, rel_tol=1e-6)


def test_early_stopping(tiny_model, data_files, tmp_path):
    # a huge lr makes validation worse after the first check; patience 1 stops at the next check
    args = ("optim.lr=0.5", "optim.clip_grad=0", "trainer.test_freq=1", "trainer.early_stopping_patience=1",
            "trainer.total_training_steps=20", "optim.lr_scheduler_type=constant")
    _, h = run(tiny_model, data_files, tmp_path, *args)
    vals = losses(h, "val/loss")
    assert len(h) < 20
    assert all(b < a for a, b in zip(vals, vals[1:-1])) and vals[-1] >= min(vals[:-1])  # first non-improvement
    _, again = run(tiny_model, data_files, tmp_path, *args)  # relaunching a stopped run trains no further
    assert again == [] and [r["step"] for r in read_metrics(tmp_path / "run")] == [h_["step"] for h_ in h]


def test_non_finite_gradients_skip_the_step(tiny_model, data_files, tmp_path):
    trainer = run(tiny_model, data_files, tmp_path, fit=False)
    before = {k: v.clone() for k, v in trainer.engine.model.state_dict().items()}
    p = next(trainer.engine.model.parameters())
    handle = p.register_hook(lambda g: torch.full_like(g, float("nan")))
    history = trainer.fit()
    handle.remove()
    assert all(h["train/skipped_steps"] == i + 1 for i, h in enumerate(history))
    after = trainer.engine.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear", "wsd"])
def test_schedules(kind):
    cfg = OptimConfig(lr_scheduler_type=kind, lr_warmup_steps=4, min_lr_ratio=0.1, wsd_decay_ratio=0.25)
    f = [lr_factor(s, cfg, 20) for s in range(20)]
    assert f[:4] == [0.2, 0.4, 0.6, 0.8]  # linear warmup that never starts at 0
    assert f[4] == 1.0
    if kind == "constant":
        assert set(f[4:]) == {1.0}
    else:
        assert all(a >= b for a, b in zip(f[4:], f[5:])) and f[-1] >= 0.1 and f[-1] < 0.5
    if kind == "wsd":
        assert f[4:15] == [1.0] * 11 and f[15] == 1.0 and f[16] < 1.0


def test_token_budget_micro_batches_equal_fixed_ones(tiny_model, data_files, tmp_path):
    _, fixed = run(tiny_model, data_files, tmp_path / "f", "data.micro_batch_size_per_gpu=8")
    _, dynamic = run(tiny_model, data_files, tmp_path / "d", "data.use_dynamic_bsz=true",
                     "data.max_token_len_per_gpu=256", "data.max_length=256")
    assert_close(losses(fixed), losses(dynamic), 1e-5)
    assert all(h["perf/micro_batches"] > 1 for h in dynamic)


def test_gradient_checkpointing_gives_the_same_steps(tiny_model, data_files, tmp_path):
    _, plain = run(tiny_model, data_files, tmp_path / "a", "trainer.total_training_steps=3")
    _, ckpt = run(tiny_model, data_files, tmp_path / "b", "trainer.total_training_steps=3",
                  "model.enable_gradient_checkpointing=true")
    assert_close(losses(plain), losses(ckpt), 1e-6)
    assert_close(losses(plain, "train/grad_norm"), losses(ckpt, "train/grad_norm"), 1e-5)


def test_mfu_is_logged_and_plausible(tiny_model, data_files, tmp_path):
    _, h = run(tiny_model, data_files, tmp_path, "trainer.total_training_steps=3")
    assert all(0 < r["perf/mfu"] < 1 and r["perf/tflops"] > 0 for r in h)


def test_prefetching_changes_nothing(tiny_model, data_files, tmp_path):
    """Batches built 2 steps ahead in a background thread == built in the loop, and the sampler position
    (what a checkpoint saves) counts trained steps, not prefetched ones. (The SIGKILL-and-resume tests of
    test_checkpoint.py run with prefetching on and resume bitwise.)"""
    over = ("trainer.total_epochs=2", "trainer.total_training_steps=null")
    trainer, ahead = run(tiny_model, data_files, tmp_path / "a", "data.prefetch_steps=2", *over)
    _, inline = run(tiny_model, data_files, tmp_path / "b", "data.prefetch_steps=0", *over)
    assert len(ahead) == 2 * trainer.loader.steps_per_epoch
    assert losses(ahead) == losses(inline) and losses(ahead, "train/grad_norm") == losses(inline, "train/grad_norm")
    assert all(h["perf/data_wait_s"] >= 0 for h in ahead)
    assert trainer.loader.state_dict() == {"epoch": 1, "step_in_epoch": trainer.loader.steps_per_epoch, "seed": 42,
                                           "sources": {"train": 40}}
    mid = run(tiny_model, data_files, tmp_path / "c", "data.prefetch_steps=2", "trainer.total_training_steps=3",
              fit=False)
    mid.fit()
    assert mid.loader.state_dict()["step_in_epoch"] == 3


def test_an_error_while_prefetching_is_raised_as_itself(tiny_model, data_files, tmp_path, monkeypatch):
    from shardtune.errors import DataError

    trainer = run(tiny_model, data_files, tmp_path, "data.prefetch_steps=2", fit=False)
    prepare, calls = trainer.loader.prepare, []

    def failing_prepare(*args):
        calls.append(args)
        if len(calls) == 3:
            raise DataError("row 7 of train.jsonl: bad. Fix: repair it.")
        return prepare(*args)

    monkeypatch.setattr(trainer.loader, "prepare", failing_prepare)
    with pytest.raises(DataError, match=r"^row 7 of train.jsonl: bad. Fix: repair it.$"):
        trainer.fit()
    assert trainer.state.step == 2  # the two good steps trained before the error reached the loop


@pytest.mark.slow
def test_torch_compile_gives_the_same_steps(tiny_model, data_files, tmp_path):
    """Compiled decoder layers (dynamic shapes: every packed row has another length) == eager, step by step."""
    _, eager = run(tiny_model, data_files, tmp_path / "a", "trainer.total_training_steps=4")
    trainer, compiled = run(tiny_model, data_files, tmp_path / "b", "trainer.total_training_steps=4",
                            "engine.use_torch_compile=true")
    from shardtune.parallel import decoder_layers

    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(trainer.engine.model))
    assert len({h["data/max_seq_len"] for h in compiled}) > 1  # several shapes went through one graph
    assert_close(losses(eager), losses(compiled), 1e-5)
    assert_close(losses(eager, "train/grad_norm"), losses(compiled, "train/grad_norm"), 1e-5)


def test_a_training_step_needs_no_collective_for_its_loss_divisor(tiny_model, data_files, tmp_path, monkeypatch):
    """The step's only host sync is the gradient norm (with the loss): the divisor comes from the data plan."""
    from shardtune import parallel

    trainer = run(tiny_model, data_files, tmp_path, fit=False)
    calls = []
    monkeypatch.setattr(parallel, "all_reduce_sum", lambda values, world: calls.append(values) or list(values))
    batch = next(iter(trainer.loader))
    metrics = trainer.train_step(batch)
    assert calls == [] and metrics["train/supervised_tokens"] == batch.num_targets > 0
