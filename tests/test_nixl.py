"""The NIXL receiver (a decode messager) against senders it should not trust: a write lands only with the
lease's token and into the lease's own blocks; a sender that goes away frees its staging region.

The senders run in a spawned child (tests/nixl_peer.py) with the prefill side's own sender code; only the
headers are the test's. NIXL (UCX over loopback) moves host memory: no GPU needed."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pytest
import torch
from instances import Launched
from nixl_peer import sender

from mpkv.client import Client
from mpkv.pd.leases import Lease
from mpkv.pd.nixl import SENDERS
from mpkv.protocol import LeaseState

pytest.importorskip("nixl_cu12", reason="NIXL is an optional extra: pip install 'mpkv[nixl]'")

PD = dict(layers=3, device_blocks=96)
FILL = 7.0  # what the test's sender stages: no pool byte holds it before
STALE = -3.0  # what a stale write of an earlier owner of the region leaves in staging


@contextmanager
def peer(decode: Launched, port: int, cfg_json: str, first_port: int) -> Iterator[Connection]:
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=sender, args=(child_conn, decode.name, port, cfg_json, f"{decode.name}s", first_port))
    proc.start()
    child_conn.close()
    try:
        yield conn
        conn.send(("exit",))
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        conn.close()
    assert proc.exitcode == 0, f"the sender child exited with {proc.exitcode}"


def ask(conn: Connection, *cmd: Any) -> tuple[str, Any]:
    conn.send(cmd)
    assert conn.poll(90), f"the sender child did not answer {cmd[0]} within 90 s"
    return conn.recv()  # type: ignore[no-any-return]


def header(lease: Lease, region: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A write of all of ``lease``'s blocks, layer 0, as the prefill messager would send it."""
    h = {"lease": lease.slot, "gen": lease.gen, "token": lease.token, "layer": 0, "slot": region["slot"]}
    h |= {"blocks": [int(b) for b in lease.blocks], "first": 0, "n": len(lease.blocks)}
    return h | changes


def pool_bytes(d: Client) -> dict[int, torch.Tensor]:
    """Every device block of the decode instance, per rank, as (layers, 2, tokens, heads, dim)."""
    cfg, blocks = d.cfg, np.arange(d.cfg.device_blocks, dtype=np.int32)
    out = {}
    for done in d.wait(d.read_blocks(blocks)):
        t = torch.frombuffer(bytearray(done.data), dtype=cfg.torch_dtype)
        out[done.rank] = t.view(cfg.layers, 2, len(blocks) * cfg.block_size, cfg.heads_per_rank, cfg.head_dim)
    return out


def layer0_filled(pool: torch.Tensor, blocks: np.ndarray, block_size: int) -> torch.Tensor:
    """A rank's pool bytes as they must be after one good write of FILL into layer 0 of ``blocks``."""
    want = pool.clone()
    for b in blocks.tolist():
        want[0, :, b * block_size : (b + 1) * block_size] = FILL
    return want


def test_forged_writes_are_refused_and_land_nothing(instance: str, rng) -> None:
    """A sender that does not hold a lease's token, or holds it but names blocks that are not the lease's (another
    lease's, or past its end), is answered no, and not one byte of the pool changes. The same sender with the
    token and the lease's blocks lands its bytes: the refusals are the checks', not a broken sender."""
    port = 20000 + rng.randrange(20000)
    with Launched(f"{instance}d", role="decode", nixl_port=port, **PD) as dec:
        d = Client(dec.name)
        try:
            before = pool_bytes(d)
            target, other, good = d.allocate("target", 24), d.allocate("other", 24), d.allocate("good", 16)
            with peer(dec, port, d.cfg.to_json(), port + 100) as conn:
                state, region = ask(conn, "hello", 0)
                assert state == "ok", region
                n = len(target.blocks)
                forged = {
                    "a guessed token": header(target, region, token=target.token ^ (1 << 17)),
                    "another lease's blocks": header(target, region, blocks=[int(b) for b in other.blocks]),
                    "blocks past the lease's end": header(target, region, first=1, n=n),
                    "no token": {k: v for k, v in header(target, region).items() if k != "token"},
                    # The lease's own token, numbers that are not integers: used to crash the decode messager.
                    "numbers as strings": {**header(target, region), "first": "0"},
                    "numbers as floats": {**header(target, region), "layer": 0.0},
                    "a digest of other bytes": header(target, region, digest="0" * 32),
                    "a digest that is not a string": header(target, region, digest=7),
                }
                for what, h in forged.items():
                    state, text = ask(conn, "write", 0, h["n"], h, FILL)
                    assert state == "refused", f"{what}: the receiver accepted it ({text})"
                    assert "refused" in text, f"{what}: {text}"
                state, text = ask(conn, "write", 0, len(good.blocks), header(good, region), FILL)
                assert state == "ok", f"the lease's own token and blocks were refused: {text}"
            for lease in (target, other):
                d.allocator.fail(lease, "the test is done with it")
                d.allocator.release(lease)
            assert d.allocator.complete([good]) == "" and good.state == LeaseState.COMPLETE
            after = pool_bytes(d)
            want = layer0_filled(before[0], good.blocks, d.cfg.block_size)  # rank 0's receiver took the good write
            assert torch.equal(after[0].view(torch.uint8), want.view(torch.uint8)), "rank 0's pool changed elsewhere"
            assert torch.equal(after[1].view(torch.uint8), before[1].view(torch.uint8)), "rank 1's pool changed"
        finally:
            d.close()


def test_a_stale_write_under_a_valid_header_is_refused_and_lands_nothing(instance: str, rng) -> None:
    """A sender whose staged bytes were overwritten after it hashed them (what a stalled earlier owner of its
    region does with a late one-sided write) is refused: the header is the lease's own, the bytes are not those it
    vouches for, and not one byte of the pool changes. The same lease's next write, with its own bytes, lands."""
    port = 20000 + rng.randrange(20000)
    with Launched(f"{instance}d", role="decode", nixl_port=port, **PD) as dec:
        d = Client(dec.name)
        try:
            before = pool_bytes(d)
            lease = d.allocate("target", 24)
            with peer(dec, port, d.cfg.to_json(), port + 100) as conn:
                state, region = ask(conn, "hello", 0)
                assert state == "ok", region
                n = len(lease.blocks)
                state, text = ask(conn, "write", 0, n, header(lease, region, layer=1), FILL, STALE)
                assert state == "refused", f"a stale write under the lease's header landed ({text})"
                assert "digest differs" in text and "nothing landed" in text, text
                state, text = ask(conn, "write", 0, n, header(lease, region), FILL)
                assert state == "ok", f"the lease's own bytes were refused after the stale write: {text}"
            assert d.allocator.complete([lease]) == "" and lease.state == LeaseState.COMPLETE
            after = pool_bytes(d)
            want = layer0_filled(before[0], lease.blocks, d.cfg.block_size)  # layer 1 as it was
            assert torch.equal(after[0].view(torch.uint8), want.view(torch.uint8)), "rank 0's pool: stale bytes landed"
            assert torch.equal(after[1].view(torch.uint8), before[1].view(torch.uint8)), "rank 1's pool changed"
        finally:
            d.close()


def test_a_sender_that_goes_away_frees_its_region(instance: str, rng) -> None:
    """SENDERS senders hold every staging region: one more is refused, naming them. Once one of them closes its
    link (it says bye), the refused sender connects."""
    port = 20000 + rng.randrange(20000)
    with Launched(f"{instance}d", role="decode", nixl_port=port, **PD) as dec:
        d = Client(dec.name)
        try:
            with peer(dec, port, d.cfg.to_json(), port + 100) as conn:
                regions = {}
                for k in range(SENDERS):
                    state, regions[k] = ask(conn, "hello", k)
                    assert state == "ok", regions[k]
                assert len({r["slot"] for r in regions.values()}) == SENDERS, "two senders share a region"
                state, text = ask(conn, "hello", SENDERS)
                assert state == "refused" and f"already serves {SENDERS} senders" in text, text
                assert ask(conn, "close", 1) == ("ok", None)
                state, region = ask(conn, "hello", SENDERS)
                assert state == "ok", f"the region of the sender that closed was not freed: {region}"
                assert region["slot"] == regions[1]["slot"]
        finally:
            d.close()
