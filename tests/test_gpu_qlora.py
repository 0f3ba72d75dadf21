"""QLoRA and activation offloading on a CUDA GPU (skipped on CPU machines; run them where a GPU is lent):
the 4-bit codes against bitsandbytes' CUDA kernels, a 4-bit LoRA run in bf16, the weights' GPU memory, and
the peak memory that offloading saves against what `validate`'s estimate names."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from conftest import arithmetic_rows, write_jsonl

from shardtune.config import load_config, validate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_4bit_weights_match_bitsandbytes_on_cuda():
    """The same weight quantized by bitsandbytes' CUDA kernels and by shardtune: the same code values, and
    de-quantization errors of the same size."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    from shardtune import quantize

    torch.manual_seed(0)
    weight = torch.randn(1024, 1024, device="cuda")
    for quant_type, digits in (("fp4", 6), ("nf4", 4)):
        packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type=quant_type)  # fp32 block scales
        codes = bnb.dequantize_4bit(packed, state, quant_type=quant_type).view(-1, 64) / state.absmax[:, None]
        ours = quantize.to_4bit(weight, quant_type, torch.float32)
        assert ours.quantized_data.is_cuda
        assert {round(v, digits) for v in ours.nf4.tolist()} == {round(v, digits) for v in codes.flatten().tolist()}
        packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type=quant_type, compress_statistics=True)
        theirs = bnb.dequantize_4bit(packed, state, quant_type=quant_type)  # 8-bit block scales, as ours
        their_error = (theirs - weight).abs().mean().item()
        our_error = (ours.get_original_weight() - weight).abs().mean().item()
        assert our_error == pytest.approx(their_error, rel=0.05), quant_type


def weight_bytes(model) -> int:
    from shardtune.memory import nbytes

    return sum(nbytes(p) for p in model.parameters())


def test_qlora_trains_in_bf16_on_cuda_with_a_third_of_the_weight_memory(tmp_path):
    from shardtune.model import load_model
    from shardtune.parallel import World
    from shardtune.parallelize import parallelize
    from shardtune.tiny import save_tiny_model
    from shardtune.trainer import Trainer

    path = save_tiny_model(tmp_path / "model", hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024)
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(32, seed=9))
    base = [f"model.path={path}", f"data.train_files={data}", "model.lora_rank=8", "data.train_batch_size=8",
            "data.micro_batch_size_per_gpu=2", "optim.lr=1e-2", "trainer.total_training_steps=6",
            "trainer.logger=[jsonl]", "trainer.progress_bar=false", f"data.cache_dir={tmp_path}/cache"]
    sizes = {}
    for four in (False, True):
        cfg = load_config(None, [*base, f"model.load_in_4bit={str(four).lower()}"])
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        model = parallelize(load_model(cfg.model, "cuda"), cfg, World(device=torch.device("cuda")))
        sizes[four] = torch.cuda.memory_allocated() - before
        assert sizes[four] >= weight_bytes(model)  # the allocator rounds up, never down
        del model
        gc.collect()
        torch.cuda.empty_cache()
    print(f"GPU memory of the weights: fp32 LoRA {sizes[False] / 2**20:.2f} MiB, 4-bit {sizes[True] / 2**20:.2f} MiB")
    assert sizes[True] * 3 <= sizes[False]
    cfg = validate(load_config(None, [*base, "model.load_in_4bit=true", "engine.mixed_precision.param_dtype=bf16",
                                      f"trainer.default_local_dir={tmp_path}/run"]))
    history = Trainer(cfg).fit()
    assert history[-1]["train/loss"] < history[0]["train/loss"] - 0.3


def peak_of_training(overrides: list[str]) -> tuple[float, list[float]]:
    """Peak CUDA memory above what the built engine holds, over two steps, and the losses."""
    from shardtune.trainer import Trainer

    trainer = Trainer(validate(load_config(None, overrides)))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    losses = [h["train/loss"] for h in trainer.fit()]
    peak = torch.cuda.max_memory_allocated() - before
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return peak, losses


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_offload_lowers_the_peak_by_what_the_estimate_names(tmp_path, checkpointing):
    """Eight layers of hidden 512 and one packed ~4096-token micro-batch, fp32: the peak falls by at least 70%
    of the activations the estimate moves to the host, and the losses are those without offloading."""
    from shardtune.memory import estimate, model_shape
    from shardtune.tiny import save_tiny_model

    path = save_tiny_model(tmp_path / "model", hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1024)
    reply = ("abcdefghij " * 100)[:1000]
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": reply}]}
            for i in range(8)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    base = [f"model.path={path}", f"data.train_files={data}", "data.cache_dir=null", "data.max_length=1024",
            "data.use_dynamic_bsz=true", "data.max_token_len_per_gpu=4096", "data.train_batch_size=4",
            "data.shuffle=false", "trainer.total_training_steps=2", "trainer.logger=[jsonl]",
            "trainer.progress_bar=false", f"model.enable_gradient_checkpointing={str(checkpointing).lower()}"]
    runs, named = {}, {}
    for on in (False, True):
        overrides = [*base, f"model.enable_activation_offload={str(on).lower()}",
                     f"trainer.default_local_dir={tmp_path}/run_{on}"]
        runs[on] = peak_of_training(overrides)
        cfg = load_config(None, overrides)
        named[on] = estimate(cfg, model_shape(cfg.model), world_size=1, device_type="cuda")
    saved = runs[False][0] - runs[True][0]
    predicted = named[False].activations - named[True].activations
    print(f"checkpointing={checkpointing}: peak {runs[False][0] / 2**20:.1f} -> {runs[True][0] / 2**20:.1f} MiB "
          f"(saved {saved / 2**20:.1f} MiB; the estimate names {predicted / 2**20:.1f} MiB, "
          f"{named[True].host_activations / 2**20:.1f} MiB on the host)")
    assert predicted > 0 and saved >= 0.7 * predicted
    for a, b in zip(runs[False][1], runs[True][1], strict=True):
        assert math.isclose(a, b, rel_tol=1e-5)
