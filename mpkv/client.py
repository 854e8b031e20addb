"""`mpkv.Client`: the engine's side of an instance: submit tasks, collect every rank's completion.

Tasks go through one broadcast ring per role, read by every rank in the same order (DESIGN I4: the task stream
is the only thing that decides what ranks do). A task is complete when every rank reported; it succeeded only if
every rank succeeded: a task that failed on one rank is failed, with each rank's reason. While the instance is
paused or cleared, new tasks are refused here, with the reason; tasks that raced with a pause are finished or
failed explicitly by the actors.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass

import numpy as np

from mpkv.blocks import check_ids
from mpkv.errors import MpkvError, PeerDied
from mpkv.instance import CONTROL_COMMAND, TASK_ROLES, Instance
from mpkv.protocol import (
    DONE_CODEC,
    ROLES,
    TASK_CODEC,
    ActorState,
    Cmd,
    Done,
    Prefill,
    ReadBlocks,
    Role,
    SwapIn,
    SwapOut,
    actor_slot,
)
from mpkv.shm.ring import RingReader, RingWriter


class InstanceNotServing(MpkvError):
    """The instance is paused, cleared or failed: the task was not submitted."""


class TaskFailed(MpkvError):
    """A task failed on at least one rank; the message lists each failing rank's reason."""

    def __init__(self, message: str, dones: list[Done]) -> None:
        super().__init__(message)
        self.dones = dones


@dataclass(frozen=True)
class Ticket:
    role: Role
    seq: int
    what: str


class Client:
    def __init__(self, name: str) -> None:
        self.inst = Instance.attach(name)
        self.name, self.cfg = name, self.inst.cfg
        self._tasks: dict[Role, RingWriter] = {}
        self._done: dict[tuple[Role, int], RingReader] = {}
        self._early: dict[tuple[Role, int], dict[int, Done]] = {}
        try:
            for role in TASK_ROLES:
                self._tasks[role] = RingWriter(self.inst.task_ring(role), label="client")
                for r in range(self.cfg.tp):
                    reader = RingReader(self.inst.done_ring(role, r), 0, label="client")
                    while reader.try_get() is not None:  # completions of an earlier client's tasks
                        pass
                    self._done[(role, r)] = reader
                    self._early[(role, r)] = {}
        except BaseException:
            self.close()
            raise
        # Sequence numbers carry a per-client session in their top 32 bits: a completion of an earlier client's
        # task (still in flight when it closed) can never be taken for one of ours.
        self._session = secrets.randbits(31) + 1
        self._seq = itertools.count((self._session << 32) + 1)

    # -- tasks --------------------------------------------------------------------------------------------------
    def prefill(self, request: str, tokens: np.ndarray, blocks: np.ndarray) -> Ticket:
        check_ids(blocks, self.cfg.device_blocks, "device blocks")
        seq = next(self._seq)
        task = Prefill(seq, request, np.asarray(tokens, dtype=np.int32), np.asarray(blocks, dtype=np.int32))
        return self._submit(Role.WORKER, task, f"prefill {request!r}")

    def swap_out(self, blocks: np.ndarray) -> Ticket:
        check_ids(blocks, self.cfg.device_blocks, "device blocks")
        seq = next(self._seq)
        return self._submit(Role.TRANSFER, SwapOut(seq, np.asarray(blocks, dtype=np.int32)), "swap-out")

    def swap_in(self, slots: np.ndarray, blocks: np.ndarray, free_slots: bool = True) -> Ticket:
        check_ids(blocks, self.cfg.device_blocks, "device blocks")
        check_ids(slots, self.cfg.host_blocks, "host slots")
        seq = next(self._seq)
        task = SwapIn(seq, np.asarray(slots, dtype=np.int32), np.asarray(blocks, dtype=np.int32), free_slots)
        return self._submit(Role.TRANSFER, task, "swap-in")

    def read_blocks(self, blocks: np.ndarray, host: bool = False) -> Ticket:
        seq = next(self._seq)
        return self._submit(Role.TRANSFER, ReadBlocks(seq, np.asarray(blocks, dtype=np.int32), host), "read")

    def _submit(self, role: Role, task: Prefill | SwapOut | SwapIn | ReadBlocks, what: str) -> Ticket:
        self.check_serving()
        self._tasks[role].put(TASK_CODEC.encode(task), timeout_s=60)
        return Ticket(role, task.seq, what)

    def check_serving(self) -> None:
        cmd = self.inst.control.read(CONTROL_COMMAND)
        if cmd.value not in (Cmd.NONE, Cmd.RESUME):
            raise InstanceNotServing(
                f"instance {self.name} is not serving: the controller's last command is {cmd.value.name} "
                f"(epoch {cmd.epoch}); tasks are refused until resume"
            )
        for rank in range(self.cfg.tp):
            for role in ROLES:
                sig = self.inst.status.read(actor_slot(role, rank))
                if sig.value == ActorState.FAILED:
                    raise InstanceNotServing(f"instance {self.name}: {role.name.lower()} r{rank} has FAILED")

    # -- completions ---------------------------------------------------------------------------------------------
    def wait(self, ticket: Ticket, timeout_s: float = 60.0) -> list[Done]:
        """Every rank's completion of ``ticket``, in rank order; raises TaskFailed if any rank failed."""
        dones = [self._wait_rank(ticket, r, timeout_s) for r in range(self.cfg.tp)]
        bad = [d for d in dones if d.error]
        if bad:
            reasons = "; ".join(f"rank {d.rank}: {d.error}" for d in bad)
            raise TaskFailed(
                f"{ticket.what} (task {ticket.seq}) failed on {len(bad)} of {len(dones)} ranks: {reasons}", dones
            )
        return dones

    def _wait_rank(self, ticket: Ticket, rank: int, timeout_s: float) -> Done:
        key = (ticket.role, rank)
        early = self._early[key]
        while ticket.seq not in early:
            try:
                raw = self._done[key].get(timeout_s=timeout_s)
            except PeerDied as e:
                raise PeerDied(f"{ticket.what} (task {ticket.seq}) lost: {self.inst.culprits()}. ({e})") from None
            done = DONE_CODEC.decode(raw)
            if done.seq >> 32 == self._session:  # else: an earlier client's, dropped
                early[done.seq] = done
        return early.pop(ticket.seq)

    def close(self) -> None:
        for port in [*self._tasks.values(), *self._done.values()]:
            port.close()
        self.inst.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
