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

CFG = CacheConfig(layers=2, kv_heads=2, head_dim=16, block_size=8, device_blocks=32, host_blocks=32, backend="cuda")


def _attach_and_write(handle_bytes: bytes, role: int, value: float, conn) -> None:  # type: ignore[no-untyped-def]
    import msgspec

    from mpkv.pool import PoolHandle, attach_device_pool

    pool = attach_device_pool(CFG, msgspec.msgpack.decode(handle_bytes, type=PoolHandle), role)
    pool.tensor[1, 0, 5].fill_(value)
    torch.cuda.synchronize()
    pool.close()
    conn.send("done")


def test_cuda_ipc_pool_is_shared_and_really_freed(instance: str) -> None:
    import msgspec

    from mpkv.pool import allocate_device_pool
    from mpkv.shm.registry import Registry

    reg = Registry.create(instance)
    try:
        # two attachers, as in an instance (transfer manager and messager beside the owning worker)
        pool = allocate_device_pool(reg, CFG, rank=0, epoch=1, weight_version=1, attachers=(2, 3))
        for role, value in ((2, 3.0), (3, 5.0)):
            parent, child = CTX.Pipe()
            handle = msgspec.msgpack.encode(pool.handle())
            p = CTX.Process(target=_attach_and_write, args=(handle, role, value, child))
            p.start()
            assert parent.poll(120) and parent.recv() == "done"
            p.join(60)
            assert p.exitcode == 0
            assert float(pool.tensor[1, 0, 5].float().mean()) == value  # written through the IPC mapping
        assert pool.free() >= CFG.pool_bytes(CFG.device_blocks)  # measured by cudaMemGetInfo
    finally:
        reg.destroy()


@pytest.mark.parametrize("owner", ["worker", "transfer"])
def test_cuda_instance_cycles_and_swaps(instance: str, owner: str) -> None:
    gen = np.random.default_rng(0)
    extra = {"backend": "cuda"}
    with Launched(instance, tp=1, owner=owner, **extra), Controller(instance) as ctl, Client(instance) as client:
        wv = ctl.weight_version
        for _ in range(3):
            blocks = gen.permutation(client.cfg.device_blocks)[:3].astype(np.int32)
            tokens = prefill_and_verify(client, gen, blocks, wv)
            slots = client.wait(client.swap_out(blocks))[0].slots
            verify(client, tokens, slots, wv, host=True)
            ctl.pause()
            res = ctl.clear()
            # the owner measured (cudaMemGetInfo) the whole device pool coming back: no share left it in limbo
            assert res.released_bytes[f"{owner} r0"] >= client.cfg.pool_bytes(client.cfg.device_blocks)
            wv += 1
            ctl.restore(wv)
            ctl.resume()
        ctl.shutdown()
