"""Every mesh or dispatcher mistake is a one-line UserError that names the problem and the fix."""

from __future__ import annotations

import pytest

from trainer.errors import UserError
from trainer.parallel import ParallelConfig
from trainer.parallel.dispatchers import make_dispatcher
from trainer.parallel.mesh import mesh_sizes


def test_layout_resolves_the_rest_of_the_ranks_to_expert_fsdp():
    sizes = mesh_sizes(ParallelConfig(ep_size=2, dp_replicate_size=2), world_size=8, num_experts=8)
    assert (sizes.dp_replicate, sizes.efsdp, sizes.ep, sizes.dp_shard) == (2, 2, 2, 4)


def test_ep_size_that_does_not_divide_the_experts_is_refused():
    with pytest.raises(UserError, match="ep_size=4 does not divide the model's 6 experts; choose an ep_size"):
        mesh_sizes(ParallelConfig(ep_size=4), world_size=4, num_experts=6)


def test_ep_size_that_does_not_divide_the_world_is_refused():
    with pytest.raises(UserError, match=r"ep_size=4 does not divide the 6 sharded data-parallel ranks \(world size 6\)"):
        mesh_sizes(ParallelConfig(ep_size=4), world_size=6, num_experts=8)


def test_mesh_sizes_that_do_not_multiply_to_the_world_are_refused():
    with pytest.raises(UserError, match="dp_replicate_size x dp_shard_size = 2 x 3 but the world size is 8"):
        mesh_sizes(ParallelConfig(dp_replicate_size=2, dp_shard_size=3), world_size=8)


def test_deepep_asked_for_where_it_cannot_run_says_what_to_install():
    with pytest.raises(UserError) as err:
        make_dispatcher("deepep", group=None, device_type="cpu")
    message = str(err.value)
    assert "parallel.dispatcher=deepep but DeepEP cannot run here" in message
    assert "build DeepEP v1.2.1" in message and "parallel.dispatcher=alltoall" in message
    assert "\n" not in message


def test_unknown_dispatcher_is_refused():
    with pytest.raises(UserError, match="unknown parallel.dispatcher 'nccl'; use one of auto|alltoall|deepep"):
        ParallelConfig(dispatcher="nccl")


def test_ep_without_torchrun_is_refused():
    from trainer.parallel import parallelize

    with pytest.raises(UserError, match="ep_size=2 needs as many processes; launch with torchrun"):
        parallelize(object(), ParallelConfig(ep_size=2))
