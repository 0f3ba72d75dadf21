"""Data plans: global batches, rank shares, micro-batches (count and token budget), packing and shifting."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardtune.config import DataConfig
from shardtune.data.batching import (
    GlobalBatchSampler,
    collate,
    fixed_micro_batches,
    plan_micro_batches,
    split_across_ranks,
    token_budget_micro_batches,
)
from shardtune.data.chat import IGNORE_INDEX


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=60), batch=st.integers(1, 16),
       dp=st.sampled_from([1, 2, 3, 4]), budget=st.integers(64, 200), seed=st.integers(0, 5), padded=st.booleans())
def test_token_budget_plans(lengths, batch, dp, budget, seed, padded):
    """No micro-batch over budget (rows x longest row when padded), every rank the same count, every sample
    exactly once per epoch."""
    lengths = np.array(lengths)
    sampler = GlobalBatchSampler(len(lengths), batch * dp, seed)
    seen = []
    for step in range(sampler.steps_per_epoch):
        indices = sampler.batch(0, step)
        shares = split_across_ranks(indices, lengths, dp)
        assert sorted(i for s in shares for i in s) == sorted(indices.tolist())
        cfg = DataConfig(use_dynamic_bsz=True, max_token_len_per_gpu=budget)
        plans = plan_micro_batches(indices, lengths, dp, cfg, padded)
        assert [sorted(i for m in plan for i in m) for plan in plans] == [sorted(s) for s in shares]
        assert len({len(p) for p in plans}) == 1
        for plan in plans:
            for micro in plan:
                if micro:
                    assert (len(micro) * lengths[micro].max() if padded else lengths[micro].sum()) <= budget
                seen += micro
    assert sorted(seen) == list(range(len(lengths)))


def test_best_fit_decreasing_fills_bins():
    lengths = np.array([60, 50, 40, 30, 20, 10, 5, 5])
    micro = token_budget_micro_batches(list(range(8)), lengths, 110)
    assert sorted(int(lengths[m].sum()) for m in micro) == [110, 110]


def test_padded_budget_counts_rows_times_longest():
    lengths = np.array([60, 50, 40, 30, 20, 10, 5, 5])
    micro = token_budget_micro_batches(list(range(8)), lengths, 120, padded=True)
    assert [lengths[m].tolist() for m in micro] == [[60, 50], [40, 30, 20], [10, 5, 5]]  # padded 120, 120, 30


def test_ranks_are_balanced_by_tokens():
    lengths = np.array([100, 90, 10, 10, 10, 10, 5, 5])
    shares = split_across_ranks(np.arange(8), lengths, 2)
    loads = [int(lengths[s].sum()) for s in shares]
    assert max(loads) - min(loads) <= 20 and all(len(s) <= 4 for s in shares)


def test_sampler_order_depends_only_on_seed_and_epoch_and_resumes():
    a = GlobalBatchSampler(10, 4, seed=3)
    first = [(e, s, b.tolist()) for (e, s, b), _ in zip(a, range(5))]
    assert [x[:2] for x in first] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]  # last batch of 2 is kept
    assert first[2][2] and len(first[2][2]) == 2
    assert a.state_dict()["step_in_epoch"] == 0  # drawing ahead (a prefetcher) does not move the position
    a.consumed(0, 2)
    assert a.state_dict() == {"epoch": 0, "step_in_epoch": 3, "seed": 3}
    b = GlobalBatchSampler(10, 4, seed=3)
    b.load_state_dict({"epoch": 0, "step_in_epoch": 3})  # saved right after the epoch's last step
    assert [(e, s, x.tolist()) for (e, s, x), _ in zip(b, range(2))] == first[3:]
    assert sorted(sum((x[2] for x in first[:3]), [])) == list(range(10))


def test_packed_collate_shifts_per_sequence():
    s1 = (np.array([1, 2, 3]), np.array([IGNORE_INDEX, 2, 3]))
    s2 = (np.array([4, 5]), np.array([IGNORE_INDEX, 5]))
    mb = collate([s1, s2], packed=True, pad_id=0)
    assert mb.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    # token 3 (end of the first sequence) predicts nothing: it never learns to predict the next document
    assert mb.targets.tolist() == [[2, 3, IGNORE_INDEX, 5, IGNORE_INDEX]]
    assert mb.cu_seqlens.tolist() == [0, 3, 5] and mb.num_targets == 3 and mb.num_tokens == 5
    padded = collate([s1, s2], packed=False, pad_id=0)
    assert padded.input_ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert padded.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]] and padded.num_padded == 1
    assert torch.equal(padded.targets[1], torch.tensor([5, IGNORE_INDEX, IGNORE_INDEX]))


def test_empty_micro_batch_has_nothing_to_train():
    mb = collate([], packed=True, pad_id=7)
    assert mb.num_targets == 0 and mb.num_tokens == 0 and mb.input_ids.tolist() == [[7]]


def test_sequence_parallel_slices_cover_the_padded_row():
    from shardtune.data.batching import slice_for_sequence_parallel

    s1 = (np.array([1, 2, 3, 4]), np.array([IGNORE_INDEX, 2, 3, 4]))
    s2 = (np.array([5, 6, 7]), np.array([IGNORE_INDEX, 6, 7]))
    mb = collate([s1, s2], packed=True, pad_id=0)
    parts = [slice_for_sequence_parallel(mb, 3, r, pad_id=0) for r in range(3)]
    assert [p.input_ids.tolist()[0] for p in parts] == [[1, 2, 3], [4, 5, 6], [7, 0, 0]]
    # the padding is its own sequence with no targets, and every slice keeps the whole row's boundaries
    assert all(p.cu_seqlens.tolist() == [0, 4, 7, 9] for p in parts)
    assert torch.cat([p.position_ids for p in parts], 1).tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert sum(p.num_targets for p in parts) == mb.num_targets == 5


def test_the_step_divisor_counted_from_the_dataset_equals_the_collated_targets():
    """The loss divisor is counted on the host from the samples (no collective); it must equal what the
    micro-batches of all ranks hold, packed or padded."""
    from shardtune.data.dataset import TokenizedDataset

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, size=20)
    labels = np.where(rng.random(lengths.sum()) < 0.5, IGNORE_INDEX, 7).astype(np.int32)
    ds = TokenizedDataset(np.ones(lengths.sum(), dtype=np.int32), labels, np.concatenate([[0], np.cumsum(lengths)]))
    indices = np.array([3, 0, 17, 9, 12, 5])
    shares = split_across_ranks(indices, ds.lengths, 2)
    for packed in (True, False):
        held = sum(collate([ds[i] for i in m], packed, pad_id=0).num_targets
                   for share in shares for m in fixed_micro_batches(share, 2))
        assert held == ds.num_targets(indices) > 0
