"""Rank -> node/GPU map and the ranks of each TP/CP/DP/PP group.

megatron-core (parallel_state.initialize_model_parallel) orders ranks "tp-cp-ep-dp-pp": TP varies
fastest, then CP, (EP = 1 here), DP, and PP slowest, so

    rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))

and ranks are laid on nodes in order: node = rank // gpus_per_node, gpu = rank % gpus_per_node.
So TP groups stay inside a node when tp divides gpus_per_node. Groups are listed in the same order
as megatron-core's RankGenerator.get_ranks (tests compare against it).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product

from hpctrain.plan.layout import Layout

# Dimension names from fastest to slowest varying.
ORDER = ("tp", "cp", "dp", "pp")


@dataclass(frozen=True)
class RankPlace:
    rank: int
    node: int
    gpu: int
    tp: int
    cp: int
    dp: int
    pp: int


def _sizes(lay: Layout) -> dict[str, int]:
    return {"tp": lay.tp, "cp": lay.cp, "dp": lay.dp, "pp": lay.pp}


def coords(rank: int, lay: Layout) -> dict[str, int]:
    """{tp, cp, dp, pp} ranks of a global rank."""
    out, rest = {}, rank
    for name in ORDER:
        size = _sizes(lay)[name]
        out[name] = rest % size
        rest //= size
    return out


def rank_of(c: dict[str, int], lay: Layout) -> int:
    sizes, rank, stride = _sizes(lay), 0, 1
    for name in ORDER:
        rank += c[name] * stride
        stride *= sizes[name]
    return rank


def rank_map(lay: Layout, gpus_per_node: int) -> list[RankPlace]:
    """Where each global rank runs and its coordinate in every parallel dimension."""
    return [RankPlace(r, r // gpus_per_node, r % gpus_per_node, **coords(r, lay)) for r in range(lay.world_size)]


def groups(lay: Layout, kind: str) -> list[list[int]]:
    """Ranks of each group of ``kind`` ("tp", "cp", "dp", "pp", or combined like "dp-cp").

    A group holds the ranks that differ only in the named dimensions; groups are enumerated with the
    other dimensions varying fastest-first (megatron-core's order).
    """
    members = kind.split("-")
    bad = [m for m in members if m not in ORDER]
    if bad:
        raise ValueError(f"unknown group kind {kind!r}: use names from {ORDER} joined by '-'")
    sizes = _sizes(lay)
    inside = [n for n in ORDER if n in members]
    outside = [n for n in ORDER if n not in members]
    result = []
    # itertools.product varies the LAST element fastest; reverse so the first ORDER name is fastest.
    for out_vals in product(*(range(sizes[n]) for n in reversed(outside))):
        fixed = dict(zip(reversed(outside), out_vals))
        group = []
        for in_vals in product(*(range(sizes[n]) for n in reversed(inside))):
            c = dict(fixed, **dict(zip(reversed(inside), in_vals)))
            group.append(rank_of(c, lay))
        result.append(group)
    return result
