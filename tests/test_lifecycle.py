"""The KV pool life cycle and the RL transaction against real launched instances (seed 001's scenarios)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from instances import back_to_serving, prefill_and_verify, shared_instance, verify

from mpkv.blocks import BadBlocks, BadTask
from mpkv.client import Client, InstanceNotServing, TaskFailed
from mpkv.controller import CommandRefused, Controller
from mpkv.errors import AttachError
from mpkv.instance import CONTROL_COMMAND
from mpkv.naming import list_names
from mpkv.protocol import ActorState, Prefill, Role, SwapIn, SwapOut

OWNERS = ["worker", "transfer"]

# Its tests share launched instances (module fixtures): under -n they run on one worker.
pytestmark = pytest.mark.xdist_group("lifecycle")


@pytest.fixture(autouse=True)
def _serving_after(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    back_to_serving(request, "owned", "single")


# Launching is the slow part of these tests: they share one instance per kind (each test leaves it serving, as it
# found it; its SHUTDOWN at the module's end must go through, and nothing of it may be left).
@pytest.fixture(scope="module", params=OWNERS)
def owned(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(name, pool owner) of an instance at tp=2 whose device pools that role owns."""
    with shared_instance(tp=2, owner=request.param) as inst:
        yield inst.name, request.param


@pytest.fixture(scope="module")
def single() -> Iterator[str]:
    """An instance at tp=1, with more device blocks than a completion carries."""
    with shared_instance(tp=1, device_blocks=2048) as inst:
        yield inst.name


def test_clear_with_attached_peers_releases_the_memory(owned: tuple[str, str]) -> None:
    instance, owner = owned
    with Controller(instance) as ctl:
        pools_before = [n for n in list_names() if ".pool." in n and instance in n]
        assert len(pools_before) == 4  # device + host, 2 ranks
        ctl.pause()
        res = ctl.clear()
        assert not res.already
        cfg = ctl.cfg
        pool_bytes = cfg.pool_bytes(cfg.device_blocks)
        owner_name = f"{owner} r0"
        assert res.released_bytes[owner_name] >= pool_bytes, res.released_bytes
        # What the actors measured (their segments' blocks): /dev/shm as a whole also moves with other tests' work.
        assert sum(res.released_bytes.values()) >= 2 * (pool_bytes + cfg.pool_bytes(cfg.host_blocks))
        assert not [n for n in list_names() if ".pool." in n and instance in n], "pool segments survived the clear"
        st = ctl.status()
        assert {a.state for a in st.actors} == {"CLEARED"}
        ctl.restore()
        ctl.resume()


def test_cycles_then_swaps_verify_every_byte(owned: tuple[str, str], rng) -> None:
    instance, _ = owned
    gen = np.random.default_rng(rng.randrange(2**32))
    with Controller(instance) as ctl, Client(instance) as client:
        wv = ctl.weight_version
        for _ in range(3):
            blocks = gen.permutation(client.cfg.device_blocks)[:3].astype(np.int32)
            tokens = prefill_and_verify(client, gen, blocks, wv)
            slots = client.wait(client.swap_out(blocks))[0].slots
            verify(client, tokens, slots, wv, host=True)
            other = gen.permutation(np.setdiff1d(np.arange(client.cfg.device_blocks), blocks))[:3].astype(np.int32)
            client.wait(client.swap_in(slots, other))
            verify(client, tokens, other, wv)
            ctl.pause()
            ctl.clear()
            wv += 1
            ctl.restore(wv)
            ctl.resume()
            # No stale view survived: the new pool is zero where the old KV was, and new KV verifies.
            with pytest.raises(AssertionError, match="KV differs"):
                verify(client, tokens, other, wv)


def test_retries_are_idempotent_and_say_so(single: str) -> None:
    with Controller(single) as ctl:
        wv = ctl.weight_version + 6
        assert ctl.resume().message == "already running"
        assert not ctl.pause().already
        assert ctl.pause().message == "already paused"
        assert not ctl.clear().already
        assert ctl.clear().message == "already cleared"
        assert ctl.clear(host=False).already
        assert not ctl.restore(wv).already
        assert ctl.restore(wv).message == f"already restored (weight version {wv})"
        assert ctl.restore().already
        assert not ctl.resume().already


def test_bad_commands_are_refused_and_change_nothing(instance: str, single: str) -> None:
    with pytest.raises(AttachError, match=f"instance '{instance}' is not running here"):
        Controller(instance)
    with Controller(single) as ctl, Client(single) as client:
        wv = ctl.weight_version
        with pytest.raises(CommandRefused, match="cannot clear a running instance: pause it first"):
            ctl.clear()
        ctl.pause()
        with pytest.raises(
            CommandRefused,
            match=f"cannot restore weight version {wv + 8}: the KV cache of weight version {wv} is still live",
        ):
            ctl.restore(wv + 8)
        with pytest.raises(InstanceNotServing, match="last command is PAUSE"):
            client.swap_out(np.array([1, 2]))
        ctl.clear()
        with pytest.raises(CommandRefused, match="cannot resume: the KV cache is cleared"):
            ctl.resume()
        with pytest.raises(InstanceNotServing, match="last command is CLEAR"):
            client.prefill("r", np.arange(3), np.array([0]))
        st = ctl.status()
        assert st.command.kind == "CLEAR" and st.weight_version == wv
        assert {a.state for a in st.actors} == {"CLEARED"}
        ctl.restore(wv + 1)
        ctl.resume()


def test_bad_blocks_are_refused_before_anything_is_copied(owned: tuple[str, str]) -> None:
    instance, _ = owned
    with Client(instance) as client:
        n = client.cfg.device_blocks
        with pytest.raises(BadBlocks, match=rf"device blocks \[{n}\] out of range: valid ids are 0..{n - 1}"):
            client.swap_out(np.array([0, n]))
        with pytest.raises(BadBlocks, match=r"device blocks \[3\] appear more than once"):
            client.swap_out(np.array([3, 3]))
        # The actors validate too: a client that skips the checks gets the same diagnosis, from every rank.
        bad_out = SwapOut(next(client._seq), np.array([-1], dtype=np.int32))
        with pytest.raises(TaskFailed, match=r"failed on 2 of 2 ranks: rank 0: task \d+: device blocks \[-1\] out of"):
            client.wait(client._submit(Role.TRANSFER, bad_out, "raw swap-out"))
        unowned = SwapIn(next(client._seq), np.array([5], dtype=np.int32), np.array([1], dtype=np.int32))
        with pytest.raises(TaskFailed, match=r"host slots \[5\] hold nothing"):
            client.wait(client._submit(Role.TRANSFER, unowned, "raw swap-in"))
        with pytest.raises(BadTask, match="10 tokens need 2 blocks of 8, got 1"):
            client.prefill("short", np.arange(10), np.array([4]))
        short = Prefill(next(client._seq), "short", np.arange(10, dtype=np.int32), np.array([4], dtype=np.int32))
        with pytest.raises(TaskFailed, match="10 tokens need 2 blocks of 8, got 1"):
            client.wait(client._submit(Role.WORKER, short, "raw prefill"))


def test_a_clear_that_times_out_still_counts_as_a_clear(single: str) -> None:
    """The clear fails at its deadline (one actor is stopped), then completes when it runs again: the instance
    must not look ready, and resume is refused until a restore."""
    import os
    import signal

    from mpkv.controller import StepFailed
    from mpkv.protocol import actor_slot

    with Controller(single) as ctl:
        ctl.pause()
        epoch = ctl.inst.control.read(CONTROL_COMMAND).epoch + 1  # the CLEAR's
        pid = ctl.inst.status.read(actor_slot(Role.TRANSFER, 0)).writer.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(StepFailed, match=f"CLEAR@{epoch} failed: .*did not acknowledge within 1 s"):
                ctl.clear(timeout_s=1)
        finally:
            os.kill(pid, signal.SIGCONT)
        for i in range(3):
            ctl.inst.status.wait(
                i, lambda s: s.at_least(ActorState.CLEARED, epoch), what="the late clear", timeout_s=60
            )
        with pytest.raises(CommandRefused, match="cannot resume: the KV cache is cleared"):
            ctl.resume()
        ctl.restore()
        ctl.resume()


def test_status_while_a_trainer_holds_the_controller(single: str) -> None:
    import subprocess
    import sys

    instance = single
    with Controller(instance) as trainer:
        trainer.pause()  # the trainer's controller now holds the command block
        out = subprocess.run(
            [sys.executable, "-m", "mpkv.cli", "ctl", instance, "status", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        out = subprocess.run(
            [sys.executable, "-m", "mpkv.cli", "ctl", instance, "resume"], capture_output=True, text=True, timeout=60
        )  # a second controller, in another process
        assert out.returncode == 1 and "the command word" in out.stderr and "is written by pid" in out.stderr
        trainer.resume()


def test_reads_larger_than_a_completion_fail_the_task_not_the_instance(single: str) -> None:
    """(The shared instance's SHUTDOWN, after this and the other tests, must go through: the fixture checks.)"""
    with Client(single) as client:
        assert client.cfg.device_blocks == 2048
        with pytest.raises(TaskFailed, match="more than the completion ring carries"):
            client.wait(client.read_blocks(np.arange(2048, dtype=np.int32)))
        client.wait(client.read_blocks(np.arange(4, dtype=np.int32)))  # still serving


def test_a_new_client_never_gets_an_old_clients_results(single: str) -> None:
    first = Client(single)
    for _ in range(300):
        first.read_blocks(np.arange(2, dtype=np.int32))  # never waited for
    first.close()
    with Client(single) as second:
        for _ in range(50):
            (done,) = second.wait(second.read_blocks(np.arange(1, dtype=np.int32)))
            assert len(done.data) == second.cfg.block_bytes, "got the completion of another client's task"


def test_clear_with_swaps_in_flight(owned: tuple[str, str]) -> None:
    """Swaps queued and not waited for, then pause and clear at once: every swap either finished before the
    pool went away or failed explicitly; no actor touched freed memory (none FAILED, the clear released it all),
    and after a restore the instance serves verified KV again."""
    instance, _ = owned
    gen = np.random.default_rng(7)
    with Controller(instance) as ctl, Client(instance) as client:
        wv = ctl.weight_version
        blocks = gen.permutation(client.cfg.device_blocks)[:4].astype(np.int32)
        prefill_and_verify(client, gen, blocks, wv)
        tickets = [client.swap_out(blocks) for _ in range(12)]  # 12 x 4 blocks: fills 48 of 64 host slots
        ctl.pause()
        res = ctl.clear()
        finished = failed = 0
        for t in tickets:
            try:
                client.wait(t)
                finished += 1
            except TaskFailed as e:
                assert "cleared" in str(e) or "host pool full" in str(e), e
                failed += 1
        assert finished + failed == len(tickets) and finished > 0
        assert {a.state for a in ctl.status().actors} == {"CLEARED"}
        assert res.shm_released_bytes >= 2 * client.cfg.pool_bytes(client.cfg.device_blocks)
        ctl.restore()
        ctl.resume()
        prefill_and_verify(client, gen, blocks, wv)  # the instance serves again, same weights


def test_a_batch_of_swaps_is_one_task_and_keeps_its_requests_apart(owned: tuple[str, str], rng) -> None:
    instance, _ = owned
    gen = np.random.default_rng(rng.randrange(2**32))
    with Controller(instance) as ctl, Client(instance) as client:
        wv = ctl.weight_version
        picked = gen.permutation(client.cfg.device_blocks)[:12].astype(np.int32)
        requests, others = [picked[0:2], picked[2:5], picked[5:6]], [picked[6:8], picked[8:11], picked[11:12]]
        tokens = [prefill_and_verify(client, gen, b, wv) for b in requests]
        in_use = [client.inst.usage.read(r).epoch for r in range(client.cfg.tp)]
        n = client.cfg.device_blocks
        # A bad request refuses the whole batch before anything is submitted: no host slot is taken.
        with pytest.raises(BadBlocks, match=rf"request 1: device blocks \[{n}\] out of range"):
            client.swap_out_batch([requests[0], np.array([0, n]), requests[2]])
        twice = rf"\(of all requests together\) \[{requests[0][0]}\] appear more than once"
        with pytest.raises(BadBlocks, match=twice):
            client.swap_out_batch([requests[0], requests[0][:1]])
        with pytest.raises(BadTask, match="non-empty list of requests"):
            client.swap_out_batch([])
        assert [client.inst.usage.read(r).epoch for r in range(client.cfg.tp)] == in_use
        ticket = client.swap_out_batch(requests)
        slots = client.slots_of(ticket, client.wait(ticket))
        assert [len(s) for s in slots] == [len(b) for b in requests]
        for t, s in zip(tokens, slots, strict=True):
            verify(client, t, s, wv, host=True)
        with pytest.raises(BadBlocks, match="request 2: 2 host slots for 1 device blocks"):
            client.swap_in_batch([(slots[0], others[0]), (slots[1], others[1]), (slots[0], others[2])])
        client.wait(client.swap_in_batch(list(zip(slots, others, strict=True))))
        for t, b in zip(tokens, others, strict=True):
            verify(client, t, b, wv)
        assert [client.inst.usage.read(r).epoch for r in range(client.cfg.tp)] == in_use  # the slots are free again
