"""Client.wait against a real instance: a wait that times out half-way (one rank's completion read, another's
not there yet) loses nothing; a later wait returns every rank's completion."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest
from instances import shared_instance

import mpkv.client
from mpkv.client import BadTicket, Client, Ticket
from mpkv.errors import WaitTimeout
from mpkv.protocol import Role, actor_slot
from mpkv.shm.ring import RingReader

# Its tests share one launched instance (a module fixture): under -n they run on one worker.
pytestmark = pytest.mark.xdist_group("client_wait")


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    """The instance this module's tests share (tp=2): each leaves every actor running as it found it."""
    with shared_instance(tp=2) as inst:
        yield inst.name


def test_a_wait_that_times_out_on_one_rank_keeps_the_other_ranks_completion(served: str) -> None:
    with Client(served) as client:
        stopped = client.inst.status.read(actor_slot(Role.TRANSFER, 1)).writer.pid
        os.kill(stopped, signal.SIGSTOP)  # transfer r1 reads nothing until SIGCONT: its completion cannot come
        try:
            ticket = client.read_blocks(np.array([0, 1]))
            # Poll until a wait got past rank 0 (its completion was read) and timed out on rank 1: the window in
            # which a wait used to drop rank 0's completion. The deadline only catches a hang.
            deadline = time.monotonic() + 60
            while True:
                assert time.monotonic() < deadline, "rank 0's completion never arrived"
                with pytest.raises(WaitTimeout) as timed_out:
                    client.wait(ticket, timeout_s=0.05)
                if "transfer r1" in str(timed_out.value):
                    break
                assert "transfer r0" in str(timed_out.value), timed_out.value
        finally:
            os.kill(stopped, signal.SIGCONT)
        dones = client.wait(ticket, timeout_s=60)
        assert [d.rank for d in dones] == [0, 1]
        assert all(d.seq == ticket.seq and not d.error and len(d.data) > 0 for d in dones)


def test_polling_waits_lose_no_completion(served: str) -> None:
    """The issue's reproduction: tickets polled by waits of 0.1 ms, one at a time right after each is
    submitted, then any left over in turn until each is complete. Transfer r1 runs niced on this process's
    core, so its completion often comes later than rank 0's: the window a wait used to lose rank 0's in."""
    with Client(served) as client:
        slow = client.inst.status.read(actor_slot(Role.TRANSFER, 1)).writer.pid
        core = {min(os.sched_getaffinity(0))}
        mine, its_cores = os.sched_getaffinity(0), os.sched_getaffinity(slow)
        its_nice = os.getpriority(os.PRIO_PROCESS, slow)
        os.setpriority(os.PRIO_PROCESS, slow, 19)
        os.sched_setaffinity(slow, core)
        os.sched_setaffinity(0, core)
        tickets: list[Ticket] = []
        done: dict[int, list[int]] = {}
        timeouts = 0

        def poll(i: int) -> None:
            nonlocal timeouts
            try:
                done[i] = [d.rank for d in client.wait(tickets[i], timeout_s=1e-4)]
            except WaitTimeout:
                timeouts += 1

        try:
            for i in range(12):
                tickets.append(client.read_blocks(np.arange(8) + 8 * (i % 8)))
                for _ in range(20):
                    if i not in done:
                        poll(i)
            deadline = time.monotonic() + 30  # catches a hang (a lost completion) only
            while len(done) < len(tickets):
                assert time.monotonic() < deadline, f"tickets never completed: {sorted(set(range(12)) - set(done))}"
                for i in sorted(set(range(len(tickets))) - set(done)):
                    poll(i)
        finally:
            os.sched_setaffinity(0, mine)
            os.sched_setaffinity(slow, its_cores)  # the instance is shared: as it was
            os.setpriority(os.PRIO_PROCESS, slow, its_nice)
        assert all(ranks == [0, 1] for ranks in done.values()), done
        print(f"{timeouts} waits timed out on the way")


def test_wait_refuses_what_is_not_its_ticket(served: str) -> None:
    with Client(served) as client:
        ticket = client.read_blocks(np.array([0]))
        for bad in (None, 7, "ticket", (Role.TRANSFER, ticket.seq)):
            with pytest.raises(BadTicket, match="expected a Ticket"):
                client.wait(bad)  # type: ignore[arg-type]
        with pytest.raises(BadTicket, match="was not submitted by this client"):
            client.wait(Ticket(Role.TRANSFER, ticket.seq ^ 1 << 40, "another client's"))
        with pytest.raises(BadTicket, match="was not submitted by this client"):
            client.wait(Ticket(Role.MESSAGER, ticket.seq, "forged"))
        with pytest.raises(BadTicket, match="use wait for it"):
            client.wait_send(ticket)
        for timeout in (0, -1, float("nan"), float("inf"), "5", True):
            with pytest.raises(ValueError, match="timeout_s must be a positive, finite number"):
                client.wait(ticket, timeout_s=timeout)  # type: ignore[arg-type]
        assert [d.rank for d in client.wait(ticket)] == [0, 1]  # none of the refusals read or lost anything


def test_a_spinning_swap_wait_keeps_its_deadline_and_loses_nothing(
    served: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the swap wait's spin on (NOTE [ a swap's wait spins for its expected time ]) and sized far past the
    wait's deadline, the wait spins no longer than its deadline, names the rank it waited for, and keeps what it
    read."""
    monkeypatch.setattr(mpkv.client, "SPIN_CAP_S", 1e6)
    timeout_s = 0.5
    with Client(served) as client:
        client._swap_rate = 1.0  # bytes/s: the expected time is far past any deadline
        spins: list[float] = []
        for ring in client._done.values():

            def spin_for(spin_s: float, ring: RingReader = ring) -> bool:
                spins.append(spin_s)
                assert spin_s <= timeout_s, f"a spin of {spin_s:g} s in a wait of {timeout_s:g} s"
                return RingReader.spin_for(ring, spin_s)

            monkeypatch.setattr(ring, "spin_for", spin_for)
        stopped = client.inst.status.read(actor_slot(Role.TRANSFER, 1)).writer.pid
        os.kill(stopped, signal.SIGSTOP)
        try:
            ticket = client.swap_out(np.array([5, 6]))
            with pytest.raises(WaitTimeout, match=r"no completion from transfer r[01]"):
                client.wait(ticket, timeout_s=timeout_s)
        finally:
            os.kill(stopped, signal.SIGCONT)
        assert spins, "the wait never spun"
        monkeypatch.setattr(mpkv.client, "SPIN_CAP_S", 0.0)  # the waits below sleep as by default
        dones = client.wait(ticket, timeout_s=60)
        slots = dones[0].slots
        assert [d.rank for d in dones] == [0, 1] and slots is not None and len(slots) == 2
        client.wait(client.swap_in(slots, np.array([5, 6])), timeout_s=60)  # the slots are free again


def test_slots_of_takes_only_its_tickets_completions() -> None:
    """slots_of splits a swap-out batch's slots per request only from that ticket's completions, one per rank and
    as many slots as the batch asked for; anything else is a BadTicket that says what it got."""
    from mpkv.protocol import Done

    ticket = Ticket(Role.TRANSFER, 7, "swap_out batch", parts=(2, 3))
    slots = np.arange(5)
    good = [Done(7, 0, slots=slots), Done(7, 1, slots=slots.copy())]
    assert [s.tolist() for s in Client.slots_of(ticket, good)] == [[0, 1], [2, 3, 4]]
    with pytest.raises(BadTicket, match=r"this ticket's completions, one per rank; got \(task, rank\) \[\(9, 0\)"):
        Client.slots_of(ticket, [Done(9, 0, slots=slots), Done(9, 1, slots=slots)])  # another task's
    with pytest.raises(BadTicket, match="one per rank"):
        Client.slots_of(ticket, [good[0], good[0]])  # rank 0 twice
    with pytest.raises(BadTicket, match="carries 7 host slots, the batch asked for 5"):
        Client.slots_of(ticket, [Done(7, 0, slots=np.arange(7))])
    with pytest.raises(BadTicket, match="the list of completions wait"):
        Client.slots_of(ticket, [])


@pytest.mark.parametrize(
    ("name", "value"), [("MPKV_SWAP_SPIN_US", "nan"), ("MPKV_SWAP_SPIN_US", "1e9"), ("MPKV_COPY_GBPS", "0")]
)
def test_a_bad_swap_knob_is_refused_by_name(name: str, value: str) -> None:
    """The swap wait's knobs are checked when mpkv.client is imported: a spin without a bound, or a copy rate of
    zero, is a sentence naming the variable, not a spin of half an hour or a ZeroDivisionError at the first swap."""
    import subprocess
    import sys

    env = dict(os.environ, **{name: value})
    out = subprocess.run([sys.executable, "-c", "import mpkv.client"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and f"{name}={value!r}: expected a number of" in out.stderr, out.stderr[-500:]
