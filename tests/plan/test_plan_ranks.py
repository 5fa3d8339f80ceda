"""Rank -> node/GPU map and parallel groups, checked against megatron-core's own RankGenerator."""
import pytest

from hpctrain.plan.layout import Layout
from hpctrain.plan.ranks import coords, groups, rank_map, rank_of

LAYOUTS = [(2, 1, 3, 4), (2, 2, 2, 2), (1, 1, 8, 1), (4, 1, 2, 2), (2, 3, 1, 2), (8, 1, 4, 2)]  # tp, cp, dp, pp


@pytest.mark.parametrize("tp,cp,dp,pp", LAYOUTS)
def test_groups_match_megatron_rank_generator(tp, cp, dp, pp):
    from megatron.core.parallel_state import RankGenerator

    lay = Layout(tp=tp, pp=pp, cp=cp, dp=dp)
    ref = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    for kind in ("tp", "cp", "dp", "pp", "dp-cp", "tp-pp", "tp-cp"):
        assert groups(lay, kind) == ref.get_ranks(kind), kind


def test_rank_map_nodes_and_coordinates():
    lay = Layout(tp=2, pp=2, cp=1, dp=2)  # 8 ranks on 2 nodes x 4
    places = rank_map(lay, gpus_per_node=4)
    assert [(p.node, p.gpu) for p in places] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert [(p.tp, p.dp, p.pp) for p in places[:4]] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]
    assert all(p.pp == 1 for p in places[4:])  # second pipeline stage on the second node
    for r in range(lay.world_size):
        assert rank_of(coords(r, lay), lay) == r


def test_unknown_group_kind():
    with pytest.raises(ValueError, match="unknown group kind 'ep'"):
        groups(Layout(1, 1, 1, 1), "ep")
