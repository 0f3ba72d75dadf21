"""The chunked loss head: equal to the plain lm_head + cross_entropy, alone, in training, and under bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import arithmetic_rows, run_cli, write_jsonl
from test_training import assert_close, losses, run

from shardtune.errors import ConfigError
from shardtune.loss import LossHead, linear_cross_entropy


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_jsonl(d / "train.jsonl", arithmetic_rows(40, seed=1)), write_jsonl(d / "val.jsonl", arithmetic_rows(10, seed=2))


def _plain(hidden, weight, bias, targets):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
def test_values_and_gradients_equal_the_plain_loss(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    got = linear_cross_entropy(hidden, weight, bias, targets, chunk)
    (got * 0.37).backward()
    grads = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    want = _plain(hidden, weight, bias, targets)
    (want * 0.37).backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for a, t in zip(grads, (hidden, weight, bias)):
        torch.testing.assert_close(a, t.grad, rtol=1e-5, atol=1e-6)


def test_gradients_pass_gradcheck_in_float64():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (9,), generator=g)
    assert torch.autograd.gradcheck(lambda h, w, b: linear_cross_entropy(h, w, b, t, 4), (h, w, b))


def test_bf16_autocast_matches_the_plain_head_under_autocast():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(64, 32, generator=g, requires_grad=True)
    weight = torch.randn(300, 32, generator=g, requires_grad=True)
    targets = torch.randint(0, 300, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, None, targets, 16)
        want = _plain(hidden, weight, None, targets)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)  # the same bf16 logits, the same fp32 softmax
    gh, gw = torch.autograd.grad(got, (hidden, weight))
    wh, ww = torch.autograd.grad(want, (hidden, weight))
    torch.testing.assert_close(gh, wh, rtol=2e-2, atol=2e-2)  # 16-bit matmuls on both sides
    torch.testing.assert_close(gw, ww, rtol=2e-2, atol=2e-2)


def test_no_supervised_tokens_gives_zero_loss_and_zero_gradients():
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, None, torch.zeros(0, dtype=torch.long), 4)
    loss.backward()
    assert loss.item() == 0 and weight.grad.abs().sum() == 0


def test_the_head_is_a_plain_linear_outside_the_loss_block():
    linear = torch.nn.Linear(8, 11, bias=False)
    head = LossHead(linear, chunk_size=4)
    assert head.weight is linear.weight and list(head.state_dict()) == ["weight"]
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(head(x), linear(x))
    targets = torch.tensor([3, 5])
    with head.computing_loss(torch.tensor([1, 4]), targets):
        loss = head(x)
    torch.testing.assert_close(loss, _plain(x.reshape(6, 8)[[1, 4]], linear.weight, None, targets))
    assert head(x).shape == (2, 3, 11)


@pytest.mark.parametrize("packed", ["true", "false"])
def test_training_with_the_chunked_loss_equals_the_plain_loss(tiny_model, data_files, tmp_path, packed):
    """Five steps (with validation): same losses, gradient norms and validation losses as the plain head."""
    common = (f"model.use_remove_padding={packed}", "data.micro_batch_size_per_gpu=3", "trainer.test_freq=2")
    _, plain = run(tiny_model, data_files, tmp_path / "plain", *common)
    trainer, chunked = run(tiny_model, data_files, tmp_path / "chunked", *common, "model.loss_chunk_size=7")
    assert isinstance(trainer.engine.model.get_output_embeddings(), LossHead)
    assert_close(losses(plain), losses(chunked), 1e-5)
    assert_close(losses(plain, "train/grad_norm"), losses(chunked, "train/grad_norm"), 1e-5)
    assert_close([h["val/loss"] for h in plain if "val/loss" in h], [h["val/loss"] for h in chunked if "val/loss" in h], 1e-5)


def test_tied_embeddings_stay_tied_and_train_the_same(data_files, tmp_path):
    from shardtune.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "tied", seed=3, tie=True)
    _, plain = run(model, data_files, tmp_path / "plain")
    trainer, chunked = run(model, data_files, tmp_path / "chunked", "model.loss_chunk_size=16")
    m = trainer.engine.model
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight
    assert_close(losses(plain), losses(chunked), 1e-5)


def test_lora_with_the_chunked_loss_equals_lora_without(tiny_model, data_files, tmp_path):
    _, plain = run(tiny_model, data_files, tmp_path / "plain", "model.lora_rank=4", "optim.lr=1e-2")
    _, chunked = run(tiny_model, data_files, tmp_path / "chunked", "model.lora_rank=4", "optim.lr=1e-2",
                     "model.loss_chunk_size=16")
    assert_close(losses(plain), losses(chunked), 1e-5)


def test_a_model_that_rescales_its_logits_is_refused_with_a_fix(data_files, tmp_path):
    """Gemma 2 soft-caps the logits after lm_head: the loss head would be soft-capped too, so it refuses."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    from shardtune.tiny import byte_tokenizer

    tok = byte_tokenizer()
    config = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gemma2")
    tok.save_pretrained(tmp_path / "gemma2")
    over = ("model.loss_chunk_size=16", "model.attn_implementation=eager", "model.use_remove_padding=false")
    with pytest.raises(ConfigError, match="transforms its logits after lm_head"):  # the engine's backstop
        run(tmp_path / "gemma2", data_files, tmp_path / "run", *over)
    r = run_cli("validate", f"model.path={tmp_path / 'gemma2'}", f"data.train_files={data_files[0]}", *over)
    assert r.returncode == 2 and "final_logit_softcapping=30.0" in r.stderr and "Traceback" not in r.stderr


def test_use_liger_on_cpu_warns_and_trains_as_without(tiny_model, data_files, tmp_path):
    _, plain = run(tiny_model, data_files, tmp_path / "plain", "trainer.total_training_steps=2")
    with pytest.warns(UserWarning, match="needs a CUDA GPU"):
        _, liger = run(tiny_model, data_files, tmp_path / "liger", "trainer.total_training_steps=2", "model.use_liger=true")
    assert losses(plain) == losses(liger)


def test_negative_chunk_size_and_lora_on_the_head_are_config_errors(tiny_model, data_files, tmp_path):
    with pytest.raises(ConfigError, match="loss_chunk_size must be >= 0"):
        run(tiny_model, data_files, tmp_path, "model.loss_chunk_size=-1", fit=False)
    with pytest.raises(ConfigError, match="LoRA on lm_head"):
        run(tiny_model, data_files, tmp_path, "model.loss_chunk_size=8", "model.lora_rank=4",
            "model.target_modules=[q_proj,lm_head]", fit=False)


def test_validation_computes_no_gradients():
    """Under no_grad the head only forms the loss: one matmul per chunk instead of three."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)
            return func(*args, **(kwargs or {}))

    hidden = torch.randn(40, 8)
    weight = torch.nn.Parameter(torch.randn(30, 8))
    targets = torch.randint(0, 30, (40,))
    counts = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad), CountMatmuls() as mode:
            loss = linear_cross_entropy(hidden.requires_grad_(grad), weight, None, targets, 10)
        counts.append(mode.count)
        assert loss.requires_grad == grad
    assert counts == [4 * 3, 4 * 1]


def test_an_empty_micro_batch_gives_zero_loss_and_defined_zero_gradients():
    """Ranks padded with an empty micro-batch must still give every head parameter a gradient, as the
    other ranks do (FSDP2 reduces the same tensors on every rank)."""
    head = LossHead(torch.nn.Linear(8, 11, bias=True), chunk_size=4)
    hidden = torch.randn(1, 1, 8, requires_grad=True)
    with head.computing_loss(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)):
        loss = head(hidden)
    loss.backward()
    assert loss.item() == 0
    for t in (hidden, head.weight, head.bias):
        assert t.grad is not None and not t.grad.any()


def test_a_chunk_size_selects_the_chunked_head_even_with_liger(tiny_model, monkeypatch):
    """Liger's fused loss serves only `loss_chunk_size=0`; with a chunk size the chunked head is used (Liger's
    tiny chunks made it the largest cost of a GPU step on a large vocabulary)."""
    from transformers import AutoModelForCausalLM

    from shardtune import parallelize
    from shardtune.config import Config, ModelConfig
    from shardtune.loss import find_loss_head
    from shardtune.parallel import World

    monkeypatch.setattr(parallelize, "uses_liger", lambda cfg, world: True)  # as on a GPU with liger-kernel
    for chunk, liger_loss in ((64, False), (0, True)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        cfg = Config(model=ModelConfig(path=str(tiny_model), loss_chunk_size=chunk, use_liger=True))
        head = find_loss_head(parallelize.add_loss_head(model, cfg, World()))
        assert (head.use_liger, head.chunk_size) == (liger_loss, chunk)


def test_varlen_kernel_flags_follow_the_torch_release():
    """torch 2.10 asks for causal attention with is_causal and has no enable_gqa; 2.11+ uses window_size."""
    from shardtune.attention import _varlen_flags

    def v210(q, k, v, cq, ck, mq, mk, *, return_aux=None, is_causal=False, scale=None): ...

    def v213(q, k, v, cq, ck, mq, mk, *, return_aux=None, scale=None, window_size=(-1, -1), enable_gqa=False): ...

    assert _varlen_flags(v210) == ({"is_causal": True}, False)
    assert _varlen_flags(v213) == ({"window_size": (-1, 0)}, True)
    from torch.nn.attention.varlen import varlen_attn  # and the installed release's own signature

    causal, gqa = _varlen_flags(varlen_attn)
    assert causal in ({"window_size": (-1, 0)}, {"is_causal": True}) and isinstance(gqa, bool)
