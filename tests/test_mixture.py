"""Weighted mixtures: per-batch proportions, determinism, resume, repetition rules, token-weighted shares."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from shardtune.data.mixture import MixtureSampler


def source_of(sampler: MixtureSampler, indices: np.ndarray) -> np.ndarray:
    return np.searchsorted(sampler.offsets, indices, side="right") - 1


def test_a_three_to_one_mixture_draws_six_of_eight_every_step():
    sampler = MixtureSampler([1000, 37], [0.75, 0.25], global_batch=8, seed=0)
    for (_, _, batch), _ in zip(sampler, range(50)):
        assert np.bincount(source_of(sampler, batch), minlength=2).tolist() == [6, 2]


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.floats(0.05, 1.0), min_size=2, max_size=4), batch=st.integers(1, 32),
       seed=st.integers(0, 3))
def test_every_step_is_within_one_sample_of_the_weights(weights, batch, seed):
    sizes = [50 + 13 * i for i in range(len(weights))]
    sampler = MixtureSampler(sizes, weights, global_batch=batch, seed=seed)
    share = np.asarray(weights) / sum(weights)
    total = np.zeros(len(weights))
    for (_, _, indices), _ in zip(sampler, range(40)):
        counts = np.bincount(source_of(sampler, indices), minlength=len(weights))
        assert counts.sum() == batch and np.all(np.abs(counts - share * batch) < 1 + 1e-9)
        total += counts
        assert np.all(np.abs(total - share * total.sum()) < 1 + 1e-9)  # no drift over the run


def test_same_seed_same_batches_and_resume_continues_exactly():
    a = MixtureSampler([40, 7, 90], [0.5, 0.2, 0.3], global_batch=10, seed=5)
    b = MixtureSampler([40, 7, 90], [0.5, 0.2, 0.3], global_batch=10, seed=5)
    run = [x.tolist() for (_, _, x), _ in zip(a, range(30))]
    assert run == [x.tolist() for (_, _, x), _ in zip(b, range(30))]
    resumed = MixtureSampler([40, 7, 90], [0.5, 0.2, 0.3], global_batch=10, seed=5)
    epoch, step = divmod(17, resumed.steps_per_epoch)
    resumed.load_state_dict({"epoch": epoch, "step_in_epoch": step, "seed": 5})
    assert [x.tolist() for (_, _, x), _ in zip(resumed, range(13))] == run[17:]
    other = MixtureSampler([40, 7, 90], [0.5, 0.2, 0.3], global_batch=10, seed=6)
    assert [x.tolist() for (_, _, x), _ in zip(other, range(30))] != run


def test_a_large_source_is_not_repeated_and_a_small_one_is_cycled():
    sampler = MixtureSampler([500, 4], [0.5, 0.5], global_batch=8, seed=1)
    drawn = np.concatenate([x for (_, _, x), _ in zip(sampler, range(30))])
    large, small = drawn[drawn < 500], drawn[drawn >= 500] - 500
    assert len(large) == len(set(large.tolist())) == 120  # a quarter of an epoch's share: no repeats
    assert len(small) == 120 and all(np.bincount(small).tolist()[i] == 30 for i in range(4))
    for lap in range(30):  # each pass over the small source is a permutation of it
        assert sorted(small[4 * lap : 4 * lap + 4].tolist()) == [0, 1, 2, 3]


def test_natural_weights_visit_every_sample_once_per_epoch():
    sampler = MixtureSampler([30, 10], [0.75, 0.25], global_batch=8, seed=2)
    assert sampler.steps_per_epoch == 5
    epoch = np.concatenate([sampler.batch(0, s) for s in range(5)])
    assert sorted(epoch.tolist()) == list(range(40))


def test_token_weights_take_fewer_samples_from_longer_sources():
    sampler = MixtureSampler([100, 100], [0.5, 0.5], global_batch=8, seed=0, mean_lengths=[100.0, 300.0])
    counts = np.bincount(source_of(sampler, sampler.batch(0, 0)), minlength=2)
    assert counts.tolist() == [6, 2]  # equal tokens: 6 x 100 vs 2 x 300


def test_every_batch_of_a_mixture_is_full_and_drop_last_only_shortens_the_epoch():
    """Sources are endless streams: the last batch of an epoch is completed from their next passes."""
    kept = MixtureSampler([30, 11], [0.5, 0.5], global_batch=8, seed=0)
    dropped = MixtureSampler([30, 11], [0.5, 0.5], global_batch=8, seed=0, drop_last=True)
    assert (kept.steps_per_epoch, dropped.steps_per_epoch) == (6, 5)
    assert all(len(kept.batch(e, s)) == 8 for e in range(2) for s in range(6))
