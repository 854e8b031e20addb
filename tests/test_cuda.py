"""The cuda backend, on a real GPU: skipped cleanly where torch sees none (every CI run so far).

Run them where a GPU is: `tools/test -m gpu`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import CTX
from instances import Launched, prefill_and_verify, verify

from mpkv.client import Client
from mpkv.config import CacheConfig
from mpkv.controller import Controller

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
]

# 64 MiB pools: large enough that NVML's figures show them come and go (small allocations may share pages the
# driver keeps)
CFG = CacheConfig(layers=2, kv_heads=2, head_dim=16, block_size=8, device_blocks=32768, host_blocks=32, backend="cuda")


def _attach_and_write(handle_bytes: bytes, value: float, conn) -> None:  # type: ignore[no-untyped-def]
    import msgspec

    from mpkv.pool import PoolHandle, attach_device_pool

    pool = attach_device_pool(CFG, msgspec.msgpack.decode(handle_bytes, type=PoolHandle))
    pool.tensor[1, 0, 5].fill_(value)
    torch.cuda.synchronize()
    pool.close()
    conn.send("done")


@pytest.mark.parametrize("stable", [False, True], ids=["ipc-handle", "stable-addresses"])
def test_one_pool_is_shared_with_every_attacher_and_really_freed(instance: str, stable: bool) -> None:
    import msgspec

    from mpkv import cudaext
    from mpkv.pool import allocate_device_pool
    from mpkv.shm.registry import Registry

    if stable and cudaext.missing():
        pytest.skip(cudaext.missing())
    cfg = CacheConfig(**(CFG.__dict__ | {"stable_addresses": stable}))
    reg = Registry.create(instance)
    try:
        pool = allocate_device_pool(reg, cfg, rank=0, epoch=1, weight_version=1)
        address = pool.tensor.data_ptr()
        # one handle for all: the transfer manager, the messager, a link, or the same one twice
        for value in (3.0, 5.0, 7.0):
            parent, child = CTX.Pipe()
            p = CTX.Process(target=_attach_and_write, args=(msgspec.msgpack.encode(pool.handle()), value, child))
            p.start()
            assert parent.poll(120) and parent.recv() == "done"
            p.join(60)
            assert p.exitcode == 0
            assert float(pool.tensor[1, 0, 5].float().mean()) == value  # written through the other process's mapping
        released = pool.free()
        assert released >= cfg.pool_bytes(cfg.device_blocks)  # NVML (or cudaMemGetInfo): the memory came back
        again = allocate_device_pool(reg, cfg, rank=0, epoch=2, weight_version=1)
        if stable:
            assert again.tensor.data_ptr() == address  # the next epoch's pool is at the same address
        again.free()
    finally:
        reg.destroy()


@pytest.mark.parametrize(
    ("owner", "stable"), [("worker", False), ("transfer", False), ("worker", True)], ids=["worker", "transfer", "vmm"]
)
def test_cuda_instance_cycles_and_swaps(instance: str, owner: str, stable: bool) -> None:
    from mpkv import cudaext

    if stable and cudaext.missing():
        pytest.skip(cudaext.missing())
    gen = np.random.default_rng(0)
    extra: dict[str, str | bool | int] = {"backend": "cuda", "stable_addresses": stable, "device_blocks": 16384}
    with Launched(instance, tp=1, owner=owner, **extra), Controller(instance) as ctl, Client(instance) as client:
        wv = ctl.weight_version
        for _ in range(3):
            blocks = gen.permutation(client.cfg.device_blocks)[:3].astype(np.int32)
            tokens = prefill_and_verify(client, gen, blocks, wv)
            slots = client.wait(client.swap_out(blocks))[0].slots
            verify(client, tokens, slots, wv, host=True)
            ctl.pause()
            res = ctl.clear()  # a MemoryHeld if NVML sees the pool still held by any process
            assert res.released_bytes[f"{owner} r0"] >= client.cfg.pool_bytes(client.cfg.device_blocks)
            wv += 1
            ctl.restore(wv)
            ctl.resume()
        ctl.shutdown()
