"""Checks that need a CUDA GPU (skipped on CPU machines; run them where a GPU is lent)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_torch_varlen_kernel_matches_per_sequence_sdpa(kv_heads):
    from shardtune.attention import torch_varlen_forward, varlen_forward

    torch.manual_seed(0)
    lengths = [37, 5, 120, 64]
    total = sum(lengths)
    q = torch.randn(1, 4, total, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, kv_heads, total, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    module = torch.nn.Module().eval()
    got, _ = torch_varlen_forward(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=max(lengths))
    ref, _ = varlen_forward(module, q, k, v, None, cu_seq_lens_q=cu)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_chunked_loss_head_matches_the_plain_loss_in_bf16_on_cuda():
    from shardtune.loss import linear_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(3000, 256, device="cuda", generator=g, requires_grad=True)
    weight = torch.randn(32000, 256, device="cuda", generator=g, requires_grad=True)
    targets = torch.randint(0, 32000, (3000,), device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, None, targets, 1024)
        want = torch.nn.functional.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


def test_liger_fused_loss_keeps_the_summed_token_loss_and_its_gradients():
    """Liger's fused linear cross-entropy, called the way LossHead calls it, returns the plain summed loss and
    its gradients; an empty micro-batch gives a zero that still reaches the graph."""
    pytest.importorskip("liger_kernel")
    from shardtune.loss import LossHead

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 32000, bias=False, device="cuda")
    head = LossHead(linear, chunk_size=0, use_liger=True)
    hidden = torch.randn(2, 1500, 256, device="cuda", requires_grad=True)
    positions = torch.arange(100, 3000, device="cuda")
    targets = torch.randint(0, 32000, (2900,), device="cuda")
    with head.computing_loss(positions, targets):
        got = head(hidden)
    got_grads = torch.autograd.grad(got, (hidden, linear.weight))
    want = torch.nn.functional.cross_entropy(linear(hidden.reshape(-1, 256)[positions]).float(), targets,
                                             reduction="sum")
    want_grads = torch.autograd.grad(want, (hidden, linear.weight))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    empty = torch.zeros(0, dtype=torch.long, device="cuda")
    with head.computing_loss(empty, empty):
        zero = head(hidden)
    zero.backward()
    assert zero.item() == 0 and linear.weight.grad is not None and not linear.weight.grad.any()


def _gpu_run(tiny_model, tmp_path, name, *extra):
    from conftest import arithmetic_rows, write_jsonl

    from shardtune.config import load_config, validate
    from shardtune.trainer import Trainer

    data = write_jsonl(tmp_path / "data.jsonl", arithmetic_rows(64, seed=3, multi_turn=True))
    cfg = validate(load_config(None, [
        f"model.path={tiny_model}", f"data.train_files={data}", "data.cache_dir=null", "data.max_length=256",
        "data.train_batch_size=16", "data.micro_batch_size_per_gpu=4", "trainer.total_training_steps=4",
        f"trainer.default_local_dir={tmp_path / name}", "trainer.logger=[jsonl]", "trainer.progress_bar=false",
        "checkpoint.save_contents=[model]", "optim.lr=1e-3", "engine.mixed_precision.param_dtype=bf16", *extra]))
    return [h["train/loss"] for h in Trainer(cfg).fit()]


def test_liger_on_and_off_train_the_same_losses_in_bf16(tiny_model, tmp_path):
    """Liger's kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy) against the PyTorch path: the
    same four optimizer steps, within bf16 rounding."""
    pytest.importorskip("liger_kernel")
    off = _gpu_run(tiny_model, tmp_path, "off", "model.loss_chunk_size=64")
    on = _gpu_run(tiny_model, tmp_path, "on", "model.use_liger=true")
    torch.testing.assert_close(torch.tensor(on), torch.tensor(off), rtol=2e-2, atol=0)


def test_packed_varlen_kernel_and_padded_sdpa_train_the_same_losses_in_bf16(tiny_model, tmp_path):
    """Padding-free rows through the varlen kernel against right-padded rows through sdpa on CUDA."""
    packed = _gpu_run(tiny_model, tmp_path, "packed", "model.use_remove_padding=true")
    padded = _gpu_run(tiny_model, tmp_path, "padded", "model.use_remove_padding=false")
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(padded), rtol=2e-2, atol=0)


def test_fsdp2_on_one_gpu_matches_the_plain_bf16_forward(tiny_model):
    """FSDP2 (NCCL, world size 1) with bf16 parameters computes the same logits as the plain bf16 model."""
    import copy
    import os
    import socket

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from shardtune.parallel import World, build_mesh
    from shardtune.parallelize import apply_fsdp2

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).cuda()
        sharded = apply_fsdp2(copy.deepcopy(plain), build_mesh(World(0, 1, 0, torch.device("cuda")), -1),
                              param_dtype=torch.bfloat16)
        ids = torch.randint(0, plain.config.vocab_size, (2, 96), device="cuda")
        with torch.no_grad():
            want = plain(input_ids=ids, use_cache=False).logits
            got = sharded(input_ids=ids, use_cache=False).logits
        print("fsdp2 vs plain bf16 logits: max abs diff", (got - want).abs().max().item())
        torch.testing.assert_close(got, want)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("window", [None, 16])
def test_torch_varlen_sliding_window_matches_the_per_sequence_kernel(window):
    """PyTorch's varlen kernel with transformers' window (the query and the window - 1 keys before it) against
    the per-sequence kernel's masked path, in bf16 on packed sequences longer and shorter than the window."""
    from shardtune.attention import torch_varlen_forward, varlen_forward

    torch.manual_seed(0)
    lengths = [37, 5, 120]
    q = torch.randn(1, 4, sum(lengths), 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q[:, :2]), torch.randn_like(q[:, :2])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    module = torch.nn.Module().eval()
    got, _ = torch_varlen_forward(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=max(lengths),
                                  sliding_window=window)
    ref, _ = varlen_forward(module, q, k, v, None, cu_seq_lens_q=cu, sliding_window=window)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_auto_on_gpu_never_hands_sinks_or_softcapping_to_a_kernel_without_them():
    from transformers import Gemma2Config, GptOssConfig, LlamaConfig

    from shardtune.attention import choose

    cuda = torch.device("cuda")
    for config, allowed in ((GptOssConfig(), {"shardtune_varlen"}),
                            (Gemma2Config(), {"shardtune_varlen", "flash_attention_2"}),
                            (LlamaConfig(), {"shardtune_torch_varlen", "flash_attention_2", "shardtune_varlen"})):
        assert choose("auto", True, cuda, torch.bfloat16, config) in allowed, type(config).__name__
