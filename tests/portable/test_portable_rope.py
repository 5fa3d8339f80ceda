"""The sync-free packed (thd) RoPE equals megatron-core's own, with and without context parallel."""
import pytest
import torch

from hpctrain.model.portable import rope


class _Group:  # megatron's thd RoPE reads only size() and rank() of the CP group
    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


@pytest.mark.parametrize("cp,rank", [(1, 0), (2, 0), (2, 1), (4, 3)])
def test_fast_thd_rope_equals_megatron(cp, rank):
    rope.install()
    cu = torch.tensor([0, 8, 24, 32, 64], dtype=torch.int32)
    g = torch.Generator().manual_seed(cp * 10 + rank)
    local = 64 // cp
    t = torch.randn(local, 3, 16, generator=g)
    freqs = torch.randn(32, 1, 1, 16, generator=g)  # max_seqlen rows, as GPTModel builds them
    group = _Group(cp, rank) if cp > 1 else None
    got = rope._fast_thd(t, cu, freqs, cp_group=group)
    want = rope.original_thd()(t, cu, freqs, cp_group=group or _Group(1, 0))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
