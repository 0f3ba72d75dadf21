"""QLoRA (model.load_in_4bit) and activation offloading (model.enable_activation_offload): 4-bit base weights
frozen under LoRA, 1 = 2 processes (FSDP2 with gradient checkpointing; Ulysses SP with offloading), export
against the live de-quantized model, resume, the weights' memory, and offloading's numbers against off."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import arithmetic_rows, read_metrics, run_cli, torchrun, write_jsonl

from shardtune.config import load_config, validate
from shardtune.errors import ConfigError
from shardtune.trainer import Trainer

pytest.importorskip("torchao", reason="QLoRA needs the qlora extra (torchao)")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("qlora") / "train.jsonl", arithmetic_rows(32, seed=9))


def args(model, data, run_dir, *extra):
    return [f"model.path={model}", f"data.train_files={data}", f"trainer.default_local_dir={run_dir}",
            "data.train_batch_size=8", "data.micro_batch_size_per_gpu=2", "optim.lr=1e-2", "model.lora_rank=8",
            "trainer.total_training_steps=6", "trainer.logger=[jsonl]", "trainer.progress_bar=false",
            f"data.cache_dir={run_dir}_cache", "model.load_in_4bit=true", *extra]


def live_logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([list(range(3, 40))])


@pytest.mark.slow
def test_qlora_trains_the_same_on_one_and_two_processes_and_exports_the_live_model(tiny_model, data, tmp_path):
    from transformers import AutoModelForCausalLM

    from shardtune import quantize

    trainer = Trainer(validate(load_config(None, args(tiny_model, data, tmp_path / "one"))))
    model = trainer.engine.model
    four_bit = [n for n, p in model.named_parameters() if quantize.is_4bit(p)]
    assert len(four_bit) == 2 * 7  # q, k, v, o, gate, up, down of both layers
    assert all("base_layer" in n for n in four_bit)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)  # compute dtype
    history = trainer.fit()
    assert history[-1]["train/loss"] < history[0]["train/loss"] - 0.3
    live = live_logits(model, IDS)

    # FSDP2 over 2 processes with gradient checkpointing; Ulysses SP=2 with activation offloading
    for name, extra in (("fsdp", ["model.enable_gradient_checkpointing=true"]),
                        ("sp", ["engine.ulysses_sequence_parallel_size=2", "model.enable_activation_offload=true"])):
        r = torchrun(2, "train", *args(tiny_model, data, tmp_path / name, *extra))
        assert r.returncode == 0, r.stderr[-3000:]
        for a, b in zip(history, read_metrics(tmp_path / name), strict=True):
            assert math.isclose(a["train/loss"], b["train/loss"], rel_tol=1e-5), name
            assert math.isclose(a["train/grad_norm"], b["train/grad_norm"], rel_tol=1e-4), name

    # merged into the de-quantized base: the live model's logits (the 1- and the 2-process checkpoints)
    for run, tol in (("one", 1e-5), ("fsdp", 1e-4)):
        out = tmp_path / f"merged_{run}"
        r = run_cli("export", str(tmp_path / run / "global_step_6"), "--out", str(out), "--dtype", "fp32")
        assert r.returncode == 0, r.stderr[-3000:]
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert not any("lora" in k or "4bit" in k for k in merged.state_dict())
        torch.testing.assert_close(live_logits(merged, IDS), live, rtol=tol, atol=tol)
    plain = live_logits(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), IDS)
    assert not torch.allclose(plain, live, atol=1e-3)  # 4-bit base + adapters differ from the original

    # the adapter alone: the live adapters' weights
    r = run_cli("export", str(tmp_path / "one" / "global_step_6"), "--out", str(tmp_path / "adapter"), "--adapter-only")
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    lora = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    assert set(saved) == set(lora)
    assert all(torch.equal(saved[n], lora[n].detach()) for n in saved)


@pytest.mark.slow
def test_qlora_resume_continues_as_the_uninterrupted_run(tiny_model, data, tmp_path):
    whole = Trainer(validate(load_config(None, args(tiny_model, data, tmp_path / "whole", "trainer.save_freq=3"))))
    expected = whole.fit()
    resumed = Trainer(validate(load_config(None, args(
        tiny_model, data, tmp_path / "resumed", "trainer.resume_mode=resume_path",
        f"trainer.resume_from_path={tmp_path / 'whole' / 'global_step_3'}"))))
    history = resumed.fit()
    assert [h["step"] for h in history] == [4, 5, 6]
    assert [h["train/loss"] for h in history] == [h["train/loss"] for h in expected[3:]]


def weight_bytes(model) -> int:
    """Bytes the model's parameters hold (a 4-bit weight: its codes, block scales and constants)."""
    from shardtune.memory import nbytes

    return sum(nbytes(p) for p in model.parameters())


def test_4bit_weights_take_over_3x_less_memory_than_fp32_lora(tmp_path):
    """A larger tiny model (hidden 256, 4 layers, intermediate 1024): the weights of the 4-bit LoRA model,
    measured from its live tensors, against the fp32 LoRA model; the estimate counts the same bytes."""
    from shardtune.memory import model_shape
    from shardtune.model import load_model
    from shardtune.parallel import World
    from shardtune.parallelize import parallelize
    from shardtune.tiny import save_tiny_model

    path = save_tiny_model(tmp_path / "model", hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024)
    sizes = {}
    for four in (False, True):
        cfg = load_config(None, [f"model.path={path}", "data.train_files=x.jsonl", "model.lora_rank=8",
                                 f"model.load_in_4bit={str(four).lower()}"])
        model = parallelize(load_model(cfg.model), cfg, World())  # LoRA and the 4-bit base, as the engine does
        sizes[four] = weight_bytes(model)
        assert model_shape(cfg.model).param_bytes == sizes[four]
    print(f"weights: fp32 LoRA {sizes[False] / 2**20:.2f} MiB, 4-bit LoRA {sizes[True] / 2**20:.2f} MiB")
    assert sizes[True] * 3 <= sizes[False]


def test_4bit_codes_are_bitsandbytes_ones():
    """The FP4 table is bitsandbytes' FP4 code and NF4 is its NF4 code to 4 digits (read from bitsandbytes'
    own de-quantization of a ramp); the quantization round-trips within half a code step."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    from shardtune import quantize

    ramp = torch.linspace(-1, 1, 64 * 64)
    for quant_type, digits in (("fp4", 6), ("nf4", 4)):
        packed, state = bnb.quantize_4bit(ramp, blocksize=64, quant_type=quant_type)
        codes = (bnb.dequantize_4bit(packed, state, quant_type=quant_type).view(-1, 64) / state.absmax[:, None])
        theirs = sorted({round(v, digits) for v in codes.flatten().tolist()} | {0.0})
        weight = quantize.to_4bit(ramp.view(64, 64), quant_type, torch.float32)
        ours = sorted({round(v, digits) for v in weight.nf4.tolist()})
        assert ours == theirs, quant_type
        error = (weight.get_original_weight() - ramp.view(64, 64)).abs().max()
        gaps = torch.tensor(ours).diff().max()
        assert error <= gaps / 2 + 1e-3


def test_offloaded_activations_give_the_same_losses(tiny_model, data, tmp_path, monkeypatch):
    """fp32 on the CPU: the offloading hooks run (counted) and the losses are those of a run without them, bit
    for bit, with and without gradient checkpointing."""
    from shardtune import offload

    packed = []
    original = offload.LayerOffload.pack
    monkeypatch.setattr(offload.LayerOffload, "pack", lambda self, t: packed.append(1) or original(self, t))
    dense = ["model.load_in_4bit=false", "model.lora_rank=0", "trainer.total_training_steps=3"]
    for ckpt in ("false", "true"):
        losses = {}
        for on in ("false", "true"):
            cfg = load_config(None, args(tiny_model, data, tmp_path / f"{ckpt}_{on}", *dense,
                                         f"model.enable_gradient_checkpointing={ckpt}",
                                         f"model.enable_activation_offload={on}"))
            losses[on] = [h["train/loss"] for h in Trainer(validate(cfg)).fit()]
        assert losses["true"] == losses["false"]
        assert packed, "the offloading hooks never ran"
        packed.clear()


def test_qlora_config_rules(tiny_model, data, tmp_path):
    with pytest.raises(ConfigError, match="only LoRA adapters can train"):
        validate(load_config(None, args(tiny_model, data, tmp_path, "model.lora_rank=0")))
    with pytest.raises(ConfigError, match="bnb_4bit_use_double_quant=false"):
        validate(load_config(None, args(tiny_model, data, tmp_path, "model.bnb_4bit_use_double_quant=false")))


def test_estimate_counts_4bit_weights_and_offloaded_activations(tiny_model):
    from shardtune.memory import estimate, layer_bytes_per_token, model_shape

    base = ["model.path=" + str(tiny_model), "data.train_files=x.jsonl", "model.lora_rank=8"]
    dense = model_shape(load_config(None, base).model)
    four = model_shape(load_config(None, [*base, "model.load_in_4bit=true"]).model)
    # about half a byte per 4-bit parameter (codes 0.5, 8-bit block scales 1/64, a few constants)
    assert 0.5 < four.four_bit_bytes / four.four_bit_params < 0.53
    assert dense.param_bytes - four.param_bytes == 4 * four.four_bit_params - four.four_bit_bytes
    cfg = load_config(None, [*base, "model.enable_activation_offload=true"])
    dense = dataclasses.replace(dense, layers=8)  # deeper than the two layers back on the device
    off, on = (estimate(load_config(None, base), dense, device_type="cuda"), estimate(cfg, dense, device_type="cuda"))
    layer = layer_bytes_per_token(dense, 4, 4, False) * on.tokens
    assert on.host_activations == dense.layers * layer  # every layer's saved tensors on the host
    assert off.activations - on.activations == (dense.layers - 2) * layer  # two layers back on the device
    assert estimate(cfg, dense, device_type="cpu").host_activations == 0  # on the CPU nothing moves


def test_validate_names_the_4bit_base_and_the_offload(tiny_model, data):
    r = run_cli("validate", f"model.path={tiny_model}", f"data.train_files={data}", "data.cache_dir=null",
                "data.num_proc=1", "model.lora_rank=8", "model.load_in_4bit=true",
                "model.enable_activation_offload=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(4-bit base)" in r.stdout and "a 4-bit weight de-quantized" in r.stdout
    assert "offload moves nothing on a CPU" in r.stdout
