"""Pools and block copies in one process: the pieces the transfer manager and the handshake stand on."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mpkv.blocks import BadBlocks, check_ids
from mpkv.config import CacheConfig
from mpkv.errors import MpkvError
from mpkv.pd.transport import SameHost
from mpkv.pool import allocate_device_pool, attach_device_pool
from mpkv.pool.copy import CpuPool, checked_runs, copy_blocks, copy_runs, runs_pay
from mpkv.pool.runs import merge_runs
from mpkv.shm.registry import Registry

CFG = CacheConfig(layers=2, kv_heads=2, head_dim=8, block_size=4, device_blocks=16, host_blocks=8)


def test_copy_blocks_matches_indexing(rng: random.Random) -> None:
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    src = torch.randn(CFG.pool_shape(16), generator=gen).to(torch.float16)
    dst = torch.zeros(CFG.pool_shape(8), dtype=torch.float16)
    s = np.array(rng.sample(range(16), 5))
    d = np.array(rng.sample(range(8), 5))
    copy_blocks(dst, d, src, s)
    want = torch.zeros_like(dst)
    want[:, :, torch.as_tensor(d)] = src[:, :, torch.as_tensor(s)]
    assert torch.equal(dst, want)
    with pytest.raises(ValueError, match="out of range"):
        copy_blocks(dst, np.array([8]), src, np.array([0]))
    with pytest.raises(ValueError, match="2 source blocks for 1 destination blocks"):
        copy_blocks(dst, np.array([1]), src, np.array([0, 1]))


def test_copy_runs_matches_indexing_and_refuses_a_run_out_of_range(rng: random.Random) -> None:
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    src = torch.randn(CFG.pool_shape(16), generator=gen).to(torch.float16)
    dst = torch.zeros(CFG.pool_shape(12), dtype=torch.float16)
    # Two runs and a lone block, listed out of order: what a lease of a fragmented decode pool looks like.
    s = np.array([9, 3, 4, 5, 10, 11, 0])
    d = np.array([0, 6, 7, 8, 1, 2, 11])
    runs = merge_runs(d, s)
    assert len(runs) == 3 and runs_pay(merge_runs(np.arange(8), np.arange(4, 12))) and not runs_pay(runs[2:])
    pools = CpuPool.of(dst), CpuPool.of(src)
    copy_runs(checked_runs(*pools, runs), range(2, 4))  # layer 1's K and V, as a PD ship copies it
    want = torch.zeros_like(dst)
    want[1:2, :, torch.as_tensor(d)] = src[1:2, :, torch.as_tensor(s)]
    assert torch.equal(dst, want)
    before = dst.clone()
    with pytest.raises(ValueError, match="out of range of the pools"):
        checked_runs(*pools, np.array([[0, 0, 2], [11, 14, 2]]))  # the first run fits; nothing is copied
    with pytest.raises(ValueError, match="out of range of the pools"):
        checked_runs(*pools, np.array([[10, 0, 3]]))
    for bad in ([2**63 - 1, 0, 1], [0, 2**63 - 1, 1], [0, 0, 0]):  # start + count would wrap around; an empty run
        with pytest.raises(ValueError, match="out of range of the pools"):
            checked_runs(*pools, np.array([bad]))
    with pytest.raises(ValueError, match="planes range"):
        copy_runs(checked_runs(*pools, runs), range(2, 6))  # a layer the pools do not have
    assert torch.equal(dst, before)


def test_a_same_host_ship_lands_every_layer_by_runs_or_by_blocks(rng: random.Random) -> None:
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    src = torch.randn(CFG.pool_shape(16), generator=gen).to(torch.float16)
    dst = torch.zeros(CFG.pool_shape(16), dtype=torch.float16)
    ship = SameHost(dst)
    # Two items of one batch, layer after layer: a prompt's consecutive blocks into a lease of two runs (copied by
    # runs), and scattered blocks (copied block by block).
    runs = (np.arange(2, 11), np.array([12, 13, 14, 15, 0, 1, 2, 3, 4]))
    items = [runs, (np.array([0, 14, 12]), np.array([9, 5, 7]))]
    for layer in range(CFG.layers):
        for s, d in items:
            ship.write_layer(layer, src, s, d, (0, 0, 0))
    ship.flush()
    want = torch.zeros_like(dst)
    for s, d in items:
        want[:, :, torch.as_tensor(d)] = src[:, :, torch.as_tensor(s)]
    assert torch.equal(dst, want)
    ship.close()


def test_a_pool_is_not_freed_under_a_live_view(instance: str) -> None:
    reg = Registry.create(instance)
    try:
        pool = allocate_device_pool(reg, CFG, rank=0, epoch=1, weight_version=1)
        attached = attach_device_pool(CFG, pool.handle())
        attached.tensor[0, 0, 3] = 7
        assert torch.equal(pool.tensor[0, 0, 3], attached.tensor[0, 0, 3])  # one memory, two processes' views
        stale = attached.tensor[1]  # a view kept past detach: exactly the reference's second bug
        with pytest.raises(MpkvError, match="still holds a tensor view of it"):
            attached.close()
        del stale
        attached.close()
        assert pool.free() >= CFG.pool_bytes(CFG.device_blocks)
    finally:
        reg.destroy()


def test_block_id_checks() -> None:
    assert check_ids([3, 1], 4, "blocks").tolist() == [3, 1]
    with pytest.raises(BadBlocks, match=r"blocks \[-2, 9\] out of range: valid ids are 0..3"):
        check_ids([-2, 9, 1], 4, "blocks")
    with pytest.raises(BadBlocks, match=r"appear more than once"):
        check_ids([1, 1], 4, "blocks")
    with pytest.raises(BadBlocks, match="1-D array of integers"):
        check_ids([[1]], 4, "blocks")


def test_a_view_of_our_own_host_memory_keeps_it_from_being_freed() -> None:
    # The cuda host pool's memory is ours (cuMemHostAlloc), viewed through numpy: while a torch view of it lives,
    # check_no_views refuses (free would leave the view reading freed memory); once all are gone, it passes.
    import ctypes
    import weakref

    from mpkv.pool.cuda_driver import _HostMemory, check_no_views

    buf = ctypes.create_string_buffer(64)
    mem = _HostMemory(ctypes.addressof(buf), 64)
    tensor, alive = torch.from_numpy(np.asarray(mem)), weakref.ref(mem)
    del mem
    view = tensor[8:16]
    del tensor
    view.fill_(7)
    assert buf.raw[8:16] == b"\x07" * 8  # the tensor is that memory, not a copy
    with pytest.raises(MpkvError, match="still holds a tensor view"):
        check_no_views(alive, "the host pool")
    del view
    check_no_views(alive, "the host pool")
