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


# ----------------------------------------------------------------------------------------------------------
# Packed rows of the model families on CUDA in bf16: each GPU kernel against the per-sequence path

LENGTHS = [37, 5, 120, 70]  # across fla's 64-token chunks; longer and shorter than the tiny sliding window (8)


def family_model(family, tmp_path, attn):
    from transformers import AutoModelForCausalLM

    from shardtune import attention
    from shardtune.tiny import save_tiny_family

    path = save_tiny_family(family, tmp_path / family)
    name = attention.register(attn) if attn.startswith("shardtune") else attn
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation=name).cuda()


def packed_row(vocab=250):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, sum(LENGTHS)), generator=g).cuda()
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None].cuda()
    return dict(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS),
                max_length_k=max(LENGTHS), use_cache=False)


def logits_and_grads(model, inputs):
    model.zero_grad()
    logits = model(**inputs).logits.float()
    (logits.logsumexp(-1).sum() / logits.shape[1]).backward()
    return logits.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def assert_bf16_close(a, b, what):
    """bf16 agreement: relative to the tensor's scale (two kernels round differently)."""
    err = ((a - b).norm() / b.norm().clamp(min=1e-6)).item()
    assert err < 3e-2, f"{what}: relative difference {err:.2e}"


def test_fla_gated_deltanet_matches_the_per_sequence_path_on_packed_rows(tmp_path):
    """flash-linear-attention's varlen convolution and delta rule over the whole row (Qwen3.5's Gated DeltaNet)
    against transformers' layer run once per sequence: logits and every gradient."""
    pytest.importorskip("fla")
    from shardtune.linear_attention import isolate_recurrent_layers

    models = []
    for use_fla in (False, True):
        model = family_model("qwen3_5_text", tmp_path / str(use_fla), "shardtune_varlen").train()
        assert isolate_recurrent_layers(model, use_fla=use_fla) == 1
        models.append(model)
    inputs = packed_row()
    ref, ref_grads = logits_and_grads(models[0], inputs)
    got, grads = logits_and_grads(models[1], inputs)
    assert_bf16_close(got, ref, "logits")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_bf16_close(grads[name], ref_grads[name], name)
    # the path is the fla one: a row whose boundaries are ignored would differ
    whole = {k: v for k, v in inputs.items() if k in ("input_ids", "use_cache")}
    with torch.no_grad():
        joined = models[1](**whole, position_ids=torch.arange(sum(LENGTHS), device="cuda")[None]).logits.float()
    assert ((joined - ref).norm() / ref.norm()).item() > 3e-2


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_flash_attn_window_and_softcap_match_the_per_sequence_kernel(family, tmp_path):
    """flash-attn's varlen kernel with transformers' sliding window and soft-capping (Gemma 2) on a packed row
    against shardtune's per-sequence kernel: logits and every gradient."""
    pytest.importorskip("flash_attn")
    inputs = packed_row()
    ref, ref_grads = logits_and_grads(family_model(family, tmp_path / "ref", "shardtune_varlen").train(), inputs)
    got, grads = logits_and_grads(family_model(family, tmp_path / "fa", "flash_attention_2").train(), inputs)
    assert_bf16_close(got, ref, "logits")
    for name in grads:
        assert_bf16_close(grads[name], ref_grads[name], name)


def test_sinks_on_packed_rows_match_gpt_oss_eager_attention_per_sequence(tmp_path):
    """gpt-oss's sinks on CUDA in bf16: the packed row through the per-sequence kernel (what `auto` picks for
    sinks on a GPU) against each sequence alone through gpt-oss's own eager attention."""
    inputs = packed_row()
    model = family_model("gpt_oss", tmp_path, "shardtune_varlen").eval()
    with torch.no_grad():
        packed = model(**inputs).logits.float()[0]
        model.set_attn_implementation("eager")
        cu = inputs["cu_seq_lens_q"].tolist()
        for s, e in zip(cu[:-1], cu[1:]):
            alone = model(input_ids=inputs["input_ids"][:, s:e], use_cache=False).logits.float()[0]
            assert_bf16_close(packed[s:e], alone, f"sequence {s}:{e}")
