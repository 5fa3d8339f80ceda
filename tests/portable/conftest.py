"""The portable tests' shared fixture: one single-process megatron-core (gloo) per test module."""
import pytest

from portable_tiny import init_single_process


@pytest.fixture(scope="module")
def mcore():
    created = init_single_process()
    yield
    if created:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        ps.destroy_model_parallel()
        dist.destroy_process_group()
