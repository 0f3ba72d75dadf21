"""Checks that need a CUDA GPU (skipped on CPU machines; run them where a GPU is lent)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_torch_varlen_kernel_matches_per_sequence_sdpa(kv_heads):
    from shardtune.attention import torch_varlen_forward, varlen_sdpa_forward

    torch.manual_seed(0)
    lengths = [37, 5, 120, 64]
    total = sum(lengths)
    q = torch.randn(1, 4, total, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, kv_heads, total, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    module = torch.nn.Module().eval()
    got, _ = torch_varlen_forward(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=max(lengths))
    ref, _ = varlen_sdpa_forward(module, q, k, v, None, cu_seq_lens_q=cu)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
