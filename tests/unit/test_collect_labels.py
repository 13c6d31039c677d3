"""Label rules, concentration statistics and the shard plan of `dejavu collect`, on hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from dejavu.bits import unpack_bits
from dejavu.collect import labels as L
from dejavu.collect.collect import make_plan, split_eval, state_differences, stats_rows


def test_topk_mask_keeps_exactly_the_largest():
    gen = torch.Generator().manual_seed(0)
    mag = torch.rand(50, 37, generator=gen)
    for density in (0.1, 0.5, 0.77, 1.0):
        mask = L.topk_mask(mag, density)
        assert mask.sum(dim=1).eq(min(37, int(torch.tensor(density * 37).ceil()))).all()
        kept_min = torch.where(mask, mag, torch.inf).amin(dim=1)
        dropped_max = torch.where(mask, -torch.inf, mag).amax(dim=1)
        assert (kept_min >= dropped_max).all()


def test_topk_ranks_by_magnitude_not_sign():
    act = torch.tensor([[-5.0, 1.0, 0.5, -0.1]])
    packed = L.mlp_labels(act, "topk", [0.5])["0.5"]
    assert unpack_bits(packed, 4).tolist() == [[True, True, False, False]]


def test_positive_rule_and_several_densities_round_trip_through_bits():
    act = torch.tensor([[0.0, 2.0, -1.0, 3.0, 0.1, 0.0, 0.0, 0.0, 7.0]])
    pos = L.mlp_labels(act, "positive", [0.5])
    assert list(pos) == ["positive"]
    assert unpack_bits(pos["positive"], 9).tolist() == [(act > 0).tolist()[0]]
    multi = L.mlp_labels(act, "topk", [0.25, 0.5])
    assert list(multi) == ["0.25", "0.5"]
    assert pos["positive"].dtype == torch.uint8 and pos["positive"].shape == (1, 2)
    assert unpack_bits(multi["0.25"], 9).sum() == 3  # ceil(0.25 * 9)
    assert unpack_bits(multi["0.5"], 9).sum() == 5


@pytest.mark.parametrize("gated,activation,expected", [
    (False, "relu", "positive"), (False, "ReLU", "positive"), (False, "gelu_new", "topk"),
    (True, "silu", "topk"), (True, "relu", "topk"),
])
def test_auto_rule(gated, activation, expected):
    assert L.resolve_label_rule("auto", gated, activation) == expected
    assert L.resolve_label_rule("topk", gated, activation) == "topk"


def test_tags_follow_formats_md():
    assert L.label_tags("topk", [0.5, 0.25, 1.0]) == ["0.5", "0.25", "1"]
    assert L.label_tags("positive", [0.5]) == ["positive"]


def test_frac_for_mass():
    mag = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 10.0]])
    frac = L.frac_for_mass(mag)
    # row 0: cumulative shares 0.4, 0.7, 0.9, 1.0
    assert frac[0].tolist() == [0.75, 1.0, 1.0]
    assert frac[1].tolist() == [1.0, 1.0, 1.0]
    assert frac[2].tolist() == [0.25, 0.25, 0.25]


def test_head_norms():
    out = torch.zeros(2, 3 * 4)
    out[0, 4:8] = torch.tensor([3.0, 4.0, 0.0, 0.0])
    out[1, 8:12] = 1.0
    assert L.head_norms(out, 3).tolist() == [[0.0, 5.0, 0.0], [0.0, 0.0, 2.0]]


def test_plan_split_and_round_robin_ranks():
    seqs = torch.arange(20 * 8).view(20, 8)
    plan = make_plan(seqs, eval_tokens=20, shard_tokens=24, world_size=1)
    assert plan.eval.shape[0] == 3 and plan.train.shape[0] == 17  # eval: whole sequences, rounded up
    assert torch.equal(plan.eval, seqs[17:])
    assert [s.tokens for s in plan.shards if s.split == "train"] == [24] * 5 + [16]
    two = make_plan(seqs, eval_tokens=20, shard_tokens=24, world_size=2)
    for split, part in (("train", plan.train), ("eval", plan.eval)):
        for rank in (0, 1):
            got = torch.cat([s.sequences for s in two.shards if s.split == split and s.rank == rank])
            assert torch.equal(got, part[rank::2])
    names = [s.path for s in two.shards]
    assert names[0] == "shards/train-r00-00000.safetensors" and len(set(names)) == len(names)
    assert [(s.split, s.rank, s.index) for s in two.shards] == sorted(
        ((s.split, s.rank, s.index) for s in two.shards), key=lambda t: (t[0] != "train", t[1], t[2]))


def test_eval_split_never_takes_more_than_half():
    seqs = torch.zeros(4, 8, dtype=torch.long)
    train, evals, wanted = split_eval(seqs, eval_tokens=1000)
    assert wanted == 125 and evals.shape[0] == 2 and train.shape[0] == 2


def test_stats_rows_sample_positions_within_each_sequence():
    rows = stats_rows(2, 40)
    assert rows.tolist() == [0, 16, 32, 40, 56, 72]


def test_state_differences_name_keys():
    diffs = state_differences({"config": {"collect": {"max_tokens": 1, "seed": 0}}, "world_size": 1},
                              {"config": {"collect": {"max_tokens": 2, "seed": 0}}, "world_size": 1})
    assert diffs == ["config.collect.max_tokens: 1 -> 2"]


@pytest.mark.parametrize("shape", [(5, 16), (64, 1536), (3, 8), (7, 12), (2, 3)])
def test_fast_pack_equals_reference_pack_bits(shape):
    from dejavu.bits import pack_bits

    gen = torch.Generator().manual_seed(1)
    for mask in (torch.rand(*shape, generator=gen) > 0.5, torch.ones(shape, dtype=torch.bool),
                 torch.zeros(shape, dtype=torch.bool)):
        assert torch.equal(L.pack_mask(mask), pack_bits(mask))
        assert torch.equal(unpack_bits(L.pack_mask(mask), shape[1]), mask)
