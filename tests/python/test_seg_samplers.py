"""PlanSampler: coverage, sharding, epochs, and agreement with DistributedSampler."""

from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.utils.data import DistributedSampler  # noqa: E402

from cobalance.segmentation.samplers import PlanSampler  # noqa: E402

from seg_folders import make_plan  # noqa: E402

copies_strategy = st.lists(st.integers(0, 4), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(copies=copies_strategy, replicas=st.integers(1, 5), drop_last=st.booleans(), seed=st.integers(0, 2**31),
       epoch=st.integers(0, 5))
def test_epoch_over_all_ranks_is_the_plans_multiset(copies, replicas, drop_last, seed, epoch):
    plan = make_plan(copies)
    expected = Counter(plan.indices().tolist())
    n_out = plan.n_samples_out
    per_rank = []
    for rank in range(replicas):
        s = PlanSampler(plan, seed=seed, num_replicas=replicas, rank=rank, drop_last=drop_last)
        s.set_epoch(epoch)
        per_rank.append(list(s))
        assert len(per_rank[-1]) == len(s)
    lengths = {len(x) for x in per_rank}
    assert len(lengths) == 1, "ranks must get equal parts"
    got = Counter(i for part in per_rank for i in part)
    total = sum(got.values())
    if drop_last:
        assert total == (n_out // replicas) * replicas
        assert not (got - expected), "drop_last never yields an index more often than the plan holds it"
        assert sum((expected - got).values()) == n_out - total < replicas
    else:
        assert total == -(-n_out // replicas) * replicas
        assert not (expected - got), "every planned copy is yielded"
        assert sum((got - expected).values()) == total - n_out < max(replicas, 1)


@settings(max_examples=40, deadline=None)
@given(copies=copies_strategy, replicas=st.integers(1, 4), drop_last=st.booleans(), shuffle=st.booleans(),
       seed=st.integers(0, 1000), epoch=st.integers(0, 3))
def test_positions_match_distributed_sampler_exactly(copies, replicas, drop_last, shuffle, seed, epoch):
    plan = make_plan(copies)
    positions = list(range(plan.n_samples_out))  # a "dataset" as long as the plan
    for rank in range(replicas):
        ours = PlanSampler(plan, shuffle=shuffle, seed=seed, num_replicas=replicas, rank=rank, drop_last=drop_last,
                           positions=True)
        ref = DistributedSampler(positions, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
        ours.set_epoch(epoch)
        ref.set_epoch(epoch)
        got = list(ours)
        assert got == list(ref)
        assert len(ours) == len(ref)
        # the index-yielding sampler reads the same positions through the plan
        by_index = PlanSampler(plan, shuffle=shuffle, seed=seed, num_replicas=replicas, rank=rank,
                               drop_last=drop_last)
        by_index.set_epoch(epoch)
        assert list(by_index) == plan.indices()[got].tolist()


def test_set_epoch_reshuffles_and_is_seed_stable():
    plan = make_plan([1, 3, 0, 2, 5, 1, 1, 2] * 4)
    a = PlanSampler(plan, seed=3)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert sorted(first) == sorted(second) == sorted(plan.indices().tolist())
    assert first != second
    b = PlanSampler(plan, seed=3)
    b.set_epoch(1)
    assert list(b) == second  # a fresh sampler with the same seed and epoch
    c = PlanSampler(plan, seed=4)
    c.set_epoch(1)
    assert list(c) != second
    assert list(PlanSampler(plan, shuffle=False)) == plan.indices().tolist()


def test_single_process_defaults_to_one_rank():
    plan = make_plan([2, 1])
    s = PlanSampler(plan, shuffle=False)
    assert (s.num_replicas, s.rank) == (1, 0)
    assert list(s) == [0, 0, 1]


def test_dataloader_accepts_it():
    plan = make_plan([2, 0, 1, 3])
    data = torch.arange(4) * 10
    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=PlanSampler(plan, seed=1))
    got = torch.cat(list(loader)).tolist()
    assert sorted(got) == [0, 0, 20, 30, 30, 30]


def test_bad_arguments_name_themselves():
    plan = make_plan([1, 2])
    with pytest.raises(ValueError, match="num_replicas"):
        PlanSampler(plan, num_replicas=0, rank=0)
    with pytest.raises(ValueError, match="rank"):
        PlanSampler(plan, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="plan must be a cobalance.Plan"):
        PlanSampler(np.arange(3))
