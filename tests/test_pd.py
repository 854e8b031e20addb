"""Prefill/decode disaggregation against real launched instances: a prefill instance ships KV layer by layer
into a decode instance's pool; every byte is verified on the decode side (seed 000's scenarios)."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from conftest import new_name
from instances import Launched, shared

from mpkv.blocks import BadTask
from mpkv.client import Client, TransferFailed
from mpkv.controller import Controller
from mpkv.instance import Instance
from mpkv.pd.leases import Lease, LeaseError
from mpkv.protocol import LeaseState, Role, WaitKind, actor_slot
from mpkv.verify import verify_kv

PD = dict(layers=3, device_blocks=96)
GLANCE_S = 1e-6  # a wait of this long reads what is in a completion ring and waits for nothing more
# The tests of the module pairs (shared_pair, slow_pair): under -n they run on one worker, which launches each once.
ON_SHARED_PAIRS = pytest.mark.xdist_group("pd_shared_pairs")


@contextmanager
def pd_pair(name: str, prefill_env: dict[str, str] | None = None) -> Iterator[tuple[Launched, Launched]]:
    with (
        Launched(f"{name}d", role="decode", **PD) as d,
        Launched(f"{name}p", role="prefill", env=prefill_env, **PD) as p,
    ):
        yield p, d


@contextmanager
def shared_pd_pair(prefill_env: dict[str, str]) -> Iterator[tuple[Launched, Launched]]:
    """A pair that the tests of this module share (launching a pair is the slow part of these tests): each test
    leaves it serving, every lease given back, both instances at one weight version; in the end both SHUTDOWNs must
    go through, and nothing is left."""
    name = new_name()
    with shared(f"{name}d", f"{name}p"), pd_pair(name, prefill_env=prefill_env) as (p, d):
        yield p, d
        for inst in (d, p):
            with Controller(inst.name) as ctl:
                ctl.shutdown()
            assert inst.exit_code() == 0, list(inst.lines)[-20:]


@pytest.fixture(scope="module")
def shared_pair() -> Iterator[tuple[Launched, Launched]]:
    """The prefill instance runs with small random per-rank delays (seed 000's race, for every test that uses it),
    their seed printed for a replay."""
    seed = int(os.environ.get("MPKV_TEST_SEED", random.randrange(2**31)))
    print(f"[seed] shared pd pair: MPKV_JITTER_SEED={seed} (replay with MPKV_TEST_SEED={seed})")
    with shared_pd_pair({"MPKV_JITTER_US": "1500", "MPKV_JITTER_SEED": str(seed)}) as pair:
        yield pair


@pytest.fixture(scope="module")
def slow_pair() -> Iterator[tuple[Launched, Launched]]:
    """The prefill instance's ranks wait up to 0.3 s at each point (layer progress, destination, task): a batch is
    in flight long enough for a pause or a clear to land in the middle of it."""
    with shared_pd_pair({"MPKV_JITTER_US": "300000"}) as pair:
        yield pair


class Engine:
    """The engine's side for a test: source blocks of the prefill instance, leases of the decode instance."""

    def __init__(self, prefill: str, decode: str, gen: np.random.Generator) -> None:
        self.p, self.d, self.gen = Client(prefill), Client(decode), gen
        self.cfg = self.p.cfg
        self.free = list(range(self.cfg.device_blocks))
        self.wv = 1

    def request(self, name: str, max_tokens: int = 40) -> tuple[str, np.ndarray, np.ndarray, Lease]:
        n = int(self.gen.integers(1, max_tokens))
        tokens = self.gen.integers(0, self.cfg.vocab, n, dtype=np.int32)
        lease = self.d.allocate(name, n)
        src = np.array([self.free.pop(int(self.gen.integers(len(self.free)))) for _ in lease.blocks], dtype=np.int32)
        return name, tokens, src, lease

    def verify(self, batch: list[tuple[str, np.ndarray, np.ndarray, Lease]]) -> None:
        for request, tokens, _src, lease in batch:
            assert lease.state == LeaseState.COMPLETE
            verify_kv(self.d, tokens, lease.blocks, self.wv, what=f"{request}: the decode copy")

    def done_with(self, batch: list[tuple[str, np.ndarray, np.ndarray, Lease]]) -> None:
        for _, _, src, lease in batch:
            self.d.allocator.release(lease)
            self.free.extend(src.tolist())

    def close(self) -> None:
        self.p.close()
        self.d.close()


def pid_of(launched: Launched, who: str) -> int:
    """The pid the launcher's ready record gives for ``who`` (e.g. "messager:r1")."""
    return launched.pids[who]


def until_waiting(instance: str, role: Role, rank: int, kind: WaitKind, since_ns: int = 0) -> None:
    """Block until that actor publishes a wait of ``kind`` begun after ``since_ns`` (CLOCK_MONOTONIC; its wait
    record, rewritten only when the wait changes; a futex wait, 30 s deadline)."""
    inst = Instance.attach(instance)
    try:
        inst.waits.wait(
            actor_slot(role, rank),
            lambda s: s.value == kind and s.epoch > since_ns,
            what=f"{kind.name} wait",
            timeout_s=30,
        )
    finally:
        inst.close()


def barrier_keys(dones: list) -> dict[int, bytes]:  # type: ignore[type-arg]
    """The messagers' barrier keys (the last tp completions of a send), by rank."""
    keys = {d.rank: d.data for d in dones[len(dones) // 2 :]}
    assert all(keys.values()), f"a messager's completion carries no barrier key: {keys}"
    return keys


@ON_SHARED_PAIRS
def test_layerwise_transfer_lands_every_byte(shared_pair: tuple[Launched, Launched], rng) -> None:
    gen = np.random.default_rng(rng.randrange(2**32))
    p, d = shared_pair
    eng = Engine(p.name, d.name, gen)
    # Bad sends are refused before the ring (the same checks as prefill); the good ones below still land.
    name, tokens, src, lease = eng.request("bad")
    for bad, error in [
        ([(name, tokens, src, lease), (name, tokens, src, lease)], "a lease of its own"),
        ([(name, tokens.astype(np.float64), src, lease)], "cast whole numbers"),
        ([(7, tokens, src, lease)], "must be a str"),
        ([(name, tokens, src.astype(np.float64), lease)], "source blocks must be"),
        ([(name, tokens, src, "lease")], "a batch item is"),
    ]:
        with pytest.raises(BadTask, match=error):
            eng.p.send(eng.d, bad)  # type: ignore[arg-type]
    eng.d.allocator.fail(lease, "never sent")  # nothing was shipped into it: its blocks come back
    eng.done_with([(name, tokens, src, lease)])
    for i in range(6):
        batch = [eng.request(f"b{i}.{j}") for j in range(1 + i % 3)]
        with pytest.raises(LeaseError, match="GRANTED"):
            eng.d.read_blocks(batch[0][3].blocks)  # not readable while in flight
        dones = eng.p.wait_send(eng.p.send(eng.d, batch))
        keys = barrier_keys(dones)
        assert len(set(keys.values())) == 1, f"ranks met at different barrier keys: {keys}"
        eng.verify(batch)
        for _, _, _, lease in batch:  # the decode side sees the lease complete in its shared memory
            assert eng.d.inst.leases.read(lease.slot).value == LeaseState.COMPLETE
        eng.done_with(batch)
    eng.close()


@ON_SHARED_PAIRS
def test_seed_race_randomized_delays(shared_pair: tuple[Launched, Launched], rng) -> None:
    """Seed 000: ranks see destination info, layer progress and tasks at different times. With random per-rank
    delays at each of those points (the shared pair's), 200 batches of random size: no hang, same barrier keys,
    every byte lands."""
    gen = np.random.default_rng(rng.randrange(2**32))
    p, d = shared_pair
    eng = Engine(p.name, d.name, gen)
    trials, sequences = 200, []
    for i in range(trials):
        batch = [eng.request(f"t{i}.{j}", max_tokens=24) for j in range(int(gen.integers(1, 4)))]
        dones = eng.p.wait_send(eng.p.send(eng.d, batch), timeout_s=30)
        sequences.append(barrier_keys(dones))
        eng.verify(batch)
        eng.done_with(batch)
    per_rank = {r: [s[r] for s in sequences] for r in range(eng.cfg.tp)}
    assert per_rank[0] == per_rank[1], "the ranks' barrier key sequences differ"
    assert len(per_rank[0]) == trials
    eng.close()


def test_rank_divergent_batch_is_a_protocol_error(instance: str, rng) -> None:
    """A test hook makes rank 1 key its second batch as if it had split it (the reference's bug): both ranks
    get a ProtocolError naming the ranks and keys, long before the 60 s deadline; the lease fails."""
    gen = np.random.default_rng(rng.randrange(2**32))
    with pd_pair(instance, prefill_env={"MPKV_DIVERGE": "1:2"}) as (p, d):
        eng = Engine(p.name, d.name, gen)
        first = [eng.request("ok.0"), eng.request("ok.1")]
        eng.p.wait_send(eng.p.send(eng.d, first))
        eng.verify(first)
        batch = [eng.request("split.0"), eng.request("split.1")]
        with pytest.raises(TransferFailed) as err:
            eng.p.wait_send(eng.p.send(eng.d, batch), timeout_s=50)
        text = str(err.value)
        assert "ProtocolError" in text and "rank 0" in text and "rank 1" in text, text
        assert "timed out" not in text and "within 50 s" not in text, f"a hang, not the error at once: {text}"
        for _, _, _, lease in batch:
            assert lease.state == LeaseState.FAILED
            assert eng.d.inst.leases.read(lease.slot).value == LeaseState.FAILED
        assert p.exit_code() == 1  # a protocol error fails the prefill instance, loudly
        eng.close()


@pytest.mark.parametrize("victim", ["prefill:messager", "prefill:worker", "decode:worker"])
def test_kill_9_mid_transfer_fails_the_transfer(instance: str, rng, victim: str) -> None:
    """kill -9 of an actor while a batch is in flight: the batch is reported failed with the dead actor named,
    its leases fail on the decode side, nothing leaks. An injected hang on rank 1 (the victim itself, or for the
    decode worker, the prefill worker r1) holds the batch; the kill comes once the survivors publish that they
    wait, so it lands mid-transfer."""
    side, role = victim.split(":")
    gen = np.random.default_rng(rng.randrange(2**32))
    held = "worker" if side == "decode" else role  # decode: prefill worker r1 holds the batch mid-transfer
    env = {"MPKV_FAULT": f"{held}:1:task:hang"}
    with pd_pair(instance, prefill_env=env) as (p, d):
        eng = Engine(p.name, d.name, gen)
        batch = [eng.request("doomed.0"), eng.request("doomed.1")]
        ticket = eng.p.send(eng.d, batch)
        if role == "messager":
            until_waiting(p.name, Role.MESSAGER, 0, WaitKind.BARRIER)  # rank 0 shipped; rank 1 is held
        else:
            until_waiting(p.name, Role.MESSAGER, 1, WaitKind.PROGRESS)  # mid-batch on rank 1
        target = p if side == "prefill" else d
        os.kill(pid_of(target, f"{role}:r1"), signal.SIGKILL)
        with pytest.raises(TransferFailed) as err:
            eng.p.wait_send(ticket, timeout_s=5 if side == "decode" else 50)
        text = str(err.value)
        assert "died" in text or "dead" in text or "gone" in text, text
        if side == "decode":  # the held prefill worker never finished: said so, its source blocks stay in use
            assert f"decode instance {d.name!r}" in text and "worker r1" in text, text
        for _, _, _, lease in batch:
            assert lease.state == LeaseState.FAILED, lease
        assert target.exit_code() == 1
        eng.close()


@ON_SHARED_PAIRS
def test_decode_clear_with_transfers_in_flight(slow_pair: tuple[Launched, Launched], rng) -> None:
    """RL on PD: the decode instance pauses and clears while a batch is being shipped into it. The clear
    finishes (the links let go of the pool), the batch is reported failed, and after restore new transfers land."""
    gen = np.random.default_rng(rng.randrange(2**32))
    p, d = slow_pair
    eng = Engine(p.name, d.name, gen)
    with Controller(d.name) as dctl, Controller(p.name) as pctl:
        eng.wv = old = dctl.weight_version
        new = old + 2
        batch = [eng.request("inflight.0"), eng.request("inflight.1")]
        ticket = eng.p.send(eng.d, batch)
        until_waiting(p.name, Role.MESSAGER, 0, WaitKind.PROGRESS)  # the link is open, layers are coming
        dctl.pause()
        res = dctl.clear()
        assert sum(res.released_bytes.values()) > 0
        with pytest.raises(TransferFailed) as err:
            eng.p.wait_send(ticket, timeout_s=50)
        # Either a messager let go mid-batch, or (if its layers all came in time) the pool was gone at the end.
        text = str(err.value)
        assert "while the batch was being shipped" in text or "shipped, but" in text, text
        for _, _, src, lease in batch:
            assert lease.state == LeaseState.FAILED
            eng.free.extend(src.tolist())
        dctl.restore(new)
        dctl.resume()
        # The decode instance now serves weight version new; KV from the prefill's version old is refused (I7).
        stale = [eng.request("stale.0")]
        with pytest.raises(TransferFailed, match="weight version"):
            eng.p.wait_send(eng.p.send(eng.d, stale), timeout_s=50)
        assert stale[0][3].state == LeaseState.FAILED
        eng.done_with(stale)
        # The prefill instance takes its RL step too: its KV now comes from weight version new as well.
        pctl.pause()
        pctl.clear()
        pctl.restore(new)
        pctl.resume()
        eng.wv = new
        after = [eng.request("after.0")]
        eng.p.wait_send(eng.p.send(eng.d, after), timeout_s=50)
        eng.verify(after)
        assert all(lease.state == LeaseState.FREE for lease in [b[3] for b in batch]), "old leases not returned"
        eng.done_with(after)
    eng.close()


@ON_SHARED_PAIRS
@pytest.mark.parametrize("when", ["shipped", "in_flight"])
def test_decode_clear_restore_before_wait_send(
    shared_pair: tuple[Launched, Launched], slow_pair: tuple[Launched, Launched], rng, when: str
) -> None:
    """The decode instance clears and restores its pool after a batch was shipped into it (every prefill messager
    reported) or while it is being shipped, before the engine's wait_send. wait_send fails the batch naming the
    clear (never a LeaseError of the allocator), the allocator takes each lease back exactly once (every block
    free once), the client keeps no record of the batch, and the next lease, send and wait_send land."""
    gen = np.random.default_rng(rng.randrange(2**32))
    p, d = shared_pair if when == "shipped" else slow_pair
    eng = Engine(p.name, d.name, gen)
    with Controller(d.name) as dctl:
        eng.wv = dctl.weight_version
        for r in range(eng.cfg.tp):  # idle before the send: a later idle record means the batch is reported
            until_waiting(p.name, Role.MESSAGER, r, WaitKind.COMMAND)
        t0 = time.monotonic_ns()
        batch = [eng.request("gone.0"), eng.request("gone.1")]
        ticket = eng.p.send(eng.d, batch)
        if when == "shipped":
            for r in range(eng.cfg.tp):
                until_waiting(p.name, Role.MESSAGER, r, WaitKind.COMMAND, since_ns=t0)
        else:
            until_waiting(p.name, Role.MESSAGER, 0, WaitKind.PROGRESS)
        dctl.pause()
        dctl.clear()
        dctl.restore()
        dctl.resume()
        with pytest.raises(TransferFailed, match="clear") as err:
            eng.p.wait_send(ticket, timeout_s=50)
        assert "still in use" not in str(err.value), err.value
        assert ticket.seq not in eng.p._sends, "the client kept a record of a settled batch"
        for _, _, src, lease in batch:
            assert lease.state == LeaseState.FREE, lease
            eng.d.allocator.release(lease)  # the allocator took it back already: a second release changes nothing
            eng.free.extend(src.tolist())
        free = eng.d.allocator.blocks._free  # (the decode client's one free list since Client.blocks)
        assert sorted(free) == list(range(eng.cfg.device_blocks)), "a block was returned twice, or never"
        after = [eng.request("after.0"), eng.request("after.1")]
        eng.p.wait_send(eng.p.send(eng.d, after), timeout_s=50)
        eng.verify(after)
        eng.done_with(after)
    eng.close()


def test_cross_host_path_over_loopback(instance: str, rng) -> None:
    """The NIXL transport (UCX over loopback moves host memory): the same batches, the same decode-side check."""
    pytest.importorskip("nixl_cu12", reason="NIXL is an optional extra: pip install 'mpkv[nixl]'")
    gen = np.random.default_rng(rng.randrange(2**32))
    port = 20000 + rng.randrange(20000)
    with (
        Launched(f"{instance}d", role="decode", nixl_port=port, **PD) as d,
        Launched(f"{instance}p", role="prefill", nixl_port=port + 10, **PD) as p,
    ):
        eng = Engine(p.name, d.name, gen)
        for i in range(4):
            batch = [eng.request(f"x{i}.{j}") for j in range(1 + i % 2)]
            dones = eng.p.wait_send(eng.p.send(eng.d, batch, via=f"nixl://127.0.0.1:{port}"), timeout_s=60)
            assert len(set(barrier_keys(dones).values())) == 1
            eng.verify(batch)
            eng.done_with(batch)
        eng.close()


@ON_SHARED_PAIRS
def test_prefill_pause_drains_transfers_in_flight(slow_pair: tuple[Launched, Launched], rng) -> None:
    """RL on PD, the prefill side: a pause with a batch in flight returns once the batch is shipped (drained),
    the batch is complete and verified, and after clear/restore the new weights' KV lands on decode."""
    gen = np.random.default_rng(rng.randrange(2**32))
    p, d = slow_pair
    eng = Engine(p.name, d.name, gen)
    with Controller(p.name) as pctl:
        eng.wv = pctl.weight_version
        new = eng.wv + 1
        batch = [eng.request("drained.0"), eng.request("drained.1")]
        ticket = eng.p.send(eng.d, batch)
        until_waiting(p.name, Role.MESSAGER, 0, WaitKind.PROGRESS)
        pctl.pause()  # drains: every task read before the pause is finished
        # so the completions are there already: a glance at the rings finds them, nothing is waited for
        dones = eng.p.wait_send(ticket, timeout_s=GLANCE_S)
        assert len(set(barrier_keys(dones).values())) == 1
        eng.verify(batch)
        eng.done_with(batch)
        pctl.clear()
        pctl.restore(new)
        pctl.resume()
        with Controller(d.name) as dctl:  # both sides move to the new weights
            dctl.pause()
            dctl.clear()
            dctl.restore(new)
            dctl.resume()
        eng.wv = new
        after = [eng.request("after.0"), eng.request("after.1")]
        eng.p.wait_send(eng.p.send(eng.d, after), timeout_s=50)
        eng.verify(after)
        eng.done_with(after)
    eng.close()


def test_a_transfer_that_times_out_keeps_its_blocks_until_settled(instance: str, rng) -> None:
    """A batch held up past the caller's deadline fails, but its blocks stay in use (release refuses) until every
    messager reported or died: a late copy can never land in blocks the decode side gave to someone else.

    And wait_send's timeout bounds the whole call, not each rank: with worker r1 stuck (and the messagers waiting
    for it), only the first rank that has not reported is waited for; by then the one deadline has passed, so
    every later one is only glanced at, and the failure says so. (Each rank used to get a full timeout of its own:
    up to 2 * tp timeouts in all.)"""
    gen = np.random.default_rng(rng.randrange(2**32))
    with pd_pair(instance, prefill_env={"MPKV_FAULT": "worker:1:task:hang"}) as (p, d):
        eng = Engine(p.name, d.name, gen)
        batch = [eng.request("slow.0")]
        lease = batch[0][3]
        ticket = eng.p.send(eng.d, batch)
        with pytest.raises(TransferFailed, match="still in use") as err:
            eng.p.wait_send(ticket, timeout_s=1)
        text = str(err.value)
        late = text.count("within 1 s")
        assert late >= 2, f"fewer than two ranks late, nothing to show: {text}"
        assert text.count("timed out after") == 1, f"more than one rank was waited for on its own: {text}"
        assert text.count("past the one deadline of this wait") == late - 1, text
        assert lease.state == LeaseState.FAILED
        with pytest.raises(LeaseError, match="may still be written"):
            eng.d.allocator.release(lease)
        os.kill(pid_of(p, "worker:r1"), signal.SIGKILL)  # the stuck worker goes: the batch can settle now
        with pytest.raises(TransferFailed) as err:
            eng.p.wait_send(ticket, timeout_s=50)
        assert "still in use" not in str(err.value), err.value
        eng.d.allocator.release(lease)  # settled: the blocks are the allocator's again
        assert p.exit_code() == 1
        eng.close()


def test_an_exception_on_one_rank_fails_the_batch_not_the_instance(instance: str, rng) -> None:
    """An unexpected exception while shipping on one rank (injected on messager r1 at every batch) fails that
    batch with the exception named; the ranks still meet at every barrier, so the next batch is handled alike."""
    gen = np.random.default_rng(rng.randrange(2**32))
    with pd_pair(instance, prefill_env={"MPKV_FAULT": "messager:1:ship:raise"}) as (p, d):
        eng = Engine(p.name, d.name, gen)
        for i in range(3):
            batch = [eng.request(f"boom{i}.0"), eng.request(f"boom{i}.1")]
            with pytest.raises(TransferFailed, match="messager r1: RuntimeError: fault injection at ship"):
                eng.p.wait_send(eng.p.send(eng.d, batch), timeout_s=50)
            assert all(b[3].state == LeaseState.FAILED for b in batch)
            eng.done_with(batch)
        assert p.proc.poll() is None, "the prefill instance went down over a failed batch"
        eng.close()
